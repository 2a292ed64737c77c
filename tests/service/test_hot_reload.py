"""Model folders added, changed or removed while serving are picked up (model_poll_s), with
readiness and /v1/models following, and no request to the other models dropped."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from models.core.checkpoint import save_checkpoint
from models.networks.densenet import ACSDenseNet, DenseNetConfig
from tests.conftest import randomize_bn
from tests.service_helpers import encode, make_client, wait_ready


def tiny_model() -> ACSDenseNet:
    return randomize_bn(ACSDenseNet(DenseNetConfig(num_classes=3, growth=4, bn_size=2, init_features=8,
                                                   blocks=(2, 2), gate="cheap", input_size=16))).eval()


def save(root, name: str, **kw) -> None:
    save_checkpoint(tiny_model(), root / name, name=name, classes=["a", "b", "c"], **kw)


def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the server never picked up the change")
        time.sleep(0.05)


def served(client) -> dict:
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


def predict(client, name: str):
    return client.post(f"/v1/models/{name}/predict", content=encode(),
                       headers={"content-type": "image/png"})


@pytest.fixture
def weights(tmp_path):
    save(tmp_path, "steady")
    return tmp_path


def test_added_changed_and_removed_models_follow_without_dropping_the_others(weights):
    with make_client(str(weights), model_poll_s=0.1) as client:
        wait_ready(client.get)
        statuses, changing, stop = [], [], threading.Event()

        def traffic(name: str, log: list):
            while not stop.is_set():
                log.append(predict(client, name).status_code)

        workers = [threading.Thread(target=traffic, args=("steady", statuses)),
                   threading.Thread(target=traffic, args=("added", changing))]
        for worker in workers:
            worker.start()
        try:
            save(weights, "added")  # a new folder
            until(lambda: "added" in served(client))
            assert predict(client, "added").status_code == 200
            assert client.get("/readyz").json()["models"] == {"steady": True, "added": True}

            save(weights, "added", default_budget=0.5)  # changed in place
            until(lambda: served(client)["added"]["default"]["budget"] == 0.5)
            assert predict(client, "added").status_code == 200

            shutil.rmtree(weights / "added")  # removed
            until(lambda: "added" not in served(client))
            assert predict(client, "added").status_code == 404
            assert client.get("/readyz").status_code == 200
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert statuses and set(statuses) == {200}
        assert 200 in changing and set(changing) <= {200, 404}  # absent, served, reloaded: none refused


def test_a_broken_folder_is_reported_and_tried_again_once_fixed(weights):
    with make_client(str(weights), model_poll_s=0.1) as client:
        wait_ready(client.get)
        (weights / "broken").mkdir()
        (weights / "broken" / "manifest.json").write_text("{not json")
        until(lambda: "broken" in client.get("/readyz").json()["errors"])
        assert client.get("/readyz").status_code == 503  # strict readiness: every folder
        assert predict(client, "steady").status_code == 200
        shutil.rmtree(weights / "broken")
        save(weights, "broken")
        until(lambda: "broken" in served(client))
        assert client.get("/readyz").json()["errors"] == {}
        assert client.get("/readyz").status_code == 200


def test_polling_off_serves_what_was_there_at_start(weights):
    with make_client(str(weights), model_poll_s=0) as client:
        wait_ready(client.get)
        save(weights, "late")
        time.sleep(0.5)
        assert "late" not in served(client)
