"""Adversarial training on the word embeddings: FGM (Miyato et al., 2017, "Adversarial Training Methods for
Semi-Supervised Text Classification") and PGD (Madry et al., 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks"; as applied to embeddings in FreeLB-style text training).

FGM: after the clean backward pass, the input embedding matrix moves by epsilon * g / ||g|| (g: its gradient, the
direction that raises the loss most), the same batch runs forward and backward again so its gradient adds to the
clean one, and the matrix is restored bit for bit before the optimizer steps. A step costs about one more forward
and backward.

PGD: `steps` smaller moves of alpha * g / ||g||, each followed by a forward and backward that gives the next
direction; after each move the total perturbation is projected back onto the L2 ball of radius epsilon around the
clean matrix. Only the last pass's gradient adds to the clean one (the inner passes only find the direction), and
the matrix is restored bit for bit. A step costs about `steps` more forwards and backwards.

Both perturb the rows of the tokens the batch uses (the only rows with a gradient); norms are those of the whole
matrix's perturbation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch


def gradient_norm(weight: torch.Tensor) -> Optional[float]:
    """The L2 norm of `weight`'s gradient, or None when there is no usable one (none, zero or not finite)."""
    grad = weight.grad
    norm = float(grad.norm()) if grad is not None else 0.0
    return norm if norm > 0.0 and math.isfinite(norm) else None


@torch.no_grad()
def ascend(weight: torch.Tensor, size: float, norm: float) -> None:
    """Move `weight` by `size` along its normalised gradient (the direction that raises the loss most)."""
    weight.add_(weight.grad, alpha=size / norm)


@torch.no_grad()
def project(weight: torch.Tensor, clean: torch.Tensor, epsilon: float) -> None:
    """Pull `weight` back onto the L2 ball of radius `epsilon` around `clean` when it has left it."""
    delta = weight - clean
    norm = float(delta.norm())
    if norm > epsilon:
        weight.copy_(clean + delta * (epsilon / norm))


@contextlib.contextmanager
def restored(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yields a copy of `weight`; on leaving, the copy is written back (bit for bit, whatever happened inside)."""
    saved = weight.detach().clone()
    try:
        yield saved
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@contextlib.contextmanager
def own_gradient(weight: torch.Tensor, settle: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> Iterator[None]:
    """Inside: `weight.grad` holds only what is computed inside, the gradient accumulated before (earlier
    micro-batches of the step) set aside; on leaving, the two are summed. An attack's direction is then its own
    micro-batch's. `settle` makes the set-aside part what the backward passes inside made of theirs: under DDP,
    whose last micro-batch averages the gradient over processes, the average of each process's earlier part."""
    before = weight.grad
    weight.grad = None
    try:
        yield
    finally:
        if before is not None:
            before = settle(before) if settle is not None else before
            weight.grad = before if weight.grad is None else weight.grad.add_(before)


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
        norm = gradient_norm(weight)
        if norm is None:
            yield False
            return
        with restored(weight):
            ascend(weight, self.epsilon, norm)
            yield True

    def attack(self, model, forward_backward: Callable[[], None]) -> bool:
        """After the clean backward: run `forward_backward` (the batch's loss, backward, gradients accumulating) on
        perturbed embeddings; the embeddings are as before on return. False when nothing was perturbed."""
        with self.perturbed(model) as moved:
            if moved:
                forward_backward()
        return moved


class PGD(FGM):
    """Projected gradient descent (ascent on the loss): `steps` moves of `alpha`, kept within `epsilon` of the
    clean embeddings."""

    def __init__(self, epsilon: float, alpha: float, steps: int):
        super().__init__(epsilon)
        self.alpha, self.steps = alpha, steps

    def attack(self, model, forward_backward: Callable[[], None]) -> bool:
        weight = self.embedding_weight(model)
        if gradient_norm(weight) is None:
            return False
        params = [p for p in model.parameters() if p.requires_grad]
        clean_grads = [p.grad for p in params]  # the clean gradient, set aside while the inner passes run
        with restored(weight) as clean:
            for _ in range(self.steps):
                norm = gradient_norm(weight)
                if norm is None:  # a flat spot: the last pass's gradient stands
                    break
                ascend(weight, self.alpha, norm)
                project(weight, clean, self.epsilon)
                for p in params:
                    p.grad = None
                forward_backward()
        for p, g in zip(params, clean_grads):  # clean gradient + the last adversarial pass's
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        return True
