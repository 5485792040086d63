"""Objectives: how to build a batch from packed blocks and how to compute the loss from the model.

Every objective returns a *sum* of per-token losses and the number of loss tokens, so the engine can
normalise by the tokens of the whole optimizer step (accumulation and DDP give the large-batch gradient).
"""

from lmforge.objectives.base import Objective, build_objective

__all__ = ["Objective", "build_objective"]
