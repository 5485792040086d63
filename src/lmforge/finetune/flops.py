"""The training FLOPs of a task batch as it actually runs, for an honest MFU.

Every padded position passes every layer (padding is work done, though no token is read there); the pooler and
a sequence classifier's head run once per example; with `first_position_only` the last layer's queries,
attention output and feed-forward block run for [CLS] alone. A weight that trains costs 6 FLOPs per use
(forward, input gradient, weight gradient), a frozen one 4 (no weight gradient), as in `flops_per_token`.
"""

from __future__ import annotations

from typing import Callable

from lmforge.finetune.fast import encoder_layers


def _cost(params) -> float:
    return float(sum((6 if p.requires_grad else 4) * p.numel() for p in params))


def task_batch_flops(model, task: str, first_position: bool) -> Callable[[dict], float]:
    """`flops(batch)`: training FLOPs of one batch of `model` (an HF encoder task model, also inside peft)."""
    cfg = model.config
    layers, width = cfg.num_hidden_layers, cfg.hidden_size
    per_row = ("pooler", "classifier") if task == "classification" else ("pooler",)
    per_token, once = [], []
    for name, p in model.named_parameters():
        if "embeddings" in name:
            continue  # a table lookup, not a matmul
        (once if any(part in name for part in per_row) else per_token).append(p)
    token_cost, row_cost = _cost(per_token), _cost(once)
    skipped = 0.0
    if first_position:
        last = encoder_layers(model)[-1]
        keys_values = {id(p) for p in last.attention.self.key.parameters()} | \
                      {id(p) for p in last.attention.self.value.parameters()}
        skipped = _cost(p for p in last.parameters() if id(p) not in keys_values)

    def flops(batch: dict) -> float:
        rows, length = batch["input_ids"].shape
        attention = 3 * 2 * 2 * width * length  # QK^T and AV per query position and layer, forward + backward
        total = rows * length * (token_cost + layers * attention) + rows * row_cost
        if first_position:
            total -= rows * (length - 1) * (skipped + attention)
        return float(total)

    return flops


def seq2seq_batch_flops(model) -> Callable[[dict], float]:
    """`flops(batch)` of an encoder-decoder LM (T5): encoder weights once per padded source position, decoder
    weights and the vocabulary projection once per padded target position (attention scores left out: short
    texts make them small)."""
    vocab = model.get_output_embeddings().weight
    head = float((6 if vocab.requires_grad else 4) * vocab.numel())
    encoder = _cost(p for n, p in model.named_parameters() if n.startswith("encoder.") and "embed_tokens" not in n)
    decoder = _cost(p for n, p in model.named_parameters() if n.startswith("decoder.") and "embed_tokens" not in n)

    def flops(batch: dict) -> float:
        rows, length = batch["input_ids"].shape
        return float(rows * length * encoder + batch["labels"].numel() * (decoder + head))

    return flops
