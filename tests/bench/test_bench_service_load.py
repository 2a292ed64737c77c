"""bench/service_load.py and bench/load_clients.py: the open- and closed-loop clients against
mock transports, the parsing of hey and perf_analyzer output, and (where those tools are
installed) each tool against a real server."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import load_clients  # noqa: E402
import service_load  # noqa: E402
from common import png_bytes  # noqa: E402

from models.core.checkpoint import load_checkpoint  # noqa: E402
from tests.service_helpers import ThreadedServer, make_weights  # noqa: E402

# Captured from `hey -o csv` against acs-serve (one 503 row added), and from `perf_analyzer -f`.
HEY_CSV = """response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.0366,0.0021,0.0000,0.0001,0.0341,0.0003,200,0.0206
0.0334,0.0000,0.0000,0.0000,0.0315,0.0019,200,0.0572
0.0015,0.0000,0.0000,0.0000,0.0013,0.0000,503,0.0906
0.0410,0.0000,0.0000,0.0000,0.0408,0.0000,200,0.0921
"""
PA_CSV = ("Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,"
          "p95 latency,p99 latency\n1,25.8104,239,0,37419,48745,53710,70748\n"
          "4,36.3807,94,1,104843,140508,144726,163110\n")


def scripted(codes: list[str], slow: float = 1.0):
    """A mock server answering the i-th request with codes[i % len(codes)] after 10 ms;
    'slow' means a 200 after `slow` seconds."""
    seen = Counter()

    async def handler(request: httpx.Request) -> httpx.Response:
        code = codes[seen["n"] % len(codes)]
        seen["n"] += 1
        await asyncio.sleep(slow if code == "slow" else 0.01)
        return httpx.Response(200 if code == "slow" else int(code))

    return httpx.MockTransport(handler)


def test_arrival_times():
    uniform = load_clients.arrival_times(10, 1.0, poisson=False)
    assert uniform == pytest.approx([i / 10 for i in range(10)])
    poisson = load_clients.arrival_times(1000, 1.0, seed=1)
    assert 850 < len(poisson) < 1150 and poisson == sorted(poisson) and poisson[-1] < 1.0
    assert poisson == load_clients.arrival_times(1000, 1.0, seed=1)


def test_open_loop_sorts_outcomes_and_keeps_its_schedule():
    transport = scripted(["200", "503", "slow", "504"])
    row = asyncio.run(load_clients.open_loop("http://test", "/p", b"x", rate=40, seconds=0.5,
                                             timeout=0.2, poisson=False, transport=transport))
    assert row["sent"] == 20 and row["ok"] == 5
    assert row["rejected_fraction"] == 0.25 and row["timeout_fraction"] == 0.5
    assert row["errors"] == {} and row["p99_ms"] < 200 and row["reject_p50_ms"] < 200
    # the 1 s answers were cut at 0.2 s, and sending never waited for them: 20 requests in
    # about 0.5 s + 0.2 s, where one client waiting for each answer would need over 1.2 s
    assert row["throughput"] > 5 / 1.0 and row["send_lag_p99_ms"] < 100


def test_closed_loop_counts_errors_by_status():
    row = asyncio.run(load_clients.closed_loop("http://test", "/p", b"x", concurrency=2,
                                               seconds=0.3, transport=scripted(["200", "429"])))
    assert row["ok"] > 5 and abs(row["errors"]["429"] - row["ok"]) <= 2
    assert row["p50_ms"] >= 10 and row["throughput"] == row["ok"] / 0.3


def test_parse_hey_csv():
    row = load_clients.parse_hey_csv(HEY_CSV, seconds=2.0)
    assert row["ok"] == 3 and row["errors"] == {"503": 1} and row["throughput"] == 1.5
    assert row["p50_ms"] == pytest.approx(36.6) and row["p99_ms"] == pytest.approx(41.0)


def test_parse_perf_analyzer_csv():
    rows = load_clients.parse_perf_analyzer_csv(PA_CSV)
    assert [r["concurrency"] for r in rows] == [1, 4]
    assert rows[1]["throughput"] == pytest.approx(36.3807)
    assert rows[0]["p50_ms"] == pytest.approx(37.419) and rows[1]["p99_ms"] == pytest.approx(163.11)


def test_budget_models_share_weights_with_their_own_defaults(tmp_path):
    weights = Path(make_weights(tmp_path / "weights"))
    names = service_load.budget_models(weights, "tiny", [1.0, 0.25], "topk", tmp_path / "variants")
    assert names == {1.0: "tiny_b100", 0.25: "tiny_b025"}
    variant = load_checkpoint(tmp_path / "variants" / "tiny_b025")
    assert variant.name == "tiny_b025"
    assert variant.manifest["default"] == {"budget": 0.25, "policy": "topk"}


def test_tables_and_plot(tmp_path, capsys):
    closed = [{"client": "httpx", "budget": b, "concurrency": c, "ok": 10 * c, "errors": {},
               "throughput": 20.0 * c * b, "p50_ms": 30.0 * c, "p90_ms": 40.0 * c, "p99_ms": 50.0 * c}
              for b in (1.0, 0.5) for c in (1, 4)]
    closed.append({**closed[0], "concurrency": 8, "ok": None, "p50_ms": None, "p99_ms": None})
    opened = [load_clients.open_loop_row(r, [("200", 0.05), ("503", 0.01)], [0.0], 1.0)
              for r in (10, 80)]
    service_load.print_tables(closed, opened, {1.0: 25.0})
    out = capsys.readouterr().out
    assert "| httpx | 1.0 | 8 | - |" in out and "| 80 | 2 | 1.0 |" in out
    assert "overhead 5.00 ms" in out
    service_load.plot(closed, opened, str(tmp_path / "load.png"))
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    weights = make_weights(tmp_path_factory.mktemp("weights"))
    with ThreadedServer(weights, max_batch_size=2, warmup=False) as s:
        yield s, Path(weights)


@pytest.mark.skipif(shutil.which("hey") is None, reason="needs hey (apt-get install hey)")
def test_hey_against_the_server(server, tmp_path):
    s, _ = server
    body = tmp_path / "image.png"
    body.write_bytes(png_bytes())
    row = load_clients.hey_closed_loop(f"{s.url}/v1/models/tiny/predict?budget=0.5", body, 2, 0.5)
    assert row["ok"] > 0 and row["errors"] == {}


@pytest.mark.skipif(shutil.which("perf_analyzer") is None, reason="needs perf_analyzer")
def test_perf_analyzer_against_the_server(server, tmp_path):
    s, weights = server
    data = service_load.perf_analyzer_input(load_checkpoint(weights / "tiny"), png_bytes(),
                                            tmp_path / "input.json")
    row = load_clients.perf_analyzer_closed_loop(s.url.removeprefix("http://"), "tiny", data, 1, 0.6)
    assert row["concurrency"] == 1 and row["throughput"] > 0
