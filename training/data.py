"""Datasets: decode once into a cached uint8 tensor file; batch, crop and flip on the device.

Sources (`--data`):
- an image-folder tree `train/<class>/*` and `test/<class>/*` (CIFAR-10-JPEG unpacks so; any
  user dataset in this layout works, images are resized and center-cropped to `image_size`);
- the standard CIFAR-10 python layout `cifar-10-batches-py/` (or its parent folder);
- a cache file written by `prepare` (`*.safetensors`).

The cache holds uint8 images (N, 3, H, W), int64 labels, the class names, the per-channel
mean and std of the training images and a fingerprint of the source files, so an unchanged
source is never decoded twice. Training never reads the test split; the calibration split
is held out of train (`holdout_split`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR_BATCHES = "cifar-10-batches-py"


@dataclass
class Dataset:
    """Decoded train and test splits (uint8 images, int64 labels) with their metadata."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


def default_cache(source: Path, image_size: int) -> Path:
    """Where `prepare` writes a source's cache: beside it, named after it and the size."""
    return source.parent / f"{source.name}-{image_size}px.safetensors"


def load_dataset(source: str | Path, cache: str | Path | None = None, image_size: int = 32,
                 workers: int | None = None, force: bool = False) -> Dataset:
    """The dataset of a source, decoded once: a matching cache is read, else written."""
    source = Path(source)
    if source.suffix == ".safetensors":
        return read_cache(source)
    layout, root = detect_layout(source)
    cache = Path(cache) if cache else default_cache(source, image_size)
    fingerprint = source_fingerprint(layout, root, image_size)
    if cache.is_file() and not force and cache_fingerprint(cache) == fingerprint:
        return read_cache(cache)
    if layout == "cifar":
        splits, classes = decode_cifar_batches(root, image_size)
    else:
        splits, classes = decode_image_folders(root, image_size, workers)
    (train_x, train_y), (test_x, test_y) = splits
    mean, std = channel_stats(train_x)
    data = Dataset(train_x, train_y, test_x, test_y, classes, mean, std, fingerprint)
    write_cache(data, cache, source)
    return data


TEST_FRACTION = 0.1  # of every class, held out as the test split of a source without one


def detect_layout(source: Path) -> tuple[str, Path]:
    """('cifar', batches folder) or ('folders', root) for a source folder."""
    for root in (source, source / CIFAR_BATCHES):
        if (root / "data_batch_1").is_file() and (root / "test_batch").is_file():
            return "cifar", root
    if (source / "train").is_dir() or any(p.is_dir() for p in source.glob("*/")):
        return "folders", source
    raise FileNotFoundError(f"{source}: expected train/<class>/ (and test/<class>/) image folders, "
                            f"<class>/ folders, a {CIFAR_BATCHES}/ folder, or a .safetensors cache")


def source_files(layout: str, root: Path) -> list[Path]:
    """The files a source is decoded from, in a fixed order."""
    if layout == "cifar":
        return [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch",
                                                                 root / "batches.meta"]
    splits = [d for d in image_splits(root) if d is not None]
    return sorted(p for split in splits for p in split.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def image_splits(root: Path) -> tuple[Path, Path | None]:
    """The train and test folders of an image-folder source: train/ and test/, or train/ alone,
    or the root's own <class>/ folders (no test folder: None)."""
    train = root / "train" if (root / "train").is_dir() else root
    return train, (root / "test" if (root / "test").is_dir() else None)


def source_fingerprint(layout: str, root: Path, image_size: int) -> str:
    """sha256 over the source files' relative paths and sizes, and the image size."""
    digest = hashlib.sha256(f"{layout}:{image_size}\n".encode())
    for path in source_files(layout, root):
        digest.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def decode_cifar_batches(root: Path, image_size: int):
    """((train_x, train_y), (test_x, test_y)), classes from the CIFAR-10 python batches."""
    if image_size != 32:
        raise ValueError("the CIFAR-10 batches hold 32x32 images; use --image-size 32")

    def load(name: str) -> dict:
        # The standard CIFAR-10 distribution format is a pickle; it is read only here, for
        # that dataset. Weights and caches never use pickle.
        with open(root / name, "rb") as f:
            return pickle.load(f, encoding="bytes")

    def split(names: list[str]):
        batches = [load(n) for n in names]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
        return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y.astype(np.int64))

    classes = [c.decode() for c in load("batches.meta")[b"label_names"]]
    return (split([f"data_batch_{i}" for i in range(1, 6)]), split(["test_batch"])), classes


