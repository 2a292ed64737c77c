"""Shared by the deployment tests: paths, tools, the shipped dashboards and rules as data."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
K8S_DIR = DEPLOY / "k8s"
DATASOURCE_UID = "acs-prometheus"
DASHBOARD_UIDS = {"acs-serve-overview", "acs-serve-budgets"}
TIERS = ("0.25", "0.50", "0.75", "1.00")

# An alert is "<signal> <comparison> <number>"; the integration test runs the signal.
ALERT_FORM = re.compile(r"^(?P<signal>.*\S)\s*(?:>=|<=|==|!=|>|<)\s*-?[0-9.]+(?:e-?[0-9]+)?\s*$",
                        re.DOTALL)
# Grafana variables ($name, ${name}, ${name:format}); `$1` in label_replace is Prometheus'.
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")


def tool(name: str) -> str | None:
    """A command on PATH, beside this Python (a virtual environment's bin/) or in /usr/sbin
    (Debian's nginx, off a non-root user's PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in (Path(sys.executable).parent, Path("/usr/sbin")):
        if (folder / name).exists():
            return str(folder / name)
    return None


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in DASHBOARDS}


def panels(board: dict):
    """Every panel, rows' collapsed children included."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def rules() -> dict:
    return yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())


def all_rules() -> list[dict]:
    return [rule for group in rules()["groups"] for rule in group["rules"]]


def alert_signal(expr: str) -> str:
    match = ALERT_FORM.match(expr.strip())
    if match is None:
        raise ValueError(f"alert expression is not '<signal> <op> <number>': {expr}")
    return match["signal"]


def substitute(expr: str, window: str, values: dict[str, str] | None = None) -> str:
    """A dashboard expression with Grafana's variables filled in, ready for Prometheus:
    interval variables become `window`, template variables their value (default: all, `.*`)."""
    values = values or {}

    def value(match: re.Match) -> str:
        name = match[1] or match[2]
        if name in ("__rate_interval", "__interval", "__range"):
            return window
        return values.get(name, ".*")

    return VARIABLE.sub(value, expr)


def dashboard_queries(board: dict) -> list[tuple[str, str, str]]:
    """(panel title, legend, expression) for every target of every panel."""
    return [(panel["title"], target.get("legendFormat", ""), target["expr"])
            for panel in panels(board) if panel.get("type") != "row"
            for target in panel.get("targets", [])]


def k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S_DIR.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                docs.append((path, doc))
    return docs


def k8s(kind: str) -> dict:
    found = [doc for _, doc in k8s_documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
