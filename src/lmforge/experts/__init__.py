"""Domain experts: Branch-Train-Merge (branch a seed per domain, train independently, ensemble or average),
Branch-Train-MiX (merge the experts into one mixture-of-experts model with a learned router) and DEMix layers
(one model with an FFN expert per domain)."""

from lmforge.experts.demix import add_domain, remove_domain, train_demix
from lmforge.experts.moe import load_moe, merge_experts
from lmforge.experts.run import add_expert, branch, evaluate, format_comparison, merge, train
from lmforge.models.demix import GPT2DEMixForCausalLM, LlamaDEMixForCausalLM, demix_from_dense
from lmforge.models.ensemble import ExpertEnsemble, average_state_dicts
from lmforge.models.moe import GPT2MoEForCausalLM, load_balancing_loss
from lmforge.runs import load_ensemble

__all__ = ["ExpertEnsemble", "GPT2DEMixForCausalLM", "GPT2MoEForCausalLM", "LlamaDEMixForCausalLM", "add_domain",
           "add_expert", "average_state_dicts", "branch", "demix_from_dense", "evaluate", "format_comparison",
           "load_balancing_loss", "load_ensemble", "load_moe", "merge", "merge_experts", "remove_domain", "train",
           "train_demix"]
