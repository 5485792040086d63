"""Adversarial training on the word embeddings: FGM (Miyato et al., 2017, "Adversarial Training Methods for
Semi-Supervised Text Classification").

After the clean backward pass, the input embedding matrix moves by epsilon * g / ||g|| (g: its gradient, the
direction that raises the loss most), the same batch runs forward and backward again so its gradient adds to the
clean one, and the matrix is restored bit for bit before the optimizer steps. The perturbation lands on the rows
of the tokens the batch uses (the only rows with a gradient). A step costs about one more forward and backward.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch


class FGM:
    """The fast gradient method with step size `epsilon` (in the units of an embedding row's L2 norm)."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    @staticmethod
    def embedding_weight(model) -> torch.Tensor:
        return model.get_input_embeddings().weight

    @contextlib.contextmanager
    def perturbed(self, model) -> Iterator[bool]:
        """Inside: the embeddings moved along their gradient (yields False and moves nothing when there is no
        usable gradient); on leaving, the saved embeddings are copied back."""
        weight = self.embedding_weight(model)
        grad = weight.grad
        norm = float(grad.norm()) if grad is not None else 0.0
        if norm == 0.0 or not math.isfinite(norm):
            yield False
            return
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(grad, alpha=self.epsilon / norm)
        try:
            yield True
        finally:
            with torch.no_grad():
                weight.copy_(saved)
