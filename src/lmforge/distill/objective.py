"""The distillation loss: the student's own objective on the hard labels plus the KL divergence to the teacher's
soft targets at temperature T (Hinton et al. 2015), computed on the loss units the objective already has —
examples (classification), labelled words (NER), every next-token position (causal LM), masked positions (MLM).

    loss = alpha · T² · Σ_units KL(softmax(t / T) ‖ softmax(s / T)) + (1 − alpha) · hard loss
           + hidden_weight · units · mean over layer pairs of MSE(student block output, teacher block output)

T² keeps the soft term's gradients the size of the hard term's as T changes. The hidden term (TinyBERT's hidden-
state matching, off by default) pairs student block i with teacher block (i + 1)·L_t / L_s − 1, so the last
blocks meet, and compares their outputs on the real (non-padding) positions. Multi-label classification uses the
KL between the tempered Bernoulli distributions of each label. Training only: evaluation scores the hard loss, so
a distilled run's validation figures compare with any other run's. When the student is narrower than the
teacher, each pair's student states go through a learned linear map to the teacher's width first (TinyBERT's W_h),
trained with the student and kept in its checkpoints, but not in the saved model.
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


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student block, teacher block) whose outputs are matched: TinyBERT's uniform map, last to last."""
    return [(i, (i + 1) * teacher_layers // student_layers - 1) for i in range(student_layers)]


class BlockOutputs:
    """Forward hooks that keep each transformer block's output hidden states while `on` (a training step's
    forward passes; never evaluation's, which would pile them up)."""

    def __init__(self, blocks: torch.nn.ModuleList):
        self.states: list[torch.Tensor] = []
        self.on = False
        for block in blocks:
            block.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        if self.on:
            self.states.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        states, self.states, self.on = self.states, [], False
        return states


def projections(student_width: int, teacher_width: int, pairs: int) -> Optional[torch.nn.ModuleList]:
    """TinyBERT's learned maps from the student's width to the teacher's, one per layer pair (None: equal widths)."""
    if student_width == teacher_width:
        return None
    return torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width) for _ in range(pairs))


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], pairs: list[tuple[int, int]],
               mask: Optional[torch.Tensor] = None, project: Optional[torch.nn.ModuleList] = None) -> torch.Tensor:
    """Mean over the layer pairs of the mean squared difference of the hidden states, on the positions `mask`
    keeps (B, T; None: all), the student's states mapped to the teacher's width by `project` when widths differ.
    A classifier's last block may run on the first position only: a pair is compared on the positions both of its
    states hold."""
    total = 0.0
    for k, (i, j) in enumerate(pairs):
        n = min(student[i].size(1), teacher[j].size(1))
        s, t = student[i][:, :n], teacher[j][:, :n].float()
        s = (project[k](s) if project is not None else s).float()
        if mask is not None:
            s, t = s[mask[:, :n].bool()], t[mask[:, :n].bool()]
        total = total + F.mse_loss(s, t)
    return total / len(pairs)


class TeacherCache:
    """The teacher's outputs for each training example, kept in memory the first time the example is seen and
    reused in later epochs (fine-tuning: a few floats per example, or per word for NER). Keyed by the example's
    token ids, so the order and grouping of batches do not matter."""

    def __init__(self):
        self.rows: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def keys(batch: dict) -> list[bytes]:
        lengths = batch["attention_mask"].sum(1).tolist()
        return [row[:n].numpy().tobytes() for row, n in zip(batch["input_ids"].cpu(), lengths)]

    def lookup(self, batch: dict, width: int) -> Optional[torch.Tensor]:
        """The batch's teacher outputs if every row is cached (rows padded with zeros to `width` positions)."""
        keys = self.keys(batch)
        if not all(k in self.rows for k in keys):
            return None
        self.hits += len(keys)
        rows = [self.rows[k] for k in keys]
        if rows[0].dim() == 1:
            return torch.stack(rows)
        out = rows[0].new_zeros((len(rows), width, rows[0].size(-1)))
        for r, row in enumerate(rows):
            out[r, :row.size(0)] = row
        return out

    def store(self, batch: dict, outputs: torch.Tensor) -> None:
        lengths = batch["attention_mask"].sum(1).tolist()
        for key, row, n in zip(self.keys(batch), outputs.detach().cpu(), lengths):
            self.rows[key] = row if row.dim() == 1 else row[:n].clone()
        self.misses += len(lengths)


class Distilled:
    """Wraps a student's objective (anything with forward_logits / prediction_mask / loss_from_logits); everything
    else — batches, token counts, tallies — is the wrapped objective's."""

    def __init__(self, base, teacher: torch.nn.Module, temperature: float, alpha: float, binary: bool = False, *,
                 hidden_weight: float = 0.0, taps: Optional[tuple["BlockOutputs", "BlockOutputs"]] = None,
                 pairs: Optional[list[tuple[int, int]]] = None, cache: Optional[TeacherCache] = None,
                 project: Optional[torch.nn.ModuleList] = None):
        self.base, self.teacher, self.temperature, self.alpha, self.binary = base, teacher, temperature, alpha, binary
        self.cache = cache
        self.hidden_weight, self.taps, self.pairs = hidden_weight, taps, pairs
        self.trainable = project  # trained with the student (the engine's optimizer and checkpoints), never saved in it
        self.tally_names = tuple(getattr(base, "tally_names", ())) + ("kd_loss",) + (("hidden_loss",) if taps else ())
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
        for taps in self.taps or ():
            taps.on = True
        start = time.perf_counter()
        teacher = self.cache.lookup(batch, batch["input_ids"].size(1)) if self.cache is not None else None
        if teacher is None:
            with torch.no_grad():
                teacher = self.base.forward_logits(self.teacher, batch)
            if self.cache is not None:
                self.cache.store(batch, teacher)
        teacher = teacher.to(device)
        self.teacher_seconds += time.perf_counter() - start
        student = self.base.forward_logits(model, batch)
        hard, count, per_example = self.base.loss_from_logits(student, batch)
        soft = kd_loss(student, teacher, self.temperature, self.base.prediction_mask(batch), self.binary)
        self.base.tally(model, "kd_loss", soft.detach(), count)
        total = self.alpha * soft + (1 - self.alpha) * hard
        if self.taps is not None:
            student_taps, teacher_taps = self.taps
            mask = batch.get("attention_mask")
            hidden = hidden_mse(student_taps.take(), teacher_taps.take(), self.pairs, mask, self.trainable)
            self.base.tally(model, "hidden_loss", hidden.detach() * count, count)
            total = total + self.hidden_weight * hidden * count
        return total, count, per_example
