"""Models that come as dense variants, served by their engine: the ranked FastNet (width
levels, a calibrated cascade) and the dense FastNet, compiled in OpenVINO where it is
installed, else run in torch; batched requests keep their budget."""

import pytest
import torch

from models.core.budget import CalibrationTable
from models.core.checkpoint import save_checkpoint
from models.core.registry import create_model
from models.engines.variants import openvino_available
from tests.conftest import randomize_bn
from tests.service_helpers import CLASSES, encode, make_client, wait_ready

pytestmark = pytest.mark.service
RUNTIMES = ["torch"] + (["openvino"] if openvino_available() else [])


def ranked():
    """A small ranked FastNet with a cascade from its narrowest level to its widest."""
    torch.manual_seed(0)
    model = randomize_bn(create_model("acs_ranked_fastnet", widths=(32, 64, 64),
                                      levels=(0.25, 0.5, 0.75, 1.0))).eval()
    table = model.uniform_table()
    model.table = CalibrationTable(table.budgets, table.taus, table.counts, table.floor, "cascade",
                                   {"cascade": {"threshold": [[table.floor, 0, 3, 0.2], [1.0, 3, 3, 2.0]],
                                                "cap": [[table.floor, 0, 0, 2.0], [0.6, 0, 1, 0.2]]}})
    return model


@pytest.fixture(scope="module", params=RUNTIMES)
def client(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_checkpoint(ranked(), root / "ranked", name="ranked", classes=CLASSES, serve_default=True,
                    dense_baseline="dense")
    torch.manual_seed(1)
    dense = randomize_bn(create_model("fastnet", widths=(16, 32, 32))).eval()
    save_checkpoint(dense, root / "dense", name="dense", classes=CLASSES)
    with make_client(str(root), runtime=request.param, max_batch_size=32) as c:
        wait_ready(c.get)
        yield c, request.param


def post(c, n: int, budget: float, policy: str, model: str = "ranked"):
    files = [("file", (f"{i}.png", encode(color=(i * 7 % 256, 90, 200 - i)), "image/png"))
             for i in range(n)]
    r = c.post(f"/v1/models/{model}/predict?budget={budget}&policy={policy}", files=files)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_models_report_their_engine_and_baseline(client):
    c, runtime = client
    models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
    assert models["ranked"]["engine"] == runtime == models["dense"]["engine"]
    assert models["ranked"]["dense_baseline"] == "dense"
    assert c.get("/v1/models").json()["default"] == "ranked"


@pytest.mark.parametrize("budget", [0.3, 0.6, 0.9])
def test_cap_never_exceeds_the_budget_in_a_batched_request(client, budget):
    c, _ = client
    floor = c.get("/v1/models/ranked").json()["budget_floor"]
    ratios = [p["cost"]["executed_ratio"] for p in post(c, 16, budget, "cap")]
    assert max(ratios) <= max(budget, floor) + 1e-6


def test_each_image_is_charged_its_own_variants(client):
    """A batch runs each image at its own level (probe, then the widest for the uncertain
    ones): every image costs the narrowest level, or the narrowest plus the widest."""
    c, _ = client
    dense = post(c, 1, 1.0, "topk")[0]["cost"]
    floor = post(c, 1, 0.0, "topk")[0]["cost"]
    assert dense["executed_ratio"] == 1.0 and floor["executed_ratio"] < 0.5
    costs = {p["cost"]["executed_macs"] for p in post(c, 16, 0.5, "threshold")}
    assert costs <= {floor["executed_macs"], floor["executed_macs"] + dense["executed_macs"]}
    for p in post(c, 16, 0.5, "threshold"):
        escalated = p["cost"]["executed_macs"] > floor["executed_macs"]
        assert p["cost"]["layer_skipped_ratio"] == (dense if escalated else floor)["layer_skipped_ratio"]


def test_the_dense_baseline_answers_at_its_full_cost(client):
    c, _ = client
    (p,) = post(c, 1, 0.3, "threshold", model="dense")
    assert p["cost"]["executed_ratio"] == 1.0 and p["cost"]["skipped_channel_ratio"] == 0.0
    assert len(p["top_k"]) == 5
