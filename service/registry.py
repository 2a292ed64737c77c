"""The models a server serves: loaded from a weights folder, each with its own batcher."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.core.budget import POLICIES
from models.core.checkpoint import MANIFEST, CheckpointError, load_checkpoint
from models.engines.precision import serving_dtype
from models.engines.variants import engine_name, executor_for

from .batching import Batcher

log = logging.getLogger("acs_serve")


@dataclass
class ServedModel:
    name: str
    manifest: dict
    model: torch.nn.Module
    batcher: Batcher
    load_seconds: float
    precision: torch.dtype = torch.float32  # what the model computes in
    engine: str = "torch-compact"  # what runs it: openvino, torch (variants), openvino-steps or torch-compact
    warmup_seconds: float = 0.0
    ready: bool = False
    folder: Path | None = None  # the checkpoint folder it came from
    signature: tuple = ()  # that folder's files when loaded (folder_signature)

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def input_size(self) -> int:
        return self.manifest["input"]["size"]

    @property
    def default_budget(self) -> float:
        return self.manifest.get("default", {}).get("budget", 1.0)

    @property
    def default_policy(self) -> str:
        return self.manifest.get("default", {}).get("policy", "threshold")

    def expected_top1(self, budget: float, policy: str) -> float | None:
        """Top-1 on held-out data at this operating point, interpolated between the budgets the
        manifest's evaluation measured (a dense model: its one figure, whatever the policy);
        None where that policy or budget range was not measured."""
        policy = policy if self.model.gated else "threshold"
        rows = sorted((r["budget"], r["top1"]) for r in self.manifest.get("accuracy", [])
                      if r["policy"] == policy)
        if not rows or (self.model.gated and not rows[0][0] <= budget <= rows[-1][0]):
            return None
        budgets, top1 = zip(*rows, strict=True)
        return round(float(np.interp(budget if self.model.gated else 1.0, budgets, top1)), 4)

    def metadata(self) -> dict:
        m = self.manifest
        return {
            "name": self.name, "ready": self.ready, "architecture": m["architecture"],
            "config": m["config"], "classes": self.classes, "input": m["input"],
            "gated": self.model.gated, "budget_floor": self.model.table.floor,
            "default": {"budget": self.default_budget, "policy": self.default_policy},
            "policies": list(POLICIES),
            "calibration": m["calibration"], "accuracy": m.get("accuracy", []),
            "dense_baseline": m.get("dense_baseline"), "provenance": m.get("provenance", {}),
            "weights_sha256": m["weights"]["sha256"],
            "device": str(self.batcher.device), "dtype": str(self.precision).removeprefix("torch."),
            "engine": self.engine,
        }


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def checkpoint_dirs(weights_dir: str | Path) -> list[Path]:
    """Sub-folders holding a manifest, by name (none if the folder is missing)."""
    root = Path(weights_dir)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))


def folder_signature(folder: Path) -> tuple:
    """Name, size and modification time of a checkpoint folder's manifest and weights: a
    change means the model changed."""
    try:
        files = [f for f in folder.iterdir() if f.name == MANIFEST or f.suffix == ".safetensors"]
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    except OSError:  # removed while we looked: the next look sees it gone
        return ()


def missing_weights(weights_dir: str | Path) -> str | None:
    """Why a weights folder has nothing to serve, or None."""
    root = Path(weights_dir)
    if not root.is_dir():
        return "the weights folder (--weights-dir, ACS_WEIGHTS_DIR) does not exist"
    if not checkpoint_dirs(root):
        return f"the weights folder holds no checkpoint (no <model>/{MANIFEST})"
    return None


@dataclass
class ModelRegistry:
    settings: object
    metrics: object
    device: torch.device
    models: dict[str, ServedModel] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    failed: dict[str, tuple] = field(default_factory=dict)  # folder: its signature when it failed

    def fail(self, folder: str, reason: str) -> None:
        """Record why a checkpoint folder is not served (readiness, /v1/models, a metric)."""
        self.errors[folder] = reason
        self.metrics.load_failed.labels(folder).set(1)

    def clear(self, folder: str) -> None:
        """Forget a folder's failure (it was removed, or is tried again)."""
        if self.errors.pop(folder, None) is not None:
            self.metrics.load_failed.labels(folder).set(0)

    def load(self, path: Path) -> ServedModel | None:
        """Load one checkpoint (blocking; run it off the event loop). Any failure is logged
        with its cause and recorded under the folder's name; the other models are unaffected."""
        start = time.monotonic()
        try:
            signature = folder_signature(path)
            checkpoint = load_checkpoint(path, self.device)
        except CheckpointError as e:
            log.error("not serving %s: %s", path, e)
            self.fail(path.name, f"{e.path.relative_to(path.parent)}: {e.reason}")
            return None
        except Exception as e:  # anything else (a bug, an odd file) must not stop the others
            log.exception("not serving %s: loading failed", path)
            self.fail(path.name, f"loading failed: {type(e).__name__}")
            return None
        name = checkpoint.name
        if name in self.models and self.models[name].folder != path:
            log.error("not serving %s: model name %r is already served", path, name)
            self.fail(path.name, f"model name {name!r} is already served from another folder")
            return None
        dtype = serving_dtype(self.settings.dtype, self.device, checkpoint.manifest)
        model = checkpoint.model.to(self.device)
        executor = executor_for(model, self.device, dtype, self.settings.runtime, self.settings.threads)
        batcher = Batcher(name, model, executor, self.device, self.settings, self.metrics,
                          dtype if engine_name(executor) == "torch-compact" else torch.float32)
        served = ServedModel(name, checkpoint.manifest, model, batcher, time.monotonic() - start,
                             dtype, engine_name(executor), folder=path, signature=signature)
        self.metrics.load_seconds.labels(name).set(served.load_seconds)
        self.metrics.model_ready.labels(name).set(0)
        self.metrics.queue_depth.labels(name).set(0)  # exists before the first request
        return served

    def warm_up(self, served: ServedModel) -> bool:
        """Run the model once per batch-size bucket; False (recorded) if it raised."""
        start = time.monotonic()
        try:
            if self.settings.warmup:
                served.batcher.warm_up(served.input_size)
        except Exception as e:
            log.exception("not serving %s: warm-up failed", served.name)
            self.fail(served.folder.name if served.folder else served.name,
                      f"warm-up failed: {type(e).__name__}")
            return False
        served.warmup_seconds = time.monotonic() - start
        self.metrics.warmup_seconds.labels(served.name).set(served.warmup_seconds)
        return True

    def discard(self, served: ServedModel) -> None:
        self.models.pop(served.name, None)
        self.metrics.model_ready.labels(served.name).set(0)

    def default_name(self) -> str | None:
        if self.settings.default_model:
            return self.settings.default_model
        marked = [m.name for m in self.models.values() if m.manifest.get("serve_default")]
        names = marked or sorted(self.models)
        return names[0] if names else None