def decode_image(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: shorter side resized to `size`, then center-cropped."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BILINEAR)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)


def decode_image_folders(root: Path, image_size: int, workers: int | None = None):
    """((train_x, train_y), (test_x, test_y)), classes from train/<class>/, test/<class>/.
    Without a test folder, TEST_FRACTION of every class is held out as the test split."""
    train_dir, test_dir = image_splits(root)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    unknown = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes)) if test_dir else []
    if not classes or unknown:
        raise ValueError(f"{root}: no class folders in {train_dir.name}/, or test/ classes not in "
                         f"train/: {unknown}")
    workers = workers or min(8, os.cpu_count() or 1)

    def split(folder: Path):
        paths, labels = [], []
        for label, cls in enumerate(classes):
            files = sorted(p for p in (folder / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise ValueError(f"{folder}: no images")
        with ThreadPoolExecutor(workers) as pool:
            images = np.stack(list(pool.map(lambda p: decode_image(p, image_size), paths)))
        return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(labels, dtype=torch.int64))

    train = split(train_dir)
    if test_dir is not None:
        return (train, split(test_dir)), classes
    keep, held = holdout_split(train[1], TEST_FRACTION, seed=0)
    print(f"{root}: no test/ folder: holding out {len(held)} of the {len(keep) + len(held)} images "
          f"({TEST_FRACTION:.0%} of every class) as the test split", file=sys.stderr)
    return ((train[0][keep], train[1][keep]), (train[0][held], train[1][held])), classes


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(4096):
        chunk = chunk.double() / 255
        total += chunk.sum((0, 2, 3))
        squares += chunk.square().sum((0, 2, 3))
    n = images.numel() / images.shape[1]
    mean = total / n
    std = (squares / n - mean.square()).clamp(min=1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def write_cache(data: Dataset, path: Path, source: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"train_x": data.train_x, "train_y": data.train_y,
               "test_x": data.test_x, "test_y": data.test_y}
    metadata = {"classes": json.dumps(data.classes), "mean": json.dumps(data.mean),
                "std": json.dumps(data.std), "fingerprint": data.fingerprint,
                "source": str(source.resolve())}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def cache_fingerprint(path: Path) -> str | None:
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("fingerprint")


def read_cache(path: Path) -> Dataset:
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    t = load_file(path)
    return Dataset(t["train_x"], t["train_y"], t["test_x"], t["test_y"], json.loads(meta["classes"]),
                   tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])), meta["fingerprint"])


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, calibration) indices into the train split: `fraction` of every class held out."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        held.append(idx[: round(fraction * len(idx))])
    keep = torch.ones(len(labels), dtype=torch.bool)
    calibration = torch.cat(held).sort().values
    keep[calibration] = False
    return keep.nonzero().flatten(), calibration


def subset(indices: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """At most `limit` of the indices, drawn at random (seeded), in ascending order."""
    if limit is None or limit >= len(indices):
        return indices
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:limit]
    return indices[pick].sort().values


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                world: int = 1) -> list[torch.Tensor]:
    """This rank's mini-batches (index tensors) of one epoch: the same shuffle on every rank,
    split into `world` disjoint shards of equal length; an incomplete last batch is dropped."""
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by {world} processes")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    per_rank = batch_size // world
    steps = n // batch_size
    shard = order[rank::world][: steps * per_rank]
    return list(shard.split(per_rank)) if steps else []


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4,
            flip: torch.Tensor | None = None, reflect: bool = False) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero or reflected edges) and horizontal flip
    of a uint8 batch, on its device; `flip` (B,) bool chooses the flips instead of chance."""
    b, c, h, w = images.shape
    device = images.device
    if reflect and pad:
        padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect").to(images.dtype)
    else:
        padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=device)
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    if flip is None:
        flip = torch.rand(b, 1, generator=generator, device=device) < 0.5
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    return padded[torch.arange(b, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) bool: a random half of the images flipped in even epochs, the other half in odd."""
    base = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return base ^ bool(epoch % 2)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, standardized per channel."""
    mean = torch.tensor(mean, device=images.device)[:, None, None]
    std = torch.tensor(std, device=images.device)[:, None, None]
    return (images.float() / 255 - mean) / std
