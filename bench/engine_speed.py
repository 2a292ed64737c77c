"""Does a budget buy time? The served model's call against its dense baseline compiled whole.

Side by side in one process, timed round-robin (1 thread by default), at batch 1 and 32:

- ours: the model as the server runs it (`executor_for`: its variants in OpenVINO on the
  CPU, the confidence cascade under --policy), at each of --budgets, on real images
  (samples/cifar10-jpeg-test; each call takes the next photos, so a cascade is timed over
  the mix of photos it stops early and escalates);
- dense: its manifest's `dense_baseline` compiled whole in OpenVINO at its best precision
  (the one `dtype=auto` serves it in), called bare (no routing, no accounting);
- slice@b: the dense baseline's own uniform width slice with the MACs our model executes at
  budget b, compiled whole: the limit a budget can reach at that cost.

The target (issue 26): ours <= 1.15x dense at budget 1.0 and <= 1.15x slice@b below it.
Then the budget contract on requests of 32 images: under threshold the mean executed ratio
within 0.02 of each budget from 0.25 to 0.75, under cap no image above it.

    OMP_NUM_THREADS=1 python bench/engine_speed.py --json engine.json
    OMP_NUM_THREADS=1 python bench/engine_speed.py --data ~/.cache/acs-serve/cifar10-jpeg-32px.safetensors
    OMP_NUM_THREADS=1 python bench/engine_speed.py --model acs_ranked_fastnet --budgets 1 0.5 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from common import markdown_table, round_robin_ms

from models.core.checkpoint import load_checkpoint
from models.core.registry import create_model
from models.engines.precision import serving_dtype
from models.engines.variants import (
    OpenVINORuntime,
    TorchRuntime,
    engine_name,
    executor_for,
    openvino_available,
)
from models.networks.fastnet import FastVariant
from service.imaging import preprocess

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "cifar10-jpeg-test"
TARGET = 1.15  # ours over the dense model (budget 1.0) or its slice of the same MACs
TRACK = 0.02  # threshold: mean executed ratio within this of the budget


def sample_images(manifest: dict) -> torch.Tensor:
    """The shipped sample photos, preprocessed as served."""
    return preprocess([f.read_bytes() for f in sorted(SAMPLES.glob("*.jpg"))], manifest, 10**8)


def test_images(data: str, manifest: dict) -> torch.Tensor:
    """The test split of a dataset (its cache), normalized as the model was trained."""
    from training.data import load_dataset, normalize

    dataset = load_dataset(data)
    return normalize(dataset.test_x, manifest["input"]["mean"], manifest["input"]["std"])


def rotating(images: torch.Tensor, n: int):
    """A function giving the next batch of n images on each call (wrapping around), so that a
    cascade is timed over many photos, not one."""
    batches = [images[i : i + n].contiguous() for i in range(0, len(images) - n + 1, n)]
    state = {"i": -1}

    def next_batch() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]
    return next_batch


def slice_counts(dense, ratio: float) -> tuple[list[int], float]:
    """Per-layer channels of the dense FastNet's uniform width slice (in eighths of a 32nd)
    whose MAC ratio is closest to `ratio`, and that ratio."""
    size = dense.input_size
    full = dense.macs([], size, size).dense
    best = None
    for step in range(1, 33):
        widths = tuple(max(8, round(w * step / 32 / 8) * 8) for w in dense.config.widths)
        cost = create_model("fastnet", widths=widths, block=8).macs([], size, size).dense / full
        if best is None or abs(cost - ratio) < abs(best[1] - ratio):
            best = ([w for w in widths for _ in range(2)], cost)
    return best


def rss_mib() -> float:
    """This process's resident memory (Linux /proc), MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def loaded(model, dtype: torch.dtype, images: torch.Tensor, args):
    """The model's serving executor, and what loading it cost: seconds to build (compile) it,
    seconds to warm every width level at every timed batch size, resident memory added."""
    before, start = rss_mib(), time.perf_counter()
    executor = executor_for(model, torch.device("cpu"), dtype, args.runtime, args.threads)
    built = time.perf_counter()
    for n in args.batches:
        for budget in model.table.budgets:
            executor(images[:n], budget=budget, policy="topk")
    return executor, {"compile_s": round(built - start, 3), "warmup_s": round(time.perf_counter() - built, 3),
                      "rss_mib": round(rss_mib() - before, 1)}


