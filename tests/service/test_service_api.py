import base64
import io
import json
import threading
import time

import pytest
from PIL import Image

from service.config import Settings, from_env, parse_args
from service.routes_v1 import PredictResponse
from tests.service_helpers import CLASSES, encode, make_client, make_weights, wait_ready


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def client(weights):
    with make_client(weights, max_batch_size=4) as c:
        wait_ready(c.get)
        yield c


def predict(client, data=None, params="", **kwargs):
    if data is not None:
        kwargs.setdefault("files", {"file": ("x.png", data, "image/png")})
    return client.post(f"/v1/predict{params}", **kwargs)


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == {"cheap": True, "tiny": True}
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "acs-serve"
    assert client.get("/docs").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_liveness_does_not_wait_for_loading(weights, monkeypatch):
    from service.registry import ModelRegistry

    original = ModelRegistry.load
    release = threading.Event()

    def slow_load(self, path):
        release.wait(10)
        return original(self, path)

    monkeypatch.setattr(ModelRegistry, "load", slow_load)
    with make_client(weights) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        refused = predict(c, encode())
        assert refused.status_code == 503 and refused.json()["reason"] == "loading"
        assert refused.headers["retry-after"]
        release.set()
        wait_ready(c.get)
        assert predict(c, encode()).status_code == 200


