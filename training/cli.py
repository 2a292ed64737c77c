"""acs-train: from a dataset to a servable checkpoint in weights/.

    acs-train prepare   --data DIR                 decode once into a uint8 cache
    acs-train train     --data DIR --run runs/X    budget-conditioned training (--resume)
    acs-train calibrate --run runs/X               closed-loop tau(b) and per-layer counts
    acs-train evaluate  --run runs/X               test split: JSON, Markdown, PNG
    acs-train export    --run runs/X               weights/X/: safetensors, manifest, card
    acs-train precision --weights weights/X --data DIR   top-1 in float32 and bfloat16
    acs-train recalibrate --weights weights/X --data DIR an exported model's table and accuracy again
    acs-train all       --data DIR --run runs/X    train, calibrate, evaluate, export

Under torchrun, `train` (and the training part of `all`) runs data-parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from models.core.budget import POLICIES
from models.core.levels import LevelNetwork
from models.core.registry import architecture_names, model_names

from .calibrate import bn_check, calibrate, cascade_table, recalibrate_network
from .config import TrainConfig, load_splits, resume_config, run_config
from .data import default_cache, load_dataset
from .evaluate import evaluate, write_report
from .export import export
from .precision import BUDGETS, card_section, check_precision
from .recalibrate import recalibrate
from .recipe import RECIPES, recipe_defaults
from .state import CALIBRATION, CONFIG, load_trained, log_command, save_calibrated_state, write_json
from .train import pick_device, train

SUPPRESS = argparse.SUPPRESS
DEFAULT_ARCH, DEFAULT_RECIPE = "acs_ranked_fastnet", "fast"  # the served default's family, minutes


def train_arguments(p: argparse.ArgumentParser) -> None:
    """Options that become TrainConfig fields; unset ones keep the config's defaults (and the
    recipe's), which their help shows."""
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}

    def a(flag: str, help: str = "", **kw) -> None:
        name = kw.get("dest", flag[2:].replace("-", "_"))
        default, fast = defaults.get(name), RECIPES["fast"].get(name)
        if "default" not in help and kw.get("action") != "store_true" and default not in (None, {}):
            help += (f" (default {default})" if fast is None else
                     f" (fast recipe, the default: {fast}; default recipe: {default})")
        p.add_argument(flag, default=SUPPRESS, help=help.strip(), **kw)
    a("--data", help="image folders (train/<class>, test/<class>), cifar-10-batches-py, or a cache file")
    a("--arch", help=f"a model ({', '.join(model_names())}) or an architecture with its config defaults "
                     f"({', '.join(architecture_names())}); models win where the names meet "
                     f"(default {DEFAULT_ARCH})")
    a("--config", dest="model_config", type=json.loads,
      help='architecture config overrides as JSON, e.g. \'{"gate": "cheap", "growth": 12}\'')
    a("--dataset-name", help="name in the model card and manifest (default: the data folder's name)")
    a("--cache", help="decoded cache file (default: beside the data folder)")
    a("--image-size", type=int)
    a("--workers", type=int, help="image decoding threads")
    a("--calib-fraction", type=float, help="share of every class held out of train (default 0.1)")
    a("--limit", type=int, help="cap every split at N random images (smoke runs)")
    a("--epochs", type=int)
    a("--batch-size", type=int, help="global batch (split over DDP processes)")
    a("--lr", type=float)
    a("--momentum", type=float)
    a("--weight-decay", type=float)
    a("--warmup", type=float, help="share of the steps with a linear warmup")
    a("--grad-clip", type=float, help="clip the gradient norm of a step to this (default 5; 0: off)")
    a("--random-budgets", type=int, help="random budgets per step, beside full and floor (default 2)")
    a("--min-budget", type=float, help="lowest random budget (default: the model's floor)")
    a("--cost-weight", type=float, help="weight of (executed-MAC ratio - budget)^2 (default 2)")
    a("--dg-weight", type=float, help="weight of the DGConv regularizer (default 1e-3)")
    a("--seed", type=int)
    a("--precision", choices=("auto", "bf16", "fp32"),
      help="auto (default): bfloat16 autocast where the CPU (AVX-512 bf16, AMX) or GPU has it")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--recipe", choices=sorted(RECIPES),
      help="preset of the options below: fast (the default; airbench-style: batch 1024, triangular "
           "schedule, label smoothing, lookahead, alternating flips), or default (the networks' "
           "papers' long SGD schedule); given options win")
    a("--schedule", choices=("cosine", "triangle"))
    a("--label-smoothing", type=float)
    a("--translate", type=int, help="random translation in pixels (default 4)")
    a("--lookahead", action="store_true", help="lookahead weight averaging (on in the fast recipe)")
    a("--flip", choices=("random", "alternate"))
    a("--init-from", help="start from a trained run's weights (a gated network from its dense "
      "baseline): its run folder or its exported checkpoint folder (weights/<name>)")
    a("--teacher", help="a trained run (or exported checkpoint folder) to distill from "
      "(per-sample budget schedule)")
    a("--budget-schedule", choices=("sandwich", "per-sample"),
      help="sandwich (default): full, floor and random-budget passes a step; per-sample: one pass, "
           "a budget per image")
    a("--full-fraction", type=float, help="per-sample schedule: share of images at budget 1.0 (0.25)")
    a("--freeze-bn", action="store_true", help="normalize with the running BN statistics, never update them")
    a("--checkpoint-minutes", type=float,
      help="also checkpoint within an epoch this often (default 10; one process only)")


