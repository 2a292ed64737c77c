"""The /v1 API: predictions with a per-request budget, and model metadata."""

from __future__ import annotations

import base64
import binascii
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from .batching import JobResult
from .errors import ApiError
from .inference import PARAMETERS, PredictParams, too_many_images
from .openapi import errors, predict_openapi
from .protocol import Decoded, Protocol, handle

router = APIRouter()

class Label(BaseModel):
    label: str
    index: int
    probability: float


class Budget(BaseModel):
    requested: float
    min_budget: float = Field(description="the lowest budget the server could run it at")
    effective: float = Field(description="the budget the image ran at (after the floor and any "
                             "lowering)")
    lowered: str | None = Field(description="why it ran below the requested budget (the server's "
                                "latency objective under load), or null")
    policy: str
    expected_top1: float | None = Field(description="top-1 (0..1) the model scored on held-out data "
                                        "at this budget and policy (null: not measured)")
    notes: list[str] = Field(description="what to know about this operating point: a dense "
                             "model's fixed budget, a top-1 near chance, an unmeasured policy")


class Cost(BaseModel):
    dense_macs: int
    executed_macs: int
    executed_ratio: float
    skipped_channel_ratio: float
    layer_skipped_ratio: list[float]
    budget_unit: str = Field(description="what the budget is a fraction of: macs, or bitops (DFS)")
    budget_ratio: float = Field(description="the figure the budget bounds, in budget_unit")


class Prediction(BaseModel):
    top_k: list[Label]
    budget: Budget
    cost: Cost


class Timing(BaseModel):
    queue_ms: float
    inference_ms: float
    total_ms: float


class PredictResponse(BaseModel):
    request_id: str
    model: str
    predictions: list[Prediction]
    timing: Timing


async def read_images(request: Request, max_images: int) -> tuple[list[bytes], dict]:
    """Encoded images and body parameters from multipart, raw image/* or JSON base64."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:  # one part over the limits is enough to know the request is too large
            form = await request.form(max_files=max_images + 1, max_fields=len(PARAMETERS) + 8)
        except HTTPException as e:  # starlette's parser: malformed, or too many parts
            if "too many files" in str(e.detail).lower():
                raise too_many_images(max_images + 1, max_images) from None
            raise ApiError(400, f"multipart body: {e.detail}", "bad_request") from None
        files = [f for f in form.getlist("file") if hasattr(f, "read")]
        if len(files) > max_images:
            raise too_many_images(len(files), max_images)
        if not files:
            raise ApiError(400, 'multipart body has no "file" field', "bad_request")
        params = {k: v for k, v in form.multi_items() if k != "file" and isinstance(v, str)}
        return [await f.read() for f in files], params
    if ctype.startswith("image/"):
        return [await request.body()], {}
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not valid JSON: {e}", "bad_request") from None
        encoded = body.get("images") if isinstance(body, dict) else None
        if isinstance(body, dict) and encoded is None and "image" in body:
            encoded = [body["image"]]
        if not isinstance(encoded, list) or not encoded:
            raise ApiError(400, 'JSON body needs "image": "<base64>" or "images": [...]',
                           "bad_request")
        if len(encoded) > max_images:
            raise too_many_images(len(encoded), max_images)
        try:
            images = [base64.b64decode(e, validate=True) for e in encoded]
        except (binascii.Error, TypeError, ValueError):
            raise ApiError(400, "image is not valid base64", "bad_request") from None
        return images, {k: v for k, v in body.items() if k not in ("image", "images")}
    raise ApiError(415, f"unsupported content type {ctype or 'none'!r}: send multipart/form-data "
                   '(field "file"), an image/* body, or JSON {"image": "<base64>"}',
                   "unsupported_media")


def operating_point(served, requested: float, policy: str) -> dict:
    """What a request's budget and policy buy: the expected top-1 and notes on it."""
    expected, notes = served.expected_top1(requested, policy), []
    if not served.model.gated and requested < 1:
        notes.append(f"{served.name} is a dense model: its budget is fixed, every image runs all of "
                     "it (budget 1.0)")
    chance = 1 / len(served.classes)
    if expected is None:
        notes.append(f"top-1 was not measured for policy {policy} at budget {requested:g}")
    elif expected < 2 * chance:
        other = served.expected_top1(requested, "threshold") if policy != "threshold" else None
        hint = f" or use policy threshold ({100 * other:.1f}%)" if other and other >= 2 * chance else ""
        notes.append(f"near chance: top-1 {100 * expected:.1f}% expected at budget {requested:g} under "
                     f"{policy} (chance {100 * chance:.0f}%); raise the budget{hint}")
    return {"expected_top1": expected, "notes": notes}


