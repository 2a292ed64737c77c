"""The server a user would write instead: FastAPI + OpenVINO serving the dense checkpoint.

    python bench/peer_servers/fastapi_openvino.py --weights DIR --port 8000 --threads 1

Raw image/* body in, top-k labels out, one image per request, no batching: decode and
preprocess exactly as acs-serve does (service/imaging), then the dense network compiled
whole by OpenVINO for the CPU in its best precision (bf16 where the CPU has it), one infer
request, called on the event loop. One uvicorn worker.
"""

import argparse

import numpy as np
import openvino as ov
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from models.core.checkpoint import load_checkpoint
from service.config import Settings
from service.imaging import preprocess


def compile_dense(weights: str, threads: int) -> tuple[dict, ov.InferRequest]:
    """The checkpoint's manifest and an infer request of its dense network in OpenVINO."""
    checkpoint = load_checkpoint(weights)
    size = checkpoint.manifest["input"]["size"]
    network = checkpoint.model.variants()[0]  # the dense network as a plain module, BN folded
    graph = ov.convert_model(network, example_input=torch.zeros(1, 3, size, size))
    core = ov.Core()
    precision = "bf16" if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                 "INFERENCE_NUM_THREADS": threads,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    return checkpoint.manifest, compiled.create_infer_request()


def create_app(weights: str, threads: int, top_k: int = 5) -> FastAPI:
    manifest, request = compile_dense(weights, threads)
    classes, max_pixels = manifest["classes"], Settings().max_pixels
    app = FastAPI()

    @app.post("/predict")
    async def predict(raw: Request) -> JSONResponse:
        x = preprocess([await raw.body()], manifest, max_pixels).numpy()
        request.infer(np.ascontiguousarray(x), share_inputs=True)
        logits = torch.from_numpy(request.get_output_tensor(0).data.copy())
        probs, index = torch.softmax(logits, 1)[0].topk(min(top_k, len(classes)))
        return JSONResponse({"top_k": [{"label": classes[i], "index": i, "probability": p}
                                       for p, i in zip(probs.tolist(), index.tolist(), strict=True)]})

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="checkpoint folder")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1, help="OpenVINO inference threads")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.weights, args.threads), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
