"""What /docs and /openapi.json say of the routes whose protocols decode their own bodies (the
request bodies of predict and infer, their parameters derived from PredictParams), every
error status with its body, /metrics as text.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from .inference import V2_PARAMETERS, PredictParams

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, for a person")
    reason: str = Field(description="a stable label, e.g. bad_image, body_too_large, queue_full "
                        "(docs/api.md lists them)")
    request_id: str | None = Field(None, description="also in the X-Request-ID header")


def errors(*statuses: int) -> dict:
    """FastAPI `responses` entries: each status with the error body and what it means."""
    meaning = {
        400: "malformed body, undecodable image, or a v2 request that does not fit the model",
        401: "missing or wrong API key",
        404: "no model of that name",
        413: "body, image pixels or image count over the server's limits",
        415: "unsupported content type or image format",
        422: "a parameter out of range",
        429: "queue full (with ACS_REJECT_STATUS=429; Retry-After says when to retry)",
        500: "the model raised on this request's batch (the server logged it and serves on)",
        503: "queue full, a deadline that cannot be met, models loading or none loaded "
             "(Retry-After)",
        504: "the request's deadline passed before its result",
    }
    return {s: {"model": ErrorBody, "description": meaning[s]} for s in statuses}


def parameter_schemas() -> dict:
    """Each request parameter's JSON schema, derived from PredictParams (the model that checks
    them): an optional parameter is its value's schema (a query or form field cannot be null)."""
    out = {}
    for name, prop in PredictParams.model_json_schema()["properties"].items():
        prop = {k: v for k, v in prop.items() if k != "title"}
        options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
        prop.update(options[0] if options else {})
        if prop.get("default") is None:
            prop.pop("default", None)
        out[name] = prop
    return out


def predict_openapi() -> dict:
    """The request of the predict routes: query parameters and the three body forms."""
    params = parameter_schemas()
    binary = {"type": "string", "format": "binary"}
    return {
        "parameters": [{"name": n, "in": "query", "required": False, "schema": s}
                       for n, s in params.items()],
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"], "additionalProperties": False,
                "properties": {"file": {"type": "array", "items": binary, "minItems": 1,
                                        "description": "one part per image"}, **params}}},
            **{t: {"schema": binary} for t in IMAGE_TYPES},
            "application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"image": {"type": "string", "format": "byte",
                                         "description": "base64 of an encoded image"},
                               "images": {"type": "array", "minItems": 1,
                                          "items": {"type": "string", "format": "byte"}},
                               **params},
                "oneOf": [{"required": ["image"]}, {"required": ["images"]}]}},
        }},
    }


def infer_openapi() -> dict:
    """The request of the KServe v2 infer route: JSON, or JSON + binary tensor data."""
    binary = {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}
    dim = {"type": "integer", "minimum": 1}
    image = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"const": "IMAGE"}, "datatype": {"const": "BYTES"},
        "shape": {"type": "array", "items": dim, "minItems": 1, "maxItems": 2},
        "data": {"type": "array", "items": {"type": "string", "format": "byte"},
                 "description": "base64 of encoded images"}, "parameters": binary}}
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"const": "INPUT"}, "datatype": {"const": "FP32"},
        "shape": {"type": "array", "items": dim, "minItems": 4, "maxItems": 4,
                  "description": "[N, 3, H, W], normalized as the model's manifest says"},
        "data": {"type": "array", "items": {"type": "number"}}, "parameters": binary}}
    request = {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"oneOf": [image, tensor]}, "minItems": 1, "maxItems": 1},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object"}}}},
        "parameters": {"type": "object", "properties": {
            **{k: v for k, v in parameter_schemas().items() if k in V2_PARAMETERS},
            "binary_data_output": {"type": "boolean"}}}}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": request},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "binary tensor extension: the JSON request, "
                                     "then raw tensor bytes (Inference-Header-Content-Length)"}}}}


def with_limits(schema: dict, settings) -> dict:
    """The schema with this server's limits: the largest timeout and image count."""
    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        if not isinstance(node, dict):
            return
        if node.get("in") == "query" and node.get("name") == "timeout":
            node["schema"]["maximum"] = settings.max_timeout_s
        properties = node.get("properties")
        if isinstance(properties, dict):
            if "timeout" in properties:
                properties["timeout"]["maximum"] = settings.max_timeout_s
            for key in ("images", "file"):
                if key in properties:
                    properties[key]["maxItems"] = settings.max_images_per_request
        for value in node.values():
            walk(value)

    walk(schema["paths"])
    return schema


METRICS_RESPONSE = {200: {"description": "Prometheus text exposition format",
                          "content": {"text/plain": {"schema": {"type": "string"}}}}}
