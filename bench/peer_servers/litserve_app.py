"""LitServe serving our checkpoint: raw image/* body in, top-k labels out, batched.

    python bench/peer_servers/litserve_app.py --weights DIR --port 8000 --max-batch-size 8

One inference worker and one API server process on the CPU. LitServe's batching loop waits up to
--batch-timeout seconds for a batch to fill; at 0 it polls its queue without blocking (a busy
loop that holds a core), so give it a small positive timeout on a small machine.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation at run
# time to build the endpoint, and FastAPI needs the object, not a string.
import argparse
from typing import Annotated

import litserve as ls
from classifier import Classifier
from fastapi import Depends, Request


async def raw_body(request: Request) -> bytes:
    """The request body as sent (LitServe would otherwise parse it as JSON or a form)."""
    return await request.body()


class ClassifierAPI(ls.LitAPI):
    """Decode and preprocess per request, stack into a batch, run the model, top-k per image."""

    def __init__(self, weights: str, threads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.weights, self.threads = weights, threads

    def setup(self, device) -> None:
        self.classifier = Classifier(self.weights, self.threads)

    def decode_request(self, request: Annotated[bytes, Depends(raw_body)]):
        return self.classifier.preprocess(request)

    def predict(self, x):
        return self.classifier.labels(self.classifier.predict(x))

    def encode_response(self, output):
        return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="checkpoint folder")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.001, help="seconds")
    args = parser.parse_args(argv)
    api = ClassifierAPI(args.weights, args.threads, max_batch_size=args.max_batch_size,
                        batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)


if __name__ == "__main__":
    main()
