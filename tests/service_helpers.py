"""Checkpoints, images and servers for the service tests (random weights: no accuracy)."""

from __future__ import annotations

import io
import socket
import threading
import time

import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from models.core.checkpoint import save_checkpoint
from models.networks.densenet import ACSDenseNet, DenseNetConfig, acs_densenet40
from service.app import create_app
from service.config import Settings
from tests.conftest import randomize_bn

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def make_weights(root) -> str:
    """Two checkpoints: 'cheap' (ACS DenseNet-40, cheap gates) and 'tiny' (3 classes)."""
    model = randomize_bn(acs_densenet40(gate="cheap")).eval()
    save_checkpoint(model, root / "cheap", name="cheap", classes=CLASSES)
    tiny = ACSDenseNet(DenseNetConfig(num_classes=3, growth=4, bn_size=2, init_features=8,
                                      blocks=(2, 2), gate="cheap", input_size=16))
    save_checkpoint(randomize_bn(tiny).eval(), root / "tiny", name="tiny",
                    classes=["a", "b", "c"], default_budget=0.5, default_policy="topk")
    return str(root)


def encode(fmt: str = "PNG", size=(40, 30), mode: str = "RGB", color=(200, 30, 30), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "L" else 128).save(buf, fmt, **kw)
    return buf.getvalue()


def wait_ready(get, timeout: float = 60) -> None:
    """Poll /readyz through `get` (a client's get) until 200; a server still starting (its
    port closed) counts as not ready."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError("server never became ready")


def make_client(weights: str, **settings) -> TestClient:
    settings = {"max_queue_delay_ms": 1.0, **settings}
    return TestClient(create_app(Settings(weights_dir=weights, **settings)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """A real uvicorn server on a loopback port, in a background thread."""

    def __init__(self, weights: str, **settings) -> None:
        self.port = free_port()
        self.app = create_app(Settings(weights_dir=weights, port=self.port, **settings))
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedServer:
        import httpx

        self.thread.start()
        with httpx.Client(base_url=self.url, timeout=5) as client:
            wait_ready(client.get)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
