"""bench/skip_speed.py and bench/shipped_models.py on the shipped models and bench/train_step.py,
run as a user runs them
(tiny sizes: these check that the scripts work and report what they claim, not speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)


def test_skip_speed_compares_budgets_with_the_dense_baseline(tmp_path):
    out = tmp_path / "skip.json"
    run("skip_speed.py", "--models", "weights/acs_fastnet", "weights/fastnet", "--baseline",
        "weights/fastnet", "--batch", "1", "--budgets", "1.0", "0.5", "--repeat", "2", "--warmup", "1",
        "--dtypes", "float32", "bfloat16", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    gated = [r for r in rows if r["model"] == "weights/acs_fastnet"]
    wanted = {(b, d) for b in (1.0, 0.5) for d in ("float32", "bfloat16")}
    assert {(r["budget"], r["dtype"]) for r in gated} >= wanted
    assert all(r["vs_baseline"] > 0 and r["vs_float32"] > 0 for r in rows)
    half = next(r for r in gated if r["budget"] == 0.5)
    assert half["mac_ratio"] <= 0.5 + 1e-6  # topk: never above the budget
    dense = [r for r in rows if r["model"] == "weights/fastnet"]
    assert min(r["vs_baseline"] for r in dense) == 1.0  # against its fastest dtype


def test_shipped_models_table_joins_the_evaluations_with_latency_measured_here(tmp_path):
    for name in ("acs_fastnet", "fastnet"):
        shutil.copytree(ROOT / "weights" / name, tmp_path / "weights" / name)
    out = tmp_path / "shipped.json"
    run("shipped_models.py", "--weights", str(tmp_path / "weights"), "--repeat", "1", "--warmup", "0",
        "--json", str(out), "--plot", str(tmp_path / "shipped.png"))
    rows = json.loads(out.read_text())["rows"]
    assert (tmp_path / "shipped.png").read_bytes()[:4] == b"\x89PNG"
    gated = [r for r in rows if r["model"] == "acs_fastnet"]
    assert [r["budget"] for r in gated] == [1.0, 0.75, 0.5, 0.25, "floor"]
    manifest = json.loads((ROOT / "weights" / "acs_fastnet" / "manifest.json").read_text())
    half = next(r for r in manifest["accuracy"] if r["policy"] == "threshold" and r["budget"] == 0.5)
    assert gated[2]["top1"] == half["top1"] and gated[2]["mac_ratio"] == half["ratio_mean"]
    assert gated[2]["mmacs"] == half["mmacs_mean"]
    assert gated[4]["mac_ratio"] < 0.01 and all(r["batch1_ms"] > 0 and r["batch32_ms"] > 0 for r in rows)
    dense = [r for r in rows if r["model"] == "fastnet"]
    assert [r["budget"] for r in dense] == [1.0] and "min" in dense[0]["training"]


def test_train_step_times_both_precisions(tmp_path):
    out = tmp_path / "steps.json"
    run("train_step.py", "--batch", "8", "--repeat", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["fastnet", "acs_fastnet"]
    assert all(r["fp32_s"] > 0 and r["bf16_s"] > 0 for r in rows)


def test_engine_speed_compares_the_default_model_with_its_dense_baseline(tmp_path):
    out = tmp_path / "engine.json"
    run("engine_speed.py", "--runs", "3", "--batches", "1", "4", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["meta"]["dense"] == "fastnet"
    assert set(result["load"]) == {"acs_ranked_fastnet", "fastnet"}
    rows = {(r["batch"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {(b, budget) for b in (1, 4) for budget in (1.0, 0.5, 0.25)}
    assert rows[1, 1.0]["reference"] == "dense" and rows[1, 0.5]["reference"] == "slice"
    assert all(r["ours_ms"] > 0 and r["vs_reference"] > 0 for r in rows.values())
    for row in result["tracking"]:  # requests of 32 of the sample photos
        assert row["cap_max"] <= row["budget"] + 1e-6
        assert abs(row["threshold_mean"] - row["budget"]) < 0.15


def test_pareto_places_the_budgets_against_the_dense_curve(tmp_path):
    out, png = tmp_path / "pareto.json", tmp_path / "pareto.png"
    run("pareto.py", "--dynamic", "acs_ranked_fastnet", "--dense", "fastnet", "--budgets", "1", "0.5",
        "0.25", "--batches", "1", "4", "--runs", "2", "--json", str(out), "--plot", str(png))
    result = json.loads(out.read_text())
    rows = {(r["model"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("acs_ranked_fastnet", b) for b in (1.0, 0.5, 0.25)} | {("fastnet", 1.0)}
    assert all(0 <= r["samples_top1"] <= 100 and r["batch1_ms"] > 0 and r["batch4_ms"] > 0
               for r in rows.values())
    assert rows["fastnet", 1.0]["samples_top1"] > 50  # the sample photos' labels are read right
    for batch in ("batch1", "batch4"):
        check = result["checks"][batch]
        assert [c["budget"] for c in check["curve"]] == [1.0, 0.5, 0.25]
        gain = check["gain"]  # fastnet is the reference: the points are ours minus its top-1
        if gain["ours_top1"] is not None:
            assert gain["points"] == round(gain["ours_top1"] - rows["fastnet", 1.0]["top1"], 2)
    spread = {s["budget"]: s for s in result["checks"]["spread"]}
    low, dense = rows["acs_ranked_fastnet", 0.25]["top1"], rows["fastnet", 1.0]["top1"]
    assert spread[0.25]["met"] == (low >= dense - 2.5)
    assert png.stat().st_size > 10_000


def test_pareto_interpolates_the_dense_curve():
    sys.path.insert(0, str(ROOT / "bench"))
    from pareto import interpolate

    curve = [(2.0, 90.0), (1.0, 88.0)]
    assert interpolate(curve, 1.5) == 89.0 and interpolate(curve, 1.0) == 88.0
    assert interpolate(curve, 0.5) is None and interpolate(curve, 3.0) is None


def test_recipe_ablation_tabulates_the_shipped_checkpoints(tmp_path):
    out = tmp_path / "ablation.json"
    run("recipe_ablation.py", "dense=weights/fastnet", "ranked=weights/acs_ranked_fastnet", "--json",
        str(out))
    rows = json.loads(out.read_text())
    manifest = json.loads((ROOT / "weights" / "fastnet" / "manifest.json").read_text())
    assert [r["change"] for r in rows] == ["dense", "ranked"]
    assert rows[0]["top1"] == round(100 * manifest["accuracy"][0]["top1"], 2)
    assert rows[0]["epochs"] == manifest["provenance"]["epochs"] and rows[0]["train_minutes"] > 0


def test_latency_objective_bench_compares_the_server_with_and_without_it(tmp_path):
    out = tmp_path / "objective.json"
    run("latency_objective.py", "--loads", "2", "--duration", "2", "--capacity-duration", "1",
        "--concurrency", "4", "--objective-ms", "50", "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["meta"]["capacity_rps"]) == {"1.0", "0.25"}
    rows = {r["objective_ms"]: r for r in result["rows"]}
    assert set(rows) == {None, 50.0}
    for row in rows.values():
        assert row["sent"] > 0 and row["ok"] + row["refused"] * row["sent"] <= row["sent"] + 1e-6
        assert 0.25 - 1e-6 <= row["mean_budget"] <= 1.0
    assert rows[None]["lowered"] == 0 and rows[None]["recovery_s"] is None  # never lowered without it


def test_dfs_int8_times_the_served_engine_against_torch_dense_and_float_kernels(tmp_path):
    import torch

    from models.core.checkpoint import save_checkpoint
    from models.networks.dfs import DFSResNet, DFSResNetConfig
    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    config = {"blocks": (2, 2), "widths": (8, 16), "bits": (8, 12, 16)}
    gated = randomize_bn(DFSResNet(DFSResNetConfig(**config)))
    gated.recalibrate([torch.randn(16, 3, 32, 32)])
    classes = [f"c{i}" for i in range(10)]
    save_checkpoint(gated, tmp_path / "dfs", name="dfs", classes=classes, dense_baseline="dense")
    save_checkpoint(DFSResNet(DFSResNetConfig(gate=False, **config)), tmp_path / "dense", name="dense",
                    classes=classes)
    out = tmp_path / "int8.json"
    run("dfs_int8.py", "--weights", str(tmp_path), "--model", "dfs", "--budgets", "1.0", "0.5",
        "--batches", "1", "4", "--runs", "2", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["meta"]["engine"] == "openvino-steps" and result["meta"]["bits"] == [8, 12, 16]
    assert result["meta"]["dense_engine"] == "openvino"
    rows = result["rows"]
    assert [(r["batch"], r["budget"]) for r in rows] == [(1, 1.0), (1, 0.5), (4, 1.0), (4, 0.5)]
    assert all(r[k] > 0 for r in rows for k in ("served_ms", "topk_ms", "torch_ms", "dense_ms"))
    assert all(abs(sum(r["levels"].values()) - 1) < 0.01 for r in rows)
    assert rows[1]["bitops_ratio"] <= rows[0]["bitops_ratio"]
    assert len(result["levels"]) == 2 * len(result["meta"]["kernel_precisions"])  # each gated block
    # at both batch sizes
    assert all(r["int8_speedup"] > 0 for r in result["levels"])
