"""The shipped checkpoints in weights/: each loads (hash checked) and classifies the committed
sample of CIFAR-10-JPEG test images (samples/cifar10-jpeg-test, 20 per class) as well as its
manifest's accuracy table says, through the service's own preprocessing and the executor the
server runs (its engine, in its served precision)."""

import math
from pathlib import Path

import pytest
import torch

from models.core.budget import POLICIES
from models.core.checkpoint import load_checkpoint, read_manifest
from models.engines.precision import serving_dtype
from models.engines.variants import VariantExecutor, executor_for, openvino_available
from service.imaging import preprocess

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "weights"
SAMPLES = sorted((ROOT / "samples" / "cifar10-jpeg-test").glob("*.jpg"))
SHIPPED = sorted(p.parent.name for p in WEIGHTS.glob("*/manifest.json"))
DEFAULT_MODEL = "acs_ranked_fastnet_wide"


def test_the_default_model_and_its_dense_baseline_ship():
    assert DEFAULT_MODEL in SHIPPED
    assert read_manifest(WEIGHTS / DEFAULT_MODEL)["dense_baseline"] in SHIPPED
    assert [n for n in SHIPPED if read_manifest(WEIGHTS / n).get("serve_default")] == [DEFAULT_MODEL]
    assert len(SAMPLES) == 200


@pytest.mark.parametrize("name", SHIPPED)
def test_manifests_hold_no_paths_of_the_training_machine(name):
    """/v1/models shows the provenance: no absolute paths in it."""
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []
    assert not [s for s in strings(read_manifest(WEIGHTS / name)) if s.startswith("/")]


def sample_batch(manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    classes = manifest["classes"]
    labels = torch.tensor([classes.index(p.name.rsplit("_", 1)[0]) for p in SAMPLES])
    return preprocess([p.read_bytes() for p in SAMPLES], manifest, 10**6), labels


def expected_top1(manifest: dict, budget: float, policy: str = "threshold") -> float:
    rows = [r for r in manifest["accuracy"] if r["policy"] == policy and abs(r["budget"] - budget) < 1e-6]
    assert rows, f"{manifest['name']}: no accuracy row for {policy} at {budget}"
    return rows[0]["top1"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_classifies_the_samples_as_its_manifest_says(name):
    checkpoint = load_checkpoint(WEIGHTS / name)  # verifies the sha256 and every tensor
    manifest = read_manifest(WEIGHTS / name)
    assert manifest["provenance"]["evaluation"]["images"] == 10_000
    x, labels = sample_batch(manifest)
    dtype = serving_dtype("auto", torch.device("cpu"), manifest)
    executor = executor_for(checkpoint.model, "cpu", dtype)
    variants = isinstance(executor, VariantExecutor)
    if not variants:
        x = x.to(dtype)
    gated = checkpoint.model.gated
    points = [(b, policy) for policy in (POLICIES if gated else ("threshold",))
              for b in ((1.0, 0.5, 0.25) if gated else (1.0,))]
    for budget, policy in points:  # every policy's rows measured, and the samples agree
        p = expected_top1(manifest, budget, policy)
        logits, info = executor(x, budget=budget, policy=policy, return_info=True)
        top1 = (logits.argmax(1) == labels).float().mean().item()
        # 200 images: allow three standard errors of a binomial proportion below the test split's
        assert top1 >= p - 3 * math.sqrt(p * (1 - p) / len(labels)), (name, budget, policy, top1, p)
        with torch.no_grad():
            reference, own = checkpoint.model.float()(x.float(), budget=budget, policy=policy,
                                                      return_info=True)
        bounded = checkpoint.model.budget_ratio(own.cost)  # MACs, or BitOps for DFS
        assert float(bounded.mean()) <= budget + 0.05  # each image's own keep tracks b
        if variants:  # each image runs its own variants: the reference's, up to rounding
            assert abs(float(info.cost.ratio.mean() - own.cost.ratio.mean())) <= 0.02
        else:
            assert (info.cost.executed >= own.cost.executed).all()  # batches charge what ran
        agree = 0.97 if dtype == torch.bfloat16 else 0.99
        assert (reference.argmax(1) == logits.argmax(1)).float().mean() >= agree


@pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
@pytest.mark.parametrize("name", [n for n in SHIPPED if load_checkpoint(WEIGHTS / n).model.variants()])
def test_openvino_float32_computes_what_torch_does(name):
    """On real weights and photos: OpenVINO's float32 CPU plugin once fused MaxPool -> GELU
    wrongly (0.17 off after FastNet's first block); the variants pool so that it cannot."""
    checkpoint = load_checkpoint(WEIGHTS / name)
    x, _ = sample_batch(checkpoint.manifest)
    torch_run = VariantExecutor(checkpoint.model, "torch")
    openvino = VariantExecutor(checkpoint.model, "openvino")
    for budget in (1.0, 0.25):
        expected = torch_run(x, budget=budget, policy="topk")
        assert torch.allclose(openvino(x, budget=budget, policy="topk"), expected, atol=2e-3)
