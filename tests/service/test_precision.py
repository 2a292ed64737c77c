"""Serving in bfloat16: every registered network's compact executor runs in it, the server's
dtype setting resolves as documented, and `auto` reads what `acs-train precision` recorded."""

import copy

import pytest
import torch

import models.engines.precision
from models.core.checkpoint import read_manifest, write_manifest
from models.core.registry import create_model, model_names
from models.engines.compact import compact
from models.engines.precision import serving_dtype
from tests.dynamic_helpers import randomize_all_bn
from tests.service_helpers import encode, make_client, make_weights, wait_ready

CIFAR = [name for name in model_names() if not name.endswith(("50", "101"))]  # 32x32 inputs


@pytest.mark.parametrize("name", CIFAR)
def test_every_compact_executor_serves_in_bfloat16(name):
    torch.manual_seed(0)
    model = randomize_all_bn(create_model(name, num_classes=10)).eval()
    x = torch.randn(3, 3, 32, 32)
    full = compact(copy.deepcopy(model))(x, budget=1.0, policy="threshold")
    half_model = model.to(torch.bfloat16)
    half = compact(half_model)(x.to(torch.bfloat16), budget=1.0, policy="threshold")
    assert half.dtype == torch.bfloat16
    # Within 10% (relative L2): ungated networks land within 1%, gated ones may keep a few other
    # channels where rounding moves a gate's score across the threshold.
    assert (half.float() - full).norm() <= 0.1 * full.norm()
    budgets = torch.tensor([0.9, 0.5, 0.3])
    for policy in ("threshold", "topk", "cap"):  # the gated paths, budgets mixed in one batch
        logits, info = compact(half_model)(x.to(torch.bfloat16), budget=budgets, policy=policy,
                                           return_info=True)
        assert torch.isfinite(logits.float()).all() and info.cost.executed.shape == (3,)


def test_the_dtype_setting(monkeypatch):
    cpu = torch.device("cpu")
    holds = {"dtypes": {"bfloat16": {"top1_drop_max": 0.0008}}}
    drops = {"dtypes": {"bfloat16": {"top1_drop_max": 0.0021}}}
    assert serving_dtype("float32", cpu, holds) == torch.float32
    assert serving_dtype("bfloat16", cpu, drops) == torch.bfloat16  # asked for: served
    monkeypatch.setattr(models.engines.precision, "bf16_supported", lambda device: True)
    assert serving_dtype("auto", cpu, holds) == torch.bfloat16
    assert serving_dtype("auto", cpu, drops) == torch.float32  # more than 0.1 point lost
    assert serving_dtype("auto", cpu, {}) == torch.float32  # never measured
    monkeypatch.setattr(models.engines.precision, "bf16_supported", lambda device: False)
    assert serving_dtype("auto", cpu, holds) == torch.float32  # no fast bfloat16 here
    with pytest.raises(ValueError):
        serving_dtype("float16", cpu, holds)


def test_a_server_in_bfloat16(tmp_path, monkeypatch):
    weights = make_weights(tmp_path)
    manifest = read_manifest(tmp_path / "tiny")
    write_manifest(tmp_path / "tiny", {**manifest, "dtypes": {"bfloat16": {"top1_drop_max": 0.0}}})
    monkeypatch.setattr(models.engines.precision, "bf16_supported", lambda device: True)
    with make_client(weights) as c:  # dtype auto: tiny holds (as recorded), cheap never measured
        wait_ready(c.get)
        dtypes = {m["name"]: m["dtype"] for m in c.get("/v1/models").json()["models"]}
        assert dtypes == {"tiny": "bfloat16", "cheap": "float32"}
        r = c.post("/v1/models/tiny/predict?budget=0.5", content=encode(),
                   headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0]["top_k"]
        assert abs(sum(t["probability"] for t in top) - 1) < 0.02  # all three classes
        tensor = {"name": "INPUT", "datatype": "FP32", "shape": [2, 3, 16, 16], "data": [0.1] * 1536}
        v2 = c.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
        assert v2.status_code == 200, v2.text
