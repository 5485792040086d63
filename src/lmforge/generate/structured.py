"""Structured output: a grammar — any JSON object, a JSON Schema, a regular expression — enforced token by token
with llguidance (Microsoft's low-level guidance library: Rust, a 3 MB wheel with no dependencies; xgrammar, the
other candidate, pulls in triton, a GPU compiler, on a CPU install). Before each token, the tokens the grammar
does not allow next get a score of -inf; once the grammar is complete only EOS is allowed, so a row that ends
by itself always parses (one cut short by max_tokens does not, and says so with finish_reason "length")."""

from __future__ import annotations

import weakref
from typing import Optional

import llguidance
import llguidance.hf
import torch

from lmforge.errors import LmforgeError

_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# JSON as json.dumps writes it: no free whitespace, which a small model would otherwise fill pages with
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_grammar(schema: Optional[dict] = None) -> str:
    """The grammar of a JSON value that follows `schema` (None: any JSON object)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                             defaults=COMPACT)
    except ValueError as err:
        raise LmforgeError(f"json schema: {err}") from None


def regex_grammar(regex: str) -> str:
    try:
        return llguidance.LLMatcher.grammar_from_regex(regex)
    except ValueError as err:
        raise LmforgeError(f"regex: {err}") from None


def _ll_tokenizer(tokenizer, vocab: int):
    """llguidance's view of a tokenizer (about a second to build, so kept per tokenizer and vocabulary size)."""
    per_size = _TOKENIZERS.setdefault(tokenizer, {})
    if vocab not in per_size:
        per_size[vocab] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    return per_size[vocab]


def check_grammar(grammar: str, tokenizer, vocab: int) -> None:
    """One clear error for a grammar llguidance cannot compile (an invalid JSON Schema, say)."""
    error = llguidance.LLMatcher.validate_grammar(grammar, _ll_tokenizer(tokenizer, vocab))
    if error:
        raise LmforgeError(f"the grammar cannot be compiled: {error}")


class Constraint:
    """One row's grammar state: which tokens may come next (one bit per token: token 32w + j is bit j of int32
    word w), and the tokens chosen so far."""

    def __init__(self, grammar: str, tokenizer, vocab: int):
        self.words = (vocab + 31) // 32
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab), grammar)
        if self.matcher.is_error():
            raise LmforgeError(f"the grammar cannot be compiled: {self.matcher.get_error()}")

    def bits(self) -> torch.Tensor:
        bits = torch.empty(self.words, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), self.words * 4)
        return bits

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def mask_rows(scores: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
    """Set the scores of the tokens each row's grammar forbids next to -inf (in place), all rows in one operation.
    (Computing the next masks in a thread while the model runs its forward was slower on a busy 2-core CPU.)"""
    bits = torch.stack([c.bits() for c in constraints])
    allowed = ((bits[:, :, None] >> _SHIFTS) & 1).bool().reshape(len(rows), -1)[:, :scores.shape[1]]
    index = torch.tensor(rows, device=scores.device)
    scores[index] = scores[index].masked_fill(~allowed.to(scores.device), float("-inf"))
