"""Generate the Grafana dashboards in deploy/grafana/dashboards/ (dashboards as code).

    python deploy/grafana/build_dashboards.py            # rewrite the JSON files
    python deploy/grafana/build_dashboards.py --check    # exit 1 if a file is out of date

Every panel and target refers to the provisioned datasource by its fixed uid
(deploy/grafana/provisioning/datasources/prometheus.yml); dashboard uids are fixed here, so
links and bookmarks survive re-provisioning. No `__inputs`: the files are provisioned as they
are, never imported through the UI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "acs-prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"
TAGS = ["acs-serve"]

# Inference routes: /v1/predict, /v1/models/{name}/predict, /v2/models/{name}/infer.
INFER = 'route=~".+/(predict|infer)"'
INST = 'instance=~"$instance"'
MODEL = 'model=~"$model"'
POLICY = 'policy=~"$policy"'
WINDOW = "[$__rate_interval]"
TIERS = ("0.25", "0.50", "0.75", "1.00")


def rate(metric: str, selector: str) -> str:
    return f"rate({metric}{{{selector}}}{WINDOW})"


def mean(metric: str, selector: str, by: str = "") -> str:
    """Mean of a histogram's observations over the window: rate(sum) / rate(count)."""
    group = f" by ({by}) " if by else ""
    return (f"sum{group}({rate(metric + '_sum', selector)})\n/\n"
            f"sum{group}({rate(metric + '_count', selector)})")


def quantile(q: float, metric: str, selector: str) -> str:
    return f"histogram_quantile({q}, sum by (le) ({rate(metric + '_bucket', selector)}))"


def target(expr: str, legend: str = "", **extra) -> dict:
    return {"expr": expr, "legendFormat": legend, **extra}


class Board:
    def __init__(self, uid: str, title: str, description: str, variables: list[dict]) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables
        self.panels: list[dict] = []
        self.y = 0  # next free row of the grid
        self.x = 0
        self.row_height = 0

    def _place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_height = max(self.row_height, h)
        return pos

    def newline(self) -> None:
        if self.x:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0

    def row(self, title: str) -> None:
        self.newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def panel(self, kind: str, title: str, description: str, targets: list[dict], w: int = 12,
              h: int = 8, unit: str = "short", options: dict | None = None,
              defaults: dict | None = None, **extra) -> None:
        refs = "ABCDEFGH"
        panel = {
            "type": kind, "title": title, "description": description,
            "datasource": DATASOURCE, "gridPos": self._place(w, h),
            "targets": [{"datasource": DATASOURCE, "refId": refs[i], "range": True, **t}
                        for i, t in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []},
            "options": options or {},
            **extra,
        }
        self.panels.append(panel)

    def timeseries(self, title: str, description: str, targets: list[dict], unit: str = "short",
                   stack: bool = False, bars: bool = False, maximum: float | None = None,
                   **kw) -> None:
        custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1,
                  "fillOpacity": 60 if bars else 10, "showPoints": "never",
                  "spanNulls": False, "axisSoftMin": 0,
                  "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
        defaults = {"custom": custom, "min": 0}
        if maximum is not None:
            defaults["max"] = maximum
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
        self.panel("timeseries", title, description, targets, unit=unit, options=options,
                   defaults=defaults, **kw)

    def heatmap(self, title: str, description: str, expr: str, unit: str = "percentunit",
                **kw) -> None:
        options = {
            "calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": unit},
            "rowsFrame": {"layout": "le"}, "color": {"mode": "scheme", "scheme": "Oranges",
                                                       "steps": 64, "exponent": 0.5,
                                                       "fill": "dark-orange", "reverse": False},
            "cellValues": {"unit": "short"}, "showValue": "never",
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": True},
            "legend": {"show": True}, "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-9},
        }
        self.panel("heatmap", title, description,
                   [target(expr, "{{le}}", format="heatmap", interval="")],
                   unit=unit, options=options, **kw)

    def stat(self, title: str, description: str, targets: list[dict], unit: str = "short",
             mappings: list | None = None, thresholds: list | None = None, **kw) -> None:
        defaults = {"mappings": mappings or [],
                    "thresholds": {"mode": "absolute",
                                   "steps": thresholds or [{"color": "green", "value": None}]},
                    "color": {"mode": "thresholds"}}
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "background", "graphMode": "none", "textMode": "auto",
                   "justifyMode": "auto", "orientation": "auto", "wideLayout": True}
        self.panel("stat", title, description, targets, unit=unit, options=options,
                   defaults=defaults, **kw)

    def json(self) -> dict:
        return {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": TAGS, "editable": True, "graphTooltip": 1, "liveNow": False,
            "refresh": "10s", "schemaVersion": 39, "version": 1, "timezone": "browser",
            "time": {"from": "now-30m", "to": "now"}, "timepicker": {},
            "fiscalYearStartMonth": 0, "weekStart": "",
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts", "type": "dashboard"}]},
            "links": [{"type": "dashboards", "tags": TAGS, "asDropdown": False, "title": "acs-serve",
                       "includeVars": True, "keepTime": True, "icon": "external link",
                       "targetBlank": False, "tooltip": "", "url": ""}],
            "templating": {"list": self.variables},
            "panels": [{"id": i + 1, **p} for i, p in enumerate(self.panels)],
        }


