"""Knowledge distillation: a smaller student trained on a teacher's soft targets (`lmforge distill`)."""

from lmforge.distill.run import distill

__all__ = ["distill"]
