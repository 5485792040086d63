"""Expert mixtures and lmforge's own model classes in the continuous decode loop, and which models that loop runs.

- A Branch-Train-Merge ensemble (`EnsembleForCausalLM`): every expert keeps its own KV cache, rows aligned as in
  `RunningBatch`; each row carries its domain scores log p(d) + Σ log p_d(x_s | x_<s) (`RunningBatch.state`,
  [rows, D]), summed over its prompt at prefill and over each token it takes, so the next token is drawn from
  Σ_d p(d | x_≤t) · p_d(x_{t+1} | x_≤t) exactly as the ensemble computes it over the whole sequence (the same
  helpers, `lmforge.models.ensemble`). D expert forwards per step over the new token only, where generate reruns
  every expert over the whole sequence. A c-BTM ensemble (a `router` in place of the posterior) keeps each row's
  router weights instead, recomputed from the row's own tokens where the router would compute them (every token,
  or every `stride` tokens for `ClusterRouter`).
- A DEMix model: the posterior at the end of the prompt mixes every layer's experts (the weights the model keeps
  for generated tokens); here each row keeps its own weights (`state`, [rows, D]), so rows of other prompts can
  join and leave.
- lmforge's GPT-2 MoE (BTX): a transformers GPT-2 with per-token routing; it runs as a plain model.

Rows of a model whose numbers depend on the other rows of a batch (int8-dynamic: fbgemm quantizes a whole
batch's activations with one scale) decode one at a time (`batch_invariant`), so a row's text is what it gives
alone.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmforge.data.clusters import ClusterRouter
from lmforge.generate.decode import Completion
from lmforge.generate.running import Row, RunningBatch, continuous_batchable
from lmforge.models.demix import is_demix
from lmforge.models.ensemble import EnsembleForCausalLM, mixture, posterior_of
from lmforge.models.moe import GPT2MoEForCausalLM
from lmforge.models.quantized import Int8Linear


def decode_loop_runs(model) -> bool:
    """Whether the continuous decode loop can run this model (see `running_batch`)."""
    if isinstance(model, EnsembleForCausalLM):
        return all(continuous_batchable(e) for e in model.ensemble.experts)
    if is_demix(model) or isinstance(model, GPT2MoEForCausalLM):
        return model.config.use_cache is not False
    return continuous_batchable(model)


def batch_invariant(model) -> bool:
    """False when a row's numbers depend on the other rows of its batch (int8-dynamic layers)."""
    experts = model.ensemble.experts if isinstance(model, EnsembleForCausalLM) else [model]
    return not any(isinstance(m, Int8Linear) and m.dynamic for e in experts for m in e.modules())


def running_batch(model, tokenizer) -> RunningBatch:
    """The running batch of a model `decode_loop_runs`."""
    if isinstance(model, EnsembleForCausalLM):
        return EnsembleBatch(model, tokenizer)
    if is_demix(model):
        return DEMixBatch(model, tokenizer)
    return RunningBatch(model, tokenizer)


def domain_names(model) -> Optional[list[str]]:
    """The domains of an expert mixture (None for other models)."""
    return list(model.domains) if isinstance(model, EnsembleForCausalLM) or is_demix(model) else None


class _DomainsReported(RunningBatch):
    """Completions carry the row's posterior: `Row.domains` and `Row.prompt_domains` hold weights (D,)."""

    def _finish(self, row: Row, by_eos: bool) -> Completion:
        completion = super()._finish(row, by_eos)
        names = self.model.domains
        completion.domains = _named(names, row.domains)
        completion.prompt_domains = _named(names, row.prompt_domains)
        return completion


@torch.inference_mode()
def annotate_domains(model, prompt_ids: list[int], completion: Completion) -> Completion:
    """Give a completion made outside the decode loop (generate, micro-batching) the domain posteriors that
    `EnsembleBatch` / `DEMixBatch` report: over the prompt and the completion, and at the end of the prompt."""
    names = domain_names(model)
    if names is None or completion.domains is not None:
        return completion
    ids = torch.tensor([list(prompt_ids) + list(completion.token_ids)], device=model.device)
    if isinstance(model, EnsembleForCausalLM):
        posterior = model.ensemble(ids).posterior[0]  # (T, D): at t, from the tokens up to t
        completion.domains = _named(names, posterior[-1])
        completion.prompt_domains = _named(names, posterior[len(prompt_ids) - 1])
    else:  # DEMix: the posterior at the end of the prompt mixes the experts for every generated token
        posterior = model.domain_posterior(ids[:, :len(prompt_ids)])[0]
        completion.domains = completion.prompt_domains = _named(names, posterior[-1])
    return completion


def _named(names: list[str], weights: Optional[torch.Tensor]) -> Optional[dict]:
    if weights is None:
        return None
    return {d: round(float(w), 4) for d, w in zip(names, weights.tolist())}


