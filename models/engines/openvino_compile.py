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


def openvino_request(module: nn.Module, shape: tuple[int, ...], precision: str, threads: int):
    """An infer request of `module` compiled by OpenVINO for the CPU: input (batch, *shape) with
    a dynamic batch, in `precision` ("bf16" or "f32"; FakeQuantize ops run in int8)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    with warnings.catch_warnings(), torch.no_grad():  # the converter traces with torch.jit
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated), which warns of every
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python branch it fixes
        graph = ov.convert_model(module.eval(), example_input=torch.zeros(1, *shape),
                                 input=[ov.PartialShape([-1, *shape])])
    return ov.Core().compile_model(graph, "CPU", config).create_infer_request()


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
