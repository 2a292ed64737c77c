"""The training CLI on the other dynamic methods (slimmable width, channel gating, DFS): the
same commands train, calibrate, evaluate and export them, on tiny synthetic data (CPU)."""

import json
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

from models.core.checkpoint import load_checkpoint
from models.core.registry import build_model
from models.engines.compact import compact
from tests.training.test_training import write_folders
from training.cli import main
from training.data import load_dataset, normalize
from training.evaluate import EVAL_JSON
from training.objective import CostModel, Objective, Pass, training_table
from training.state import CALIBRATED_STATE, CHECKPOINT, load_state
from training.train import train_step

TINY = {
    "slimmable_resnet": {"blocks": [1, 1], "widths": [8, 16]},
    "cg_resnet": {"blocks": [1, 1], "widths": [8, 16]},
    "dfs_resnet": {"blocks": [2, 2], "widths": [8, 16], "bits": [8, 16]},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("data") / "synthetic")


def run_all(folders, root, arch: str) -> tuple:
    """`acs-train all` on the tiny data; returns (run folder, exported folder)."""
    run, out = root / "runs" / arch, root / "weights" / arch
    assert main(["all", "--data", str(folders), "--cache", str(root / "cache.safetensors"),
                 "--run", str(run), "--out", str(out), "--arch", arch, "--recipe", "default",
                 "--config", json.dumps(TINY[arch]),
                 "--image-size", "16", "--calib-fraction", "0.25", "--epochs", "2", "--batch-size", "8",
                 "--random-budgets", "1", "--device", "cpu", "--workers", "1", "--step", "0.25",
                 "--iterations", "6", "--budgets", "0.5", "1.0"]) == 0
    return run, out


@pytest.mark.parametrize("arch", sorted(TINY))
def test_cli_trains_calibrates_evaluates_and_exports(folders, tmp_path, arch):
    run, out = run_all(folders, tmp_path, arch)
    ckpt = load_checkpoint(out)
    model = ckpt.model
    assert ckpt.manifest["architecture"] == arch
    result = json.loads((run / EVAL_JSON).read_text())
    assert result["budget_unit"] == model.budget_unit
    topk = [r for r in result["rows"] if r["policy"] == "topk"]
    assert [r["budget"] for r in topk] == [0.5, 1.0]
    assert all(r["ratio_max"] <= r["budget"] + 1e-6 for r in topk)  # in the budget's own unit
    data = load_dataset(tmp_path / "cache.safetensors")
    x = normalize(data.test_x[:6], ckpt.manifest["input"]["mean"], ckpt.manifest["input"]["std"])
    with torch.no_grad():
        logits = model(x, budget=0.5, policy="topk")
        assert torch.allclose(compact(model)(x, budget=0.5, policy="topk"), logits, atol=1e-4)
    expected = {"slimmable_resnet": "widths", "cg_resnet": "closed-loop", "dfs_resnet": "closed-loop"}
    assert model.table.source == expected[arch]


def test_slimmable_calibration_re_estimates_every_widths_bn_statistics(folders, tmp_path):
    run, out = run_all(folders, tmp_path, "slimmable_resnet")
    stats = load_file(run / CALIBRATED_STATE)
    trained = build_model("slimmable_resnet", {"num_classes": 3, "input_size": 16,
                                               **TINY["slimmable_resnet"]})
    load_state(run, trained)
    served = load_checkpoint(out).model
    assert (run / CHECKPOINT).is_file() and "stem_bn.running_mean" in stats
    assert torch.equal(served.stem_bn.running_mean, stats["stem_bn.running_mean"])
    # every width level the stem uses (levels with equal channel counts share the narrowest)
    # was re-estimated: its statistics differ from those training left
    bn = served.stem_bn
    used = bn.level_of(bn.levels).unique()
    assert len(used) > 1
    assert (bn.running_mean != trained.stem_bn.running_mean).any(1)[used].all()


@pytest.mark.parametrize("arch", ["cg_resnet", "dfs_resnet"])
def test_gates_learn_from_the_random_budgets_only(arch):
    model = build_model(arch, {"num_classes": 3, "input_size": 16, **TINY[arch]}).train()
    model.table = training_table(model)
    objective = Objective(CostModel(model))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    gates = [p for m in model.gate_modules() for p in m.parameters()]
    assert gates

    def gate_grad(budgets):
        model.zero_grad(set_to_none=True)
        passes = [Pass(kind, b) for kind, b in zip(["full", "floor", "random"], budgets, strict=False)]
        train_step(model, model, None, objective, x, y, passes, nullcontext())
        return sum(float(p.grad.abs().sum()) for p in gates if p.grad is not None)

    assert gate_grad([1.0, model.floor()]) == 0.0
    assert gate_grad([1.0, model.floor(), 0.6]) > 0.0


def test_dfs_cost_term_is_in_bitops():
    model = build_model("dfs_resnet", {"num_classes": 3, "input_size": 16, **TINY["dfs_resnet"]}).train()
    model.table = training_table(model)
    _, info = model(torch.randn(4, 3, 16, 16), budget=0.5, return_info=True)
    ratio = CostModel(model).ratio(info)
    assert torch.allclose(ratio.detach(), info.cost.bitops_ratio.float())
    assert not torch.allclose(info.cost.bitops_ratio.float(), info.cost.ratio.float())
