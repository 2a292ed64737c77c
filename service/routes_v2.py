"""The Open Inference Protocol (KServe v2) REST endpoints, with the binary tensor extension.

Inputs (send one): IMAGE, BYTES [N] of encoded images (base64 strings in JSON, raw with the
binary extension), or INPUT, FP32 [N, 3, H, W] already normalized as the model's manifest
says. Request parameters: budget, min_budget, policy, timeout. Outputs: PROBABILITIES FP32 [N, C],
EXECUTED_MAC_RATIO, SKIPPED_CHANNEL_RATIO, EFFECTIVE_BUDGET FP32 [N], EXECUTED_MACS INT64 [N].
"""

from __future__ import annotations

import base64
import binascii
import json
import math

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from . import __version__
from .errors import ApiError
from .inference import V2_PARAMETERS, too_many_images
from .openapi import errors, infer_openapi
from .protocol import Decoded, Protocol, handle

router = APIRouter(tags=["v2"])
HEADER_LENGTH = "inference-header-content-length"
INPUTS = {"IMAGE": "BYTES", "INPUT": "FP32"}  # name: datatype


@router.get("/v2")
async def server_metadata() -> dict:
    return {"name": "acs-serve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live")
async def live() -> dict:
    return {"live": True}


READY = {"description": "readiness", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"ready": {"type": "boolean"}}}}}}


@router.get("/v2/health/ready", responses={200: READY, 503: READY})
async def ready(request: Request) -> JSONResponse:
    is_ready = request.app.state.server.ready
    return JSONResponse({"ready": is_ready}, 200 if is_ready else 503)


def _served(request: Request, name: str):
    registry = request.app.state.server.registry
    if name not in registry.models:
        raise ApiError(404, f"no model named {name!r}", "unknown_model")
    return registry.models[name]


@router.get("/v2/models/{name}", responses=errors(401, 404))
async def model_metadata(name: str, request: Request) -> dict:
    served = _served(request, name)
    size, classes = served.input_size, len(served.classes)
    return {
        "name": name, "versions": ["1"], "platform": "pytorch",
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]},
                   {"name": "INPUT", "datatype": "FP32", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, classes]},
                    *({"name": n, "datatype": "FP32", "shape": [-1]}
                      for n in ("EXECUTED_MAC_RATIO", "SKIPPED_CHANNEL_RATIO", "EFFECTIVE_BUDGET")),
                    {"name": "EXECUTED_MACS", "datatype": "INT64", "shape": [-1]}],
    }


MODEL_READY = {"description": "the model's readiness", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}}}}


@router.get("/v2/models/{name}/ready", responses={200: MODEL_READY, 503: MODEL_READY, **errors(401, 404)})
async def model_ready(name: str, request: Request) -> JSONResponse:
    served = _served(request, name)
    return JSONResponse({"name": name, "ready": served.ready}, 200 if served.ready else 503)


@router.get("/v2/models/{name}/config", responses=errors(401, 404))
async def model_config(name: str, request: Request) -> dict:
    """A Triton-style model configuration, for clients such as perf_analyzer: both inputs are
    optional (a request sends exactly one of them)."""
    served = _served(request, name)
    size = served.input_size
    return {
        "name": name, "platform": "pytorch_libtorch",
        "max_batch_size": request.app.state.server.settings.max_batch_size,
        "input": [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
                  {"name": "INPUT", "data_type": "TYPE_FP32", "dims": [3, size, size], "optional": True}],
        "output": [{"name": "PROBABILITIES", "data_type": "TYPE_FP32",
                    "dims": [len(served.classes)]}],
    }


def parse_request(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON part and the binary part of an inference request."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"bad {HEADER_LENGTH} header {header_length!r}", "bad_request")
        split = int(header_length)
    try:
        request = json.loads(body[:split])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"inference request is not valid JSON: {e}", "bad_request") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ApiError(400, 'inference request needs "inputs": [...]', "bad_request")
    return request, body[split:]


def _binary_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor elements: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ApiError(400, "truncated BYTES element", "bad_request")
        n = int.from_bytes(raw[offset : offset + 4], "little")
        items.append(raw[offset + 4 : offset + 4 + n])
        offset += 4 + n
        if offset > len(raw):
            raise ApiError(400, "truncated BYTES element", "bad_request")
    return items


