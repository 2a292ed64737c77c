"""What int8 buys DFS: its 8-bit level run in int8 by OpenVINO, side by side in one process.

On a DFS checkpoint, timed round-robin (1 thread by default), at batch 1 and 32, on the
shipped sample photos (each call the next ones):

- served: the model as the server runs it (`openvino-steps`: each block's kernels compiled
  by OpenVINO, the 8-bit level in int8, 12 and 16 bits in float32) under `threshold` (a
  call per block, the images of a level together) and under `topk` (every image at the
  budget's configuration: one call of it compiled whole), at each of --budgets;
- torch: the same model on the torch compact executor under `threshold` (fake
  quantization, no saving);
- dense: its manifest's dense baseline as the server runs it (compiled whole by OpenVINO,
  float32), called bare;

and per level, each gated block's kernel alone at 8 bits (int8) against the same block at
12 bits (float32): what int8 buys a block. Budgets are in BitOps, as the model's table.

    OMP_NUM_THREADS=1 python bench/dfs_int8.py --json docs/performance/dfs_int8.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from common import markdown_table, round_robin_ms
from engine_speed import rotating, sample_images

from models.core.checkpoint import load_checkpoint
from models.engines.compact import CompactExecutor
from models.engines.openvino_compile import openvino_infer
from models.engines.stepwise import StepwiseExecutor, input_shapes
from models.engines.variants import engine_name, executor_for

ROOT = Path(__file__).resolve().parents[1]


def level_rows(served: StepwiseExecutor, batches: list[int], runs: int) -> list[dict]:
    """Each gated block's 8-bit kernel (int8) against its 12-bit one (float32), alone."""
    steps = served.fallback.steps
    shapes = input_shapes(served.model, steps)
    rows = []
    for index, (step, requests, shape) in enumerate(zip(steps, served.requests, shapes, strict=True)):
        if step.gate is None:
            continue
        for n in batches:
            x = torch.rand(n, *shape)
            ms = round_robin_ms({bits: lambda r=r, x=x: openvino_infer(r, x)
                                 for bits, r in zip(("8", "12"), requests[1:3], strict=True)}, runs=runs)
            rows.append({"step": index, "shape": list(shape), "batch": n, "int8_ms": round(ms["8"], 4),
                         "float_ms": round(ms["12"], 4), "int8_speedup": round(ms["12"] / ms["8"], 3)})
    return rows


def run(args) -> dict:
    checkpoint = load_checkpoint(args.weights / args.model)
    model, manifest = checkpoint.model, checkpoint.manifest
    dense = executor_for(load_checkpoint(args.weights / manifest["dense_baseline"]).model,
                         threads=args.threads)
    served = StepwiseExecutor(model, "f32", args.threads)
    torch_steps = CompactExecutor(model)
    images = sample_images(manifest)
    rows = []
    for n in args.batches:
        x = rotating(images, n)
        calls = {("dense", 1.0): lambda x=x: dense.runtime(0, x())}  # the compiled model, bare
        for b in args.budgets:
            calls[("served", b)] = lambda x=x, b=b: served(x(), budget=b, policy="threshold")
            calls[("topk", b)] = lambda x=x, b=b: served(x(), budget=b, policy="topk")
            calls[("torch", b)] = lambda x=x, b=b: torch_steps(x(), budget=b, policy="threshold")
        ms = round_robin_ms(calls, runs=args.runs)
        for b in args.budgets:
            cost = served(images[:n], budget=b, policy="threshold", return_info=True)[1].cost
            topk = served(images[:n], budget=b, policy="topk", return_info=True)[1].cost
            levels = torch.stack([k.float() for k in cost.kept.T]).flatten()
            rows.append({"batch": n, "budget": b, "bitops_ratio": round(float(cost.bitops_ratio.mean()), 4),
                         "mac_ratio": round(float(cost.ratio.mean()), 4),
                         "levels": {str(k): round(float((levels == k).float().mean()), 3)
                                    for k in range(model.levels + 1)},
                         "topk_bitops_ratio": round(float(topk.bitops_ratio.mean()), 4),
                         "served_ms": round(ms[("served", b)], 3), "topk_ms": round(ms[("topk", b)], 3),
                         "torch_ms": round(ms[("torch", b)], 3), "dense_ms": round(ms[("dense", 1.0)], 3),
                         "served_vs_dense": round(ms[("served", b)] / ms[("dense", 1.0)], 3),
                         "topk_vs_dense": round(ms[("topk", b)] / ms[("dense", 1.0)], 3),
                         "served_vs_torch": round(ms[("served", b)] / ms[("torch", b)], 3)})
    meta = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
            "model": args.model, "engine": engine_name(served), "dense": manifest["dense_baseline"],
            "dense_engine": engine_name(dense),
            "bits": list(model.config.bits),
            "kernel_precisions": served.kernel_precisions()}
    return {"meta": meta, "rows": rows, "levels": level_rows(served, args.batches, args.runs)}


def print_tables(result: dict) -> None:
    m = result["meta"]
    print(f"\n{m['model']} ({m['engine']}) against {m['dense']} ({m['dense_engine']}, "
          f"float32, whole); {m['threads']} thread(s); {m['cpu']}\n")
    print(markdown_table(
        ["batch", "budget", "BitOps", "MACs", "blocks skipped / 8 / 12 / 16 bits", "threshold ms",
         "topk ms (BitOps)", "torch ms", "dense ms", "threshold/dense", "topk/dense", "threshold/torch"],
        [[r["batch"], f"{r['budget']:g}", f"{r['bitops_ratio']:.3f}", f"{r['mac_ratio']:.3f}",
          " / ".join(f"{v:.2f}" for v in r["levels"].values()), f"{r['served_ms']:.2f}",
          f"{r['topk_ms']:.2f} ({r['topk_bitops_ratio']:.3f})", f"{r['torch_ms']:.2f}",
          f"{r['dense_ms']:.2f}",
          f"{r['served_vs_dense']:.2f}", f"{r['topk_vs_dense']:.2f}", f"{r['served_vs_torch']:.2f}"]
         for r in result["rows"]]))
    print("\nOne gated block alone: its 8-bit kernel (int8) against its 12-bit kernel (float32)\n")
    print(markdown_table(["step", "input", "batch", "int8 ms", "float32 ms", "int8 speed-up"],
                         [[r["step"], "x".join(map(str, r["shape"])), r["batch"], f"{r['int8_ms']:.3f}",
                           f"{r['float_ms']:.3f}", f"{r['int8_speedup']:.2f}"] for r in result["levels"]]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=ROOT / "weights")
    p.add_argument("--model", default="dfs_resnet20")
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