def run_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--run", required=required, help="run folder (config, checkpoint, calibration, eval)")
    p.add_argument("--device", default=SUPPRESS, help="auto (default), cpu, cuda, cuda:1, ...")


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=float, default=0.05, help="budget grid step (default 0.05)")
    p.add_argument("--iterations", type=int, default=5,
                   help="regula falsi rounds per threshold after a sweep of 25 (default 5)")
    p.add_argument("--bn-check", action="store_true",
                   help="measure whether BN statistics re-estimated per budget bucket would help")


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets", type=float, nargs="+", help="default: the floor, 0.1, 0.2, ... 1.0")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="checkpoint folder (default: <run>/weights/<name>, which "
                   "`acs-serve --weights-dir <run>/weights` serves)")
    p.add_argument("--name", help="model name (default: the run folder's name)")
    p.add_argument("--default-budget", type=float, default=1.0,
                   help="budget for requests that give none (default 1.0); choose it from the "
                        "run's eval.md: e.g. the lowest budget within a point of 1.0's top-1")
    p.add_argument("--default-policy", choices=POLICIES, default="threshold",
                   help="policy for requests that give none (default threshold)")
    p.add_argument("--serve-default", action="store_true",
                   help="make it the server's default model (/v1/predict) over the others")
    p.add_argument("--dense-baseline", help="the dense model it is measured against (a model name)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acs-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="decode a dataset once into a uint8 cache")
    prep.add_argument("--data", required=True)
    prep.add_argument("--cache")
    prep.add_argument("--image-size", type=int, default=32)
    prep.add_argument("--workers", type=int)
    prep.add_argument("--force", action="store_true", help="decode even if the cache matches")
    tr = sub.add_parser("train", help="train or resume a run")
    run_arguments(tr)
    train_arguments(tr)
    tr.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    cal = sub.add_parser("calibrate", help="closed-loop calibration on the calibration split")
    run_arguments(cal)
    cal.add_argument("--limit", type=int, default=SUPPRESS)
    calibrate_arguments(cal)
    ev = sub.add_parser("evaluate", help="accuracy and executed MACs on the test split")
    run_arguments(ev)
    ev.add_argument("--limit", type=int, default=SUPPRESS)
    evaluate_arguments(ev)
    ex = sub.add_parser("export", help="write weights/<name>/ with its model card")
    run_arguments(ex)
    export_arguments(ex)
    prec = sub.add_parser("precision", help="a checkpoint's top-1 served in float32 and "
                          "bfloat16, into its manifest and card (the server's dtype=auto reads it)")
    prec.add_argument("--weights", required=True, help="checkpoint folder, e.g. weights/acs_fastnet")
    prec.add_argument("--data", required=True, help="the dataset (or its cache) with the test split")
    prec.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    prec.add_argument("--policies", nargs="+", choices=POLICIES, default=["threshold"])
    prec.add_argument("--limit", type=int, help="the first N test images only")
    recal = sub.add_parser("recalibrate", help="an exported checkpoint's table and accuracy rows "
                           "again, in place (its run folder not needed)")
    recal.add_argument("--weights", required=True, help="checkpoint folder, e.g. weights/acs_densenet40")
    recal.add_argument("--data", required=True, help="the dataset it was trained on (or its cache)")
    recal.add_argument("--limit", type=int, help="calibration images (default: the whole held-out split)")
    recal.add_argument("--test-limit", type=int, help="test images (default: all)")
    recal.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    recal.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    recal.add_argument("--counts-only", action="store_true", help="keep the thresholds and their "
                       "rows; fit the topk/cap counts again and measure those policies")
    every = sub.add_parser("all", help="train, calibrate, evaluate, export")
    run_arguments(every)
    train_arguments(every)
    every.add_argument("--resume", action="store_true")
    calibrate_arguments(every)
    evaluate_arguments(every)
    export_arguments(every)
    return p


def train_config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if args.resume:
        return resume_config(args.run, given)
    if "data" not in given:
        raise ValueError("--data is required (unless --resume)")
    given.setdefault("arch", DEFAULT_ARCH)
    return TrainConfig(**{**recipe_defaults(given.pop("recipe", DEFAULT_RECIPE)), **given})


def command_overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("device", "limit") if hasattr(args, k)}