class EnsembleBatch(_DomainsReported):
    """A BTM ensemble's rows: one cache per expert (`self.cache` is their list); per row its domain scores, or
    with a router its routing weights (`self.state`, [rows, D])."""

    def __init__(self, model: EnsembleForCausalLM, tokenizer):
        super().__init__(model, tokenizer)
        self.experts = list(model.ensemble.experts)
        self.top_k = model.ensemble.top_k
        self.log_prior = model.ensemble.log_prior
        self.router = model.ensemble.router
        self.step_logprobs: Optional[torch.Tensor] = None  # (D, rows, V) of the forward just run

    def _prefill_forward(self, ids, mask, positions):
        attention = None if bool(mask.all()) else mask
        caches, seen, last = [], [], []
        for e in self.experts:  # one expert's (B, T, V) log-probabilities at a time
            out = e(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
            logprobs = torch.log_softmax(out.logits.float(), -1)
            # its likelihood of the prompt's tokens; a prediction from or of padding is no evidence
            seen.append(logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * (mask[:, :-1] * mask[:, 1:]))
            last.append(logprobs[:, -1])
            caches.append(out.past_key_values)
            del out, logprobs
        self.step_logprobs = torch.stack(last)  # (D, B, V)
        if self.router is not None:
            weights = torch.stack([self._route(row[m.bool()].tolist()) for row, m in zip(ids, mask)])
            return mixture(self.step_logprobs, weights), caches, weights
        scores = self.log_prior.to(ids.device)[:, None] + torch.stack(seen).sum(-1)  # (D, B)
        return self._mixed(scores), caches, scores.T.contiguous()

    def _route(self, seq: list[int], last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The router's weights (D,) for the prediction after `seq`, as `router(ids)[:, -1]` gives them; `last`:
        the row's current weights, kept where a strided ClusterRouter would reuse them."""
        r, p = self.router, len(seq) - 1
        if isinstance(r, ClusterRouter):
            if last is not None and p % r.stride:
                return last
            start = p // r.stride * r.stride
            text = r.tokenizer.batch_decode([seq[:start + 1]], skip_special_tokens=True)
            return r.weights(text)[0].to(self.log_prior.device)
        return r(torch.tensor([seq], device=self.log_prior.device))[0, -1].float()

    def _step_forward(self, mask, positions):
        outs = [e(input_ids=self.last[:, None], attention_mask=mask, position_ids=positions, past_key_values=c,
                  use_cache=True, logits_to_keep=1) for e, c in zip(self.experts, self.cache)]
        self.cache = [o.past_key_values for o in outs]
        self.step_logprobs = torch.stack([torch.log_softmax(o.logits[:, -1].float(), -1) for o in outs])
        if self.router is not None:
            self.state = torch.stack([self._route(r.prompt_ids + r.tokens, w) for r, w in zip(self.rows, self.state)])
            return mixture(self.step_logprobs, self.state)
        return self._mixed(self.state.T)

    def _mixed(self, scores: torch.Tensor) -> torch.Tensor:
        """The mixture's log-probabilities [rows, V] from domain scores (D, rows) and the experts' step_logprobs."""
        return mixture(self.step_logprobs, posterior_of(scores, self.top_k).T)

    def _chosen(self, rows, state, chosen):
        if self.router is not None:  # the weights that chose the token
            for r, weights in zip(rows, state):
                r.domains = weights
                r.prompt_domains = weights if r.prompt_domains is None else r.prompt_domains
            return state
        for r, scores in zip(rows, state):
            if r.prompt_domains is None:
                r.prompt_domains = posterior_of(scores, self.top_k)
        # the evidence of the chosen token, for the next step's posterior
        taken = self.step_logprobs.gather(-1, chosen[None, :, None].expand(len(self.experts), -1, 1))[..., 0]
        state = state + taken.T
        for r, scores in zip(rows, state):
            r.domains = scores  # made a posterior when the row ends: over its prompt and all its tokens
        return state

    def _finish(self, row: Row, by_eos: bool) -> Completion:
        scores = row.domains
        if self.router is None and scores is not None:
            row.domains = posterior_of(scores, self.top_k)
        return super()._finish(row, by_eos)


class DEMixBatch(_DomainsReported):
    """A DEMix model's rows: each mixes the experts with the posterior at the end of its prompt (`state`)."""

    def _prefill_forward(self, ids, mask, positions):
        attention = None if bool(mask.all()) else mask
        posterior = self.model.domain_posterior(ids, attention, position_ids=positions)  # (B, T, D)
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, domain_weights=posterior,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.past_key_values, posterior[:, -1].contiguous()

    def _step_forward(self, mask, positions):
        out = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, domain_weights=self.state, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def _chosen(self, rows, state, chosen):
        for r, weights in zip(rows, state):
            r.domains = r.prompt_domains = weights
        return state
