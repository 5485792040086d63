"""ELECTRA: a small masked-LM generator proposes replacements, a discriminator detects them.

The generator (`ElectraForMaskedLM`, `generator_fraction` of the discriminator's width, same depth)
shares the discriminator's embeddings (tokens, positions, token types) and its output layer is tied
to the token embeddings. It is trained with MLM on the masked positions; its samples (drawn from its
output distribution, no gradient) fill those positions, and the discriminator (`ElectraForPreTraining`)
classifies every token as original or replaced. A sample that happens to equal the original token
counts as original, so the labels mark exactly the changed tokens.

    loss = MLM(generator) + rtd_weight * RTD(discriminator)          (rtd_weight = 50, as in the paper)

Both are means: the engine divides the sum by the step's masked tokens, and each row's RTD mean is
weighted by its masked-token count. Evaluation reports the generator's masked-token loss as `loss`,
and `rtd_loss`, `rtd_accuracy`, `gen_accuracy` and `replaced` (share of tokens changed).

The model (the two networks, how they share embeddings and how they are saved) is `lmforge.models.electra`.
"""

from __future__ import annotations

import torch

from lmforge.objectives.base import token_cross_entropy
from lmforge.objectives.mlm import MaskedLM
from lmforge.registry import register_objective


def replace_tokens(original: torch.Tensor, selected: torch.Tensor,
                   sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(discriminator inputs, replaced labels): the samples put at the selected positions; a label is
    True exactly where the input now differs from the original."""
    inputs = original.clone()
    inputs[selected] = sampled
    return inputs, inputs != original


@register_objective("electra", like="electra")
class ReplacedTokenDetection(MaskedLM):
    name = "electra"
    tally_names = ("gen_accuracy", "rtd_loss", "rtd_accuracy", "replaced")

    def make_batch(self, input_ids, example_ids, domains) -> dict:
        batch = super().make_batch(input_ids, example_ids, domains)
        batch["original"] = input_ids
        return batch

    def loss(self, model, batch):
        gen, disc = model.generator, model.discriminator
        ids, labels, original = batch["input_ids"], batch["labels"], batch["original"]
        selected = labels != -100
        hidden = gen.electra(input_ids=ids).last_hidden_state
        logits = gen.generator_lm_head(gen.generator_predictions(hidden[selected]))
        targets = labels[selected]
        mlm = token_cross_entropy(logits, targets)
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1).squeeze(-1)
        disc_inputs, replaced = replace_tokens(original, selected, sampled)
        disc_logits = disc(input_ids=disc_inputs).logits.float()
        rtd = torch.nn.functional.binary_cross_entropy_with_logits(disc_logits, replaced.float(), reduction="none")
        masked = selected.sum(1)
        rows = selected.nonzero()[:, 0]
        per_row = torch.zeros(ids.size(0), device=ids.device, dtype=mlm.dtype).index_add_(0, rows, mlm)
        total = mlm.sum() + self.config.rtd_weight * (rtd.mean(1) * masked).sum()
        self.tally(model, "gen_accuracy", (logits.argmax(-1) == targets).sum(), targets.numel())
        self.tally(model, "rtd_loss", rtd.sum(), rtd.numel())
        self.tally(model, "rtd_accuracy", ((disc_logits > 0) == replaced).sum(), rtd.numel())
        self.tally(model, "replaced", replaced.sum(), replaced.numel())
        return total, selected.sum(), per_row
