"""DEMix layers (Gururangan et al. 2022, "DEMix Layers: Disentangling Domains for Modular Language Modeling"):
one causal LM whose every feed-forward block holds one expert per domain, with attention, embeddings and norms
shared.

    training    each row goes to its own domain's expert (hard routing by the data's domain tag);
    inference   every layer mixes its experts with the domain posterior, as the BTM ensemble does:
                    FFN(h_t) = Σ_d p(d | x_≤t) · FFN_d(h_t),   p(d | x_≤t) ∝ p(d) · p_d(x_≤t)
                where p_d is the whole model with expert d alone in every layer (one forward per expert);
                the prior p(d) is uniform or estimated on held-out data, `top_k` keeps the k likeliest;
    generation  the posterior at the end of the prompt is kept for the new tokens (so the KV cache stays valid);
    new domain  `add_expert` appends an expert initialised from the existing expert the new domain's text
                prefers, and only that expert trains: the others' outputs do not change;
    remove      `remove_expert` drops one domain's expert; the rest are untouched.

Families: `gpt2` (`GPT2DEMixForCausalLM`, model_type "lmforge_gpt2_demix": block i's MLP is
`transformer.h.<i>.mlp.experts.<d>`, GPT2MLPs) and `llama` (`LlamaDEMixForCausalLM`, "lmforge_llama_demix":
`model.layers.<i>.mlp.experts.<d>`, LlamaMLPs). The config carries `demix_domains` (expert d's domain name),
`demix_prior` (None: uniform) and `demix_top_k`. Both classes register with transformers' Auto classes when
this module is imported (`lmforge.models` imports it). Training a DEMix model in an experts run is the
experts stage's (`lmforge.experts.demix`).

Forward: `model(input_ids, domain=LongTensor(B))` routes row b to expert domain[b]; `domain_weights=(B, T|1, D)`
mixes with given weights; neither: the domain posterior (D + 1 forwards).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP

from lmforge.errors import LmforgeError
from lmforge.models.ensemble import domain_posterior


class RoutingState(threading.local):
    """What one forward of a DEMix model routes by, per thread: a served model runs concurrent forwards
    (streams in their own threads), and each must see only its own routing and generation weights."""

    routing: Optional[torch.Tensor] = None
    generation_weights: Optional[torch.Tensor] = None

    def __reduce__(self):  # copies and pickles start empty
        return (RoutingState, ())


class DEMixFFN(torch.nn.Module):
    """One layer's feed-forward block: one MLP per domain. `state.routing` (set by the model for one forward,
    per thread) is a (B,) long tensor (row b → expert routing[b]) or (B, T|1, D) mixture weights."""

    def __init__(self, experts: list, state: RoutingState):
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)
        self.state = state

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routing = self.state.routing
        if routing is None:
            raise RuntimeError("a DEMix layer runs only inside its model's forward (which sets the routing)")
        if not torch.is_floating_point(routing):
            first = int(routing[0])
            if bool((routing == first).all()):
                return self.experts[first](hidden_states)
            out = torch.empty_like(hidden_states)
            for e in routing.unique().tolist():
                rows = (routing == e).nonzero().squeeze(1)
                out = out.index_copy(0, rows, self.experts[e](hidden_states.index_select(0, rows)).to(out.dtype))
            return out
        out = None
        for e, expert in enumerate(self.experts):
            w = routing[..., e:e + 1]
            if not bool(w.any()):  # top-k left this expert out everywhere: skip its work
                continue
            y = expert(hidden_states) * w.to(hidden_states.dtype)
            out = y if out is None else out + y
        return out


class DEMixMixin:
    """Shared by the GPT-2 and Llama DEMix models: layer access, routing, the domain posterior."""

    def _demix_setup(self) -> None:
        n = len(self.config.demix_domains)
        if n < 1:
            raise ValueError("a DEMix model needs at least one domain (config.demix_domains)")
        self._routing_state = RoutingState()
        for layer in self._demix_layers():
            layer.mlp = DEMixFFN([self._make_mlp() for _ in range(n)], self._routing_state)

    @property
    def domains(self) -> list[str]:
        return list(self.config.demix_domains)

    def _route(self, routing: Optional[torch.Tensor]) -> None:
        self._routing_state.routing = routing

    def log_prior(self, device=None) -> torch.Tensor:
        n = len(self.domains)
        prior = torch.tensor(self.config.demix_prior or [1.0] * n, dtype=torch.float32, device=device)
        return (prior / prior.sum()).log()

    @torch.no_grad()
    def domain_posterior(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                         **kwargs) -> torch.Tensor:
        """(B, T, D): p(d | x_≤t) from each expert's likelihood of the tokens up to t (padding ignored)."""
        b = input_ids.size(0)
        seen = []
        for e in range(len(self.domains)):
            self._route(torch.full((b,), e, dtype=torch.long, device=input_ids.device))
            try:
                logits = super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                         **kwargs).logits
            finally:
                self._route(None)
            seen.append(torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1))
        return domain_posterior(torch.stack(seen), self.log_prior(input_ids.device), self.config.demix_top_k,
                                attention_mask)

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, domain=None, domain_weights=None,
                **kwargs):
        if domain is not None:
            routing = torch.as_tensor(domain, dtype=torch.long, device=input_ids.device)
            if routing.dim() == 0:
                routing = routing.expand(input_ids.size(0))
            if bool(((routing < 0) | (routing >= len(self.domains))).any()):
                raise ValueError(f"domain: expert indices must lie in 0..{len(self.domains) - 1}")
        elif domain_weights is not None:
            routing = domain_weights if domain_weights.dim() == 3 else domain_weights[:, None, :]
        else:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            state = self._routing_state
            if past == 0 or state.generation_weights is None:
                extra = {k: kwargs[k] for k in ("position_ids", "token_type_ids") if kwargs.get(k) is not None}
                routing = self.domain_posterior(input_ids, attention_mask, **extra)
                state.generation_weights = routing[:, -1:]  # kept for the tokens generated after this prompt
            else:
                routing = state.generation_weights
        self._route(routing)
        try:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   past_key_values=past_key_values, **kwargs)
        finally:
            self._route(None)


