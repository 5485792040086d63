"""T5 span corruption on packed blocks of raw tokens.

Of a block's L tokens, round(L * noise_density) are noised, in round(noise / mean_span_length) spans.
The noise and the kept text are each cut into that many spans at uniformly random points (T5's
`random_spans_noise_mask`), interleaved kept-first. Each noised span is replaced by one sentinel in the
encoder input, and the targets list every sentinel followed by the tokens it hides:

    block    The cat sat on the mat .
    inputs   The <extra_id_0> on the <extra_id_1> </s>
    targets  <extra_id_0> cat sat <extra_id_1> mat . </s>

Sentinels count up from <extra_id_0> in order of appearance. Lengths depend only on L, so every
example of a block size has the same input and target length (no padding). The noise is a pure
function of (seed, example id), like MLM masking. The decoder is trained with teacher forcing: its
inputs are the targets shifted right behind the decoder start (pad) token.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, processors

from lmforge.errors import LmforgeError
from lmforge.objectives.base import Objective, token_cross_entropy
from lmforge.registry import register_objective
from lmforge.tokenizer import special_ids


def sentinel_tokens(n: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(n)]


def add_sentinels(tokenizer, n: int):
    """Add the n sentinel tokens when the tokenizer lacks them. They are whole added tokens that swallow
    the space before them (so "The <extra_id_0> sat" encodes as it was noised) and are not marked
    special, so decoded text keeps them: `lmforge generate` shows which span each filling belongs to."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in sentinel_tokens(n) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, lstrip=True, normalized=False, special=False) for t in missing])
    return tokenizer


def end_with_eos(tokenizer):
    """Make the tokenizer close every text with EOS when it adds special tokens, as T5's does: encoder inputs
    were trained ending in EOS (so `lmforge generate` prompts match them), and the sequence-classification
    head of T5 pools at the EOS."""
    eos = tokenizer.eos_token
    probe = tokenizer("a")["input_ids"]
    if eos is None or (probe and probe[-1] == tokenizer.eos_token_id):
        return tokenizer
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_token_id)])
    return tokenizer


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noised tokens, spans) for a block of `length` tokens."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(1, min(int(round(noise / mean_span_length)), length - noise))
    return noise, spans


def corrupted_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(encoder input length, target length), each with its closing EOS."""
    noise, spans = span_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def _segments(total: int, parts: int, gen: torch.Generator) -> torch.Tensor:
    """`parts` positive lengths summing to `total`, cut points uniform over the gaps."""
    cuts = torch.randperm(total - 1, generator=gen)[:parts - 1] + 1
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([total])])
    return bounds.diff()


def noise_mask(length: int, noise_density: float, mean_span_length: float, gen: torch.Generator) -> torch.Tensor:
    """Boolean mask of the noised positions: kept and noised spans alternate, kept first."""
    noise, spans = span_counts(length, noise_density, mean_span_length)
    noise_lengths = _segments(noise, spans, gen)
    kept_lengths = _segments(length - noise, spans, gen)
    flags = torch.stack([torch.zeros(spans, dtype=torch.bool), torch.ones(spans, dtype=torch.bool)], 1).flatten()
    return flags.repeat_interleave(torch.stack([kept_lengths, noise_lengths], 1).flatten())


def corrupt(ids: torch.Tensor, mask: torch.Tensor, sentinel_ids: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one block given its noise mask."""
    starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
    span_index = torch.cumsum(starts.long(), 0) - 1
    inputs, targets = [], []
    for token, noised, start, k in zip(ids.tolist(), mask.tolist(), starts.tolist(), span_index.tolist()):
        if not noised:
            inputs.append(token)
            continue
        if start:
            inputs.append(sentinel_ids[k])
            targets.append(sentinel_ids[k])
        targets.append(token)
    return inputs + [eos], targets + [eos]


@register_objective("span", like="span")
class SpanCorruption(Objective):
    name = "span"

    def __init__(self, config, tokenizer, seed: int = 0):
        self.config, self.seed = config, seed
        ids = special_ids(tokenizer)
        self.eos, self.pad = ids["eos"], ids["pad"]
        if self.eos is None:
            raise LmforgeError("tokenizer: span corruption needs an EOS token")
        vocab = tokenizer.get_vocab()
        _, spans = span_counts(config.block_size, config.noise_density, config.mean_span_length)
        names = sentinel_tokens(max(spans, 1))
        if any(t not in vocab for t in names):
            raise LmforgeError(f"tokenizer: span corruption of {config.block_size}-token blocks needs {spans} "
                               f"sentinels (<extra_id_0> ...); this tokenizer lacks them")
        self.sentinels = [vocab[t] for t in names]

    def make_batch(self, input_ids, example_ids, domains) -> dict:
        inputs, targets = [], []
        for row, example in zip(input_ids, example_ids.tolist()):
            gen = torch.Generator().manual_seed(hash((self.seed, example, 3)) & 0x7FFF_FFFF_FFFF)
            mask = noise_mask(row.numel(), self.config.noise_density, self.config.mean_span_length, gen)
            x, y = corrupt(row, mask, self.sentinels, self.eos)
            inputs.append(x)
            targets.append(y)
        targets = torch.tensor(targets, dtype=torch.long)
        decoder_inputs = torch.cat([torch.full_like(targets[:, :1], self.pad), targets[:, :-1]], 1)
        return {"input_ids": torch.tensor(inputs, dtype=torch.long), "decoder_input_ids": decoder_inputs,
                "labels": targets, "domains": domains}

    def token_counts(self, batch):
        labels = batch["labels"]
        return torch.full((labels.size(0),), labels.size(1), dtype=torch.long)

    def count_inputs(self, batch) -> int:
        return batch["input_ids"].numel() + batch["labels"].numel()

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
                       use_cache=False).logits
        labels = batch["labels"]
        losses = token_cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        per_example = losses.view(labels.size(0), -1).sum(1)
        return per_example.sum(), torch.tensor(labels.numel(), device=labels.device), per_example
