"""bench/scale_out.py end to end, small: one replica behind nginx serves every request."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.deploy_helpers import ROOT, tool


@pytest.mark.skipif(tool("nginx") is None, reason="nginx not installed (apt-get install nginx)")
def test_scale_out_smoke(tmp_path):
    out = tmp_path / "scale_out.json"
    cmd = [sys.executable, str(ROOT / "bench" / "scale_out.py"), "--replicas", "1",
           "--duration", "2", "--warmup", "0.5", "--concurrency", "2", "--max-requests", "200",
           "--no-direct", "--no-prometheus", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["replicas"] == 1 and row["via"] == "nginx"
    assert row["ok"] > 0 and not row["errors"], row
    assert "| 1 | nginx |" in result.stdout
