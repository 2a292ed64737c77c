"""The service as a real process or uvicorn server on a loopback port."""

import http.client
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from tests.service_helpers import ThreadedServer, encode, free_port, make_weights, wait_ready


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def server(weights):
    with ThreadedServer(weights, max_batch_size=8, max_queue_delay_ms=5.0) as s:
        yield s


def test_concurrent_requests_with_different_budgets_get_their_costs(server):
    budgets = [1.0, 0.8, 0.6, 0.4, 0.2] * 4
    png = encode()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        expected = {}
        for b in set(budgets):
            r = client.post(f"/v1/predict?budget={b}&policy=topk", content=png,
                            headers={"content-type": "image/png"})
            expected[b] = r.json()["predictions"][0]["cost"]["executed_macs"]
    assert len(set(expected.values())) == len(expected)
    results = {}

    def call(i, b):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post(f"/v1/predict?budget={b}&policy=topk", content=png,
                       headers={"content-type": "image/png"})
            results[i] = r.json()["predictions"][0]

    threads = [threading.Thread(target=call, args=(i, b)) for i, b in enumerate(budgets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, b in enumerate(budgets):
        assert results[i]["budget"]["requested"] == b
        assert results[i]["cost"]["executed_macs"] == expected[b]
    with httpx.Client(base_url=server.url) as c:
        text = c.get("/metrics").text
    batched = [line for line in text.splitlines()
               if line.startswith('acs_batch_size_bucket{le="1.0",model="cheap"}')]
    total = [line for line in text.splitlines()
             if line.startswith('acs_batch_size_count{model="cheap"}')]
    assert float(batched[0].split()[-1]) < float(total[0].split()[-1])  # some batches > 1


def test_tritonclient_speaks_v2(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cheap")
    meta = client.get_model_metadata("cheap")
    assert meta["name"] == "cheap"
    image = triton.InferInput("IMAGE", [2], "BYTES")
    image.set_data_from_numpy(np.array([encode("PNG"), encode("JPEG")], dtype=object))
    outputs = [triton.InferRequestedOutput(n) for n in
               ("PROBABILITIES", "EXECUTED_MAC_RATIO", "EXECUTED_MACS")]
    result = client.infer("cheap", [image], outputs=outputs,
                          parameters={"budget": 0.4, "policy": "topk"})
    probs = result.as_numpy("PROBABILITIES")
    assert probs.shape == (2, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (result.as_numpy("EXECUTED_MAC_RATIO") <= 0.4).all()
    assert result.as_numpy("EXECUTED_MACS").dtype == np.int64
    tensor = triton.InferInput("INPUT", [3, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(0).normal(size=(3, 3, 32, 32))
                               .astype(np.float32))
    result = client.infer("cheap", [tensor], parameters={"budget": 1.0})
    assert result.as_numpy("PROBABILITIES").shape == (3, 10)
    with pytest.raises(triton.InferenceServerException, match="no model"):
        client.infer("missing", [tensor])


def test_sigterm_under_load_loses_no_in_flight_request(weights):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACS_MAX_BATCH_SIZE": "4", "ACS_MAX_QUEUE_SIZE": "128"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--weights-dir", weights,
                             "--port", str(port), "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=5) as c:
            wait_ready(c.get)
        files = [("file", (f"{i}.png", encode(), "image/png")) for i in range(8)]
        results = []

        def call():
            with httpx.Client(base_url=url, timeout=60) as c:
                r = c.post("/v1/predict?budget=1.0", files=files)
                results.append(r.status_code if r.status_code == 200 else r.text)

        threads = [threading.Thread(target=call) for _ in range(10)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all ten are in flight: 80 images take seconds on one thread
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert results == [200] * 10
        assert proc.wait(timeout=30) == 0  # a drained SIGTERM is a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_keeps_serving_through_the_drain_delay_and_a_second_signal_stops(weights):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACS_DRAIN_DELAY_S": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--weights-dir", weights,
                             "--port", str(port), "--log-level", "warning"], env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            wait_ready(c.get)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert c.get("/readyz").status_code == 503  # load balancers drop it...
            new = c.post("/v1/predict", files={"file": ("x.png", encode(), "image/png")})
            assert new.status_code == 200  # ...while it still serves what reaches it
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 2.5  # the second signal did not wait out the delay
    finally:
        proc.kill()


def test_idle_keep_alive_connections_outlive_the_clients_idle_expiry(weights):
    """uvicorn closes idle connections after 5 s, the same as httpx's pool expiry: a client
    reusing one just then gets a reset. The server keeps them keep_alive_s (75 s) instead."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--weights-dir", weights,
                             "--port", str(port), "--log-level", "warning"], env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            wait_ready(c.get)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status":"alive"}'
        sock = conn.sock
        time.sleep(6.5)
        conn.request("GET", "/healthz")  # on a connection the server closed: RemoteDisconnected
        assert conn.getresponse().read() == b'{"status":"alive"}' and conn.sock is sock
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_server_gives_freed_memory_back_every_trim_memory_s(weights, monkeypatch):
    import service.memory
    from tests.service_helpers import make_client
    calls = []
    monkeypatch.setattr(service.memory, "malloc_trim", lambda: calls.append(time.monotonic()))
    with make_client(weights, trim_memory_s=0.05) as c:
        wait_ready(c.get)
        time.sleep(0.3)
    assert len(calls) >= 3
    # which servers start trimming (other tests' servers may still trim in the background)
    import service.app
    started = []

    async def record(seconds):
        started.append(seconds)
    monkeypatch.setattr(service.app, "trim_every", record)
    for seconds in (0, 2.5):
        with make_client(weights, trim_memory_s=seconds) as c:
            wait_ready(c.get)
    assert started == [2.5]
    assert service.memory._libc() is not None  # glibc (Debian, the Docker image) has malloc_trim
