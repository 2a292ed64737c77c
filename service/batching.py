"""Dynamic batching per model: a bounded queue, deadlines, compute off the event loop.

Requests with different budgets share a batch: budgets are per image, and the executor
itself runs together the images that run the same variant (a width level) or keep equal
channel counts, so each image is charged what it ran. Requests with different policies run as
separate sub-batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from models.core.base import ForwardInfo, GatedNetwork
from models.core.macs import Cost

from .errors import ApiError
from .metrics import Metrics
from .objective import Objective, TimeModel

log = logging.getLogger("acs_serve")


@dataclass
class Job:
    images: torch.Tensor  # (n, 3, H, W), CPU
    budget: float  # requested, in [0, 1]
    policy: str
    deadline: float  # time.monotonic()
    future: asyncio.Future
    min_budget: float | None = None  # the lowest budget it may run at (None: its budget)
    enqueued: float = field(default_factory=time.monotonic)
    run_budget: float = field(init=False)  # the budget it ran at (lowered by the latency objective)
    lowered: str | None = field(default=None, init=False)  # why it was lowered

    def __post_init__(self) -> None:
        if self.min_budget is None:
            self.min_budget = self.budget
        self.run_budget = self.budget

    @property
    def size(self) -> int:
        return self.images.shape[0]


@dataclass
class JobResult:
    probabilities: torch.Tensor  # (n, C)
    effective: list[float]
    cost: Cost  # of this job's images
    budget_ratio: list[float]  # per image, the figure the budget bounds (MACs or BitOps ratio)
    queue_s: float
    inference_s: float
    batch_size: int
    requested: float  # the job's budget (the model's default where the request named none)
    policy: str
    run_budget: float  # the budget the job ran at
    min_budget: float
    lowered: str | None  # why run_budget is below the requested budget


class Executor(Protocol):
    """What runs a model's batches (models.engines.variants.VariantExecutor or
    models.engines.compact.CompactExecutor): logits and, with return_info, the plan, masks and
    cost of every image."""

    def __call__(self, x: torch.Tensor, budget: torch.Tensor | float | None = None,
                 policy: str = "threshold", return_info: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, ForwardInfo]: ...


class Batcher:
    """Collects jobs for one model into batches and runs them on one inference thread."""

    def __init__(self, name: str, model: GatedNetwork, executor: Executor, device: torch.device,
                 settings, metrics: Metrics, dtype: torch.dtype = torch.float32) -> None:
        """`model`: the network (its budget table and unit); `executor`: what runs it, on
        inputs of `dtype`."""
        self.name, self.model, self.executor, self.device = name, model, executor, device
        self.dtype = dtype
        self.settings, self.metrics = settings, metrics
        self.queue: deque[Job] = deque()
        self.queued_images = 0
        self.wakeup = asyncio.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self.seconds_per_image = 0.0  # moving average, for refusing hopeless deadlines
        self.task: asyncio.Task | None = None
        self.running: asyncio.Future | None = None  # the batch on the inference thread
        self.times = TimeModel()  # seconds per image at a budget
        objective = settings.latency_objective_ms / 1000
        self.objective = (Objective(objective, self.times, time.monotonic())
                          if objective > 0 and model.gated else None)
        self.closed = False  # drained: the model was retired or replaced

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def drain(self, timeout: float) -> None:
        """Wait, at most `timeout` seconds, until the queued jobs and the running batch are done,
        then refuse new ones (a retired or replaced model)."""
        deadline = time.monotonic() + timeout
        while self.queue or (self.running is not None and not self.running.done()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        self.closed = True

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.pool.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it now: full queue, or a deadline it cannot meet."""
        s = self.settings
        if self.closed:
            raise ApiError(503, f"model {self.name!r} was just reloaded or removed; retry",
                           "loading", {"Retry-After": "1"})
        if job.size > s.max_queue_size:
            raise ApiError(413, f"{job.size} images in one request; this server queues at most "
                           f"{s.max_queue_size}", "too_many_images")
        if self.queued_images + job.size > s.max_queue_size:
            raise ApiError(s.reject_status, f"model {self.name!r} queue is full "
                           f"({self.queued_images} images waiting); retry later", "queue_full",
                           {"Retry-After": "1"})
        expected = (self.queued_images + job.size) * self.seconds_per_image
        if self.objective is not None:  # the work at its floors: lowering can go that far
            expected = sum(j.size * self.times(j.min_budget) for j in (*self.queue, job))
        if time.monotonic() + expected > job.deadline:
            raise ApiError(503, f"cannot finish within the deadline (about {expected:.3f} s of "
                           f"work is queued)", "deadline", {"Retry-After": "1"})
        self.queue.append(job)
        self.queued_images += job.size
        self.metrics.queue_depth.labels(self.name).set(self.queued_images)
        self.wakeup.set()

    def _take_batch(self) -> list[Job]:
        batch, images = [], 0
        while self.queue and (not batch or images + self.queue[0].size
                              <= self.settings.max_batch_size):
            job = self.queue.popleft()
            self.queued_images -= job.size
            if job.future.done():  # the client went away or timed out
                continue
            if time.monotonic() > job.deadline:
                job.future.set_exception(ApiError(504, "deadline passed while queued", "deadline"))
                continue
            batch.append(job)
            images += job.size
        self.metrics.queue_depth.labels(self.name).set(self.queued_images)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            first = self.queue[0].enqueued if self.queue else time.monotonic()
            wait = first + self.settings.max_queue_delay_ms / 1000 - time.monotonic()
            if self.queued_images < self.settings.max_batch_size and wait > 0:
                await asyncio.sleep(wait)
            batch = self._take_batch()
            if self.objective is not None:
                self.objective.lower(batch, self.queue, time.monotonic())
            for policy in dict.fromkeys(job.policy for job in batch):
                jobs = [job for job in batch if job.policy == policy]
                self.running = loop.run_in_executor(self.pool, self._run, jobs, policy, loop)
                try:
                    await self.running
                except Exception as e:  # a bug must fail these requests, not the server
                    self._fail(jobs, e)

    async def settled(self) -> None:
        """Wait for the batch in progress, if any, to finish its bookkeeping (its answers may
        already be out): what /metrics reports then counts every answered request."""
        if self.running is not None and not self.running.done():
            await asyncio.wait([self.running])

    @staticmethod
    def _deliver(jobs: list[Job], results: list[JobResult]) -> None:
        """Answer each job (on the event loop)."""
        for job, result in zip(jobs, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """The model call raised: log the traceback once, answer each request with a 500."""
        log.error("model %s failed on a batch of %d requests", self.name, len(jobs), exc_info=error)
        self.metrics.inference_failures.labels(self.name).inc(len(jobs))
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(ApiError(
                    500, f"model {self.name!r} failed on this batch: {type(error).__name__}; "
                    "the server logged the traceback", "inference_error"))

    def _run(self, jobs: list[Job], policy: str, loop: asyncio.AbstractEventLoop) -> None:
        """Run one batch (on the inference thread), hand each job its result on the event loop,
        then record the batch's metrics (after the answers are on their way)."""
        start = time.monotonic()
        x = torch.cat([job.images for job in jobs]).to(self.device, self.dtype, non_blocking=True)
        requested = [job.budget for job in jobs for _ in range(job.size)]
        run = [job.run_budget for job in jobs for _ in range(job.size)]
        budgets = torch.tensor(run, dtype=torch.float32, device=self.device)
        logits, info = self.executor(x, budget=budgets, policy=policy, return_info=True)
        probabilities = torch.softmax(logits.float(), 1).cpu()
        cost = info.cost.rows(slice(None))
        # the shortest decimal of each float32 (0.3, not 0.30000001192092896)
        effective = [float(np.format_float_positional(b)) for b in info.plan.effective.cpu().numpy()]
        budget_ratio = self.model.budget_ratio(cost).tolist()
        elapsed = time.monotonic() - start
        n = x.shape[0]
        results, offset = [], 0
        for job in jobs:
            rows = slice(offset, offset + job.size)
            offset += job.size
            results.append(JobResult(probabilities[rows], effective[rows], cost.rows(rows),
                                     budget_ratio[rows], start - job.enqueued, elapsed, n, job.budget,
                                     policy, job.run_budget, job.min_budget, job.lowered))
        loop.call_soon_threadsafe(self._deliver, jobs, results)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * elapsed / n
        self.times.observe(run, elapsed)
        m = self.metrics
        m.inference_seconds.labels(self.name).observe(elapsed)
        m.batch_size.labels(self.name).observe(n)
        for result in results:
            m.queue_seconds.labels(self.name).observe(result.queue_s)
        m.observe_images(self.name, policy, requested, effective, cost, budget_ratio, run)

    def warm_up(self, size: int) -> None:
        """Run every batch-size bucket (powers of two up to the max) once per policy path, and
        a model whose cost does not depend on the input at each row of its table (every width
        level of a level network, so each compiled variant has run before readiness)."""
        sizes = sorted({1 << i for i in range(self.settings.max_batch_size.bit_length())}
                       | {self.settings.max_batch_size})
        table = self.model.table
        floors = [table.floor] if self.model.adaptive else table.budgets
        for n in sizes:
            x = torch.zeros(n, 3, size, size, device=self.device, dtype=self.dtype)
            timings = [self._timed(x, 1.0, "threshold")]
            points = {1.0: timings[0]}  # budget 1.0: the threshold call's time
            for budget in floors:
                timings.append(self._timed(x, budget, "topk"))
                points.setdefault(budget, timings[-1])
            self.seconds_per_image = max(self.seconds_per_image, sum(timings) / len(timings))
        self.times.measured(points)  # at the largest batch, every variant warm

    def _timed(self, x: torch.Tensor, budget: float, policy: str) -> float:
        """Seconds per image of one call."""
        start = time.monotonic()
        self.executor(x, budget=budget, policy=policy)
        return (time.monotonic() - start) / x.shape[0]
