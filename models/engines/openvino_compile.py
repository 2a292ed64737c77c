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


def openvino_models(modules: list[nn.Module], shapes: list[tuple[int, ...]]) -> list:
    """Each module converted to an OpenVINO model with input (batch, *shape), a dynamic batch.
    The modules convert as one graph (a conversion costs about a second however small the
    module), which splits into a model per module."""
    import openvino as ov

    with warnings.catch_warnings(), torch.no_grad():  # the converter traces with torch.jit
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated), which warns of every
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python branch it fixes
        example = tuple(torch.zeros(1, *s) for s in shapes)
        graph = ov.convert_model(Bundle(modules).eval(), example_input=example,
                                 input=[ov.PartialShape([-1, *s]) for s in shapes])
    parts = zip(graph.get_results(), graph.get_parameters(), strict=True)
    return [ov.Model([result], [parameter]) for result, parameter in parts]


def chained(models: list):
    """One OpenVINO model running `models` in sequence, each on the one before's output."""
    import openvino as ov

    first = models[0].clone()
    out = first.get_results()[0].input_value(0)
    for model in models[1:]:
        part = model.clone()
        part.get_parameters()[0].output(0).replace(out)
        out = part.get_results()[0].input_value(0)
    return ov.Model([out], first.get_parameters())


def compiled_request(model, precision: str, threads: int):
    """An infer request of an OpenVINO model compiled for the CPU in `precision` ("bf16" or
    "f32"; FakeQuantize ops run in int8)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    return ov.Core().compile_model(model, "CPU", config).create_infer_request()


def openvino_requests(modules: list[nn.Module], shapes: list[tuple[int, ...]], precision: str,
                      threads: int) -> list:
    """An infer request per module (`openvino_models`, `compiled_request`)."""
    return [compiled_request(m, precision, threads) for m in openvino_models(modules, shapes)]


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
