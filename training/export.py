"""Export a run as a servable checkpoint: weights/<name>/ with model.safetensors and
manifest.json (models/checkpoint.py), and a model card beside them: README.md with the
accuracy-vs-budget table, accuracy_vs_macs.png and eval.json."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch

from models.core.checkpoint import load_checkpoint, save_checkpoint

from .evaluate import EVAL_JSON, PLOT
from .evaluate import card_section as evaluation_section
from .state import CALIBRATION, load_trained, read_config, read_progress


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


PATHS = ("data", "run", "cache", "init_from", "teacher")  # TrainConfig fields that are paths


def without_paths(train: dict) -> dict:
    """The training config with its paths cut to their last part (a server shows the
    provenance in /v1/models: no paths of the machine that trained it)."""
    return {k: Path(v).name if k in PATHS and isinstance(v, str) else v for k, v in train.items()}


def export(run: str | Path, out: str | Path, name: str | None = None, default_budget: float = 1.0,
           default_policy: str = "threshold", serve_default: bool = False,
           dense_baseline: str | None = None) -> Path:
    """Write the run's calibrated model and model card to `out`; verifies that it loads.

    `default_budget` and `default_policy` are the model's operating point for requests that
    name none (pick one from the evaluation's accuracy-vs-budget rows, e.g. the lowest budget
    within a point of budget 1.0); `serve_default` marks it the server's default model;
    `dense_baseline` names the dense model it is measured against (shipped beside it)."""
    run, out = Path(run), Path(out)
    name = name or out.name
    if not (run / CALIBRATION).is_file():
        raise FileNotFoundError(f"{run}: not calibrated; run `acs-train calibrate --run {run}` first")
    config = read_config(run)
    model = load_trained(run)
    progress = read_progress(run)
    result = json.loads((run / EVAL_JSON).read_text()) if (run / EVAL_JSON).is_file() else None
    data = config["data"]
    provenance = {
        "dataset": data["name"], "data_fingerprint": data["fingerprint"],
        "train_images": data["train_images"], "train": without_paths(config["train"]),
        "epochs": progress["epoch"], "steps": progress["step"],
        "last_epoch": progress["history"][-1] if progress["history"] else None,
        "calibration": {"source": model.table.source, "images": model.table.extra.get("images")},
        "evaluation": {"split": "test", "images": result["images"]} if result else None,
        "torch": torch.__version__, "git_commit": git_commit(),
    }
    save_checkpoint(model, out, name=name, classes=data["classes"], mean=data["mean"], std=data["std"],
                    accuracy=result["rows"] if result else [], provenance=provenance,
                    default_budget=default_budget, default_policy=default_policy,
                    serve_default=serve_default, dense_baseline=dense_baseline)
    if result:
        shutil.copy(run / EVAL_JSON, out / EVAL_JSON)
        if (run / PLOT).is_file():
            shutil.copy(run / PLOT, out / PLOT)
    (out / "README.md").write_text(model_card(name, config, progress, model, result))
    load_checkpoint(out)
    return out


def schedule(train: dict, gated: bool) -> str:
    """The budget schedule of a run, in words."""
    if not gated:
        return "dense: one pass a step at budget 1.0"
    if train.get("budget_schedule") == "per-sample":
        start = f", started from `{train['init_from']}`" if train.get("init_from") else ""
        teacher = f", distilled from `{train['teacher']}`" if train.get("teacher") else ""
        return (f"one pass a step, a budget per image ({train['full_fraction']} of them at 1.0, the rest "
                f"uniform from {train.get('min_budget') or 'the floor'}){start}{teacher}"
                f"{', BN statistics frozen' if train.get('freeze_bn') else ''}")
    return f"budgets per step: full, floor, {train['random_budgets']} random"


def calibration(model) -> str:
    if not model.gated:
        return "none needed (a dense network runs at budget 1.0)"
    return f"{model.table.source} on {model.table.extra.get('images')} calibration images"


def wall_time(config: dict, history: list[dict]) -> str:
    """Wall time of each logged command and the hardware it ran on, and the sum of the epochs'
    clocks (kept in the checkpoint: they count a train command that was stopped and resumed,
    which leaves no log entry)."""
    log = config.get("log", [])
    epochs = sum(e.get("seconds", 0.0) for e in history) / 60
    clocks = f"; the {len(history)} epochs' clocks sum to {epochs:.1f} min" if history else ""
    if not log:
        return "commands not logged" + clocks
    parts = [f"{e['command'].split()[1]} {e['seconds'] / 60:.1f} min" for e in log]
    trained = next((e for e in log if e["command"].split()[1] in ("train", "all")), log[-1])
    return f"{', '.join(parts)} (trained on {trained['hardware']}){clocks}"


def levels_section(model) -> list[str]:
    """A width-level network's levels (MACs, calibration top-1) and how budgets route; none
    for other networks."""
    extra = model.table.extra
    if "level_top1" not in extra:
        return []
    ratios = model.level_costs(model.input_size, model.input_size)[1]
    lines = ["", "## Width levels", "", "Each level is a dense network of every layer's channel prefix, "
             "compiled whole by the serving runtime. `topk` runs the widest level within the budget; "
             "`threshold` and `cap` run a calibrated confidence cascade (a probe level, then a wider "
             "level for the uncertain images; `cap` only pairs levels whose costs add up to at most "
             "the budget).", "", "| level | width | MACs/dense | top-1, calibration split (%) |",
             "| ---: | ---: | ---: | ---: |"]
    rows = zip(model.config.levels, ratios, extra["level_top1"], strict=True)
    lines += [f"| {i} | {w:g} | {r:.3f} | {100 * t:.2f} |" for i, (w, r, t) in enumerate(rows)]
    return lines


def model_card(name: str, config: dict, progress: dict, model, result: dict | None) -> str:
    train, data = config["train"], config["data"]
    last = progress["history"][-1] if progress["history"] else {}
    dense = model.count_cost([0] * len(model.gated_totals())).dense
    gate = f", gate `{config['model']['gate']}`" if "gate" in config["model"] else ""
    floor, cost = "", ""  # a dense network has no floor and trains with no cost term
    if model.gated:
        floor = f"; floor (everything gated skipped) {model.floor():.3f} of the {model.budget_unit}"
        cost = f"cost weight {train['cost_weight']}, "
    lines = [
        f"# {name}", "",
        f"`{train['arch']}` ({config['architecture']}{gate}), trained "
        f"with `acs-train` on {data['name']}: {data['train_images']} training images; "
        f"{data['calibration_images']} more held out of train for validation and calibration.", "",
        "| | |", "| --- | --- |",
        f"| config | `{json.dumps(config['model'])}` |",
        f"| input | {data['image_size']}x{data['image_size']}, mean {data['mean']}, std {data['std']} |",
        f"| dense MACs | {dense / 1e6:.1f} M{floor} |",
        f"| training | recipe `{train.get('recipe', 'default')}`: {progress['epoch']} epochs, "
        f"{progress['step']} steps, batch {train['batch_size']}, lr {train['lr']}, "
        f"{schedule(train, model.gated)}; {cost}DGConv weight {train['dg_weight']}, seed {train['seed']} |",
        f"| wall time | {wall_time(config, progress['history'])} |",
        f"| last epoch | {json.dumps(last)} |",
        f"| calibration | {calibration(model)} |",
    ]
    if train.get("limit"):
        lines.append(f"| **subset** | every split capped at {train['limit']} images: a smoke run |")
    lines += levels_section(model)
    if result:
        lines += ["", evaluation_section(result)]
    if config.get("log"):
        lines += ["", "## Reproduce", "", "The `acs-train` commands this model came from, in order "
                  "(then `acs-train export`):", "", "```",
                  *[entry["command"] for entry in config["log"]], "```"]
    lines += ["", "## Use", "", "```python", "from models.core.checkpoint import load_checkpoint",
              f'ckpt = load_checkpoint("weights/{name}")',
              "logits = ckpt.model(x, budget=0.5, policy=\"threshold\")  # x: normalized (B, 3, H, W)",
              "```"]
    return "\n".join(lines) + "\n"
