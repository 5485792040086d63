"""Combine domain experts: an ensemble weighted by the domain posterior (Bayes' rule over the context), or one
model whose parameters are a weighted average of the experts'.

Ensemble, for the prediction at position t (of token t+1):

    p(x_{t+1} | x_{≤t}) = Σ_d p(d | x_{≤t}) · p_d(x_{t+1} | x_{≤t})
    p(d | x_{≤t}) ∝ p(d) · Π_{s<t} p_d(x_{s+1} | x_{≤s})

so the posterior at t uses only the tokens already seen. A `router` replaces the posterior by other weights
of the tokens seen so far (c-BTM's distance to cluster centres; the rules by name are in `lmforge.models.routers`).
`ExpertEnsemble` returns the mixture's log probabilities as `.logits` (already normalised), so anything that
takes a causal LM's logits — the evaluation loop, cross-entropy — works on it unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class EnsembleOutput:
    logits: torch.Tensor          # (B, T, V) log-probabilities of the mixture
    posterior: torch.Tensor       # (B, T, D) p(d | x_{≤t}) (or the router's weights) used at each position


def domain_posterior(seen: torch.Tensor, log_prior: torch.Tensor, top_k: Optional[int] = None,
                     attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, T, D) p(d | x_{≤t}) ∝ p(d) · Π_{s<t} p_d(x_{s+1} | x_{≤s}), from `seen` (D, B, T-1), each domain's
    log-likelihood of every observed next token; `top_k` keeps the k likeliest domains; a prediction whose
    context token or target is padding (`attention_mask` 0) is no evidence."""
    if attention_mask is not None:
        seen = seen * (attention_mask[:, :-1] * attention_mask[:, 1:]).to(seen.dtype)
    start = seen.new_zeros(*seen.shape[:-1], 1)  # no evidence before the first token (also for T = 1)
    cumulative = torch.cat([start, seen.cumsum(-1)], dim=-1)  # (D, B, T)
    return posterior_of(log_prior.to(seen.device)[:, None, None] + cumulative, top_k).permute(1, 2, 0)


def posterior_of(scores: torch.Tensor, top_k: Optional[int] = None) -> torch.Tensor:
    """p(d | ·) from unnormalised log scores log p(d) + Σ log p_d(seen tokens), domains on dim 0; `top_k` keeps
    the k likeliest domains (the rest get 0)."""
    if top_k and top_k < scores.size(0):
        kth = scores.topk(top_k, dim=0).values[-1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.softmax(scores, dim=0)


def mixture(logprobs: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """log Σ_d p(d | ·) · p_d(x): the mixture's log-probabilities from every expert's `logprobs` (D, ..., V) and
    the posterior (..., D)."""
    weights = posterior.movedim(-1, 0).clamp_min(1e-30).log()[..., None]  # (D, ..., 1)
    return torch.logsumexp(weights + logprobs, dim=0)


class ExpertEnsemble(torch.nn.Module):
    def __init__(self, experts: list, domains: list[str], prior: Optional[torch.Tensor] = None,
                 top_k: Optional[int] = None, router: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        if not experts:
            raise ValueError("an ensemble needs at least one expert")
        self.experts = torch.nn.ModuleList(experts)
        self.domains = list(domains)
        prior = torch.full((len(experts),), 1.0 / len(experts)) if prior is None else torch.as_tensor(prior).float()
        self.register_buffer("log_prior", (prior / prior.sum()).log())
        self.top_k = top_k if top_k and top_k < len(experts) else None
        self.config = experts[0].config  # position limits, vocabulary: the experts share them
        self.router = router  # input_ids → (B, T, D) weights; None: the domain posterior

    def expert_logprobs(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """(D, B, T, V) next-token log-probabilities of every expert."""
        return torch.stack([torch.log_softmax(e(input_ids=input_ids, use_cache=False, **kwargs).logits.float(), -1)
                            for e in self.experts])

    def posterior_from(self, logprobs: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T, D) domain posterior at each position, from the likelihood of the tokens seen before it
        (padding, where `attention_mask` is 0, is no evidence)."""
        seen = logprobs[:, :, :-1].gather(-1, input_ids[None, :, 1:, None].expand(logprobs.size(0), -1, -1, 1))
        return domain_posterior(seen.squeeze(-1), self.log_prior, self.top_k, attention_mask)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> EnsembleOutput:
        kwargs = {k: v for k, v in kwargs.items() if k in ("position_ids", "attention_mask")}
        logprobs = self.expert_logprobs(input_ids, **kwargs)
        posterior = (self.posterior_from(logprobs, input_ids, kwargs.get("attention_mask")) if self.router is None
                     else self.router(input_ids).to(logprobs.device, logprobs.dtype))
        return EnsembleOutput(logits=mixture(logprobs, posterior), posterior=posterior)

    def parameters_per_expert(self) -> int:
        return sum(p.numel() for p in self.experts[0].parameters())


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    """An ExpertEnsemble as a causal LM that transformers' `generate` drives (greedy, sampling, beam search):
    its logits are the mixture's log-probabilities. It keeps no KV cache: every step reruns the experts on the
    whole sequence, so the posterior is exact at every new token (D expert passes per token)."""

    _supports_sdpa = True
    kv_cache = False  # read by lmforge.generate

    def __init__(self, ensemble: ExpertEnsemble):
        super().__init__(copy.deepcopy(ensemble.config))
        self.ensemble = ensemble
        self.generation_config = GenerationConfig.from_model_config(self.config)
        self.generation_config.use_cache = False

    @property
    def domains(self) -> list[str]:
        return self.ensemble.domains

    def get_output_embeddings(self):
        """The first expert's output matrix: its shape is the vocabulary the mixture scores (grammars read it)."""
        return self.ensemble.experts[0].get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs) -> CausalLMOutputWithPast:
        extra = {k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids))
                 if v is not None}
        return CausalLMOutputWithPast(logits=self.ensemble(input_ids, **extra).logits)


def average_state_dicts(states: list[dict], weights: Optional[list[float]] = None) -> dict:
    """Weighted parameter average (weights normalised; uniform by default). Integer buffers come from the first."""
    weights = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    weights = weights / weights.sum()
    out = {}
    for key, first in states[0].items():
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        total = torch.zeros_like(first, dtype=torch.float64)
        for w, state in zip(weights, states):
            total += w * state[key].double()
        out[key] = total.to(first.dtype)
    return out