def query_variable(name: str, label: str, query: str, description: str) -> dict:
    return {
        "name": name, "label": label, "description": description, "type": "query",
        "datasource": DATASOURCE, "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "regex": "", "hide": 0, "skipUrlSync": False,
    }


def tier_variable() -> dict:
    options = [{"selected": True, "text": "All", "value": "$__all"}]
    options += [{"selected": False, "text": t, "value": t} for t in TIERS]
    return {
        "name": "tier", "label": "budget tier", "type": "custom", "query": ",".join(TIERS),
        "description": "effective budget's quarter: 0.25 holds budgets up to 0.25, 0.50 those "
                       "in (0.25, 0.50], and so on",
        "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": options, "hide": 0, "skipUrlSync": False,
    }


INSTANCE_VAR = query_variable("instance", "replica", "label_values(acs_build_info, instance)",
                              "scraped acs-serve processes")
MODEL_VAR = query_variable("model", "model", "label_values(acs_model_ready, model)",
                           "served models")
POLICY_VAR = query_variable("policy", "policy", "label_values(acs_requested_budget_count, policy)",
                            "budget policies seen in the traffic")


def overview() -> Board:
    b = Board("acs-serve-overview", "acs-serve: traffic, latency, queues",
              "Health, request rates, errors, latency, dynamic batching and backpressure.",
              [INSTANCE_VAR, MODEL_VAR])
    b.row("Health")
    b.stat("Model ready", "acs_model_ready per model and replica: 1 once the checkpoint is "
           "loaded and warmed up (the replica's /readyz is 200 only when all are).",
           [target(f"acs_model_ready{{{INST}, {MODEL}}}", "{{model}} @ {{instance}}")],
           w=8, h=5,
           mappings=[{"type": "value", "options": {
               "0": {"text": "not ready", "color": "red", "index": 0},
               "1": {"text": "ready", "color": "green", "index": 1}}}],
           thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
    b.stat("Replicas up", "Replicas Prometheus scraped successfully on its last try.",
           [target(f"sum(up{{{INST}}} and on (instance) acs_build_info)", "replicas")],
           w=4, h=5, thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}])
    b.stat("In-flight requests", "HTTP requests being served right now, all replicas (each "
           "replica counts the scrape that reads it, so an idle replica shows 1).",
           [target(f"sum(acs_in_flight_requests{{{INST}}})", "in flight")], w=4, h=5,
           thresholds=[{"color": "green", "value": None}])
    b.panel("table", "Build", "Version, torch, Python and device of each replica.",
            [target(f"acs_build_info{{{INST}}}", "", format="table", instant=True)],
            w=8, h=5, transformations=[{"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
                "indexByName": {}, "renameByName": {}}}],
            options={"showHeader": True, "cellHeight": "sm"})

    b.row("Traffic")
    b.timeseries("Request rate by status",
                 "Inference requests per second (/v1 predict, /v2 infer), by HTTP status code. "
                 "Health probes and scrapes are left out.",
                 [target(f"sum by (code) ({rate('acs_requests_total', f'{INST}, {INFER}')})",
                         "{{code}}")], unit="reqps", w=8)
    errors = f'{INST}, {INFER}, code=~"5.."'
    client = f'{INST}, {INFER}, code=~"4.."'
    total = f"sum({rate('acs_requests_total', f'{INST}, {INFER}')})"
    b.timeseries("Error ratio",
                 "Share of inference requests answered 5xx (queue full, deadline, internal "
                 "error) and 4xx (bad input, unknown model, auth). Alert AcsHighErrorRatio "
                 "fires above 5% of 5xx for 5 minutes.",
                 [target(f"(sum({rate('acs_requests_total', errors)}) or vector(0))\n/\n{total}",
                         "5xx (server)"),
                  target(f"(sum({rate('acs_requests_total', client)}) or vector(0))\n/\n{total}",
                         "4xx (client)")], unit="percentunit", w=8)
    b.timeseries("Latency p50 / p95 / p99",
                 "Inference request time seen by the server, from the first byte read to the "
                 "response (decode, queue, compute, encode). Alert AcsHighLatencyP99: p99 > 1 s.",
                 [target(quantile(q, "acs_request_duration_seconds", f"{INST}, {INFER}"),
                         f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)], unit="s", w=8)

    b.row("Queue and batching")
    sel = f"{INST}, {MODEL}"
    b.timeseries("Queue wait vs compute time",
                 "Time a request waited for its batch (acs_queue_seconds) against the compute "
                 "time of one batch (acs_inference_seconds): mean and p95. Queue time above "
                 "compute time: the replica is saturated.",
                 [target(mean("acs_queue_seconds", sel), "queue wait (mean)"),
                  target(quantile(0.95, "acs_queue_seconds", sel), "queue wait (p95)"),
                  target(mean("acs_inference_seconds", sel), "compute per batch (mean)"),
                  target(quantile(0.95, "acs_inference_seconds", sel), "compute per batch (p95)")],
                 unit="s", w=12)
    b.timeseries("Batch size",
                 "Images per executed batch (dynamic batching): mean and p95. It grows with "
                 "load up to --max-batch-size.",
                 [target(mean("acs_batch_size", sel), "mean"),
                  target(quantile(0.95, "acs_batch_size", sel), "p95")], unit="short", w=12)
    b.timeseries("Queue depth",
                 "Images waiting per model and replica: the last scraped value and the "
                 "highest one over the interval. The HPA scales on this metric; alert "
                 "AcsQueueNearlyFull fires above 192 (75% of the default queue size).",
                 [target(f"sum by (model, instance) (acs_queue_depth{{{sel}}})",
                         "{{model}} @ {{instance}}"),
                  target(f"max by (model, instance) (max_over_time(acs_queue_depth{{{sel}}}{WINDOW}))",
                         "{{model}} @ {{instance}} (max)")], unit="short", w=12)
    rejected = INST + ', model=~"$model|-"'  # "-": refused before a model was resolved
    b.timeseries("Rejections by reason",
                 "Requests refused per second, by reason: queue_full and deadline are "
                 "backpressure (503); bad_image, bad_parameter, unsupported_media, "
                 "body_too_large, too_many_pixels, unknown_model, unauthorized are the "
                 "client's (4xx); loading while models warm up.",
                 [target(f"sum by (reason) ({rate('acs_rejections_total', rejected)})",
                         "{{reason}}")], unit="reqps", stack=True, bars=True, w=12)
    return b


