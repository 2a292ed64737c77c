"""Faults that must neither leave the server stuck nor hide from a client: models that fail
to load, weights a non-root server cannot read, refused bodies, a model that raises, messages."""

import base64
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import requests

import models.core.checkpoint
from models.core.checkpoint import MANIFEST, WEIGHTS, load_checkpoint, save_checkpoint, sha256_file
from models.networks.densenet import ACSDenseNet, DenseNetConfig
from tests.conftest import randomize_bn
from tests.service_helpers import ThreadedServer, encode, make_client, make_weights, wait_ready

ROOT = Path(__file__).resolve().parents[2]


def save_tiny(folder: Path, name: str) -> Path:
    model = ACSDenseNet(DenseNetConfig(num_classes=3, growth=4, bn_size=2, init_features=8,
                                       blocks=(2, 2), gate="cheap", input_size=16))
    return save_checkpoint(randomize_bn(model).eval(), folder, name=name, classes=["a", "b", "c"])


def wait_loaded(client, timeout: float = 60) -> dict:
    """/readyz once every folder was tried (ready or not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get("/readyz").json()
        if body["loaded"]:
            return body
        time.sleep(0.05)
    raise TimeoutError("models never finished loading")


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def corrupt_weights_with_matching_hash(folder: Path, monkeypatch) -> None:
    (folder / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + b"\x00" * 64)
    edit_manifest(folder, lambda m: m["weights"].update(sha256=sha256_file(folder / WEIGHTS)))


def unreadable_weights(folder: Path, monkeypatch) -> None:
    real = models.core.checkpoint.sha256_file

    def denied(path):  # root reads any file, so the refusal is simulated
        if Path(path).parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(models.core.checkpoint, "sha256_file", denied)


def manifest_not_json(folder: Path, monkeypatch) -> None:
    (folder / MANIFEST).write_text("{oops")


def unknown_architecture(folder: Path, monkeypatch) -> None:
    edit_manifest(folder, lambda m: m.update(architecture="vgg"))


def weights_entry_not_an_object(folder: Path, monkeypatch) -> None:
    edit_manifest(folder, lambda m: m.update(weights="model.safetensors"))


def unexpected_error(folder: Path, monkeypatch) -> None:
    import service.registry

    real = service.registry.load_checkpoint

    def buggy(path, device):
        if Path(path) == folder:
            raise RuntimeError("a bug while loading")
        return real(path, device)
    monkeypatch.setattr(service.registry, "load_checkpoint", buggy)


@pytest.mark.parametrize("fault,cause", [
    (corrupt_weights_with_matching_hash, "not a readable safetensors file"),
    (unreadable_weights, "cannot read the weights: Permission denied"),
    (manifest_not_json, "not valid JSON"),
    (unknown_architecture, "unknown architecture 'vgg'"),
    (weights_entry_not_an_object, "weights must be"),
    (unexpected_error, "loading failed: RuntimeError"),
])
def test_a_model_that_fails_to_load_is_reported_and_the_others_serve(tmp_path, monkeypatch, caplog,
                                                                      fault, cause):
    weights = tmp_path / "weights"
    save_tiny(weights / "broken", "broken")
    save_tiny(weights / "good", "good")
    fault(weights / "broken", monkeypatch)
    caplog.set_level(logging.ERROR, "acs_serve")
    with make_client(str(weights)) as c:
        ready = wait_loaded(c)
        response = c.get("/readyz")
        assert response.status_code == 503 and not ready["ready"]  # strict: every folder must load
        assert ready["models"] == {"good": True}
        assert cause in ready["errors"]["broken"], ready["errors"]
        assert str(tmp_path) not in response.text + c.get("/v1/models").text  # no host paths
        assert c.get("/v1/models").json()["errors"] == ready["errors"]
        assert 'acs_model_load_failed{model="broken"} 1.0' in c.get("/metrics").text
        served = c.post("/v1/models/good/predict", content=encode(), headers={"content-type": "image/png"})
        assert served.status_code == 200
    assert any("broken" in r.getMessage() for r in caplog.records), "the failure is logged"
    with make_client(str(weights), strict_readiness=False) as c:
        assert wait_loaded(c)["ready"] and c.get("/readyz").status_code == 200


def test_two_folders_with_one_model_name_do_not_replace_each_other(tmp_path):
    save_tiny(tmp_path / "a", "same")
    save_tiny(tmp_path / "b", "same")
    with make_client(str(tmp_path)) as c:
        ready = wait_loaded(c)
        assert ready["models"] == {"same": True}
        assert "'same' is already served" in ready["errors"]["b"]


def test_a_missing_weights_folder_is_named_and_predict_points_at_readyz(tmp_path):
    with make_client(str(tmp_path / "nowhere")) as c:
        ready = wait_loaded(c)
        assert not ready["ready"] and "does not exist" in ready["errors"]["weights_dir"]
        r = c.post("/v1/predict", content=encode(), headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.json()["reason"] == "no_model"
        assert "/readyz" in r.json()["error"]


def test_checkpoints_are_written_readable_and_load_as_a_non_root_user(tmp_path):
    folder = save_tiny(tmp_path / "tiny", "tiny")
    for name in (MANIFEST, WEIGHTS):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name
    if os.geteuid() != 0:
        return  # not root: cannot switch to another user; the modes above are the point
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o755)
        shutil.copytree(folder, shared / "tiny")  # keeps the modes the writer gave
        nobody = 65534
        os.setegid(nobody)
        os.seteuid(nobody)  # files are now opened with nobody's rights
        try:
            load_checkpoint(shared / "tiny")
        finally:
            os.seteuid(0)
            os.setegid(0)
    finally:
        shutil.rmtree(shared)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    weights = make_weights(tmp_path_factory.mktemp("weights"))
    with ThreadedServer(weights, max_body_bytes=100_000, max_images_per_request=2) as s:
        yield s


def test_clients_that_send_the_whole_body_first_see_the_413(server):
    url, big = f"{server.url}/v1/predict", b"x" * 8_000_000
    request = urllib.request.Request(url, data=big, headers={"Content-Type": "image/png"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["reason"] == "body_too_large"
    r = requests.post(url, data=big, headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    chunked = requests.post(url, data=(b"x" * 100_000 for _ in range(80)),
                            headers={"Content-Type": "image/png"}, timeout=30)
    assert chunked.status_code == 413
    with requests.Session() as session:  # the connection stays usable after a drained 413
        png = {"Content-Type": "image/png"}
        assert session.post(url, data=b"x" * 200_000, headers=png).status_code == 413
        ok = session.post(url, data=encode(), headers=png)
        assert ok.status_code == 200
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert 'acs_requests_total{code="413",route="/v1/predict"}' in metrics


def test_too_many_images_is_413_in_every_form(server):
    png = encode()
    files = [("file", (f"{i}.png", png, "image/png")) for i in range(3)]
    multipart = requests.post(f"{server.url}/v1/predict", files=files, timeout=30)
    as_json = requests.post(f"{server.url}/v1/predict", timeout=30,
                            json={"images": [base64.b64encode(png).decode()] * 3})
    v2 = requests.post(f"{server.url}/v2/models/tiny/infer", timeout=30, json={"inputs": [
        {"name": "IMAGE", "datatype": "BYTES", "shape": [3], "data": [base64.b64encode(png).decode()] * 3}]})
    for r in (multipart, as_json, v2):
        assert r.status_code == 413 and r.json()["reason"] == "too_many_images", r.text
        assert "max_images_per_request" in r.json()["error"]


def test_a_model_whose_forward_raises_answers_500_and_serves_on(tmp_path, caplog):
    weights = make_weights(tmp_path)
    with make_client(weights) as c:
        wait_ready(c.get)
        batcher = c.app.state.server.registry.models["tiny"].batcher
        working = batcher.executor

        def raising(*args, **kwargs):
            batcher.executor = working  # fails once
            raise RuntimeError("simulated fault in the model")
        batcher.executor = raising
        caplog.set_level(logging.ERROR, "acs_serve")
        r = c.post("/v1/models/tiny/predict", content=encode(), headers={"content-type": "image/png"})
        assert r.status_code == 500, r.text
        body = r.json()
        assert body["reason"] == "inference_error" and body["request_id"] == r.headers["x-request-id"]
        assert "RuntimeError" in body["error"]
        logged = [rec for rec in caplog.records if rec.exc_info]
        assert len(logged) == 1 and "simulated fault" in str(logged[0].exc_info[1])
        again = c.post("/v1/models/tiny/predict", content=encode(), headers={"content-type": "image/png"})
        assert again.status_code == 200
        assert 'acs_inference_failures_total{model="tiny"} 1.0' in c.get("/metrics").text


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with make_client(make_weights(tmp_path_factory.mktemp("weights"))) as c:
        wait_ready(c.get)
        yield c


def predict(client, params: str) -> httpx.Response:
    return client.post(f"/v1/models/tiny/predict{params}", content=encode(),
                       headers={"content-type": "image/png"})


def test_messages_say_what_was_wrong(client):
    nan = predict(client, "?budget=nan")
    assert nan.status_code == 422 and "budget: must be a number in [0, 1]" in nan.json()["error"]
    long = predict(client, "?timeout=500")
    assert long.status_code == 422 and "max_timeout_s" in long.json()["error"]
    effective = predict(client, "?budget=0.3&policy=topk").json()["predictions"][0]["budget"]["effective"]
    assert effective == 0.3  # not float32 noise (0.30000001192092896)
    both = client.post("/v1/models/tiny/predict?budget=7", json={
        "image": base64.b64encode(encode()).decode(), "budget": 0.5})
    assert both.status_code == 422  # an invalid query value is refused even where the body wins
    unknown = client.post("/v2/models/tiny/infer", json={"inputs": [
        {"name": "PIXELS", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.0] * 768}]})
    assert unknown.status_code == 400
    assert "IMAGE" in unknown.json()["error"] and "INPUT" in unknown.json()["error"]


def test_openapi_describes_predict_infer_and_metrics(client):
    schema = client.get("/openapi.json").json()
    predict_op = schema["paths"]["/v1/predict"]["post"]
    assert {"multipart/form-data", "application/json", "image/png", "image/jpeg"} <= set(
        predict_op["requestBody"]["content"])
    assert {p["name"] for p in predict_op["parameters"]} == {"budget", "min_budget", "policy", "top_k",
                                                              "timeout"}
    for status in ("400", "413", "415", "422", "500", "503", "504"):
        content = predict_op["responses"][status]["content"]["application/json"]
        assert content["schema"]["$ref"].endswith("/ErrorBody")
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    assert "application/json" in infer["requestBody"]["content"]
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


def test_schemathesis_with_every_check_passes(server):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if cli is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    result = subprocess.run([cli, "--config-file", str(ROOT / "tests/data/schemathesis.toml"), "run",
                             f"{server.url}/openapi.json", "--checks", "all", "--max-examples", "25",
                             "--seed", "1", "--request-timeout", "30"],
                            capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stdout[-6000:]


def test_a_client_that_leaves_mid_body_is_a_499_not_a_server_error(tmp_path, caplog):
    """A client that times out while sending (the open-loop benchmark's did) is logged and
    counted as 499, without a traceback, and never as a 5xx."""
    import socket

    caplog.set_level(logging.INFO, "acs_serve")
    with ThreadedServer(make_weights(tmp_path)) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: image/png\r\nContent-Length: 10000\r\n\r\n" + encode()[:50])
            time.sleep(0.2)
        deadline, metrics = time.monotonic() + 10, ""
        while time.monotonic() < deadline and 'code="499"' not in metrics:
            time.sleep(0.1)
            metrics = httpx.get(f"{server.url}/metrics").text
        assert 'acs_requests_total{code="499",route="/v1/models/{name}/predict"} 1.0' in metrics
        assert 'code="500"' not in metrics
        assert httpx.post(f"{server.url}/v1/models/tiny/predict", content=encode(),
                          headers={"content-type": "image/png"}).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any("client closed the connection" in r.getMessage() for r in caplog.records)
