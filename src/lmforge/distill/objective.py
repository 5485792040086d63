"""The distillation loss: the student's own objective on the hard labels plus the KL divergence to the teacher's
soft targets at temperature T (Hinton et al. 2015), computed on the loss units the objective already has —
examples (classification), labelled words (NER), every next-token position (causal LM), masked positions (MLM).

    loss = alpha · T² · Σ_units KL(softmax(t / T) ‖ softmax(s / T)) + (1 − alpha) · hard loss

T² keeps the soft term's gradients the size of the hard term's as T changes. Multi-label classification uses the
KL between the tempered Bernoulli distributions of each label. Training only: evaluation scores the hard loss, so
a distilled run's validation figures compare with any other run's.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: Optional[torch.Tensor] = None,
            binary: bool = False) -> torch.Tensor:
    """T² · Σ KL(teacher ‖ student) over the units that `mask` selects (the last axis holds the classes)."""
    if mask is not None:
        student, teacher = student[mask], teacher[mask]
    s, t = student.float() / temperature, teacher.float() / temperature
    if binary:
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    else:
        log_t = F.log_softmax(t, dim=-1)
        kl = log_t.exp() * (log_t - F.log_softmax(s, dim=-1))
    return kl.sum() * temperature ** 2


class Distilled:
    """Wraps a student's objective (anything with forward_logits / prediction_mask / loss_from_logits); everything
    else — batches, token counts, tallies — is the wrapped objective's."""

    def __init__(self, base, teacher: torch.nn.Module, temperature: float, alpha: float, binary: bool = False):
        self.base, self.teacher, self.temperature, self.alpha, self.binary = base, teacher, temperature, alpha, binary
        self.tally_names = tuple(getattr(base, "tally_names", ())) + ("kd_loss",)
        self.teacher_seconds = 0.0  # the teacher's forward passes, computed in the same step as the student's
        self.teacher.eval().requires_grad_(False)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def loss(self, model, batch: dict):
        if not model.training:
            return self.base.loss(model, batch)
        device = next(model.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        start = time.perf_counter()
        with torch.no_grad():
            teacher = self.base.forward_logits(self.teacher, batch)
        self.teacher_seconds += time.perf_counter() - start
        student = self.base.forward_logits(model, batch)
        hard, count, per_example = self.base.loss_from_logits(student, batch)
        soft = kd_loss(student, teacher, self.temperature, self.base.prediction_mask(batch), self.binary)
        self.base.tally(model, "kd_loss", soft.detach(), count)
        return self.alpha * soft + (1 - self.alpha) * hard, count, per_example
