"""Budget-conditioned training: one model for every budget; resumable; DDP under torchrun.

Every step samples budgets (full, floor, random; `objective.sample_budgets`), runs the batch
at each, and backpropagates each pass's loss at once (the graph of one pass is freed before
the next; under DDP the gradients are all-reduced once, after the last pass). SGD with
Nesterov momentum, linear warmup then cosine decay, no weight decay on 1-d parameters (BN,
biases, gate logits), the gradient norm clipped (`grad_clip`; without it, the post-activation
ResNets of channel gating diverged in the first steps at lr 0.1). A checkpoint is written
after every epoch; randomness is seeded per (seed, epoch, rank), so a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.base import GatedNetwork
from models.registry import describe

from .config import Splits, TrainConfig, create_model, load_splits
from .data import augment, epoch_order, normalize
from .evaluate import measure
from .objective import CostModel, Objective, gates_frozen, running_bn, sample_budgets, training_table
from .state import CHECKPOINT, CONFIG, load_state, save_state, write_json

LOG_EVERY = 10  # steps between progress-bar updates (each reads values back from the device)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


class Distributed:
    """This process's rank and device; a process group when launched by torchrun."""

    def __init__(self, device_name: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (BN running statistics) over the processes."""
        if self.world > 1:
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer)
                    buffer /= self.world

    def stop(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    warmup = max(1, round(cfg.warmup * total))
    return cfg.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def seeded(seed: int, epoch: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one epoch and one stream of randomness (budgets, augmentation + rank)."""
    return torch.Generator(device).manual_seed((seed * 100_003 + epoch) * 1_009 + stream)


def train(cfg: TrainConfig, resume: bool = False) -> GatedNetwork:
    """Train (or resume) the run in cfg.run; returns the trained model (on its device)."""
    ranks = Distributed(cfg.device)
    device = ranks.device
    run = Path(cfg.run)
    if ranks.main:
        if not resume and (run / CHECKPOINT).exists():
            raise FileExistsError(f"{run} already has a checkpoint; pass --resume or another --run")
        run.mkdir(parents=True, exist_ok=True)
        splits = load_splits(cfg)  # decodes and caches once, before the other ranks read it
    ranks.barrier()
    if not ranks.main:
        splits = load_splits(cfg)
    data = splits.data

    torch.manual_seed(cfg.seed)
    model = create_model(cfg, len(data.classes), data.image_size)
    if ranks.main and not resume:
        architecture, model_config = describe(model)
        write_json(run / CONFIG, {
            "train": asdict(cfg), "architecture": architecture, "model": model_config,
            "data": {"name": cfg.dataset_name or Path(cfg.data).name, "fingerprint": data.fingerprint,
                     "classes": data.classes, "mean": data.mean, "std": data.std,
                     "image_size": data.image_size, "train_images": len(splits.train),
                     "calibration_images": len(splits.calibration)}})
    cuda = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    optimizer = make_optimizer(model, cfg)
    progress = {"epoch": 0, "step": 0, "history": []}
    if resume:
        progress = load_state(run, model, optimizer)

    net = ddp = None
    if ranks.world > 1:
        net = ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                            broadcast_buffers=False)
    net = torch.compile(net or model) if cfg.compile else net or model
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cfg.amp and cuda)

    images, labels = data.train_x[splits.train].to(device), data.train_y[splits.train].to(device)
    steps_per_epoch = len(splits.train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(splits.train)} training images are fewer than one batch")
    total = cfg.epochs * steps_per_epoch
    if model.gated and cfg.random_budgets < 1:
        raise ValueError("the gates learn from the random budgets: --random-budgets must be >= 1")
    floor = model.floor()
    model.table = training_table(model)

    for epoch in range(progress["epoch"], cfg.epochs):
        model.train()
        objective = Objective(CostModel(model), cfg.cost_weight, cfg.dg_weight)
        budget_rng = seeded(cfg.seed, epoch, 0)
        augment_rng = seeded(cfg.seed, epoch, 1 + ranks.rank, device)
        batches = epoch_order(len(labels), cfg.batch_size, cfg.seed, epoch, ranks.rank, ranks.world)
        meter = {}
        started = time.time()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not ranks.main,
                   dynamic_ncols=True, mininterval=1.0)
        for n, index in enumerate(bar, 1):
            index = index.to(device)
            x = normalize(augment(images[index], augment_rng), data.mean, data.std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, progress["step"], total)
            optimizer.zero_grad(set_to_none=True)
            budgets = sample_budgets(floor, cfg.random_budgets, budget_rng, cfg.min_budget)
            step = train_step(net, model, ddp, objective, x, labels[index], budgets, autocast)
            if cfg.grad_clip:
                step["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            progress["step"] += 1
            for key, value in step.items():
                meter[key] = meter.get(key, 0.0) + value
            if n % LOG_EVERY == 0 or n == len(batches):
                meter = {k: float(v) for k, v in meter.items()}
                bar.set_postfix(loss=f"{meter['loss'] / n:.3f}", acc=f"{meter['acc'] / n:.3f}",
                                mac=f"{meter['ratio'] / n:.3f}/{meter['target'] / n:.3f}", refresh=False)
        bar.close()
        ranks.average_buffers(model)
        progress["epoch"] = epoch + 1
        if ranks.main:
            entry = {"epoch": epoch + 1, "step": progress["step"], "seconds": round(time.time() - started, 1),
                     "lr": optimizer.param_groups[0]["lr"],
                     **{k: round(v / len(batches), 4) for k, v in meter.items()},
                     **validate(model, splits, device)}
            progress["history"].append(entry)
            print(" ".join(f"{k} {v}" for k, v in entry.items()), flush=True)
            save_state(run, model, optimizer, progress)
        ranks.barrier()
    ranks.stop()
    return model


def train_step(net, model: GatedNetwork, ddp: DistributedDataParallel | None, objective: Objective,
               x: torch.Tensor, y: torch.Tensor, budgets: list[float], autocast) -> dict:
    """Forward and backward at every budget of a step (the full one first: its output is the
    teacher). Returns loss, accuracy (full budget), executed-MAC ratio and budget (the random
    budgets), as tensors."""
    teacher, losses, parts = None, [], []
    for i, budget in enumerate(budgets):
        sync = ddp is None or i == len(budgets) - 1  # all-reduce the summed gradients once
        with nullcontext() if sync else ddp.no_sync():
            with (autocast, running_bn(model) if i > 0 and model.adaptive else nullcontext(),
                  gates_frozen(model) if i < 2 else nullcontext()):
                # a tensor budget: torch.compile does not specialize (recompile) on its value
                logits, info = net(x, budget=torch.tensor(budget), return_info=True)
            loss, stats = objective(model, logits, info, labels=y, teacher=teacher, regularize=i == 0)
            loss.backward()
        if teacher is None:
            teacher = logits.detach().float().softmax(1)
            accuracy = (logits.argmax(1) == y).float().mean()
        losses.append(loss.detach())
        parts.append(stats)
    partial = parts[2:] or parts  # the random budgets, if any
    return {"loss": sum(losses), "acc": accuracy,
            "ratio": sum(p["ratio"] for p in partial) / len(partial),
            "target": sum(p["target"] for p in partial) / len(partial)}


def validate(model: GatedNetwork, splits: Splits, device: torch.device) -> dict:
    """Top-1 and executed-MAC ratio on the calibration split at budgets 1.0 and 0.5."""
    data = splits.data
    images, labels = data.train_x[splits.calibration], data.train_y[splits.calibration]
    if not len(labels):
        return {}
    out = {}
    for budget in (1.0, 0.5) if model.gated else (1.0,):
        correct, ratio, _ = measure(model, images, labels, budget, "threshold", data.mean, data.std, device)
        out[f"val_top1@{budget}"] = round(correct.float().mean().item(), 4)
        out[f"val_mac@{budget}"] = round(ratio.mean().item(), 4)
    model.train()
    return out
