"""Our checkpoint as the peer servers run it: decode and preprocess exactly as acs-serve does
(service/imaging), then the plain PyTorch module in eval mode without gradients, in the
precision acs-serve's dtype=auto serves the checkpoint in.

Imported as a top-level module by the LitServe app (its folder is the script's) and by the
TorchServe handler (the archive ships it as an extra file next to the handler).
"""

from __future__ import annotations

import torch

from models.core.checkpoint import load_checkpoint
from models.engines.precision import serving_dtype
from service.config import Settings
from service.imaging import preprocess


class Classifier:
    """Encoded image -> input tensor; batch -> top-k labels with probabilities, as acs-serve's."""

    def __init__(self, weights_dir, threads: int = 1, top_k: int = 5) -> None:
        torch.set_num_threads(threads)
        checkpoint = load_checkpoint(weights_dir)
        self.manifest = checkpoint.manifest
        self.dtype = serving_dtype("auto", torch.device("cpu"), self.manifest)
        self.model = checkpoint.model.eval().to(self.dtype)
        self.classes = self.manifest["classes"]
        self.top_k = min(top_k, len(self.classes))
        self.max_pixels = Settings().max_pixels

    def preprocess(self, body: bytes) -> torch.Tensor:
        """One encoded image -> its normalized (3, size, size) tensor."""
        return preprocess([body], self.manifest, self.max_pixels)[0]

    @torch.no_grad()
    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, size, size) -> (N, classes) probabilities."""
        return torch.softmax(self.model(batch.to(self.dtype)).float(), 1)

    def labels(self, probabilities: torch.Tensor) -> list[dict]:
        """Per image, {"top_k": [{"label", "index", "probability"}, ...]}."""
        probs, index = probabilities.topk(self.top_k, 1)
        return [{"top_k": [{"label": self.classes[j], "index": j, "probability": p}
                           for p, j in zip(row_p, row_i, strict=True)]}
                for row_p, row_i in zip(probs.tolist(), index.tolist(), strict=True)]
