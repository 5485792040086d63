"""Masked LM with dynamic masking: 15 % selected, of which 80 % [MASK], 10 % random, 10 % kept.

Masking is a pure function of (seed, example id), so it is the same whatever the batch layout,
number of processes, or whether the run was resumed. The head runs only at the selected positions.
"""

from __future__ import annotations

import torch

from lmforge.objectives.base import Objective, token_cross_entropy
from lmforge.recipe import ObjectiveConfig
from lmforge.registry import register_objective
from lmforge.tokenizer import special_ids, word_start_table


def mask_tokens(input_ids: torch.Tensor, example_ids: torch.Tensor, *, seed: int, mask_id: int,
                vocab_size: int, special: torch.Tensor, probability: float = 0.15,
                word_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked inputs, labels) with labels == -100 everywhere except the selected positions."""
    inputs = input_ids.clone()
    labels = torch.full_like(input_ids, -100)
    for row, example in enumerate(example_ids.tolist()):
        gen = torch.Generator().manual_seed(hash((seed, example)) & 0x7FFF_FFFF_FFFF)
        ids = input_ids[row]
        draws = torch.rand(3, ids.numel(), generator=gen)
        if word_starts is None:
            selected = draws[0] < probability
        else:
            # Whole words: draw once per word (at its first sub-word) and spread over the word.
            word_index = torch.cumsum(word_starts[ids].long(), 0) - 1
            word_index.clamp_(min=0)
            selected = (draws[0] < probability)[word_index]
        selected &= ~special[ids]
        replace = selected & (draws[1] < 0.8)
        randomise = selected & ~replace & (draws[2] < 0.5)
        labels[row, selected] = ids[selected]
        inputs[row, replace] = mask_id
        random_ids = torch.randint(vocab_size, (int(randomise.sum()),), generator=gen)
        inputs[row, randomise] = random_ids
    return inputs, labels


def _split_mlm(model):
    """(encoder, head) for HF masked-LM classes, so the head can run on selected positions only."""
    for enc_name, head_name in (("bert", "cls"), ("roberta", "lm_head"), ("electra", "generator_predictions")):
        encoder = getattr(model, enc_name, None)
        if encoder is not None and hasattr(model, head_name):
            if enc_name == "electra":
                return encoder, torch.nn.Sequential(model.generator_predictions, model.generator_lm_head)
            return encoder, getattr(model, head_name)
    return None, None


@register_objective("mlm", like="mlm")
class MaskedLM(Objective):
    name = "mlm"

    def __init__(self, config: ObjectiveConfig, tokenizer, seed: int = 0):
        self.config = config
        self.seed = seed
        ids = special_ids(tokenizer)
        if ids["mask"] is None:
            raise ValueError("tokenizer has no mask token")
        self.mask_id = ids["mask"]
        self.vocab_size = len(tokenizer)
        special = torch.zeros(self.vocab_size, dtype=torch.bool)
        for token_id in tokenizer.all_special_ids:
            special[token_id] = True
        self.special = special
        self.word_starts = torch.tensor(word_start_table(tokenizer)) if config.whole_word else None

    def make_batch(self, input_ids, example_ids, domains) -> dict:
        inputs, labels = mask_tokens(input_ids, example_ids, seed=self.seed, mask_id=self.mask_id,
                                     vocab_size=self.vocab_size, special=self.special,
                                     probability=self.config.mlm_probability, word_starts=self.word_starts)
        return {"input_ids": inputs, "labels": labels, "domains": domains}

    def token_counts(self, batch):
        return (batch["labels"] != -100).sum(1).cpu()

    def loss(self, model, batch):
        return self.loss_from_logits(self.forward_logits(model, batch), batch)

    def forward_logits(self, model, batch) -> torch.Tensor:
        """(N, V): the logits of the N masked positions only (the head runs on nothing else)."""
        ids, selected = batch["input_ids"], batch["labels"] != -100
        encoder, head = _split_mlm(model)
        if encoder is not None:
            return head(encoder(input_ids=ids).last_hidden_state[selected])
        return model(input_ids=ids).logits[selected]  # an unknown masked-LM class: full logits, then select

    def prediction_mask(self, batch) -> None:
        return None  # forward_logits holds the masked positions only

    def loss_from_logits(self, logits: torch.Tensor, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        selected = labels != -100
        losses = token_cross_entropy(logits, labels[selected])
        rows = selected.nonzero()[:, 0]
        per_example = torch.zeros(ids.size(0), device=ids.device, dtype=losses.dtype).index_add_(0, rows, losses)
        return losses.sum(), selected.sum(), per_example
