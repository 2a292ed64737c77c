
import pytest
import torch

from models.networks.dfs import (
    BITOPS_LABEL,
    DFSResNet,
    DFSResNetConfig,
    dfs_resnet38,
    quantize_activation,
    quantize_weight,
    resnet38,
)
from tests.conftest import randomize_bn
from tests.dynamic_helpers import fvcore_macs, infer, run_with_skipped_parts_failing

BUDGETS = [0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_bn(dfs_resnet38()).eval()


def tiny():
    return DFSResNet(DFSResNetConfig(num_classes=3, blocks=(2, 1), widths=(4, 8), bits=(8, 16),
                                     input_size=8))


def test_cost_carries_bitops_and_every_identity_block_is_gated(model, images):
    info = infer(model, images, 0.5)[1]
    assert info.cost.bitops.shape == (images.shape[0],)
    assert len(info.masks) == len(model.gated_totals()) == 16  # every identity-shortcut block

def test_table_is_in_bitops(model):
    table = model.table
    assert table.budgets[0] == pytest.approx(model.floor()) and table.budgets[-1] == 1.0
    assert table.extra["budget_unit"] == BITOPS_LABEL
    for budget, counts in zip(table.budgets, table.counts, strict=True):
        assert model.bitops_ratio(counts) <= budget + 1e-9
    assert table.counts[-1] == [3] * 16
    assert model.floor() == pytest.approx(model.count_cost([0] * 16).bitops_ratio[0].item())


@pytest.mark.parametrize("policy", ["threshold", "topk", "cap"])
def test_bitops_are_monotone_in_the_budget(model, images, policy):
    costs = [infer(model, images, b, policy)[1].cost.bitops.double().mean().item() for b in BUDGETS]
    assert costs == sorted(costs) and costs[-1] > costs[0]


def test_topk_bitops_are_exact_and_within_budget(model, images):
    for b in BUDGETS:
        info = infer(model, images, b, "topk")[1]
        bitops = info.cost.bitops
        assert (bitops == bitops[0]).all()
        counts = model.table.layer_counts(info.plan.effective[:1])[0].tolist()
        assert info.cost.kept[0].tolist() == counts
        assert bitops[0] == model.count_cost(counts).bitops[0]
        assert info.cost.bitops_ratio[0] <= max(b, model.floor()) + 1e-9


def test_cap_never_exceeds_the_budget_per_request(model, images):
    budgets = torch.rand(images.shape[0], generator=torch.Generator().manual_seed(3))
    for scale in (1.0, 0.6, 0.3):
        info = infer(model, images, budgets * scale, "cap")[1]
        limit = torch.clamp(budgets.double() * scale, min=model.floor())
        assert (info.cost.bitops_ratio <= limit + 1e-9).all()
        assert (model.budget_ratio(info.cost) == info.cost.bitops_ratio).all()


def test_masks_are_thermometers(model, images):
    for policy in ("threshold", "topk", "cap"):
        info = infer(model, images, 0.5, policy)[1]
        for mask, scores in zip(info.masks, info.scores, strict=True):
            kept = mask > 0
            assert (kept[:, 1:] <= kept[:, :-1]).all()  # a prefix of the precision levels
            assert (scores[:, 1:] <= scores[:, :-1]).all()


def test_skipped_blocks_are_not_computed(model, monkeypatch):
    run_with_skipped_parts_failing(model, monkeypatch, model.gated_blocks(), "branch")


@pytest.mark.parametrize("size", [32, 48])
def test_dense_macs_match_fvcore(size):
    dense = resnet38()
    gated = dfs_resnet38()
    cost = infer(gated, torch.randn(1, 3, size, size), 1.0)[1].cost
    assert cost.dense == dense.macs([], size, size).dense
    assert cost.executed.tolist() == [fvcore_macs(gated, size)]  # every block, plus the gates
    assert cost.executed[0] == cost.dense + cost.gates[0]
    assert cost.gates[0] == sum(b.gate.macs() for b in gated.gated_blocks())


def test_tiny_by_hand():
    model = tiny()
    assert model.gated_totals() == [2, 2] and model.blocks[2].fixed_bits == 16
    stem, block, down, short, fc, gate = 64 * 27 * 4, 64 * 9 * 32, 16 * 9 * 96, 16 * 32, 8 * 3, 4 * 2
    masks = [torch.tensor([[True, True]]), torch.tensor([[False, False]])]  # 16-bit, skipped
    cost = model.macs(masks, 8, 8)
    assert cost.dense == stem + 2 * block + down + short + fc == 58136
    assert cost.executed.tolist() == [stem + 2 * gate + block + down + short + fc]
    assert cost.gates.tolist() == [2 * gate]
    fp = 32 * 32
    assert cost.bitops.tolist() == [fp * (stem + 2 * gate + short + fc) + 16 * 16 * (block + down)]
    assert cost.bitops_dense == fp * (stem + 2 * gate + short + fc) + 16 * 16 * (2 * block + down)
    assert cost.bitops_fp32 == fp * 58136
    assert cost.bitops_label == BITOPS_LABEL
    eight = model.macs([torch.tensor([[True, False]])] * 2, 8, 8)  # both blocks at 8 bits
    assert eight.executed.tolist() == [cost.dense + 2 * gate]  # quantized MACs are still MACs
    assert eight.bitops.tolist() == [fp * (stem + 2 * gate + short + fc) + 8 * 8 * 2 * block + 16 * 16 * down]
    floor = (fp * (stem + 2 * gate + short + fc) + 16 * 16 * down) / cost.bitops_dense
    assert model.floor() == pytest.approx(floor)


@pytest.mark.parametrize("bits", range(8, 17))
def test_fake_quantization_levels(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(3, 64, 3, 3, generator=g)
    q = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax((1, 2, 3), keepdim=True) / qmax
    steps = q / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= qmax + 1e-3
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()
    assert all(len(q[i].unique()) <= 2**bits - 1 for i in range(3))
    x = torch.rand(2, 8, 16, 16, generator=g) * 5
    a = quantize_activation(x, bits)
    ascale = x.amax((1, 2, 3), keepdim=True) / (2**bits - 1)
    steps = a / ascale
    assert torch.allclose(steps, steps.round(), atol=1e-3) and (a >= 0).all()
    assert torch.equal(a.amax((1, 2, 3)), x.amax((1, 2, 3)))  # the range is kept
    assert ((a - x).abs() <= ascale / 2 + 1e-6).all()
    assert all(len(a[i].unique()) <= 2**bits for i in range(2))
    if bits == 8:  # few enough levels to be visible
        assert len(q[0].unique()) < 255 < 576 and len(a[0].unique()) <= 256


def test_quantization_gradients_are_straight_through():
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    x = torch.rand(2, 4, 5, 5, requires_grad=True)
    (quantize_weight(w, 8).sum() + quantize_activation(x, 8).sum()).backward()
    assert torch.equal(w.grad, torch.ones_like(w)) and torch.equal(x.grad, torch.ones_like(x))


def test_bits_outside_8_to_16_are_rejected():
    for bits in [(4, 8), (8, 32), (16, 8)]:
        with pytest.raises(ValueError, match="bits"):
            DFSResNetConfig(bits=bits)


def test_gradients_reach_the_gates():
    model = randomize_bn(DFSResNet(DFSResNetConfig(blocks=(2, 2, 2)))).train()
    logits, info = model(torch.randn(4, 3, 32, 32), budget=0.6, return_info=True)
    logits.square().mean().backward()
    for block in model.gated_blocks():
        assert block.gate.fc.weight.grad.abs().sum() > 0


def calibrated(seed: int = 0) -> tuple[DFSResNet, torch.Tensor]:
    """A small DFS network with its static 8-bit ranges calibrated on random images."""
    torch.manual_seed(seed)
    model = randomize_bn(DFSResNet(DFSResNetConfig(blocks=(2, 2), widths=(8, 16), bits=(8, 12, 16))))
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    assert model.recalibrate([x[:12], x[12:]]) == 2
    return model.eval(), x


def test_recalibrate_sets_the_8_bit_levels_static_ranges():
    model, x = calibrated()
    first = model.gated_blocks()[0]
    stem = torch.relu(model.stem_bn(model.stem(x)))
    assert first.act_limit[0].item() == pytest.approx(stem.amax((1, 2, 3)).mean().item(), rel=1e-5)
    assert (first.act_limit > 0).all()
    state = model.calibrated_state()
    gated = [i for i, b in enumerate(model.blocks) if b.gate is not None]
    assert sorted(state) == [f"blocks.{i}.act_limit" for i in gated]
    assert DFSResNet(DFSResNetConfig(gate=False)).recalibrate([x]) == 0  # nothing to calibrate


def test_static_ranges_quantize_the_8_bit_level_in_eval_only():
    model, x = calibrated()
    block = model.gated_blocks()[0]
    h = torch.relu(model.stem_bn(model.stem(x))) * 3  # some values above the range
    limit = block.act_limit[0]
    static = quantize_activation(h, 8, limit)
    assert static.max() <= limit + 1e-6 and len(static.unique()) <= 256  # saturates, 256 levels
    expected = torch.fake_quantize_per_tensor_affine(h, (limit / 255).item(), 0, 0, 255)
    assert torch.allclose(static, expected)
    assert torch.equal(torch.stack(block.limits(8)), block.act_limit) and block.limits(12) == (None, None)
    model.train()
    assert block.limits(8) == (None, None)  # training quantizes per sample


def test_openvino_runs_the_8_bit_level_in_int8_and_matches_the_reference():
    pytest.importorskip("openvino")
    from models.engines.compact import CompactExecutor
    from models.engines.variants import engine_name, executor_for

    model, x = calibrated()
    served, reference = executor_for(model), CompactExecutor(model)
    assert engine_name(served) == "openvino-steps"
    precisions = served.kernel_precisions()
    assert len(precisions) == len(model.gated_blocks())
    for levels in precisions:  # skipped, 8 bits in int8, 12 and 16 in float
        assert levels[0] == [] and set(levels[1]) <= {"u8", "i8"} and levels[1]
        assert all(set(p) == {"f32"} for p in levels[2:])
    assert set(served.fixed) == {tuple(row) for row in model.table.counts}  # topk rows, whole
    for policy in ("topk", "threshold"):
        for budget in (0.3, 0.6, 1.0):
            logits, info = served(x, budget, policy, return_info=True)
            want, want_info = reference(x, budget, policy, return_info=True)
            assert torch.allclose(logits, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
            assert (logits.argmax(1) == want.argmax(1)).float().mean() >= 0.9
            if policy == "topk":  # the same levels: the same masks and BitOps
                assert all(torch.equal(a, b) for a, b in zip(info.masks, want_info.masks, strict=True))
                assert torch.equal(info.cost.bitops, want_info.cost.bitops)
    served.compiled = None  # a topk batch of one configuration: one call of it compiled whole
    logits, info = served(x, 0.6, "topk", return_info=True)
    want, want_info = reference(x, 0.6, "topk", return_info=True)
    assert (logits.argmax(1) == want.argmax(1)).float().mean() >= 0.9
    assert torch.equal(info.cost.bitops, want_info.cost.bitops)
    other = torch.randn(2, 3, 40, 40)  # another input size: the torch steps
    assert torch.equal(served(other, 0.5), reference(other, 0.5))


def test_the_dense_baseline_compiles_whole():
    pytest.importorskip("openvino")
    from models.engines.variants import engine_name, executor_for

    torch.manual_seed(0)
    dense = randomize_bn(DFSResNet(DFSResNetConfig(blocks=(2, 2), widths=(8, 16), gate=False))).eval()
    served = executor_for(dense)
    assert engine_name(served) == "openvino" and len(served.runtime.requests) == 1
    x = torch.randn(4, 3, 32, 32)
    logits, info = served(x, 1.0, return_info=True)
    want = dense(x, budget=1.0)
    assert torch.allclose(logits, want, atol=1e-4 * want.abs().max().item())
    assert (info.cost.executed == dense.macs([], 32, 32).dense).all()
    assert (dense.budget_ratio(info.cost) == 1).all()  # its BitOps, as training's evaluation reads


def test_a_batch_regroups_by_level_at_every_block(model, images):
    import copy

    from models.engines.compact import CompactExecutor

    executor = CompactExecutor(copy.deepcopy(model).double())  # float64: no rounding flips
    images = images.double()
    calls = []
    for step in executor.steps:
        if step.gate is not None:
            def counted(state, keep, apply=step.apply, index=step.gated_index):
                calls.append((index, keep.shape[0]))
                return apply(state, keep)
            step.apply = counted
    budgets = torch.linspace(0.2, 1.0, images.shape[0])  # a budget per image: levels differ
    logits, info = executor(images, budgets, "threshold", return_info=True)
    levels = [mask.sum(1) for mask in info.masks]
    assert any(len(level.unique()) > 1 for level in levels)  # the batch splits...
    for index, level in enumerate(levels):  # ...into one call a level, block by block
        group_sizes = level.unique(return_counts=True)[1].tolist()
        assert sorted(n for i, n in calls if i == index) == sorted(group_sizes)
    alone = executor(images, budgets, "threshold", per_sample=True)
    assert torch.allclose(logits, alone)