def run_calibrate(args: argparse.Namespace) -> None:
    cfg = run_config(args.run, **command_overrides(args))
    device = pick_device(cfg.device)
    splits = load_splits(cfg)
    data = splits.data
    images, labels = data.train_x[splits.calibration], data.train_y[splits.calibration]
    model = load_trained(Path(args.run), calibrated=False).to(device)
    started = time.time()
    batches = recalibrate_network(model, images, data.mean, data.std, device)
    if batches:
        save_calibrated_state(Path(args.run), model)
        print(f"re-estimated the network's calibrated state ({len(model.calibrated_state())} "
              f"tensors) on {len(images)} images ({batches} batches)")
    if isinstance(model, LevelNetwork):
        model.table = cascade_table(model, images, labels, data.mean, data.std, device)
    else:
        model.table = calibrate(model, images, data.mean, data.std, device, args.step, args.iterations)
    if args.bn_check:
        model.table.extra["bn_per_budget"] = bn_check(model, images, labels, data.mean, data.std, device)
    write_json(Path(args.run) / CALIBRATION, model.table.to_dict())
    table = model.table
    print(f"calibrated on {len(images)} images in {time.time() - started:.1f} s:")
    for i, (b, t) in enumerate(zip(table.budgets, table.taus, strict=True)):
        executed = table.extra.get("threshold_ratio_mean", table.budgets)[i]
        print(f"  budget {b:.3f}  tau {t:.4f}  executed {executed:.3f}  counts {sum(table.counts[i])}")
    for row in model.table.extra.get("bn_per_budget", []):
        print("  BN check:", row)


def run_evaluate(args: argparse.Namespace) -> None:
    cfg = run_config(args.run, **command_overrides(args))
    device = pick_device(cfg.device)
    splits = load_splits(cfg)
    data = splits.data
    model = load_trained(Path(args.run)).to(device)
    if model.table.source == "uniform" and model.gated:
        print("warning: the run is not calibrated; evaluating with the uniform table", file=sys.stderr)
    result = evaluate(model, data.test_x[splits.test], data.test_y[splits.test], data.mean, data.std,
                      device, args.budgets, tuple(args.policies))
    write_report(result, Path(args.run), f"{Path(args.run).name} ({result['images']} test images)")
    print_rows(result)


def print_rows(result: dict) -> None:
    """An evaluation's rows, one line each."""
    for row in result["rows"]:
        print(f"  {row['policy']:9s} budget {row['budget']:.3f}  top-1 {100 * row['top1']:.2f}%  "
              f"MACs {row['ratio_mean']:.3f} mean, {row['ratio_p95']:.3f} p95, {row['ratio_max']:.3f} max")


def run_export(args: argparse.Namespace) -> None:
    name = args.name or Path(args.run).name
    out = export(args.run, args.out or Path(args.run) / "weights" / name, name, args.default_budget,
                 args.default_policy, args.serve_default, args.dense_baseline)
    print(f"exported {out}")


def main(argv: list[str] | None = None) -> int:
    """Run a command; a mistake in the input (a missing folder, a bad setting) is one line on
    stderr and exit status 2, not a traceback."""
    args = parser().parse_args(argv)
    started = time.time()
    try:
        status = run_command(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"acs-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    run = getattr(args, "run", None)
    if run and int(os.environ.get("RANK", "0")) == 0 and (Path(run) / CONFIG).is_file():
        log_command(Path(run), sys.argv[1:] if argv is None else list(argv), time.time() - started)
    return status


def run_command(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        data = load_dataset(args.data, args.cache, args.image_size, args.workers, args.force)
        source = Path(args.data)
        cache = args.cache or (source if source.suffix == ".safetensors" else
                               default_cache(source, args.image_size))
        print(f"{cache}: {len(data.train_y)} train and {len(data.test_y)} test images of "
              f"{len(data.classes)} classes, {data.image_size}x{data.image_size}; "
              f"mean {data.mean}, std {data.std}")
        return 0
    if args.command == "recalibrate":
        print_rows(recalibrate(args.weights, load_dataset(args.data), args.limit, args.test_limit,
                               args.budgets, tuple(args.policies), counts_only=args.counts_only))
        return 0
    if args.command == "precision":
        result = check_precision(args.weights, load_dataset(args.data), args.budgets,
                                 tuple(args.policies), args.limit)
        print(card_section(result))
        return 0
    if args.command in ("train", "all"):
        train(train_config(args), resume=args.resume)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    if args.command in ("calibrate", "all"):
        run_calibrate(args)
    if args.command in ("evaluate", "all"):
        run_evaluate(args)
    if args.command in ("export", "all"):
        run_export(args)
    return 0
