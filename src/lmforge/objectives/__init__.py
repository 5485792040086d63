"""Objectives: how to build a batch from packed blocks and how to compute the loss from the model.

Every objective returns a *sum* of per-token losses and the number of loss tokens, so the engine can
normalise by the tokens of the whole optimizer step (accumulation and DDP give the large-batch gradient).
"""

from lmforge.objectives.base import Objective, build_objective

# The built-in objectives register themselves by name when imported.
from lmforge.objectives.clm import CausalLM
from lmforge.objectives.electra import ReplacedTokenDetection
from lmforge.objectives.mlm import MaskedLM
from lmforge.objectives.pairs import PairedMaskedLM
from lmforge.objectives.span import SpanCorruption

__all__ = ["CausalLM", "MaskedLM", "Objective", "PairedMaskedLM", "ReplacedTokenDetection", "SpanCorruption",
           "build_objective"]
