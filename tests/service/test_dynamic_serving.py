"""The other dynamic methods are servable: one checkpoint of each, through the /v1 API."""

import pytest
import torch

from models.core.checkpoint import save_checkpoint
from models.networks.channel_gating import cg_resnet20
from models.networks.dfs import dfs_resnet38
from models.networks.slimmable import slimmable_resnet20
from tests.dynamic_helpers import randomize_all_bn
from tests.service_helpers import CLASSES, encode, make_client, wait_ready

FACTORIES = {"slim": slimmable_resnet20, "cg": cg_resnet20, "dfs": dfs_resnet38}
ARCHITECTURES = {"slim": "slimmable_resnet", "cg": "cg_resnet", "dfs": "dfs_resnet"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    for name, factory in FACTORIES.items():
        save_checkpoint(randomize_all_bn(factory()).eval(), root / name, name=name, classes=CLASSES)
    with make_client(str(root), max_batch_size=2) as c:
        wait_ready(c.get)
        yield c


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("policy", ["threshold", "topk", "cap"])
def test_predict_with_a_budget(client, name, policy):
    response = client.post(f"/v1/models/{name}/predict?budget=0.5&policy={policy}",
                           files={"file": ("x.png", encode(), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == name
    prediction = body["predictions"][0]
    assert len(prediction["top_k"]) == 5
    assert prediction["budget"]["requested"] == 0.5 and prediction["budget"]["policy"] == policy
    cost = prediction["cost"]
    assert 0 < cost["executed_macs"] <= cost["dense_macs"] * 1.01
    assert cost["budget_unit"] == ("bitops" if name == "dfs" else "macs")
    if policy != "threshold":  # the bounded figure is in the budget's unit (BitOps for DFS)
        assert cost["budget_ratio"] <= 0.5 + 1e-6
    if name != "dfs":
        assert cost["budget_ratio"] == pytest.approx(cost["executed_ratio"])


def test_models_are_listed_with_their_architectures(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert {n: models[n]["architecture"] for n in FACTORIES} == ARCHITECTURES
    assert all(models[n]["ready"] and models[n]["gated"] for n in FACTORIES)


def test_the_budget_metric_is_in_the_budget_unit(client):
    """Alerts compare acs_budget_ratio with the requested budget: for DFS that is BitOps."""
    def metric(name: str) -> float:
        prefix = f'{name}{{budget_tier="0.50",model="dfs",policy="topk"}} '
        lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = metric("acs_budget_ratio_sum"), metric("acs_executed_mac_ratio_sum")
    cost = client.post("/v1/models/dfs/predict?budget=0.5&policy=topk",
                       files={"file": ("x.png", encode(), "image/png")}).json()["predictions"][0]["cost"]
    after = metric("acs_budget_ratio_sum"), metric("acs_executed_mac_ratio_sum")
    assert after[0] - before[0] == pytest.approx(cost["budget_ratio"])
    assert after[1] - before[1] == pytest.approx(cost["executed_ratio"])
    assert cost["budget_ratio"] != pytest.approx(cost["executed_ratio"])
