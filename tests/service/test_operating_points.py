"""What a request's operating point buys (expected top-1 and notes), and parameter mistakes that
must not pass silently: unknown names, conflicting values."""

from __future__ import annotations

import base64

import pytest

from models.core.checkpoint import save_checkpoint
from models.core.registry import create_model
from tests.conftest import randomize_bn
from tests.service_helpers import encode, make_client, wait_ready

CLASSES = ["a", "b", "c"]


def row(policy: str, budget: float, top1: float) -> dict:
    return {"policy": policy, "budget": budget, "top1": top1}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    gated = randomize_bn(create_model("acs_ranked_fastnet", num_classes=3, widths=(16, 32, 32))).eval()
    accuracy = [row("threshold", 0.25, 0.5), row("threshold", 0.5, 0.7), row("threshold", 1.0, 0.8),
                row("topk", 0.25, 0.3), row("topk", 1.0, 0.8)]
    save_checkpoint(gated, root / "ranked", name="ranked", classes=CLASSES, accuracy=accuracy)
    dense = randomize_bn(create_model("fastnet", num_classes=3, widths=(16, 32, 32))).eval()
    save_checkpoint(dense, root / "dense", name="dense", classes=CLASSES,
                    accuracy=[row("threshold", 1.0, 0.9)])
    with make_client(str(root), default_model="ranked") as c:
        wait_ready(c.get)
        yield c


def post(client, query: str = "", model: str = "ranked", **kwargs):
    kwargs.setdefault("files", {"file": ("x.png", encode(size=(32, 32)), "image/png")})
    return client.post(f"/v1/models/{model}/predict{query}", **kwargs)


def budget_of(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["budget"]


def test_expected_top1_is_interpolated_from_the_evaluation(client):
    point = budget_of(post(client, "?budget=0.75&policy=threshold"))
    assert point["expected_top1"] == pytest.approx(0.75) and point["notes"] == []
    assert budget_of(post(client, "?budget=0.25"))["expected_top1"] == pytest.approx(0.5)


def test_an_operating_point_near_chance_says_so(client):
    point = budget_of(post(client, "?budget=0.25&policy=topk"))
    assert point["expected_top1"] == pytest.approx(0.3)
    assert any("near chance" in note for note in point["notes"])


def test_an_unmeasured_operating_point_says_so(client):
    cap = budget_of(post(client, "?budget=0.5&policy=cap"))
    assert cap["expected_top1"] is None and "not measured" in cap["notes"][0]
    below = budget_of(post(client, "?budget=0.1&policy=threshold"))  # below the lowest measured
    assert below["expected_top1"] is None


def test_a_dense_model_says_its_budget_is_fixed(client):
    point = budget_of(post(client, "?budget=0.25&policy=topk", model="dense"))
    assert point["effective"] == 1.0 and point["expected_top1"] == pytest.approx(0.9)
    assert "dense model" in point["notes"][0] and "fixed" in point["notes"][0]
    assert budget_of(post(client, "?budget=1", model="dense"))["notes"] == []


@pytest.mark.parametrize("query,body", [
    ("?budgt=0.1", {}), ("?budget=0.5&foo=1", {}), ("", {"data": {"budgt": "0.1"}}),
])
def test_unknown_parameters_are_422_listing_the_accepted_names(client, query, body):
    r = post(client, query, **body)
    assert r.status_code == 422 and r.json()["reason"] == "bad_parameter"
    error = r.json()["error"]
    assert "unknown parameter" in error and "budget, min_budget, policy, top_k, timeout" in error
    assert ("budgt" in error) or ("foo" in error)


def test_an_unknown_json_key_is_422(client):
    image = base64.b64encode(encode(size=(32, 32))).decode()
    r = client.post("/v1/models/ranked/predict", json={"image": image, "budjet": 0.5})
    assert r.status_code == 422 and "budjet" in r.json()["error"]
    assert client.post("/v1/models/ranked/predict", json={"image": image, "budget": 0.5}).status_code == 200


def test_conflicting_values_are_422_and_agreeing_ones_pass(client):
    r = post(client, "?budget=0.5", data={"budget": "0.25"})
    assert r.status_code == 422 and "conflicting" in r.json()["error"] and "budget" in r.json()["error"]
    assert budget_of(post(client, "?budget=0.5", data={"budget": "0.50"}))["requested"] == 0.5
    assert budget_of(post(client, "?policy=topk", data={"budget": "0.25"}))["policy"] == "topk"
