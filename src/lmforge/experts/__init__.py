"""Domain experts: Branch-Train-Merge (branch a seed per domain, train independently, ensemble or average) and
Branch-Train-MiX (merge the experts into one mixture-of-experts model with a learned router)."""

from lmforge.experts.ensemble import ExpertEnsemble, average_state_dicts
from lmforge.experts.moe import GPT2MoEForCausalLM, load_balancing_loss, load_moe, merge_experts
from lmforge.experts.run import branch, evaluate, format_comparison, load_ensemble, merge, train

__all__ = ["ExpertEnsemble", "GPT2MoEForCausalLM", "average_state_dicts", "branch", "evaluate", "format_comparison",
           "load_balancing_loss", "load_ensemble", "load_moe", "merge", "merge_experts", "train"]