def run(args) -> dict:
    checkpoint = load_checkpoint(args.weights / args.model)
    manifest = checkpoint.manifest
    dense_name = manifest.get("dense_baseline")
    if not dense_name:
        raise SystemExit(f"{args.model}'s manifest names no dense_baseline")
    dense_ckpt = load_checkpoint(args.weights / dense_name)
    cpu = torch.device("cpu")
    ours_dtype = serving_dtype("auto", cpu, manifest)
    dense_dtype = serving_dtype("auto", cpu, dense_ckpt.manifest)
    images = sample_images(manifest)
    load = {}
    ours, load[args.model] = loaded(checkpoint.model, ours_dtype, images, args)
    dense, load[dense_name] = loaded(dense_ckpt.model, dense_dtype, images, args)
    precision = "bf16" if dense_dtype == torch.bfloat16 else "f32"

    # the MACs ours executes at each budget, on these images
    executed = {b: float(ours(images, budget=b, policy=args.policy, return_info=True)[1].cost.ratio.mean())
                for b in args.budgets}
    slices = {}
    for b in args.budgets:
        if b < 1.0:
            counts, ratio = slice_counts(dense_ckpt.model, executed[b])
            module = FastVariant(dense_ckpt.model, counts).eval()
            runtime = (OpenVINORuntime([module], dense_ckpt.model.input_size, precision, args.threads)
                       if engine_name(dense) == "openvino" else TorchRuntime([module], dense_dtype))
            slices[b] = (runtime, ratio)

    rows = []
    for n in args.batches:
        x = rotating(images, n)
        calls = {("dense", 1.0): lambda x=x: dense.runtime(0, x())}  # the compiled model, bare
        for b in args.budgets:
            calls[("ours", b)] = lambda x=x, b=b: ours(x(), budget=b, policy=args.policy)
            if b in slices:
                calls[("slice", b)] = lambda x=x, b=b: slices[b][0](0, x())
        ms = round_robin_ms(calls, runs=args.runs)
        for b in args.budgets:
            ref, ref_name, ref_ratio = ((ms[("dense", 1.0)], "dense", 1.0) if b >= 1.0 else
                                        (ms[("slice", b)], "slice", slices[b][1]))
            ratio = ms[("ours", b)] / ref
            rows.append({"batch": n, "budget": b, "executed_ratio": round(executed[b], 4),
                         "ours_ms": round(ms[("ours", b)], 3), "reference": ref_name,
                         "reference_ratio": round(ref_ratio, 4), "reference_ms": round(ref, 3),
                         "dense_ms": round(ms[("dense", 1.0)], 3),
                         "vs_reference": round(ratio, 3), "met": ratio <= TARGET})

    tracking = []
    contract = test_images(args.data, manifest) if args.data else images
    batches = contract[: len(contract) // 32 * 32].view(-1, 32, *contract.shape[1:])
    for b in [round(0.25 + 0.05 * i, 2) for i in range(11)]:
        row = {"budget": b}
        for policy in ("threshold", "cap"):
            ratios = torch.cat([ours(batch, budget=b, policy=policy, return_info=True)[1].cost.ratio
                                for batch in batches])
            row[f"{policy}_mean"] = round(float(ratios.mean()), 4)
            row[f"{policy}_max"] = round(float(ratios.max()), 4)
        row["met"] = abs(row["threshold_mean"] - b) <= TRACK and row["cap_max"] <= b + 1e-9
        tracking.append(row)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "model": args.model, "engine": engine_name(ours), "dtype": str(ours_dtype),
            "dense": dense_name, "dense_engine": engine_name(dense), "dense_dtype": str(dense_dtype),
            "policy": args.policy, "images": f"{SAMPLES.relative_to(ROOT)} ({len(images)})",
            "contract_images": f"{args.data} test split" if args.data else "the samples",
            "tracking_requests": len(batches)}
    return {"meta": meta, "load": load, "rows": rows, "tracking": tracking}


def print_tables(result: dict) -> None:
    m = result["meta"]
    print(f"\n{m['model']} ({m['engine']}, {m['dtype']}, {m['policy']}) against {m['dense']} "
          f"({m['dense_engine']}, {m['dense_dtype']}); {m['threads']} thread(s); {m['cpu']}\n")
    print(markdown_table(["model", "compile s", "warm-up s", "resident memory added (MiB)"],
                         [[name, f"{row['compile_s']:.2f}", f"{row['warmup_s']:.2f}", f"{row['rss_mib']:.1f}"]
                          for name, row in result["load"].items()]))
    print()
    print(markdown_table(
        ["batch", "budget", "executed", "ours ms", "reference", "its MACs", "reference ms", "ours/ref",
         "met"],
        [[r["batch"], f"{r['budget']:g}", f"{r['executed_ratio']:.3f}", f"{r['ours_ms']:.2f}", r["reference"],
          f"{r['reference_ratio']:.3f}", f"{r['reference_ms']:.2f}", f"{r['vs_reference']:.2f}",
          "yes" if r["met"] else "no"] for r in result["rows"]]))
    print(f"\nBudget contract, {m['tracking_requests']} requests of 32 images per budget "
          f"({m['contract_images']}) "
          f"(threshold: mean within {TRACK}; cap: max <= budget)\n")
    print(markdown_table(["budget", "threshold mean", "threshold max", "cap mean", "cap max", "met"],
                         [[f"{r['budget']:g}", f"{r['threshold_mean']:.3f}", f"{r['threshold_max']:.3f}",
                           f"{r['cap_mean']:.3f}", f"{r['cap_max']:.3f}", "yes" if r["met"] else "no"]
                          for r in result["tracking"]]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=ROOT / "weights")
    parser.add_argument("--model", default="acs_ranked_fastnet")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--policy", default="threshold", choices=("threshold", "topk", "cap"))
    parser.add_argument("--runtime", default="auto", choices=("auto", "openvino", "torch"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=200, help="timed calls per configuration")
    parser.add_argument("--data", help="a dataset (or its cache) whose test split the budget "
                        "contract runs on (default: the 200 sample photos)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.runtime == "openvino" and not openvino_available():
        print("openvino is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    result = run(args)
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
