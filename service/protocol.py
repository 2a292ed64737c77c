"""One path for every protocol. A protocol (/v1, the KServe v2 protocol) keeps one contract:
`decode` a request into images and raw parameters, `encode` a result into its answer.
`handle` does the rest, the same for each: it finds the model, checks the parameters once
(before any image is read, so a bad parameter is a 422 whatever the images), decodes and
preprocesses the images, and runs them through the model's batcher within the request's
deadline."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from fastapi import Request
from fastapi.responses import Response

from .batching import JobResult
from .imaging import preprocess_async
from .inference import PredictParams, infer, validate_params


@dataclass
class Decoded:
    """What a protocol read from a request."""

    params: dict  # the request parameters as sent; `handle` checks them
    images: list[bytes] | torch.Tensor | None = None  # encoded images, or a normalized
    # (N, 3, H, W) tensor; None: `Protocol.images` reads them after the parameters are checked
    body: dict = field(default_factory=dict)  # what the protocol needs again


class Protocol:
    """The hook contract of a protocol."""

    async def decode(self, request: Request, served, settings) -> Decoded:
        """The images and parameters of a request (an ApiError if it is malformed)."""
        raise NotImplementedError

    def images(self, decoded: Decoded, served, settings) -> list[bytes] | torch.Tensor:
        """The request's images, where `decode` left them to be read (default: decoded)."""
        return decoded.images

    def encode(self, request: Request, served, decoded: Decoded, params: PredictParams,
               result: JobResult) -> Response:
        """The answer to a request whose images ran."""
        raise NotImplementedError


async def handle(request: Request, name: str | None, protocol: Protocol) -> Response:
    """Answer one inference request of `protocol` with model `name` (None: the default)."""
    state = request.app.state.server
    served = state.model(name)
    request.state.model = served.name
    decoded = await protocol.decode(request, served, state.settings)
    params = validate_params(decoded.params)
    images = protocol.images(decoded, served, state.settings)
    if not torch.is_tensor(images):
        images = await preprocess_async(images, served.manifest, state.settings.max_pixels)
    result = await infer(request, served, images, params)
    return protocol.encode(request, served, decoded, params, result)