def read_input(request: dict, binary: bytes, limits, min_size: int) -> list[bytes] | torch.Tensor:
    """The single input: IMAGE's encoded images, or INPUT's float tensor (N, 3, H, W)."""
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, "send exactly one input: IMAGE (BYTES) or INPUT (FP32)", "bad_request")
    spec = inputs[0]
    if not isinstance(spec.get("name"), str) or spec["name"] not in INPUTS:
        raise ApiError(400, f"unknown input {spec.get('name')!r}; accepted: IMAGE (BYTES) or INPUT "
                       "(FP32)", "bad_request")
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if datatype != INPUTS[spec["name"]]:
        raise ApiError(400, f"input {spec['name']} is {INPUTS[spec['name']]}, not {datatype!r}",
                       "bad_request")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise ApiError(400, "input shape must be a list of positive integers", "bad_request")
    parameters = spec.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if not (size is None or (type(size) is int and size >= 0)):
        raise ApiError(400, "binary_data_size must be a byte count", "bad_request")
    raw = binary[:size] if size is not None else None
    count = math.prod(shape)
    if datatype == "BYTES":
        if raw is not None:
            items = _binary_elements(raw)
        else:
            try:
                items = [base64.b64decode(s, validate=True) for s in spec.get("data") or []]
            except (binascii.Error, TypeError, ValueError):
                raise ApiError(400, "BYTES data must be base64 strings in JSON", "bad_request") from None
        if count > limits.max_images_per_request:
            raise too_many_images(count, limits.max_images_per_request)
        if len(items) != count:
            raise ApiError(400, f"shape {shape} says {count} images; {len(items)} were sent",
                           "bad_request")
        return items
    if len(shape) != 4 or shape[1] != 3:
        raise ApiError(400, "FP32 input must be [N, 3, H, W]", "bad_request")
    if shape[0] > limits.max_images_per_request:
        raise too_many_images(shape[0], limits.max_images_per_request)
    if min(shape[2:]) < min_size:
        raise ApiError(400, f"FP32 input must be at least {min_size}x{min_size}", "bad_request")
    if shape[2] * shape[3] > limits.max_pixels:
        raise ApiError(413, "FP32 input has too many pixels", "too_many_pixels")
    if raw is not None:
        if len(raw) != count * 4:
            raise ApiError(400, f"FP32 binary data is {len(raw)} bytes, not {count * 4}",
                           "bad_request")
        array = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            array = np.asarray(spec.get("data"), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise ApiError(400, "FP32 data must be numbers", "bad_request") from None
        if array.size != count:
            raise ApiError(400, f"FP32 data has {array.size} values, not {count}", "bad_request")
    tensor = torch.from_numpy(array.copy()).reshape(shape)
    if not torch.isfinite(tensor).all():
        raise ApiError(400, "FP32 input has non-finite values", "bad_request")
    return tensor


INFER_OK = {"description": "outputs as JSON, or a JSON header then raw tensor bytes",
            "content": {"application/json": {"schema": {"type": "object"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


@router.post("/v2/models/{name}/infer", openapi_extra=infer_openapi(),
             responses={200: INFER_OK, **errors(400, 401, 404, 413, 415, 422, 429, 500, 503, 504)})
async def model_infer(name: str, request: Request) -> Response:
    return await handle(request, name, V2_PROTOCOL)


class V2(Protocol):
    """The Open Inference Protocol: a JSON request (with binary tensor data after it), one
    input, parameters in "parameters"; the answer holds the outputs it asks for."""

    async def decode(self, request: Request, served, settings) -> Decoded:
        body, binary = parse_request(await request.body(), request.headers.get(HEADER_LENGTH))
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(400, '"parameters" must be an object', "bad_request")
        return Decoded({k: params[k] for k in V2_PARAMETERS if k in params},
                       body={"request": body, "binary": binary})

    def images(self, decoded: Decoded, served, settings) -> list[bytes] | torch.Tensor:
        return read_input(decoded.body["request"], decoded.body["binary"], settings,
                          served.model.min_input_size)

    def encode(self, request: Request, served, decoded: Decoded, params, result) -> Response:
        cost = result.cost
        outputs = {
            "PROBABILITIES": result.probabilities.numpy().astype(np.float32),
            "EXECUTED_MAC_RATIO": cost.ratio.numpy().astype(np.float32),
            "SKIPPED_CHANNEL_RATIO": cost.skipped_ratio.numpy().astype(np.float32),
            "EFFECTIVE_BUDGET": np.asarray(result.effective, dtype=np.float32),
            "EXECUTED_MACS": cost.executed.numpy().astype(np.int64),
        }
        return encode_response(decoded.body["request"], served.name, request.state.request_id, outputs)


V2_PROTOCOL = V2()


def encode_response(body: dict, name: str, request_id: str, outputs: dict) -> Response:
    """JSON outputs, or JSON header + raw bytes for outputs asked for as binary_data."""
    wanted = body.get("outputs")
    all_binary = bool((body.get("parameters") or {}).get("binary_data_output"))
    if isinstance(wanted, list) and wanted:
        names = [o.get("name") for o in wanted if isinstance(o, dict)]
        unknown = [n for n in names if n not in outputs]
        if unknown:
            raise ApiError(400, f"unknown outputs {unknown}; available: {list(outputs)}",
                           "bad_request")
        binary = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", all_binary))
                  for o in wanted}
    else:
        binary = dict.fromkeys(outputs, all_binary)
    header, blobs = [], []
    for out_name, is_binary in binary.items():
        array = outputs[out_name]
        entry = {"name": out_name, "datatype": "FP32" if array.dtype == np.float32 else "INT64",
                 "shape": list(array.shape)}
        if is_binary:
            raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        header.append(entry)
    response = {"model_name": name, "model_version": "1",
                "id": str(body.get("id", request_id)), "outputs": header}
    text = json.dumps(response).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(text))})
