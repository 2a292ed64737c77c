"""Compiling torch modules with OpenVINO for the CPU, for the engines that run on it."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class Bundle(nn.Module):
    """Several modules as one, each on its own input: one trace converts them all."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part(x) for part, x in zip(self.parts, inputs, strict=True))


def openvino_requests(modules: list[nn.Module], shapes: list[tuple[int, ...]], precision: str,
                      threads: int) -> list:
    """An infer request per module, compiled by OpenVINO for the CPU: input (batch, *shape)
    with a dynamic batch, in `precision` ("bf16" or "f32"; FakeQuantize ops run in int8).
    The modules convert as one graph (a conversion costs about a second however small the
    module), which splits into a model per module."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    with warnings.catch_warnings(), torch.no_grad():  # the converter traces with torch.jit
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated), which warns of every
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python branch it fixes
        example = tuple(torch.zeros(1, *s) for s in shapes)
        graph = ov.convert_model(Bundle(modules).eval(), example_input=example,
                                 input=[ov.PartialShape([-1, *s]) for s in shapes])
    core = ov.Core()
    parts = zip(graph.get_results(), graph.get_parameters(), strict=True)
    return [core.compile_model(ov.Model([result], [parameter]), "CPU", config).create_infer_request()
            for result, parameter in parts]


def openvino_infer(request, x: torch.Tensor) -> torch.Tensor:
    """Run a compiled request on a batch; float32 out."""
    request.infer(np.ascontiguousarray(x.float().numpy()), share_inputs=True)
    return torch.from_numpy(request.get_output_tensor(0).data.copy())


def convolution_precisions(request) -> list[str]:
    """The precision each convolution of a compiled request runs in (f32, bf16, u8 or i8)."""
    ops = request.get_compiled_model().get_runtime_model().get_ops()
    info = [op.get_rt_info() for op in ops]
    return [i["runtimePrecision"].astype(str) for i in info
            if i["layerType"].astype(str) == "Convolution" and "runtimePrecision" in i]
