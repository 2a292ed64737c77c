"""Server settings: every field from an environment variable (ACS_<NAME>) or a CLI flag."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    weights_dir: str = "weights"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 where fast and the manifest says it holds, else float32
    runtime: str = "auto"  # auto: OpenVINO on the CPU where installed, else torch
    default_model: str = ""  # empty: the manifest marked default, else the first by name
    threads: int = 1  # torch intra-op threads on the CPU
    max_batch_size: int = 8
    max_queue_delay_ms: float = 0.0  # 0: run as soon as the inference thread is free
    max_queue_size: int = 256  # per model, in images: at least what clients' connections can
    # have outstanding (64 connections x 4 images), so a burst is queued, and admission by
    # deadline, not a small fixed bound, refuses the work that cannot finish in time
    request_timeout_s: float = 30.0  # default deadline; a request's `timeout` may lower it
    max_timeout_s: float = 120.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # decoded pixels per image (decompression bombs)
    max_images_per_request: int = 64
    reject_status: int = 503  # full queue: 503 (with Retry-After) or 429
    api_key: str = ""  # empty: no authentication
    warmup: bool = True
    strict_readiness: bool = True  # ready only when every checkpoint folder loaded
    trim_memory_s: float = 5.0  # give freed memory back to the OS this often (0: never)
    keep_alive_s: float = 75.0  # longer than clients' idle expiry (httpx 5 s): no reuse race
    drain_delay_s: float = 1.0  # after SIGTERM, keep accepting (readiness 503) this long
    graceful_timeout_s: float = 60.0  # after SIGTERM, longest wait for requests in flight
    log_level: str = "info"
    latency_objective_ms: float = 0.0  # 0: off (queue, then refuse)
    model_poll_s: float = 5.0  # look for model folders added, changed or removed (0: never)

    def __post_init__(self) -> None:
        if self.reject_status not in (429, 503):
            raise ValueError("reject_status must be 429 or 503")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError("dtype must be auto, float32 or bfloat16")
        if self.runtime not in ("auto", "openvino", "torch"):
            raise ValueError("runtime must be auto, openvino or torch")
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")


HELP = {
    "weights_dir": "folder of checkpoints, one sub-folder per model",
    "host": "address to bind",
    "port": "port to bind",
    "device": "cpu, cuda, cuda:N or auto",
    "dtype": "float32, bfloat16, or auto: bfloat16 where the device has it fast and the model's "
             "manifest records its top-1 holds (acs-train precision)",
    "runtime": "what runs models that come as dense variants (the default model, dense "
               "baselines): openvino (CPU), torch, or auto (OpenVINO on the CPU where installed)",
    "default_model": "model served by /v1/predict",
    "threads": "torch intra-op threads on the CPU",
    "max_batch_size": "largest dynamic batch, in images",
    "max_queue_delay_ms": "longest a request waits for a batch to fill",
    "max_queue_size": "queued images per model before requests are refused",
    "request_timeout_s": "default per-request deadline",
    "max_timeout_s": "largest deadline a request may ask for",
    "max_body_bytes": "largest request body",
    "max_pixels": "largest decoded image, in pixels",
    "max_images_per_request": "most images in one request",
    "reject_status": "status for a full queue: 503 or 429",
    "api_key": "require this key (Authorization: Bearer or X-API-Key) on /v1 and /v2/models",
    "warmup": "run each batch-size bucket once before reporting ready",
    "strict_readiness": "ready only when every model folder loaded (false: when one did)",
    "trim_memory_s": "give freed native memory back to the OS (glibc malloc_trim) every this "
                     "many seconds; 0: never",
    "keep_alive_s": "close an idle keep-alive connection after this long (longer than the "
                    "clients' and load balancers' idle timeouts, so they close first)",
    "drain_delay_s": "after SIGTERM, keep accepting connections (readiness 503) this long",
    "graceful_timeout_s": "after SIGTERM, longest wait for the requests in flight",
    "log_level": "uvicorn log level",
    "latency_objective_ms": "per model, the server-side latency to keep: when queued work would "
                            "miss it, run the next images at lower budgets, never below a "
                            "request's min_budget; 0: off",
    "model_poll_s": "look for model folders added, changed or removed under the weights folder "
                    "this often, in seconds, and serve, reload or retire them; 0: never",
}


def _parse(kind: type, value: str):
    if kind is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    return kind(value)


def _types() -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(Settings)}


def from_env(environ=os.environ, **overrides) -> Settings:
    """Settings from ACS_* environment variables, then explicit overrides."""
    values = {}
    for name, kind in _types().items():
        raw = environ.get(f"ACS_{name.upper()}")
        if raw is not None:
            values[name] = _parse(kind, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def parse_args(argv=None) -> Settings:
    """CLI flags (--max-batch-size 16 ...) over environment variables over defaults."""
    parser = argparse.ArgumentParser(prog="acs-serve", description="Serve ACS models over HTTP.")
    for name, kind in _types().items():
        flag = "--" + name.replace("_", "-")
        env = f"ACS_{name.upper()}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{HELP[name]} (env {env})")
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"{HELP[name]} (env {env})")
    return from_env(**vars(parser.parse_args(argv)))