def predictions(result: JobResult, served, top_k: int) -> list[dict]:
    classes = served.classes
    point = operating_point(served, result.run_budget, result.policy)
    probs, index = result.probabilities.topk(min(top_k, len(classes)), 1)
    cost = result.cost
    ratio, skipped = cost.ratio.tolist(), cost.skipped_ratio.tolist()
    layers = cost.layer_skipped_ratio.tolist()
    out = []
    for i in range(probs.shape[0]):
        out.append({
            "top_k": [{"label": classes[j], "index": j, "probability": p}
                      for p, j in zip(probs[i].tolist(), index[i].tolist(), strict=True)],
            "budget": {"requested": result.requested, "min_budget": result.min_budget,
                       "effective": result.effective[i], "lowered": result.lowered,
                       "policy": result.policy, **point},
            "cost": {"dense_macs": cost.dense, "executed_macs": int(cost.executed[i]),
                     "executed_ratio": ratio[i], "skipped_channel_ratio": skipped[i],
                     "layer_skipped_ratio": layers[i], "budget_unit": served.model.budget_unit,
                     "budget_ratio": result.budget_ratio[i]},
        })
    return out


def same_value(a, b) -> bool:
    """Whether two spellings of a parameter mean one value ("0.5" in a query, 0.5 in JSON)."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def merge_params(request: Request, body_params: dict) -> dict:
    """The parameters of the query string and the body as one dict (`handle` checks their
    values): a name neither knows, a name given twice in the query, or one given in both with
    different values is a 422."""
    unknown = sorted({k for k in [*request.query_params, *body_params] if k not in PARAMETERS})
    if unknown:
        raise ApiError(422, f"unknown parameter{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                       f"accepted: {', '.join(PARAMETERS)}", "bad_parameter")
    query = {k: request.query_params.getlist(k) for k in request.query_params}
    repeated = sorted(k for k, v in query.items() if len(v) > 1)
    if repeated:
        raise ApiError(422, f"{', '.join(repeated)}: given more than once in the query",
                       "bad_parameter")
    query = {k: v[0] for k, v in query.items()}
    conflicts = [f"{k}: {query[k]!r} in the query, {body_params[k]!r} in the body"
                 for k in sorted(query.keys() & body_params.keys())
                 if not same_value(query[k], body_params[k])]
    if conflicts:
        raise ApiError(422, "conflicting values: " + "; ".join(conflicts), "bad_parameter")
    return {**query, **body_params}


class V1(Protocol):
    """/v1: images as multipart, a raw image/* body or JSON base64; parameters in the query
    string or the body; the answer is a PredictResponse."""

    async def decode(self, request: Request, served, settings) -> Decoded:
        data, body_params = await read_images(request, settings.max_images_per_request)
        return Decoded(merge_params(request, body_params), data)

    def encode(self, request: Request, served, decoded: Decoded, params: PredictParams,
               result: JobResult) -> JSONResponse:
        """A JSONResponse: FastAPI does not validate it again against PredictResponse (the docs
        still show that schema; a test checks it holds)."""
        total_ms = (time.perf_counter() - request.state.start) * 1e3
        return JSONResponse({
            "request_id": request.state.request_id, "model": served.name,
            "predictions": predictions(result, served, params.top_k),
            "timing": {"queue_ms": result.queue_s * 1e3, "inference_ms": result.inference_s * 1e3,
                       "total_ms": total_ms},
        })


V1_PROTOCOL = V1()


PREDICT_DOC = """Classify one or more images under a compute budget.

Send the image as `multipart/form-data` (field `file`, repeat it for several images), as a raw
`image/*` body, or as JSON `{"image": "<base64>"}` (or `"images": [...]`). Parameters go in the
query string (or in the JSON body / form fields; a name given in both must have one value, an
unknown name is a 422): `budget` (0..1, fraction of the dense MACs;
default: the model's operating point), `policy` (`threshold`, `topk`, `cap`), `top_k`,
`timeout` (seconds), `min_budget` (0..budget: the server may lower the budget this far to meet its
latency objective under load; default: the budget, never lowered)."""


PREDICT_ERRORS = errors(400, 401, 404, 413, 415, 422, 429, 500, 503, 504)


@router.post("/v1/models/{name}/predict", response_model=PredictResponse, tags=["v1"],
             description=PREDICT_DOC, responses=PREDICT_ERRORS, openapi_extra=predict_openapi())
async def predict_model(name: str, request: Request) -> JSONResponse:
    return await handle(request, name, V1_PROTOCOL)


@router.post("/v1/predict", response_model=PredictResponse, tags=["v1"],
             description=PREDICT_DOC + "\n\nUses the default model.", responses=PREDICT_ERRORS,
             openapi_extra=predict_openapi())
async def predict_default(request: Request) -> JSONResponse:
    return await handle(request, None, V1_PROTOCOL)


@router.get("/v1/models", tags=["v1"], responses=errors(401))
async def list_models(request: Request) -> dict:
    """Every model served: metadata, classes, budget floor, calibration and accuracy tables."""
    state = request.app.state.server
    return {"default": state.registry.default_name(),
            "models": [m.metadata() for m in state.registry.models.values()],
            "errors": state.registry.errors}


@router.get("/v1/models/{name}", tags=["v1"], responses=errors(401, 404))
async def model_metadata(name: str, request: Request) -> dict:
    registry = request.app.state.server.registry
    if name not in registry.models:
        raise ApiError(404, f"no model named {name!r}; see GET /v1/models", "unknown_model")
    return registry.models[name].metadata()
