"""Training step time, float32 against bfloat16 autocast, side by side in one run.

One step = forward and backward of a batch (channels_last), as `acs-train` runs it: the
dense network with cross-entropy, the gated network with one budget per image (the
per-sample schedule; the teacher's forward is not included). Precisions are timed
round-robin, so drift on a shared machine hits both alike.

    python bench/train_step.py                       # fastnet, acs_fastnet; batch 1024
    python bench/train_step.py --models acs_densenet40 --batch 128 --json steps.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from common import markdown_table

from models.core.registry import create_model


def step(model, x, y, budgets, bf16: bool) -> None:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        logits = model(x, budget=budgets) if model.gated else model(x)
    F.cross_entropy(logits.float(), y).backward()
    model.zero_grad(set_to_none=True)


def measure(args) -> list[dict]:
    rows = []
    for name in args.models:
        model = create_model(name).to(memory_format=torch.channels_last).train()
        x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch,))
        budgets = torch.rand(args.batch) * 0.8 + 0.2
        times = {False: [], True: []}
        for bf16 in times:
            step(model, x, y, budgets, bf16)  # warm-up
        for _ in range(args.repeat):
            for bf16 in times:
                start = time.perf_counter()
                step(model, x, y, budgets, bf16)
                times[bf16].append(time.perf_counter() - start)
        fp32, bf16 = (statistics.median(times[k]) for k in (False, True))
        rows.append({"model": name, "batch": args.batch, "fp32_s": round(fp32, 3),
                     "bf16_s": round(bf16, 3), "fp32_images_per_s": round(args.batch / fp32),
                     "bf16_images_per_s": round(args.batch / bf16), "bf16_speedup": round(fp32 / bf16, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["fastnet", "acs_fastnet"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the rows and the machine here")
    args = parser.parse_args()
    rows = measure(args)
    print(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    if args.json:
        meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "bf16_kernels": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
