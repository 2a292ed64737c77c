"""Request parameters and their checks, and running images through a model's batcher within
the request's deadline (what `service.protocol.handle` does for every protocol)."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import torch
from fastapi import Request
from pydantic import BaseModel, Field, ValidationError

from models.core.budget import POLICIES

from .batching import Job, JobResult
from .errors import ApiError

PARAMETERS = ("budget", "min_budget", "policy", "top_k", "timeout")
V2_PARAMETERS = tuple(p for p in PARAMETERS if p != "top_k")  # v2 answers every probability
RULES = {"budget": "must be a number in [0, 1]", "min_budget": "must be a number in [0, 1], at most budget",
         "policy": f"must be {', '.join(POLICIES[:-1])} or {POLICIES[-1]}",
         "top_k": "must be an integer from 1 to 1000", "timeout": "must be a number of seconds > 0"}


class PredictParams(BaseModel):
    budget: float | None = Field(None, ge=0, le=1, description="fraction of the dense cost "
                                 "(MACs; BitOps for DFS models: see cost.budget_unit; default: "
                                 "the model's operating point)")
    min_budget: float | None = Field(None, ge=0, le=1, description="the lowest budget the server "
                                     "may run the request at to meet its latency objective "
                                     "(at most budget; default: the budget: never lowered)")
    policy: Literal[POLICIES] | None = Field(None, description="how the budget sets the gates "
                                             "(default: the model's)")
    top_k: int = Field(5, ge=1, le=1000, description="how many labels to answer")
    timeout: float | None = Field(None, gt=0, description="deadline in seconds, at most the "
                                  "server's max_timeout_s")


def validate_params(raw: dict) -> PredictParams:
    try:
        params = PredictParams(**raw)
    except ValidationError as e:
        names = dict.fromkeys(str(err["loc"][0]) for err in e.errors())
        parts = [f"{n}: {RULES.get(n, 'is not valid')}, got {raw.get(n)!r}" for n in names]
        raise ApiError(422, "; ".join(parts), "bad_parameter") from None
    check_floor(params.min_budget, params.budget)
    return params


def check_floor(min_budget: float | None, budget: float | None) -> None:
    if min_budget is not None and budget is not None and min_budget > budget:
        raise ApiError(422, f"min_budget: {RULES['min_budget']}, got {min_budget:g} > budget {budget:g}",
                       "bad_parameter")


def too_many_images(count: int, limit: int) -> ApiError:
    return ApiError(413, f"{count} images in one request; the limit is {limit} "
                    "(max_images_per_request)", "too_many_images")


async def infer(request: Request, served, images: torch.Tensor, params: PredictParams) -> JobResult:
    """Queue images for a model and wait for the result within the deadline (the budget and
    policy: the model's defaults where the request named none)."""
    budget, policy, timeout = params.budget, params.policy, params.timeout
    settings = request.app.state.server.settings
    if timeout is not None and timeout > settings.max_timeout_s:
        raise ApiError(422, f"timeout: must be at most {settings.max_timeout_s:g} s "
                       f"(max_timeout_s), got {timeout:g}", "bad_parameter")
    seconds = min(timeout or settings.request_timeout_s, settings.max_timeout_s)
    deadline = time.monotonic() + seconds
    future = asyncio.get_running_loop().create_future()
    budget = served.default_budget if budget is None else budget
    check_floor(params.min_budget, budget)
    policy = policy or served.default_policy
    if served.batcher.closed:  # reloaded while this request was decoded: the new one takes it
        served = request.app.state.server.model(served.name)
    served.batcher.submit(Job(images, budget, policy, deadline, future, params.min_budget))
    try:
        return await asyncio.wait_for(future, max(deadline - time.monotonic(), 0))
    except TimeoutError:
        raise ApiError(504, f"no result within the {seconds:g} s deadline", "deadline") from None
