"""Serving precision: float32, or bfloat16 where the hardware computes it fast and the
checkpoint's manifest records that its top-1 holds in it (`acs-train precision`)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_TOLERANCE = 0.001  # largest top-1 drop (a fraction: 0.1 point) that `auto` accepts


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 is fast here: CUDA with bf16, or a CPU with AVX-512 bf16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_holds(manifest: dict) -> bool:
    """The manifest's measured bfloat16 top-1 drop is within BF16_TOLERANCE."""
    measured = manifest.get("dtypes", {}).get("bfloat16", {}).get("top1_drop_max")
    return measured is not None and measured <= BF16_TOLERANCE


def serving_dtype(setting: str, device: torch.device, manifest: dict) -> torch.dtype:
    """The dtype to serve a checkpoint in: `setting` float32 or bfloat16, or auto (bfloat16
    where it is fast and holds the checkpoint's accuracy, else float32)."""
    if setting == "auto":
        return torch.bfloat16 if bf16_supported(device) and bf16_holds(manifest) else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {setting!r}")
    return DTYPES[setting]
