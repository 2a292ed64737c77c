"""Prometheus metrics: prefix acs_, base units, bounded labels only.

One process serves one device; each app has its own registry (run one process per device,
not several uvicorn workers, so no multiprocess mode is needed).
"""

from __future__ import annotations

import platform

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATIO = tuple(round(0.05 * i, 2) for i in range(1, 21))
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TIERS = (0.25, 0.5, 0.75, 1.0)


def budget_tier(budget: float) -> str:
    """A bounded label for a budget: the upper edge of its quarter."""
    return next(f"{t:.2f}" for t in TIERS if budget <= t + 1e-9)


class Metrics:
    def __init__(self, version: str, device: str) -> None:
        r = self.registry = CollectorRegistry()
        self._layers: dict = {}
        m = ("model",)
        self.requests = Counter("acs_requests", "HTTP requests", ("route", "code"), registry=r)
        self.request_seconds = Histogram("acs_request_duration_seconds", "HTTP request time",
                                         ("route",), buckets=LATENCY, registry=r)
        self.in_flight = Gauge("acs_in_flight_requests", "HTTP requests being served", registry=r)
        self.queue_seconds = Histogram("acs_queue_seconds", "time a request waited for its batch",
                                       m, buckets=LATENCY, registry=r)
        self.inference_seconds = Histogram("acs_inference_seconds", "compute time of one batch",
                                           m, buckets=LATENCY, registry=r)
        self.batch_size = Histogram("acs_batch_size", "images per batch", m, buckets=BATCH,
                                    registry=r)
        self.inference_failures = Counter("acs_inference_failures",
                                          "requests whose batch's model call raised", m, registry=r)
        self.queue_depth = Gauge("acs_queue_depth", "images waiting", m, registry=r)
        self.rejections = Counter("acs_rejections", "requests refused", ("model", "reason"),
                                  registry=r)
        self.requested_budget = Histogram("acs_requested_budget", "requested budget per image",
                                          ("model", "policy"), buckets=RATIO, registry=r)
        self.run_budget = Histogram("acs_run_budget", "budget each image ran at: the requested one, "
                                    "or lower under the latency objective", ("model", "policy"),
                                    buckets=RATIO, registry=r)
        self.lowered_images = Counter("acs_lowered_images", "images run below their requested "
                                      "budget to meet the latency objective", m, registry=r)
        labels = ("model", "policy", "budget_tier")
        self.skipped_ratio = Histogram("acs_skipped_channel_ratio",
                                       "fraction of gated channels skipped per image", labels,
                                       buckets=RATIO, registry=r)
        self.executed_ratio = Histogram("acs_executed_mac_ratio",
                                        "executed MACs over dense MACs per image", labels,
                                        buckets=RATIO, registry=r)
        self.budget_ratio = Histogram("acs_budget_ratio", "per image, the figure the budget bounds: "
                                      "executed over dense MACs (BitOps for DFS models)", labels,
                                      buckets=RATIO, registry=r)
        self.executed_macs = Counter("acs_executed_macs", "MACs executed", m, registry=r)
        self.saved_macs = Counter("acs_saved_macs", "dense MACs not executed", m, registry=r)
        self.layer_skipped = Counter("acs_layer_skipped_channels", "gated channels skipped",
                                     ("model", "layer"), registry=r)
        self.layer_channels = Counter("acs_layer_channels", "gated channels seen",
                                      ("model", "layer"), registry=r)
        self.model_ready = Gauge("acs_model_ready", "1 when the model serves", m, registry=r)
        self.load_failed = Gauge("acs_model_load_failed", "1 when a weights folder failed to load "
                                 "(model = the folder's name; reasons in /readyz)", m, registry=r)
        self.load_seconds = Gauge("acs_model_load_seconds", "time to load the model", m,
                                  registry=r)
        self.warmup_seconds = Gauge("acs_model_warmup_seconds", "time to warm the model up", m,
                                    registry=r)
        Info("acs_build", "build information", registry=r).info(
            {"version": version, "torch": torch.__version__, "python": platform.python_version(),
             "device": device})

    def observe_images(self, model: str, policy: str, requested, effective, cost, budget_ratios,
                       run) -> None:
        """Per-image budget and cost figures of one served batch of a model (`run`: the budget
        each image ran at)."""
        ratios = cost.ratio.tolist()
        skipped = cost.skipped_ratio.tolist()
        for req, ran, eff, ratio, skip, bounded in zip(requested, run, effective, ratios, skipped,
                                                       budget_ratios, strict=True):
            tier = budget_tier(eff)
            self.requested_budget.labels(model, policy).observe(req)
            self.run_budget.labels(model, policy).observe(ran)
            self.skipped_ratio.labels(model, policy, tier).observe(skip)
            self.executed_ratio.labels(model, policy, tier).observe(ratio)
            self.budget_ratio.labels(model, policy, tier).observe(bounded)
        self.lowered_images.labels(model).inc(sum(ran < req for req, ran in zip(requested, run, strict=True)))
        executed = int(cost.executed.sum())
        self.executed_macs.labels(model).inc(executed)
        self.saved_macs.labels(model).inc(max(cost.dense * len(ratios) - executed, 0))
        kept = cost.kept.sum(0).tolist()
        for (skipped_counter, channels_counter), total, k in zip(
                self._layer_counters(model, len(kept)), cost.totals, kept, strict=True):
            skipped_counter.inc(total * len(ratios) - k)
            channels_counter.inc(total * len(ratios))

    def _layer_counters(self, model: str, layers: int) -> list:
        """(skipped, channels) counter children of every layer of a model, looked up once."""
        key = (model, layers)
        if key not in self._layers:
            self._layers[key] = [(self.layer_skipped.labels(model, str(i)),
                                  self.layer_channels.labels(model, str(i))) for i in range(layers)]
        return self._layers[key]
