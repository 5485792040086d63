"""Gradual magnitude pruning during fine-tuning (Zhu & Gupta 2017, "To prune, or not to prune"): the sparsity
rises from s_i to s_f over n pruning events Δt steps apart, fast at first and slowly at the end,

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³        for t = t0, t0 + Δt, …, t0 + n·Δt

and the network recovers between events. Pruned weights are held at zero for the rest of the run: the masks are
written into the weights before every forward pass (training and evaluation), so neither the optimizer's momentum
nor weight decay brings them back for a forward pass (a forward pre-hook on the model). Weights pruned by an
earlier step stay pruned.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmforge.compress.magnitude import apply_masks, prune_magnitude


def cubic_sparsity(step: int, final: float, initial: float, steps: int, every: int) -> float:
    """Zhu & Gupta's target sparsity after `step` optimizer steps (t0 = 0, n·Δt = `steps`); constant between events."""
    if steps <= 0:
        return final
    t = min(step - step % every, steps)
    return final + (initial - final) * (1 - t / steps) ** 3


class HeldSparsity:
    """Attached to a model being fine-tuned: before each forward pass (training and evaluation), prune to the
    schedule's sparsity at pruning events and zero every pruned weight. `final` None: only hold `masks`."""

    def __init__(self, final: Optional[float], *, scope: str = "global", steps: int = 100, every: int = 10,
                 grad_accum: int = 1, initial: float = 0.0, masks: Optional[dict] = None):
        self.final, self.scope, self.steps, self.every = final, scope, steps, max(1, every)
        self.grad_accum, self.initial, self.masks = grad_accum, initial, masks
        self.forwards, self.pruned_at = 0, -1
        self.history: list[tuple[int, float]] = []  # (step, sparsity) at each pruning event

    def attach(self, model):
        model.register_forward_pre_hook(self._before_forward)
        return model

    @property
    def step(self) -> int:
        """Optimizer steps taken: one per `grad_accum` training forwards."""
        return self.forwards // self.grad_accum

    @torch.no_grad()
    def hold(self, model) -> None:
        """Prune at a pruning event, then zero every pruned weight."""
        step = self.step
        if self.final is not None and step % self.every == 0 and step != self.pruned_at and step <= self.steps:
            target = cubic_sparsity(step, self.final, self.initial, self.steps, self.every)
            if self.masks is not None:
                apply_masks(model, self.masks)  # zeros are the smallest magnitudes: an earlier pruning stays
            if target > 0:
                self.masks = prune_magnitude(model, target, self.scope)
                self.history.append((step, round(target, 6)))
            self.pruned_at = step
        if self.masks is not None:
            apply_masks(model, self.masks)

    def _before_forward(self, model, args) -> None:
        self.hold(model)
        if model.training:
            self.forwards += 1
