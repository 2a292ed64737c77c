"""FastNet (the fast-training ACS network): shapes, compact == masked reference, MAC counts,
whitening, checkpoints, and the fast recipe with the per-sample budget schedule in acs-train."""

import pytest
import torch

from models.core.checkpoint import load_checkpoint, save_checkpoint
from models.engines.compact import compact
from models.networks.fastnet import FastNet, FastNetConfig, acs_fastnet, fastnet
from tests.conftest import randomize_bn
from tests.dynamic_helpers import assert_compact_matches
from tests.training.test_training import tiny_config, write_folders
from training.cli import main
from training.recipe import Lookahead, lr_factor, make_optimizer
from training.state import CHECKPOINT, init_weights, load_trained, read_progress
from training.train import train

TINY = {"widths": [16, 32, 32], "block": 16, "gate": "cheap"}


def tiny(**kw) -> FastNet:
    return FastNet(FastNetConfig(**{"widths": (16, 32, 32), "block": 16, "input_size": 16, **kw}))


@pytest.mark.parametrize("factory", [acs_fastnet, fastnet, lambda: acs_fastnet(gate="acs")])
@pytest.mark.parametrize("size,batch", [(32, 1), (32, 5), (48, 2)])
def test_runs_at_sizes_and_batches(factory, size, batch):
    model = factory().eval()
    with torch.no_grad():
        logits, info = model(torch.randn(batch, 3, size, size), budget=0.5, return_info=True)
    assert logits.shape == (batch, 10) and torch.isfinite(logits).all()
    assert len(info.masks) == len(model.gated_totals())
    if model.gated:
        assert model.gated_totals() == [4, 4, 16, 16, 16, 16]  # blocks of 16 channels


def test_dense_macs_of_the_shipped_size():  # fvcore's count at every size: the contract suite
    assert fastnet().macs([], 32, 32).dense == 118_147_360


@pytest.mark.parametrize("policy", ["threshold", "topk", "cap"])
def test_compact_equals_masked_reference_with_dgconv(policy):
    """The one FastNet option the contract suite does not build (its other cases: there)."""
    model = randomize_bn(acs_fastnet(dgconv=True)).eval()
    executor = compact(model)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for budget in (1.0, 0.6, torch.tensor([0.2, 0.4, 0.5, 0.9, 1.0]), 0.0):
        assert_compact_matches(model, executor, x, budget, policy)
        assert_compact_matches(model, executor, x[:1], budget if isinstance(budget, float) else 0.3, policy)


