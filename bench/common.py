"""What the benchmark scripts share: loopback ports, a test image, percentiles, starting and
stopping servers, and a freshly initialized checkpoint for timing-only runs."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"class{i}" for i in range(10)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(size: int = 32) -> bytes:
    """A size x size RGB noise image as PNG."""
    buf = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url until it answers 200; fail early if proc exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {seconds:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_weights(root: Path, model: str, factory: str = "acs_densenet40", **config) -> Path:
    """A freshly initialized checkpoint root/model (timings only, no accuracy)."""
    from models.checkpoint import save_checkpoint
    from models.registry import FACTORIES

    save_checkpoint(FACTORIES[factory](**config).eval(), root / model, name=model, classes=CLASSES,
                    provenance={"note": "random weights, for timing only"})
    return root / model


def start_acs_serve(weights: Path, port: int, threads: int = 1, max_batch_size: int = 8,
                    max_queue_size: int = 1024, log=None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python -m service` on 127.0.0.1:port (CPU, no API key); not yet waited for."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACS_API_KEY": ""}
    cmd = [sys.executable, "-m", "service", "--weights-dir", str(weights), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--threads", str(threads),
           "--max-batch-size", str(max_batch_size), "--max-queue-size", str(max_queue_size),
           "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                            cwd=ROOT)
