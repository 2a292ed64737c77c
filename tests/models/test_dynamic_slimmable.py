import pytest
import torch

from models.engines.compact import compact
from models.networks.slimmable import (
    SlimmableResNet,
    SlimmableResNetConfig,
    SwitchableBatchNorm2d,
    channels_at,
    recalibrate_bn,
    slimmable_resnet20,
)
from tests.dynamic_helpers import (
    fvcore_macs,
    infer,
    randomize_all_bn,
)

BUDGETS = [0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_all_bn(slimmable_resnet20()).eval()


@pytest.fixture(scope="module")
def executor(model):
    return compact(model)


def tiny(**kwargs):
    cfg = dict(num_classes=3, blocks=(1, 1), widths=(4, 8), width_levels=(0.5, 1.0), input_size=8)
    return SlimmableResNet(SlimmableResNetConfig(**{**cfg, **kwargs}))


def test_every_block_and_stream_is_a_gated_layer(model):
    assert len(model.gated_totals()) == 12

def test_table_has_one_row_per_width_level(model):
    table = model.table
    levels = model.config.width_levels
    assert table.budgets[-1] == 1.0 and table.budgets[0] == pytest.approx(model.floor())
    assert len(table.budgets) == len(levels) == 13
    assert table.extra["widths"] == list(levels)
    for level, (budget, counts) in enumerate(zip(table.budgets, table.counts, strict=True)):
        assert counts == [channels_at(t, levels[level]) for t in model.gated_totals()]
        assert model.count_cost(counts).ratio[0] == pytest.approx(budget)
    assert model.floor() == pytest.approx(0.0645, abs=1e-3)  # width 0.25: about 1/16 of the MACs


def test_policies_coincide_exact_and_within_budget(model, images):
    costs = []
    for b in BUDGETS:
        infos = {p: infer(model, images, b, p)[1] for p in ("threshold", "topk", "cap")}
        executed = infos["topk"].cost.executed
        assert (executed == executed[0]).all()  # input-independent
        for info in infos.values():
            assert torch.equal(info.cost.executed, executed)
        counts = model.table.layer_counts(infos["topk"].plan.effective[:1])[0].tolist()
        assert executed[0] == model.count_cost(counts).executed[0]
        assert infos["cap"].cost.ratio[0] <= max(b, model.floor()) + 1e-9
        costs.append(executed[0].item())
    assert costs == sorted(costs) and costs[-1] > costs[0]


def test_per_sample_budgets_pick_their_own_widths(model, images):
    budgets = torch.tensor([0.1, 1.0, 0.5, 0.1, 1.0, 0.5])
    executed = infer(model, images, budgets, "threshold")[1].cost.executed
    assert executed[0] == executed[3] < executed[2] == executed[5] < executed[1] == executed[4]


def test_compact_reads_only_the_weight_prefix():
    """Zeroing every weight outside width 0.5's slices changes nothing at width 0.5."""
    model = randomize_all_bn(tiny()).eval()
    x = torch.randn(2, 3, 8, 8)
    budget = model.table.budgets[0]  # width 0.5
    before = compact(model)(x, budget=budget)
    full = compact(model)(x, budget=1.0)
    with torch.no_grad():
        c0 = channels_at(4, 0.5)
        model.stem.weight[c0:] = 0
        for block in model.blocks:
            cin, cout = block.conv1.in_channels, block.conv1.out_channels
            n_in, n_out = channels_at(cin, 0.5), channels_at(cout, 0.5)
            for conv, (o, i) in ((block.conv1, (n_out, n_in)), (block.conv2, (n_out, n_out)),
                                 (block.short_conv, (n_out, n_in))):
                if conv is not None:
                    conv.weight[o:] = 0
                    conv.weight[:, i:] = 0
        model.fc.weight[:, channels_at(8, 0.5):] = 0
    assert torch.equal(compact(model)(x, budget=budget), before)
    assert not torch.allclose(compact(model)(x, budget=1.0), full)


def test_gradients_reach_only_the_weight_prefix():
    model = tiny().train()
    model.forward_width(torch.randn(4, 3, 8, 8), 0.5).square().sum().backward()
    n0 = channels_at(4, 0.5)
    assert model.stem.weight.grad[:n0].abs().sum() > 0 and not model.stem.weight.grad[n0:].any()
    for block in model.blocks:
        g = block.conv1.weight.grad
        n_in, n_out = channels_at(block.conv1.in_channels, 0.5), channels_at(block.conv1.out_channels, 0.5)
        assert g[:n_out, :n_in].abs().sum() > 0
        assert not g[n_out:].any() and not g[:, n_in:].any()
        assert not block.conv2.weight.grad[n_out:].any() and not block.conv2.weight.grad[:, n_out:].any()
        assert not block.bn1.weight.grad[n_out:].any()
    assert not model.fc.weight.grad[:, channels_at(8, 0.5):].any()


@pytest.mark.parametrize("size", [32, 48])
def test_full_width_macs_match_fvcore(size):
    model = slimmable_resnet20()
    cost = model.macs([], size, size)
    assert cost.dense == fvcore_macs(model, size)
    with torch.no_grad():
        _, info = model(torch.randn(1, 3, size, size), budget=1.0, return_info=True)
    assert info.cost.executed.tolist() == [cost.dense]


def test_tiny_by_hand():
    model = tiny()
    # stem 3->4 at 8x8; block 1: 4->4 (two 3x3); block 2: 4->8 stride 2 (two 3x3 + 1x1 projection)
    dense = 64 * 27 * 4 + 2 * 64 * 9 * 16 + 16 * 9 * 32 + 16 * 9 * 64 + 16 * 32 + 8 * 3
    assert model.gated_totals() == [4, 4, 8, 8]  # stream 1, inner 1, stream 2, inner 2
    half = model.count_cost([2, 2, 4, 4])
    assert half.dense == dense == 39704
    assert half.executed.tolist() == [64 * 27 * 2 + 64 * 9 * 8 + 16 * 9 * 8 + 16 * 9 * 16 + 16 * 8 + 4 * 3]
    assert half.executed.tolist() == [11660]
    mixed = model.count_cost([1, 3, 5, 2])
    assert mixed.executed.tolist() == [64 * 27 + 64 * 9 * 6 + 16 * 9 * 2 + 16 * 9 * 10 + 16 * 5 + 5 * 3]
    assert model.floor() == pytest.approx(11660 / 39704)
    assert model.table.budgets == pytest.approx([11660 / 39704, 1.0])


def test_bn_recalibration_changes_only_the_chosen_widths():
    model = slimmable_resnet20().eval()
    batches = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    levels = model.config.width_levels
    chosen = levels.index(0.5)
    assert recalibrate_bn(model, batches, widths=[0.5]) == 2
    assert not model.training and all(bn.momentum == 0.1 for bn in bns)
    for bn, old in zip(bns, before, strict=True):
        changed = (bn.running_mean != old).any(1)
        assert changed[chosen] and changed.sum() == 1
        assert bn.num_batches_tracked[chosen] == 2
    # the stem BN's statistics at width 0.5 are the mean over both batches of its input
    n = channels_at(16, 0.5)
    with torch.no_grad():
        mean = torch.cat([model.stem(x)[:, :n] for x in batches]).mean((0, 2, 3))
    assert torch.allclose(model.stem_bn.running_mean[chosen, :n], mean, atol=1e-5)
    recalibrate_bn(model, batches)
    assert all((bn.running_mean != old).any(1).all() for bn, old in zip(bns, before, strict=True))


def test_mixed_widths_train_with_per_width_batch_statistics():
    model = tiny().train()
    logits = model(torch.randn(4, 3, 8, 8), budget=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    logits.square().sum().backward()
    assert (model.stem_bn.num_batches_tracked == 1).all()  # each width updated its own
    assert model.stem.weight.grad.abs().sum() > 0


def test_bad_width_levels_are_rejected():
    with pytest.raises(ValueError, match="width_levels"):
        SlimmableResNetConfig(width_levels=(0.5, 0.75))
