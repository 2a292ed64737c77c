
import pytest
import torch

from models.networks.channel_gating import CGResNet, CGResNetConfig, cg_resnet20, resnet20
from tests.conftest import randomize_bn
from tests.dynamic_helpers import fvcore_macs, infer, run_with_skipped_parts_failing

BUDGETS = [0.0, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(cg_resnet20()).eval()


def tiny():
    return CGResNet(CGResNetConfig(num_classes=3, blocks=(1, 1), widths=(4, 8), base_fraction=0.5,
                                   input_size=8))


def test_cost_carries_the_per_pixel_count(model, images):
    info = infer(model, images, 0.5)[1]
    assert info.cost.pixel_executed.shape == (images.shape[0],)
    assert len(info.masks) == len(model.gated_totals()) == 18


def test_topk_cost_is_exact_and_within_budget(model, images):
    for b in BUDGETS:
        info = infer(model, images, b, "topk")[1]
        executed = info.cost.executed
        assert (executed == executed[0]).all()
        counts = model.table.layer_counts(info.plan.effective[:1])[0].tolist()
        assert executed[0] == model.count_cost(counts).executed[0]
        assert info.cost.ratio[0] <= max(b, model.floor()) + 1e-9
        assert torch.equal(info.cost.pixel_executed, executed)  # topk: every pixel of a kept channel


def test_pixel_count_is_the_ideal_below_the_executed(model, images):
    full = infer(model, images, 1.0)[1].cost
    assert (full.executed == full.dense).all() and torch.equal(full.pixel_executed, full.executed)
    cost = infer(model, images, 0.5, "threshold")[1].cost
    floor = model.count_cost([0] * 18).executed[0]
    assert (cost.pixel_executed <= cost.executed).all() and (cost.pixel_executed >= floor).all()
    assert (cost.pixel_executed < cost.executed).any()


def test_per_sample_mode_equals_batched(pairs):
    model, executor = pairs[torch.float64]
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    budget = torch.tensor([0.3, 0.9, 0.3, 0.6])
    batched = executor(x, budget=budget)
    alone = executor(x, budget=budget, per_sample=True)
    assert torch.allclose(batched, alone, atol=1e-6)


@pytest.mark.parametrize("size", [32, 48])
def test_dense_macs_match_fvcore(size):
    dense = resnet20()
    gated = cg_resnet20()  # at budget 1.0 every gate is open: partial sums + rests = the dense convs
    cost = infer(gated, torch.randn(1, 3, size, size), 1.0)[1].cost
    assert cost.dense == fvcore_macs(gated, size) == dense.macs([], size, size).dense
    assert cost.executed.tolist() == [cost.dense]


def test_tiny_by_hand():
    model = tiny()
    assert [c.base for c in model.convs()] == [2, 2, 2, 4]
    stem = 64 * 27 * 4
    dense = stem + 2 * 64 * 9 * 16 + 16 * 9 * 32 + 16 * 9 * 64 + 16 * 32 + 8 * 3
    masks = [torch.tensor([[1, 0, 0, 0]]), torch.zeros(1, 4), torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]]),
             torch.ones(1, 8)]
    masks = [m.bool() for m in masks]
    opened = [torch.tensor([10]), torch.tensor([0]), torch.tensor([5]), torch.tensor([100])]
    cost = model.macs(masks, 8, 8, open_pixels=opened)
    assert cost.dense == dense == 39704
    # per conv: base partial sums for every output channel and pixel, the rest per kept channel
    # (executed) or per open (channel, pixel) (pixel_executed); 18 = 9 * 2 rest inputs, 36 = 9 * 4
    base = 64 * 9 * 2 * 4 + 64 * 9 * 2 * 4 + 16 * 9 * 2 * 8 + 16 * 9 * 4 * 8
    fixed = stem + base + 16 * 32 + 8 * 3
    assert cost.executed.tolist() == [fixed + 1 * 64 * 18 + 3 * 16 * 18 + 8 * 16 * 36]
    assert cost.pixel_executed.tolist() == [fixed + 10 * 18 + 5 * 18 + 100 * 36]
    assert cost.gates.tolist() == [0]
    assert cost.kept.tolist() == [[1, 0, 3, 8]]
    assert model.floor() == pytest.approx(fixed / dense)


def test_open_pixels_follow_the_gate_scores():
    """The reference's per-pixel count equals a recount from the gates' scores."""
    model = randomize_bn(tiny()).eval()
    x = torch.randn(2, 3, 8, 8)
    _, info = infer(model, x, 0.6, "threshold")
    tau = info.plan.tau
    opened, h = [], torch.relu(model.stem_bn(model.stem(x)))
    with torch.no_grad():
        for block in model.blocks:
            y = []
            for conv in (block.conv1, block.conv2):
                src = h if conv is block.conv1 else torch.relu(block.bn1(y[0]))
                p = conv.partial(src)
                open_ = conv.scores(p) >= tau[:, None, None, None]
                opened.append(open_.sum((1, 2, 3)))
                y.append(p + open_ * conv.rest(src))
            h = torch.relu(block.bn2(y[1]) + block.short(h))
    expected = model.macs([m > 0 for m in info.masks], 8, 8, open_pixels=opened)
    assert torch.equal(info.cost.pixel_executed, expected.pixel_executed)


def test_gradients_reach_the_gates():
    model = randomize_bn(cg_resnet20()).train()
    logits, info = model(torch.randn(2, 3, 32, 32), budget=0.5, return_info=True)
    (logits.square().mean() + sum(m.sum() for m in info.masks) * 1e-3).backward()
    for conv in model.convs():
        assert conv.gate.weight.grad.abs().sum() > 0 and conv.gate.bias.grad.abs().sum() > 0


def test_closed_channels_do_not_compute_their_rest(model, monkeypatch):
    cost = run_with_skipped_parts_failing(model, monkeypatch, model.convs(), "rest_weight")
    assert (cost.ratio == model.floor()).all()