def test_prediction_response(client):
    r = predict(client, encode(), "?budget=0.5&policy=topk&top_k=3",
                headers={"X-Request-ID": "my-id-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == body["request_id"] == "my-id-1"
    PredictResponse.model_validate(body)  # the schema /docs shows
    assert body["model"] == "cheap"
    (p,) = body["predictions"]
    assert len(p["top_k"]) == 3 and all(t["label"] in CLASSES for t in p["top_k"])
    probs = [t["probability"] for t in p["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert p["budget"] == {"requested": 0.5, "min_budget": 0.5, "effective": 0.5, "lowered": None,
                           "policy": "topk", "expected_top1": None,
                           "notes": ["top-1 was not measured for policy topk at budget 0.5"]}
    cost = p["cost"]
    assert cost["executed_ratio"] <= 0.5
    assert cost["executed_macs"] == pytest.approx(cost["executed_ratio"] * cost["dense_macs"])
    assert len(cost["layer_skipped_ratio"]) == 18
    assert 0 < cost["skipped_channel_ratio"] < 1
    assert set(body["timing"]) == {"queue_ms", "inference_ms", "total_ms"}
    assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0
    generated = predict(client, encode()).headers["x-request-id"]
    assert len(generated) == 32


def test_lower_budget_costs_less_and_floor_is_reported(client):
    costs = []
    for budget in (1.0, 0.6, 0.3, 0.0):
        p = predict(client, encode(), f"?budget={budget}&policy=topk").json()["predictions"][0]
        costs.append(p["cost"]["executed_ratio"])
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    floor = client.get("/v1/models/cheap").json()["budget_floor"]
    last = predict(client, encode(), "?budget=0&policy=topk").json()["predictions"][0]
    assert last["budget"]["effective"] == pytest.approx(floor)


def test_default_operating_point_comes_from_the_manifest(client):
    p = client.post("/v1/models/tiny/predict", content=encode(),
                    headers={"content-type": "image/png"}).json()["predictions"][0]
    assert p["budget"] == {"requested": 0.5, "min_budget": 0.5, "effective": 0.5, "lowered": None,
                           "policy": "topk", "expected_top1": None,
                           "notes": ["top-1 was not measured for policy topk at budget 0.5"]}
    assert [t["label"] for t in p["top_k"]] != [] and len(p["top_k"]) == 3


@pytest.mark.parametrize("fmt,mode,kw", [
    ("JPEG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "L", {}), ("WEBP", "RGB", {}),
    ("GIF", "P", {}), ("BMP", "RGB", {}), ("PNG", "P", {"transparency": 0}),
])
def test_common_formats_and_modes(client, fmt, mode, kw):
    data = encode(fmt, size=(300, 120), mode=mode, color=3 if mode == "P" else None, **kw)
    r = client.post("/v1/predict", content=data, headers={"content-type": f"image/{fmt.lower()}"})
    assert r.status_code == 200, r.text


def test_every_input_form(client):
    png, jpg = encode("PNG"), encode("JPEG")
    multi = client.post("/v1/predict?policy=topk&budget=0.4", files=[
        ("file", ("a.png", png, "image/png")), ("file", ("b.jpg", jpg, "image/jpeg"))])
    assert multi.status_code == 200 and len(multi.json()["predictions"]) == 2
    raw = client.post("/v1/predict", content=jpg, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200
    one = client.post("/v1/predict", json={"image": base64.b64encode(png).decode(),
                                           "budget": 0.3, "policy": "cap", "top_k": 2})
    assert one.status_code == 200
    p = one.json()["predictions"][0]
    assert p["budget"]["policy"] == "cap" and len(p["top_k"]) == 2
    many = client.post("/v1/models/tiny/predict",
                       json={"images": [base64.b64encode(x).decode() for x in (png, jpg, png)]})
    assert many.status_code == 200 and len(many.json()["predictions"]) == 3
    form = client.post("/v1/predict", files={"file": ("a.png", png, "image/png")},
                       data={"budget": "0.25", "policy": "topk"})
    assert form.json()["predictions"][0]["budget"]["requested"] == 0.25


@pytest.mark.parametrize("kwargs,status,reason", [
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media"),
    ({"content": b"", "headers": {}}, 415, "unsupported_media"),
    ({"content": b"not an image", "headers": {"content-type": "image/png"}}, 400, "bad_image"),
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "bad_image"),
    ({"content": encode("TIFF"), "headers": {"content-type": "image/tiff"}}, 415,
     "unsupported_media"),
    ({"content": b"{oops", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
    ({"json": {"image": "###"}}, 400, "bad_request"),
    ({"json": {"picture": "x"}}, 400, "bad_request"),
    ({"json": [1, 2]}, 400, "bad_request"),
    ({"data": {"budget": "0.5"}, "files": {"other": ("a", b"x", "image/png")}}, 400,
     "bad_request"),
])
def test_bad_requests_get_clear_errors(client, kwargs, status, reason):
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason and r.json()["error"]


@pytest.mark.parametrize("params,field", [
    ("?budget=1.5", "budget"), ("?budget=-1", "budget"), ("?budget=abc", "budget"),
    ("?budget=nan", "budget"), ("?policy=greedy", "policy"), ("?top_k=0", "top_k"),
    ("?timeout=-3", "timeout"),
])
def test_bad_parameters_are_422(client, params, field):
    r = predict(client, encode(), params)
    assert r.status_code == 422 and field in r.json()["error"]


def test_unknown_model_is_404(client):
    r = client.post("/v1/models/nope/predict", content=encode(),
                    headers={"content-type": "image/png"})
    assert r.status_code == 404 and r.json()["reason"] == "unknown_model"
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/no/such/route").status_code == 404


def test_body_and_pixel_limits(weights):
    with make_client(weights, max_body_bytes=20_000, max_pixels=1_000_000) as c:
        wait_ready(c.get)
        big = predict(c, b"x" * 30_000)
        assert big.status_code == 413 and big.json()["reason"] == "body_too_large"

        def chunks():
            for _ in range(30):
                yield b"x" * 1000

        chunked = c.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
        assert chunked.status_code == 413
        bomb = encode("PNG", size=(5000, 5000), mode="1", color=0)
        assert len(bomb) < 20_000
        r = predict(c, bomb)
        assert r.status_code == 413 and r.json()["reason"] == "too_many_pixels"
        assert predict(c, encode()).status_code == 200


def test_api_key(weights):
    with make_client(weights, api_key="s3cret") as c:
        wait_ready(c.get)
        assert predict(c, encode()).status_code == 401
        refused = predict(c, encode(), headers={"Authorization": "Bearer nope", "X-Request-ID": "r-1"})
        assert refused.status_code == 401 and refused.json()["request_id"] == "r-1"
        assert predict(c, encode(), headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert predict(c, encode(), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/v1/models").status_code == 401
        for open_route in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
            assert c.get(open_route).status_code == 200


def slow_down(client, seconds: float) -> None:
    for served in client.app.state.server.registry.models.values():
        run = served.batcher.executor

        def slow(*args, run=run, **kwargs):
            time.sleep(seconds)
            return run(*args, **kwargs)

        served.batcher.executor = slow


@pytest.mark.parametrize("status", [503, 429])
def test_full_queue_is_refused_with_retry_after(weights, status):
    with make_client(weights, max_queue_size=2, max_batch_size=1, reject_status=status) as c:
        wait_ready(c.get)
        slow_down(c, 0.3)
        results = []
        threads = [threading.Thread(target=lambda: results.append(predict(c, encode())))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and status in codes, codes
        refused = next(r for r in results if r.status_code == status)
        assert refused.json()["reason"] == "queue_full" and refused.headers["retry-after"] == "1"
        files = [("file", (f"{i}.png", encode(), "image/png")) for i in range(3)]
        too_many = c.post("/v1/predict", files=files)
        assert too_many.status_code == 413 and too_many.json()["reason"] == "too_many_images"


def test_deadlines_refuse_or_drop_never_hang(weights):
    with make_client(weights, max_batch_size=1) as c:
        wait_ready(c.get)
        slow_down(c, 0.4)
        results = {}
        first = threading.Thread(target=lambda: results.update(a=predict(c, encode())))
        first.start()
        time.sleep(0.05)
        start = time.monotonic()
        late = predict(c, encode(), "?timeout=0.1")
        assert late.status_code in (503, 504) and late.json()["reason"] == "deadline"
        assert time.monotonic() - start < 1.0
        first.join()
        assert results["a"].status_code == 200


def test_deadline_passing_in_the_queue_is_504(weights):
    with make_client(weights, max_batch_size=1) as c:
        wait_ready(c.get)
        slow_down(c, 0.4)
        for served in c.app.state.server.registry.models.values():
            served.batcher.seconds_per_image = 0.0  # nothing looks hopeless up front
        results = {}
        first = threading.Thread(target=lambda: results.update(a=predict(c, encode())))
        first.start()
        time.sleep(0.05)
        late = predict(c, encode(), "?timeout=0.15")
        assert late.status_code == 504 and late.json()["reason"] == "deadline"
        first.join()
        assert results["a"].status_code == 200


def test_model_listing(client):
    listing = client.get("/v1/models").json()
    assert listing["default"] == "cheap"
    names = {m["name"] for m in listing["models"]}
    assert names == {"cheap", "tiny"}
    meta = client.get("/v1/models/cheap").json()
    assert meta["classes"] == CLASSES
    assert 0 < meta["budget_floor"] < 0.4
    assert meta["calibration"]["budgets"][0] == pytest.approx(meta["budget_floor"])
    assert meta["accuracy"] == [] and meta["input"]["size"] == 32


def metric(client, name: str, **labels) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_as_requests_are_served(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.history == [] and "acs_build_info" in r.text
    before = {
        "requests": metric(client, "acs_requests_total", route="/v1/predict", code="200"),
        "macs": metric(client, "acs_executed_macs_total", model="cheap"),
        "saved": metric(client, "acs_saved_macs_total", model="cheap"),
        "layer": metric(client, "acs_layer_channels_total", model="cheap", layer="3"),
        "skip": metric(client, "acs_skipped_channel_ratio_count", model="cheap", policy="topk",
                       budget_tier="0.50"),
        "rejected": metric(client, "acs_rejections_total", model="cheap", reason="unsupported_media"),
    }
    predict(client, encode(), "?budget=0.4&policy=topk")
    client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"})
    assert metric(client, "acs_requests_total", route="/v1/predict", code="200") == \
        before["requests"] + 1
    assert metric(client, "acs_executed_macs_total", model="cheap") > before["macs"]
    assert metric(client, "acs_saved_macs_total", model="cheap") > before["saved"]
    assert metric(client, "acs_layer_channels_total", model="cheap", layer="3") == \
        before["layer"] + 32
    assert metric(client, "acs_skipped_channel_ratio_count", model="cheap", policy="topk",
                  budget_tier="0.50") == before["skip"] + 1
    assert metric(client, "acs_rejections_total", model="cheap", reason="unsupported_media") == \
        before["rejected"] + 1
    assert metric(client, "acs_model_ready", model="cheap") == 1
    assert metric(client, "acs_batch_size_count", model="cheap") > 0
    assert metric(client, "acs_model_load_seconds", model="cheap") > 0


def test_settings_from_environment_and_flags():
    s = from_env({"ACS_MAX_BATCH_SIZE": "16", "ACS_WARMUP": "false", "ACS_API_KEY": "k"})
    assert (s.max_batch_size, s.warmup, s.api_key) == (16, False, "k")
    s = parse_args(["--max-batch-size", "4", "--no-warmup", "--reject-status", "429"])
    assert (s.max_batch_size, s.warmup, s.reject_status) == (4, False, 429)
    with pytest.raises(ValueError):
        Settings(reject_status=500)


def test_v2_json_inference(client):
    png = base64.b64encode(encode()).decode()
    body = {"id": "r1", "parameters": {"budget": 0.3, "policy": "topk"},
            "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2], "data": [png, png]}]}
    r = client.post("/v2/models/cheap/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1"
    assert out["PROBABILITIES"]["shape"] == [2, 10]
    assert all(x <= 0.3 for x in out["EXECUTED_MAC_RATIO"]["data"])
    tensor = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 3, 32, 32],
                          "data": [0.1] * 3072}],
              "outputs": [{"name": "PROBABILITIES"}]}
    r = client.post("/v2/models/cheap/infer", json=tensor)
    assert [o["name"] for o in r.json()["outputs"]] == ["PROBABILITIES"]
    meta = client.get("/v2/models/cheap").json()
    assert {i["name"] for i in meta["inputs"]} == {"IMAGE", "INPUT"}
    assert client.get("/v2/models/cheap/ready").status_code == 200
    assert client.get("/v2/models/cheap/config").json()["max_batch_size"] == 4


@pytest.mark.parametrize("body,status", [
    ({"inputs": []}, 400),
    ({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [1.0]}]},
     400),
    ({"inputs": [{"name": "INPUT", "datatype": "INT8", "shape": [1], "data": [1]}]}, 400),
    ({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["!!"]}]}, 400),
    ({"parameters": {"budget": 3},
      "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 3, 1, 1],
                  "data": [0, 0, 0]}]}, 422),
    ({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 3, 1, 1], "data": [0, 0, 0]}]},
     400),
    ({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0] * 48}],
      "outputs": [{"name": "NOPE"}]}, 400),
])
def test_v2_bad_requests(client, body, status):
    r = client.post("/v2/models/cheap/infer", content=json.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_exif_orientation_is_applied():
    from service.imaging import decode

    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    assert decode(buf.getvalue(), 10_000).size == (20, 40)


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text and "http://" not in page.text.replace(
        "http://www.w3.org", "")
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-assets/{asset}" in page.text
        served = client.get(f"/docs-assets/{asset}")
        assert served.status_code == 200 and len(served.content) > 100_000
