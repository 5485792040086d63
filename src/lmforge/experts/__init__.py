"""Domain experts: Branch-Train-Merge (branch a seed per domain, train independently, ensemble or average)."""

from lmforge.experts.ensemble import ExpertEnsemble, average_state_dicts
from lmforge.experts.run import branch, evaluate, format_comparison, load_ensemble, merge, train

__all__ = ["ExpertEnsemble", "average_state_dicts", "branch", "evaluate", "format_comparison", "load_ensemble",
           "merge", "train"]