class GPT2DEMixConfig(GPT2Config):
    model_type = "lmforge_gpt2_demix"
    demix_domains: list | None = None
    demix_prior: list | None = None
    demix_top_k: int | None = None


class GPT2DEMixForCausalLM(DEMixMixin, GPT2LMHeadModel):
    config_class = GPT2DEMixConfig

    def __init__(self, config: GPT2DEMixConfig):
        super().__init__(config)
        self._demix_setup()
        self.post_init()

    def _demix_layers(self):
        return self.transformer.h

    def _make_mlp(self):
        inner = self.config.n_inner if self.config.n_inner is not None else 4 * self.config.hidden_size
        return GPT2MLP(inner, self.config)


class LlamaDEMixConfig(LlamaConfig):
    model_type = "lmforge_llama_demix"
    demix_domains: list | None = None
    demix_prior: list | None = None
    demix_top_k: int | None = None


class LlamaDEMixForCausalLM(DEMixMixin, LlamaForCausalLM):
    config_class = LlamaDEMixConfig

    def __init__(self, config: LlamaDEMixConfig):
        super().__init__(config)
        self._demix_setup()
        self.post_init()

    def _demix_layers(self):
        return self.model.layers

    def _make_mlp(self):
        return LlamaMLP(self.config)


for _config, _model in ((GPT2DEMixConfig, GPT2DEMixForCausalLM), (LlamaDEMixConfig, LlamaDEMixForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForCausalLM.register(_config, _model, exist_ok=True)

CLASSES = {"gpt2": (GPT2DEMixConfig, GPT2DEMixForCausalLM), "llama": (LlamaDEMixConfig, LlamaDEMixForCausalLM),
           "lmforge_gpt2_demix": (GPT2DEMixConfig, GPT2DEMixForCausalLM),
           "lmforge_llama_demix": (LlamaDEMixConfig, LlamaDEMixForCausalLM)}
MODEL_TYPES = ("lmforge_gpt2_demix", "lmforge_llama_demix")
NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "demix_domains", "demix_prior",
              "demix_top_k")


def is_demix(model) -> bool:
    return getattr(model.config, "model_type", None) in MODEL_TYPES


def _build(source_config, domains: list[str], prior=None, top_k=None):
    family = getattr(source_config, "model_type", None)
    if family not in CLASSES:
        raise LmforgeError(f"DEMix: models of family '{family}' are not supported; use gpt2 or llama")
    if len(set(domains)) != len(domains) or not domains:
        raise LmforgeError(f"DEMix: domains must be distinct and at least one, got {domains}")
    config_class, model_class = CLASSES[family]
    config = config_class(**{k: v for k, v in source_config.to_dict().items() if k not in NOT_COPIED},
                          demix_domains=list(domains), demix_prior=list(prior) if prior is not None else None,
                          demix_top_k=top_k)
    config._attn_implementation = "sdpa"
    return model_class(config)


def demix_from_dense(model, domains: list[str], *, top_k: Optional[int] = None):
    """A DEMix model whose every expert is a copy of the dense model's FFN (all else copied as is)."""
    demix = _build(model.config, domains, top_k=top_k)
    state = {}
    for key, value in model.state_dict().items():
        if ".mlp." in key:
            for e in range(len(domains)):
                state[key.replace(".mlp.", f".mlp.experts.{e}.", 1)] = value.clone()
        else:
            state[key] = value
    demix.load_state_dict(state, strict=True)
    return demix.to(next(model.parameters()).dtype)


def _remap(model, domains: list[str], source: list[int], prior=None):
    """A new DEMix model with experts `domains`, expert i copied from the old model's expert source[i]."""
    new = _build(model.config, domains, prior=prior, top_k=model.config.demix_top_k)
    state = {}
    for key, value in model.state_dict().items():
        if ".mlp.experts." not in key:
            state[key] = value
            continue
        head, tail = key.split(".mlp.experts.", 1)
        old, rest = tail.split(".", 1)
        for i, s in enumerate(source):
            if s == int(old):
                state[f"{head}.mlp.experts.{i}.{rest}"] = value.clone()
    new.load_state_dict(state, strict=True)
    return new.to(next(model.parameters()).dtype)


def add_expert(model, domain: str, init_from: str):
    """The model plus an expert for `domain`, a copy of `init_from`'s expert; the prior becomes uniform."""
    if domain in model.domains:
        raise LmforgeError(f"DEMix: domain '{domain}' already has an expert ({model.domains})")
    if init_from not in model.domains:
        raise LmforgeError(f"DEMix: no expert '{init_from}' to initialise from ({model.domains})")
    source = list(range(len(model.domains))) + [model.domains.index(init_from)]
    return _remap(model, model.domains + [domain], source)


def remove_expert(model, domain: str):
    """The model without `domain`'s expert (the prior renormalised over the rest)."""
    if domain not in model.domains:
        raise LmforgeError(f"DEMix: no expert '{domain}' to remove (experts: {model.domains})")
    if len(model.domains) == 1:
        raise LmforgeError(f"DEMix: '{domain}' is the only expert; a DEMix model keeps at least one")
    keep = [i for i, d in enumerate(model.domains) if d != domain]
    prior = model.config.demix_prior
    return _remap(model, [model.domains[i] for i in keep], keep,
                  prior=[prior[i] for i in keep] if prior is not None else None)


def expert_parameter_names(model, domain: str) -> list[str]:
    e = model.domains.index(domain)
    return [n for n, _ in model.named_parameters() if f".mlp.experts.{e}." in n]
