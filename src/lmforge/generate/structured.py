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
import numpy as np
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
    """One row's grammar state: which tokens may come next, and the tokens chosen so far."""

    def __init__(self, grammar: str, tokenizer, vocab: int):
        self.vocab = vocab
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab), grammar)
        if self.matcher.is_error():
            raise LmforgeError(f"the grammar cannot be compiled: {self.matcher.get_error()}")

    def mask(self, scores: torch.Tensor) -> None:
        """Set the scores of the tokens the grammar forbids next to -inf (in place, one row)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[:self.vocab].astype(bool))
        scores.masked_fill_(~allowed.to(scores.device), float("-inf"))

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)