def test_a_batch_under_threshold_runs_the_union_of_its_keeps_in_plain_convolutions(monkeypatch):
    """Each image gets the logits it gets alone; every convolution is one plain (ungrouped)
    call over the batch; each image is charged the union it shared (no less than its own)."""
    import models.core.gather
    from models.core.budget import CalibrationTable
    model = randomize_bn(acs_fastnet()).eval()
    counts = model.gated_totals()
    model.table = CalibrationTable([model.floor(), 0.5, 1.0], [1.0, 0.75, 0.0],
                                   [[0] * len(counts), [c // 2 for c in counts], counts], model.floor())
    executor = compact(model)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    budget = torch.tensor([0.2, 0.4, 0.5, 0.5, 0.8, 1.0])
    alone = executor(x, budget=budget, policy="threshold", per_sample=True)
    groups, conv2d = [], models.core.gather.conv2d
    monkeypatch.setattr(models.core.gather, "conv2d",
                        lambda *a, **k: groups.append(k.get("groups", 1)) or conv2d(*a, **k))
    logits, info = executor(x, budget=budget, policy="threshold", return_info=True)
    assert torch.allclose(logits, alone, atol=1e-4)
    assert groups == [1] * len(model.convs)
    assert all((mask == mask[:1]).all() for mask in info.masks)  # one union per layer
    own = model(x, budget=budget, policy="threshold", return_info=True)[1].cost.executed
    assert (info.cost.executed >= own).all() and (info.cost.executed > own).any()
    from models.engines.compact import UNION_BATCH  # a larger batch shares unions chunk by chunk
    big = torch.randn(UNION_BATCH + 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    groups.clear()
    monkeypatch.setattr(models.core.gather, "conv2d",
                        lambda *a, **k: groups.append(a[0].shape[0]) or conv2d(*a, **k))
    masks = executor(big, budget=torch.linspace(0.2, 1.0, len(big)), policy="threshold",
                     return_info=True)[1].masks
    assert groups == [UNION_BATCH] * len(model.convs) + [4] * len(model.convs)
    for chunk in (slice(0, UNION_BATCH), slice(UNION_BATCH, None)):
        assert all((m[chunk] == m[chunk][:1]).all() for m in masks)


@pytest.mark.parametrize("batch", [1, 3])
def test_compact_with_every_block_kept_after_a_partly_kept_layer(batch):
    """A layer that keeps every output block still gathers the columns its input lacks."""
    from models.core.budget import CalibrationTable
    model = randomize_bn(acs_fastnet()).eval()
    totals = model.gated_totals()
    partial = [2, 4, 8, 16, 7, 16]  # layers 1 and 3 keep everything after partly kept layers
    model.table = CalibrationTable([model.floor(), 0.5, 1.0], [1.0, 0.5, 0.0],
                                   [[0] * len(totals), partial, totals], model.floor())
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_compact_matches(model, compact(model), x, 0.5, "topk")


def test_executed_macs_by_hand():
    """A skipped output block of one layer is also skipped as an input of the next."""
    model = tiny()  # whiten 24 ch; convs 24->16, 16->16, 16->32, 32->32, 32->32, 32->32; head 32->10
    # 16x16 input: whiten 15x15; convs at 15, 7 | 7, 3 | 3, 1 (each block's first pools after)
    counts = [1, 1, 1, 2, 0, 2]  # kept blocks of 16 channels
    cost = model.count_cost(counts, 16, 16)
    k = [16 * c for c in counts]
    convs = (15 * 15 * 9 * 24 * k[0] + 7 * 7 * 9 * k[0] * k[1] + 7 * 7 * 9 * k[1] * k[2]
             + 3 * 3 * 9 * k[2] * k[3] + 3 * 3 * 9 * k[3] * k[4] + 1 * 1 * 9 * k[4] * k[5])
    whiten = 15 * 15 * 24 * 12
    gates = 24 * 1 + k[0] * 1 + (k[1] + k[2] + k[3] + k[4]) * 2  # cheap gates read the kept inputs
    assert int(cost.gates[0]) == gates
    assert int(cost.executed[0]) == whiten + convs + gates + k[5] * 10
    dense = model.count_cost([1, 1, 2, 2, 2, 2], 16, 16)
    assert dense.dense == int(dense.executed[0]) - int(dense.gates[0])


def test_policies_keep_their_promises():
    model = randomize_bn(acs_fastnet()).eval()
    x = torch.randn(8, 3, 32, 32)
    for budget in (0.25, 0.5, 0.75):
        with torch.no_grad():
            _, topk = model(x, budget=budget, policy="topk", return_info=True)
            _, cap = model(x, budget=budget, policy="cap", return_info=True)
        assert (topk.cost.ratio <= budget + 1e-9).all() and (cap.cost.ratio <= budget + 1e-9).all()
        assert (topk.cost.ratio == topk.cost.ratio[0]).all()


def test_whitening_layer_whitens_patches():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 16, 16, generator=g)
    images = images + images.roll(1, 1) + images.roll(1, 3)  # correlated channels and pixels
    model = tiny()
    model.prepare(images)
    half = model.whiten.weight.shape[0] // 2
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.whiten.weight[:half])
    flat = out.transpose(0, 1).reshape(half, -1)
    covariance = torch.cov(flat)
    assert torch.allclose(covariance, torch.eye(half), atol=0.05)
    assert torch.equal(model.whiten.weight[half:], -model.whiten.weight[:half])


def test_checkpoint_round_trip(tmp_path):
    model = randomize_bn(acs_fastnet()).eval()
    save_checkpoint(model, tmp_path / "m", name="m", classes=[str(i) for i in range(10)])
    loaded = load_checkpoint(tmp_path / "m").model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, budget=0.4), model(x, budget=0.4))


