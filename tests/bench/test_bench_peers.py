"""bench/peers.py pieces that need neither a peer server nor hey: the goal check, stopping a
process group, and the peers' inference path (same top class as acs-serve's compact executor
on the same image)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.core.checkpoint import load_checkpoint, save_checkpoint
from models.core.registry import create_model
from models.engines.compact import compact
from service.imaging import preprocess

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "peer_servers")]  # as the scripts import each other
import peers  # noqa: E402
from common import png_bytes, stop_group  # noqa: E402
from torchserve_handler import ClassifierHandler  # noqa: E402


def test_versus_peers_sets_latency_goals_at_one_client_and_throughput_goals_at_sixteen():
    def row(server, budget, concurrency, throughput, p50, **extra):
        return {"server": server, "model": "m", "budget": budget, "concurrency": concurrency,
                "ok": 1, "throughput": throughput, "p50_ms": p50, **extra}

    rows = [row("fastapi-openvino", 1.0, 1, 500, 2.0), row("litserve", 1.0, 1, 900, 1.0),
            row("acs-serve", 1.0, 1, 450, 2.2), row("acs-serve", 0.5, 1, 550, 1.8),
            row("acs-serve", 0.25, 1, 700, 1.3),
            row("fastapi-openvino", 1.0, 16, 600, 26.0), row("acs-serve", 1.0, 16, 650, 24.0),
            row("acs-serve", 0.5, 16, 700, 22.0),
            row("acs-serve", 1.0, 4, 100, 40.0, images=8), row("acs-serve", 0.5, 4, 140, 30.0, images=8)]
    dense, half, quarter, loaded, loaded_half = peers.versus_peers(rows)
    assert dense["peer"] == "fastapi-openvino"  # the reference, not the fastest peer
    assert dense["p50_ratio"] == pytest.approx(1.1) and dense["met"] is True
    assert half["met"] is False  # 0.9 > 0.85
    assert quarter["met"] is True  # 0.65 <= 0.7
    assert loaded["throughput_ratio"] == pytest.approx(650 / 600) and loaded["met"] is True
    assert loaded_half["met"] is False  # 1.17 < 1.2
    multi = peers.multi_image(rows)
    assert multi["ratio"] == pytest.approx(1.4) and multi["met"] is True


def test_missing_peers_are_named_with_the_reason(monkeypatch):
    monkeypatch.setattr(peers.util, "find_spec", lambda name: None)
    monkeypatch.setattr(peers.shutil, "which", lambda tool: None if tool == "java" else tool)
    assert "pip install litserve" in peers.missing("litserve")
    assert "pip install openvino" in peers.missing("fastapi-openvino")
    assert peers.missing("torchserve").startswith("java not found")


def test_stop_group_leaves_no_process_behind():
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30"], start_new_session=True)
    time.sleep(0.2)
    start = time.monotonic()
    assert stop_group(proc, timeout=5)
    assert time.monotonic() - start < 2 and proc.poll() is not None


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A freshly initialized densenet40 checkpoint (the same top class, not accuracy)."""
    path = tmp_path_factory.mktemp("weights") / "densenet40"
    save_checkpoint(create_model("densenet40").eval(), path, name="densenet40",
                    classes=[f"class{i}" for i in range(10)])
    return path


def our_top_class(weights, images: list[bytes]) -> list[int]:
    checkpoint = load_checkpoint(weights)
    x = preprocess(images, checkpoint.manifest, 10**8)
    return compact(checkpoint.model)(x, budget=1.0, policy="topk").argmax(1).tolist()


class Context:
    def __init__(self, model_dir) -> None:
        self.system_properties = {"model_dir": str(model_dir)}


def test_torchserve_handler_matches_acs_serve(dense):
    images = [png_bytes(), png_bytes(40)]
    handler = ClassifierHandler()
    handler.initialize(Context(dense))
    out = handler.handle([{"body": images[0]}, {"data": bytearray(images[1])}], None)
    assert [o["top_k"][0]["index"] for o in out] == our_top_class(dense, images)
    assert all(len(o["top_k"]) == 5 for o in out)


def test_litserve_api_matches_acs_serve(dense):
    pytest.importorskip("litserve")
    from litserve_app import ClassifierAPI

    images = [png_bytes(), png_bytes()]
    api = ClassifierAPI(str(dense), 1, max_batch_size=8, batch_timeout=0.001)
    api.pre_setup()  # LitServer does this: picks the default unbatch
    api.setup("cpu")
    batch = api.batch([api.decode_request(image) for image in images])
    out = [api.encode_response(o) for o in api.unbatch(api.predict(batch))]
    assert [o["top_k"][0]["index"] for o in out] == our_top_class(dense, images)


@pytest.fixture(scope="module")
def dense_fastnet(tmp_path_factory):
    """A small dense FastNet checkpoint (the network the FastAPI + OpenVINO peer compiles)."""
    path = tmp_path_factory.mktemp("weights") / "fastnet"
    model = create_model("fastnet", widths=(16, 32, 32)).eval()
    save_checkpoint(model, path, name="fastnet", classes=[f"class{i}" for i in range(10)])
    return path


def test_fastapi_openvino_peer_matches_acs_serve(dense_fastnet):
    pytest.importorskip("openvino")
    from fastapi.testclient import TestClient
    from peer_servers.fastapi_openvino import create_app

    image = png_bytes()
    with TestClient(create_app(str(dense_fastnet), 1)) as client:
        out = client.post("/predict", content=image, headers={"content-type": "image/png"}).json()
    probability = {t["index"]: t["probability"] for t in out["top_k"]}
    ours = our_top_class(dense_fastnet, [image])[0]  # the same class, up to bf16 rounding
    assert probability.get(ours, 0) >= out["top_k"][0]["probability"] - 0.02
    assert len(out["top_k"]) == 5
