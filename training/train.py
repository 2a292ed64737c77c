"""Budget-conditioned training: one model for every budget; resumable; DDP under torchrun.

Two budget schedules (`budget_schedule`):
- `sandwich`: every step runs the batch at the full budget, the floor and random budgets
  (`objective.sandwich_passes`) and backpropagates each pass's loss at once (the graph of one
  pass is freed before the next; under DDP the gradients are all-reduced once, after the
  last pass); the lower budgets are distilled from the full pass.
- `per-sample`: one pass a step, every image with its own budget (`full_fraction` of them
  at 1.0, the rest uniform in [min_budget or the floor, 1]), distilled from a trained
  `teacher` run when there is one. With `init_from` (a trained dense run) this fine-tunes a
  dense network's weights and trains its gates in a few epochs (`freeze_bn` keeps the
  running BN statistics instead; with the fast recipe's learning rates that diverged).

The optimizer, schedule, weight averaging and augmentation come from the recipe
(`recipe.py`). The model and batches are channels_last; bfloat16 autocast runs where the
hardware has it (`precision`). The gradient norm is clipped (`grad_clip`; without it, the
post-activation ResNets of channel gating diverged in the first steps at lr 0.1). A
checkpoint is written after every epoch and, in a single process, every `checkpoint_minutes`
within one (with the position in the epoch and its random generators' states); randomness is
seeded per (seed, epoch, rank), so a resumed run continues exactly where the interrupted one
stopped.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.core.base import GatedNetwork
from models.core.registry import describe

from .config import Splits, TrainConfig, load_splits, new_model
from .data import alternating_flips, augment, epoch_order, normalize
from .evaluate import measure
from .objective import (
    CostModel,
    Objective,
    Pass,
    gates_frozen,
    per_sample_budgets,
    running_bn,
    sandwich_passes,
    training_table,
)
from .recipe import Lookahead, autocast_for, make_optimizer, set_learning_rate
from .state import (
    CHECKPOINT,
    CONFIG,
    LOOKAHEAD,
    RNG,
    init_weights,
    load_state,
    load_trained,
    read_tensors,
    save_state,
    write_json,
)

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


def seeded(seed: int, epoch: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one epoch and one stream of randomness (budgets, augmentation + rank)."""
    return torch.Generator(device).manual_seed((seed * 100_003 + epoch) * 1_009 + stream)


PREPARE_IMAGES = 5000


