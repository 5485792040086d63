"""Mixture-of-experts causal LMs, as Branch-Train-MiX builds them (Sukhbaatar et al. 2024).

A router per layer (linear d_model → n_experts) sends each token to its top-k experts, weighted by a softmax over
the k chosen logits, as in Mixtral; `load_balancing_loss` is the Switch / Mixtral auxiliary loss.

    llama experts → transformers' MixtralForCausalLM (Llama attention, SwiGLU experts, top-k router).
    gpt2 experts  → `GPT2MoEForCausalLM`: GPT-2 whose every block's MLP is a `GPT2MoE` (router `mlp.gate` +
                    GPT2MLP experts `mlp.experts.<i>`); config model_type "lmforge_gpt2_moe", registered with
                    transformers' Auto classes when this module is imported.

Merging trained experts into such a model and training its routers are the experts stage's
(`lmforge.experts.moe`).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Model, GPT2PreTrainedModel

FAMILIES = ("gpt2", "llama")
ROUTER = "mlp.gate.weight"      # the router's parameter name in both families
# Config keys that say nothing about the architecture (experts trained apart differ in them).
NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache",
                    "_commit_hash", "output_attentions", "output_hidden_states", "return_dict"}


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert index), each (tokens, k): the k largest router logits, softmax over those k only."""
    top, index = logits.topk(top_k, dim=-1)
    return torch.softmax(top.float(), dim=-1), index


def load_balancing_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch / Mixtral auxiliary loss n · Σ_i f_i · P_i, averaged over layers: f_i is the share of the top-k
    assignments that go to expert i, P_i the mean router probability of expert i. It is 1 when the router's
    probabilities are uniform and grows as routing collapses onto few experts (up to n for top-1)."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        n = probs.size(-1)
        index = probs.topk(top_k, dim=-1).indices
        share = torch.zeros(n, device=probs.device).scatter_add_(0, index.reshape(-1),
                                                                  torch.ones(index.numel(), device=probs.device))
        losses.append(n * (share / index.numel() * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- GPT-2 with MoE feed-forward blocks

class GPT2MoEConfig(GPT2Config):
    model_type = "lmforge_gpt2_moe"
    num_local_experts: int = 2
    num_experts_per_tok: int = 2


class GPT2MoE(torch.nn.Module):
    """One layer's feed-forward block: a router and `num_local_experts` GPT2MLPs, top-k per token."""

    def __init__(self, config: GPT2MoEConfig):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.gate = torch.nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = torch.nn.ModuleList([GPT2MLP(inner, config) for _ in range(config.num_local_experts)])
        self.router_logits: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.size(-1))
        logits = self.gate(x)
        self.router_logits = logits  # read (and cleared) by GPT2MoEForCausalLM.forward
        weights, index = route(logits, self.top_k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(out.dtype))
        return out.view_as(hidden_states)


class GPT2MoEForCausalLM(GPT2LMHeadModel):
    """GPT2LMHeadModel with a GPT2MoE in every block; `output_router_logits=True` returns the routers' logits
    (one (tokens, n_experts) tensor per layer), as MixtralForCausalLM does."""

    config_class = GPT2MoEConfig

    def __init__(self, config: GPT2MoEConfig):
        GPT2PreTrainedModel.__init__(self, config)  # GPT2LMHeadModel's own __init__ builds dense MLPs
        self.transformer = GPT2Model(config)
        for block in self.transformer.h:
            block.mlp = GPT2MoE(config)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, *args, output_router_logits: Optional[bool] = None, **kwargs):
        out = super().forward(*args, **kwargs)
        layers = [block.mlp for block in self.transformer.h]
        router_logits = tuple(m.router_logits for m in layers)
        for m in layers:
            m.router_logits = None
        if not output_router_logits or isinstance(out, tuple):
            return out
        return MoeCausalLMOutputWithPast(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
                                         hidden_states=out.hidden_states, attentions=out.attentions,
                                         router_logits=router_logits)


AutoConfig.register(GPT2MoEConfig.model_type, GPT2MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT2MoEConfig, GPT2MoEForCausalLM, exist_ok=True)
