"""What the benchmark scripts share: loopback ports, a test image, percentiles, timing a call,
starting and stopping servers, and a freshly initialized checkpoint for timing-only runs."""

from __future__ import annotations

import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(size: int = 32) -> bytes:
    """A size x size RGB noise image as PNG."""
    buf = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def plot_by_batch(rows: list[dict], path: str, x: str, y: str, xlabel: str, ylabel: str,
                  scale: float = 1.0, decorate=None) -> None:
    """A PNG with one panel per batch size and one line per model: rows' y (times `scale`)
    against x. `decorate(ax, batch)` adds to each panel."""
    from matplotlib.figure import Figure

    batches = sorted({r["batch"] for r in rows})
    fig = Figure(figsize=(5.5 * len(batches), 4), dpi=110)
    for ax, batch in zip(fig.subplots(1, len(batches), squeeze=False)[0], batches, strict=True):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [r for r in rows if r["model"] == model and r["batch"] == batch]
            ax.plot([r[x] for r in pts], [scale * r[y] for r in pts], "o-", label=model)
        if decorate:
            decorate(ax, batch)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def fmt(value, spec: str = ".1f") -> str:
    """A number for a Markdown table; "-" for None."""
    return "-" if value is None else format(value, spec)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table: a header of `columns`, a line per row of cells (any value, shown with
    str()); a column whose cells are all numbers (or "-") aligns right."""
    cells = [[str(c) for c in row] for row in rows]

    def numeric(text: str) -> bool:
        try:
            float(text.rstrip("%x").replace(",", ""))
        except ValueError:
            return text == "-"
        return True
    align = ["---:" if cells and all(numeric(row[i]) for row in cells) else "---"
             for i in range(len(columns))]
    lines = [columns, align, *cells]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def median_ms(fn, runs: int = 50, warmup: int = 10) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls."""
    return round_robin_ms({"fn": fn}, runs, warmup)["fn"]


def round_robin_ms(fns: dict, runs: int = 40, warmup: int = 5) -> dict:
    """Median wall time in ms of each fn() in `fns`, timed round-robin so that drift on a shared
    machine hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in fns}
    for _ in range(runs):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    """Poll url until it answers 200; fail early if proc exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {seconds:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def live_group(pgid: int) -> list[int]:
    """The processes of a process group still running (zombies not counted), from Linux /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if state != "Z" and int(group) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> bool:
    """Stop proc and every process of its group (start it with start_new_session=True): SIGTERM,
    then SIGKILL after `timeout` seconds. Returns whether none of them is left running."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while live_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not live_group(proc.pid):
            break
    proc.poll()
    return not live_group(proc.pid)


def start_acs_serve(weights: Path, port: int, threads: int = 1, max_batch_size: int = 8,
                    max_queue_size: int | None = 1024, log=None,
                    extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python -m service` on 127.0.0.1:port (CPU, no API key); not yet waited for."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ACS_API_KEY": ""}
    cmd = [sys.executable, "-m", "service", "--weights-dir", str(weights), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--threads", str(threads),
           "--max-batch-size", str(max_batch_size), "--log-level", "warning", *extra]
    if max_queue_size is not None:  # None: the server's default
        cmd += ["--max-queue-size", str(max_queue_size)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                            cwd=ROOT)