def initialize(model: GatedNetwork, cfg: TrainConfig, images: torch.Tensor, data) -> None:
    """Weights from a trained run (`init_from`), else what the network derives from the data
    (`prepare`: FastNet's whitening layer)."""
    if cfg.init_from:
        init_weights(model, Path(cfg.init_from))
        model.order_channels()
    else:
        model.prepare(normalize(images[:PREPARE_IMAGES], data.mean, data.std))


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
    model = new_model(cfg, len(data.classes), data.image_size)
    if ranks.main and not resume:
        architecture, model_config = describe(model)
        write_json(run / CONFIG, {
            "train": asdict(cfg), "architecture": architecture, "model": model_config,
            "data": {"name": cfg.dataset_name or Path(cfg.data).name, "fingerprint": data.fingerprint,
                     "classes": data.classes, "mean": data.mean, "std": data.std,
                     "image_size": data.image_size, "train_images": len(splits.train),
                     "calibration_images": len(splits.calibration)}})
    images, labels = data.train_x[splits.train].to(device), data.train_y[splits.train].to(device)
    initialize(model, cfg, images, data)
    cuda = device.type == "cuda"
    model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    progress = {"epoch": 0, "step": 0, "history": []}
    if resume:
        progress = load_state(run, model, optimizer)
    generators = read_tensors(run, RNG) if progress.get("batch") else {}
    lookahead = Lookahead(model, read_tensors(run, LOOKAHEAD) if resume else None) if cfg.lookahead else None
    teacher = load_trained(Path(cfg.teacher)).to(device, memory_format=torch.channels_last) \
        if cfg.teacher else None

    net = ddp = None
    if ranks.world > 1:
        net = ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                            broadcast_buffers=False)
    net = torch.compile(net or model) if cfg.compile else net or model
    autocast = autocast_for(cfg, device)

    steps_per_epoch = len(splits.train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(splits.train)} training images are fewer than one batch of "
                         f"{cfg.batch_size}: pass a smaller --batch-size")
    total = cfg.epochs * steps_per_epoch
    if model.gated and cfg.budget_schedule == "sandwich" and cfg.random_budgets < 1:
        raise ValueError("the gates learn from the random budgets: --random-budgets must be >= 1")
    floor = model.floor()
    model.table = training_table(model)
    saved = time.time()

    for epoch in range(progress["epoch"], cfg.epochs):
        model.train()
        objective = Objective(CostModel(model), cfg.cost_weight, cfg.dg_weight, cfg.label_smoothing,
                              per_sample=cfg.budget_schedule == "per-sample")
        budget_rng = seeded(cfg.seed, epoch, 0)
        augment_rng = seeded(cfg.seed, epoch, 1 + ranks.rank, device)
        flips = None
        if cfg.flip == "alternate":
            flips = alternating_flips(len(labels), cfg.seed, epoch).to(device)
        batches = epoch_order(len(labels), cfg.batch_size, cfg.seed, epoch, ranks.rank, ranks.world)
        done, meter = progress.pop("batch", 0), progress.pop("meter", {})
        started = time.time() - progress.pop("seconds", 0.0)
        if done:  # resuming within the epoch
            budget_rng.set_state(generators["budget"])
            augment_rng.set_state(generators["augment"])
        bar = tqdm(batches[done:], desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not ranks.main,
                   dynamic_ncols=True, mininterval=1.0, initial=done, total=len(batches))
        for n, index in enumerate(bar, done + 1):
            index = index.to(device)
            x = augment(images[index], augment_rng, cfg.translate, None if flips is None else flips[index],
                        cfg.reflect)
            x = normalize(x, data.mean, data.std).contiguous(memory_format=torch.channels_last)
            set_learning_rate(optimizer, cfg, progress["step"], total)
            optimizer.zero_grad(set_to_none=True)
            if cfg.budget_schedule == "per-sample":
                budgets = per_sample_budgets(len(index), floor, cfg.full_fraction, budget_rng, cfg.min_budget)
                step = per_sample_step(net, model, objective, x, labels[index], budgets, autocast,
                                       teacher, cfg.freeze_bn)
            else:
                passes = sandwich_passes(floor, cfg.random_budgets, budget_rng, cfg.min_budget)
                step = train_step(net, model, ddp, objective, x, labels[index], passes, autocast,
                                  cfg.freeze_bn)
            if cfg.grad_clip:
                step["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            progress["step"] += 1
            if lookahead:
                lookahead.step(model, progress["step"], total)
            for key, value in step.items():
                meter[key] = meter.get(key, 0.0) + value
            if n % LOG_EVERY == 0 or n == len(batches):
                meter = {k: float(v) for k, v in meter.items()}
                bar.set_postfix(loss=f"{meter['loss'] / n:.3f}", acc=f"{meter['acc'] / n:.3f}",
                                mac=f"{meter['ratio'] / n:.3f}/{meter['target'] / n:.3f}", refresh=False)
            if ranks.world == 1 and n < len(batches) and time.time() - saved > 60 * cfg.checkpoint_minutes:
                position = {"batch": n, "meter": {k: float(v) for k, v in meter.items()},
                            "seconds": time.time() - started}
                save_state(run, model, optimizer, {**progress, **position}, {
                    RNG: {"budget": budget_rng.get_state(), "augment": augment_rng.get_state()},
                    **({LOOKAHEAD: lookahead.slow} if lookahead else {})})
                saved = time.time()
        bar.close()
        ranks.average_buffers(model)
        progress["epoch"] = epoch + 1
        if lookahead and progress["epoch"] == cfg.epochs:
            lookahead.finish(model)
        if ranks.main:
            entry = {"epoch": epoch + 1, "step": progress["step"], "seconds": round(time.time() - started, 1),
                     "lr": optimizer.param_groups[0]["lr"],
                     **{k: round(v / len(batches), 4) for k, v in meter.items()},
                     **validate(model, splits, device)}
            progress["history"].append(entry)
            print(" ".join(f"{k} {v}" for k, v in entry.items()), flush=True)
            save_state(run, model, optimizer, progress, {LOOKAHEAD: lookahead.slow} if lookahead else {})
            saved = time.time()
        ranks.barrier()
    ranks.stop()
    return model


def train_step(net, model: GatedNetwork, ddp: DistributedDataParallel | None, objective: Objective,
               x: torch.Tensor, y: torch.Tensor, passes: list[Pass], autocast,
               freeze_bn: bool = False) -> dict:
    """Forward and backward of every pass of a step (the full one first: its output is the
    teacher), each under its own rules. Returns loss, accuracy (full pass), executed-MAC ratio
    and budget (the random passes, else all), as tensors."""
    teacher, losses, parts = None, [], []
    for i, p in enumerate(passes):
        sync = ddp is None or i == len(passes) - 1  # all-reduce the summed gradients once
        frozen = freeze_bn or not p.batch_stats(model)
        with nullcontext() if sync else ddp.no_sync():
            with (autocast, running_bn(model) if frozen else nullcontext(),
                  nullcontext() if p.gates_learn else gates_frozen(model)):
                # a tensor budget: torch.compile does not specialize (recompile) on its value
                logits, info = net(x, budget=torch.tensor(p.budget), return_info=True)
            loss, stats = objective(model, logits, info, labels=y, teacher=teacher, regularize=p.teaches)
            loss.backward()
        if p.teaches:
            teacher = logits.detach().float().softmax(1)
            accuracy = (logits.argmax(1) == y).float().mean()
        losses.append(loss.detach())
        parts.append(stats)
    partial = [s for p, s in zip(passes, parts, strict=True) if p.kind == "random"] or parts
    return {"loss": sum(losses), "acc": accuracy,
            "ratio": sum(p["ratio"] for p in partial) / len(partial),
            "target": sum(p["target"] for p in partial) / len(partial)}


def per_sample_step(net, model: GatedNetwork, objective: Objective, x: torch.Tensor, y: torch.Tensor,
                    budgets: torch.Tensor, autocast, teacher: GatedNetwork | None,
                    freeze_bn: bool) -> dict:
    """One forward and backward, every image at its own budget; distilled from `teacher`
    (a trained network, in eval mode) when given, else cross-entropy on the labels."""
    target = None
    if teacher is not None:
        with torch.no_grad(), autocast:
            target = teacher(x).float().softmax(1)
    with autocast, running_bn(model) if freeze_bn else nullcontext():
        logits, info = net(x, budget=budgets.to(x.device), return_info=True)
    loss, stats = objective(model, logits, info, labels=y, teacher=target, regularize=True)
    loss.backward()
    return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean(),
            "ratio": stats["ratio"], "target": stats["target"]}


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