def test_fast_recipe_schedule_and_optimizer():
    from training.config import TrainConfig
    from training.recipe import recipe_defaults
    cfg = TrainConfig(data="d", run="r", **recipe_defaults("fast"))
    assert lr_factor(cfg, 0, 100) == pytest.approx(0.2)
    assert lr_factor(cfg, 20, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 100, 100) == 0.0
    model = tiny()
    optimizer = make_optimizer(model, cfg)
    rest, shifts = optimizer.param_groups
    assert shifts["lr"] == pytest.approx(64 * rest["lr"])
    assert rest["lr"] == pytest.approx(11.5 * 1024 / (1024 * (1 + 1 / 0.15)))
    # decoupled decay: every weight shrinks by weight_decay * batch / scale a step (0.2% here)
    for group in (rest, shifts):
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert id(model.whiten.weight) not in trainable  # the whitening filters stay fixed


def test_lookahead_moves_slow_weights_and_finishes_on_them():
    model = tiny()
    look = Lookahead(model)
    before = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    look.update(model, 0.5)
    assert torch.allclose(model.head.weight, before + 0.5)
    assert torch.allclose(look.slow["head.weight"], before + 0.5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("data") / "synthetic")


def fast_config(folders, run, **kw):
    settings = dict(arch="fastnet", model_config={"widths": [16, 32, 32], "block": 16}, recipe="fast",
                    schedule="triangle",
                    decoupled=True, bias_lr_scale=64.0, label_smoothing=0.2, lookahead=True,
                    translate=2, reflect=True, flip="alternate", lr=200.0, momentum=0.85,
                    weight_decay=0.0153, warmup=0.2, grad_clip=0.0, batch_size=12, epochs=3)
    return tiny_config(folders, run, **{**settings, **kw})


def test_fast_recipe_then_gates_from_the_dense_run(folders, tmp_path):
    dense_run = tmp_path / "dense"
    dense = train(fast_config(folders, dense_run))
    assert not dense.gated
    history = read_progress(dense_run)["history"]
    assert len(history) == 3 and history[-1]["val_top1@1.0"] > 0.6

    gated_run = tmp_path / "gated"
    cfg = fast_config(folders, gated_run, arch="acs_fastnet", model_config=TINY, init_from=str(dense_run),
                      teacher=str(dense_run),
                      budget_schedule="per-sample", freeze_bn=True, min_budget=0.3, lr=50.0, epochs=3,
                      cost_weight=4.0)
    gated = train(cfg)
    assert gated.gated
    # the backbone started from the dense run (BN frozen: the statistics are the dense run's)
    assert torch.equal(gated.whiten.weight.cpu(), dense.whiten.weight.cpu())
    for a, b in zip(gated.norms, dense.norms, strict=True):
        assert torch.equal(a.running_mean.cpu(), b.running_mean.cpu())
    history = read_progress(gated_run)["history"]
    assert all(0.0 < h["ratio"] < 1.0 for h in history)
    gaps = [abs(h["ratio"] - h["target"]) for h in history]
    assert gaps[-1] < gaps[0] or gaps[-1] < 0.1

    # the dense run's exported folder serves as well (run folders may be lost; weights/ ships)
    exported = tmp_path / "weights" / "dense"
    assert main(["calibrate", "--run", str(dense_run)]) == 0
    assert main(["export", "--run", str(dense_run), "--out", str(exported)]) == 0
    classes = dense.config.num_classes
    from_run, from_export = acs_fastnet(classes, **TINY), acs_fastnet(classes, **TINY)
    assert init_weights(from_run, dense_run) == init_weights(from_export, exported) != []
    a, b = from_run.state_dict(), from_export.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "gate" not in k)
    teacher = load_trained(exported)
    assert not teacher.training and torch.equal(teacher.whiten.weight, dense.whiten.weight.cpu())


def test_fast_recipe_resumes_with_identical_state(folders, tmp_path, monkeypatch):
    import training.train as train_module
    straight = train(fast_config(folders, tmp_path / "straight"))
    save = train_module.save_state

    def interrupted(run, model, optimizer, progress, extra=None):
        save(run, model, optimizer, progress, extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_state", interrupted)
    cfg = fast_config(folders, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_module, "save_state", save)
    assert (tmp_path / "resumed" / CHECKPOINT).is_file()
    resumed = train(cfg, resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
