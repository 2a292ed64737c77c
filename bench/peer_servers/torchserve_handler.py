"""TorchServe custom handler for our checkpoint: raw image body in, top-k labels out.

The model archive carries this file, classifier.py and the checkpoint (manifest.json,
model.safetensors) side by side; TorchServe unpacks them into the model directory and puts that
directory on the worker's import path. TorchServe hands a whole batch to handle().
"""

from __future__ import annotations

import os

import torch
from classifier import Classifier


class ClassifierHandler:
    """initialize() loads the checkpoint; handle() runs one batch of requests."""

    def initialize(self, context) -> None:
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        self.classifier = Classifier(context.system_properties["model_dir"], threads)
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[dict]:
        bodies = [bytes(row.get("data") or row.get("body")) for row in data]
        batch = torch.stack([self.classifier.preprocess(body) for body in bodies])
        return self.classifier.labels(self.classifier.predict(batch))