def budgets() -> Board:
    b = Board("acs-serve-budgets", "acs-serve: budgets and channel skipping",
              "What budgets the traffic asks for, how many channels the gates skip for them, "
              "and the compute that saves.", [INSTANCE_VAR, MODEL_VAR, POLICY_VAR, tier_variable()])
    sel = f"{INST}, {MODEL}, {POLICY}"
    b.row("Budgets")
    b.heatmap("Requested budget distribution",
              "Requested budget per image (acs_requested_budget, 0.05-wide buckets) over time: "
              "darker cells, more images. Requests without a budget count at the model's "
              "default.",
              f"sum by (le) (increase(acs_requested_budget_bucket{{{sel}}}{WINDOW}))", w=8)
    b.timeseries("Requested budget vs executed MAC ratio",
                 "Mean requested budget against the mean executed share of the dense MACs, per "
                 "model and policy. They should agree (within the budget floor); alert "
                 "AcsSkipRatioDrift fires when they differ by more than 0.15 for 15 minutes.",
                 [target(mean("acs_requested_budget", sel, "model, policy"),
                         "requested {{model}} {{policy}}"),
                  target(mean("acs_executed_mac_ratio", sel, "model, policy"),
                         "executed {{model}} {{policy}}")], unit="percentunit", maximum=1, w=8)
    b.timeseries("Executed MAC ratio by budget tier",
                 "Mean executed share of the dense MACs for the images of each budget tier; "
                 "a tier's line should stay under its upper edge (alert AcsBudgetOverrun).",
                 [target(mean("acs_executed_mac_ratio", f'{sel}, budget_tier=~"$tier"',
                              "budget_tier"), "tier ≤ {{budget_tier}}")],
                 unit="percentunit", maximum=1, w=8)

    b.timeseries("Latency objective: requested vs run budget",
                 "Mean requested budget against the mean budget images ran at (acs_run_budget), "
                 "per model: they part when the server lowers queued images' budgets to keep its "
                 "latency objective (latency_objective_ms), and meet again when the load falls.",
                 [target(mean("acs_requested_budget", sel, "model"), "requested {{model}}"),
                  target(mean("acs_run_budget", sel, "model"), "ran at {{model}}")],
                 unit="percentunit", maximum=1, w=12)
    b.timeseries("Images lowered per second",
                 "Images run below their requested budget to keep the latency objective "
                 "(acs_lowered_images_total), per model; never below a request's min_budget.",
                 [target(f"sum by (model) ({rate('acs_lowered_images_total', f'{INST}, {MODEL}')})",
                         "{{model}}")], unit="short", w=12)

    b.row("Channel skipping")
    b.heatmap("Skip ratio per image: budget tier $tier",
              "Distribution of the fraction of gated channels skipped per image "
              "(acs_skipped_channel_ratio), one panel per budget tier: lower tiers sit higher.",
              f'sum by (le) (increase(acs_skipped_channel_ratio_bucket{{{sel}, budget_tier=~"$tier"}}'
              f"{WINDOW}))", w=6, h=8, repeat="tier", repeatDirection="h", maxPerRow=4)
    b.newline()  # the repeats fill this line
    b.timeseries("Mean skip ratio by budget tier",
                 "Mean fraction of gated channels skipped per image, per budget tier.",
                 [target(mean("acs_skipped_channel_ratio", f'{sel}, budget_tier=~"$tier"',
                              "budget_tier"), "tier ≤ {{budget_tier}}")],
                 unit="percentunit", maximum=1, w=12)
    layer = f"{INST}, {MODEL}"
    b.panel("bargauge", "Per-layer skip ratio",
            "Share of each gated layer's channels skipped over the interval "
            "(rate(acs_layer_skipped_channels_total) / rate(acs_layer_channels_total)), per "
            "model; all policies.",
            [target('label_replace(\n'
                    f"  sum by (model, layer) ({rate('acs_layer_skipped_channels_total', layer)})\n"
                    f"  /\n  sum by (model, layer) ({rate('acs_layer_channels_total', layer)}),\n"
                    '  "layer", "0$1", "layer", "([0-9])"\n)', "{{model}} layer {{layer}}")],
            w=12, h=8, unit="percentunit",
            defaults={"min": 0, "max": 1, "color": {"mode": "continuous-GrYlRd"},
                      "thresholds": {"mode": "absolute",
                                     "steps": [{"color": "green", "value": None}]}},
            options={"orientation": "horizontal", "displayMode": "gradient",
                     "showUnfilled": True, "valueMode": "color", "namePlacement": "left",
                     "sizing": "auto", "minVizHeight": 10, "minVizWidth": 0, "maxVizHeight": 300,
                     "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})

    b.row("Compute")
    mac = f"{INST}, {MODEL}"
    executed = f"sum({rate('acs_executed_macs_total', mac)})"
    saved = f"sum({rate('acs_saved_macs_total', mac)})"
    b.timeseries("Executed vs saved MACs per second",
                 "Multiply-accumulates the compact executor ran per second, stacked with the "
                 "dense MACs that skipped channels saved (all policies).",
                 [target(executed, "executed"), target(saved, "saved")], unit="short",
                 stack=True, w=12)
    b.stat("Share of MACs saved", "saved / (executed + saved) over the interval.",
           [target(f"{saved}\n/\n({saved} + {executed})", "saved")], unit="percentunit", w=6,
           thresholds=[{"color": "blue", "value": None}])
    b.timeseries("Images per second by policy", "Images served per second, per budget policy.",
                 [target(f"sum by (policy) ({rate('acs_requested_budget_count', sel)})",
                         "{{policy}}")], unit="short", w=6)
    return b


def render() -> dict[str, str]:
    return {f"{board.uid}.json": json.dumps(board.json(), indent=2, ensure_ascii=False) + "\n"
            for board in (overview(), budgets())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
