"""Masked LM plus a sentence-pair task: next-sentence (NSP, BERT) or sentence-order (SOP, ALBERT) prediction.

Rows come from `lmforge.data.pairs`: [CLS] A [SEP] B [SEP] [PAD]…, then the pair label. Token type ids
are 0 up to and including the first [SEP] and 1 after it; padding is masked out of attention and never
selected for masking. The model is `BertForPreTraining` (MLM head + two-way pair head on the pooler).

Joint loss: the masked-token mean plus the pair loss, where each pair's loss is weighted by its row's
masked-token count. The engine divides the sum by the step's masked tokens, so the pair term is a
token-weighted mean and the gradient is the same whatever the micro-batch layout. Evaluation reports
the masked-token loss as `loss` (comparable to plain MLM) and both accuracies.
"""

from __future__ import annotations

import torch

from lmforge.objectives.base import token_cross_entropy
from lmforge.objectives.mlm import MaskedLM, mask_tokens
from lmforge.registry import register_objective
from lmforge.tokenizer import special_ids


def token_types(input_ids: torch.Tensor, sep_id: int, pad_id: int) -> torch.Tensor:
    """0 for [CLS] A [SEP], 1 for B [SEP], 0 for padding."""
    is_sep = input_ids == sep_id
    after_first_sep = (torch.cumsum(is_sep.long(), dim=1) - is_sep.long()) >= 1
    return (after_first_sep & (input_ids != pad_id)).long()


@register_objective("mlm+nsp", like="mlm+nsp")
@register_objective("mlm+sop", like="mlm+sop")
class PairedMaskedLM(MaskedLM):
    def __init__(self, config, tokenizer, seed: int = 0):
        super().__init__(config, tokenizer, seed=seed)
        self.name = config.name
        self.task = config.kind.split("+")[1]  # nsp | sop
        self.tally_names = ("mlm_accuracy", f"{self.task}_loss", f"{self.task}_accuracy")
        ids = special_ids(tokenizer)
        self.sep_id, self.pad_id = ids["sep"], ids["pad"]

    def make_batch(self, input_ids, example_ids, domains) -> dict:
        ids, pair_labels = input_ids[:, :-1], input_ids[:, -1]
        inputs, labels = mask_tokens(ids, example_ids, seed=self.seed, mask_id=self.mask_id,
                                     vocab_size=self.vocab_size, special=self.special,
                                     probability=self.config.mlm_probability, word_starts=self.word_starts)
        return {"input_ids": inputs, "labels": labels, "attention_mask": (ids != self.pad_id).long(),
                "token_type_ids": token_types(ids, self.sep_id, self.pad_id), "pair_labels": pair_labels,
                "domains": domains}

    def loss(self, model, batch):
        ids, labels = batch["input_ids"], batch["labels"]
        out = model.bert(input_ids=ids, attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"])
        selected = labels != -100
        logits = model.cls.predictions(out.last_hidden_state[selected])
        targets = labels[selected]
        mlm = token_cross_entropy(logits, targets)
        rows = selected.nonzero()[:, 0]
        per_row = torch.zeros(ids.size(0), device=ids.device, dtype=mlm.dtype).index_add_(0, rows, mlm)
        masked = selected.sum(1)
        pair_logits = model.cls.seq_relationship(out.pooler_output)
        pair = torch.nn.functional.cross_entropy(pair_logits.float(), batch["pair_labels"], reduction="none")
        total = mlm.sum() + (pair * masked).sum()
        self.tally(model, "mlm_accuracy", (logits.argmax(-1) == targets).sum(), targets.numel())
        self.tally(model, f"{self.task}_loss", pair.sum(), pair.numel())
        self.tally(model, f"{self.task}_accuracy", (pair_logits.argmax(-1) == batch["pair_labels"]).sum(),
                   pair.numel())
        return total, selected.sum(), per_row
