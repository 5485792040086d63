"""Domain experts: Branch-Train-Merge (branch a seed per domain, train independently, ensemble or average),
Branch-Train-MiX (merge the experts into one mixture-of-experts model with a learned router) and DEMix layers
(one model with an FFN expert per domain)."""

from lmforge.experts.demix import (GPT2DEMixForCausalLM, LlamaDEMixForCausalLM, add_domain, demix_from_dense,
                                   remove_domain, train_demix)
from lmforge.experts.ensemble import ExpertEnsemble, average_state_dicts
from lmforge.experts.moe import GPT2MoEForCausalLM, load_balancing_loss, load_moe, merge_experts
from lmforge.experts.run import branch, evaluate, format_comparison, load_ensemble, merge, train

__all__ = ["ExpertEnsemble", "GPT2DEMixForCausalLM", "GPT2MoEForCausalLM", "LlamaDEMixForCausalLM", "add_domain",
           "average_state_dicts", "branch", "demix_from_dense", "evaluate", "format_comparison", "load_balancing_loss",
           "load_ensemble", "load_moe", "merge", "merge_experts", "remove_domain", "train", "train_demix"]
