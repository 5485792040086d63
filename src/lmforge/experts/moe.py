"""Branch-Train-MiX (Sukhbaatar et al. 2024): merge trained domain experts into one mixture-of-experts causal LM,
then train it briefly on the mixed data.

Each expert's feed-forward block of every layer becomes one expert of that layer's MoE; every other parameter
(embeddings, attention, norms, LM head) is the uniform average of the experts' (or their Fisher-weighted
average, `--weights fisher`: each weight closest to the experts whose domain relies on it; experts/fisher.py). A
new router per layer (small random init, or the domains' centroids) sends each token to its top-k experts. The
short training adds a load-balancing loss (Switch / Mixtral) to the causal-LM loss and by default trains the
routers only. The model classes live in `lmforge.models.moe`.

`RUN/moe/` is one HF folder (config.json, model.safetensors, tokenizer) plus merge.json (method, domains, family,
top_k, aux_weight, steps, trained parameters); `load_moe(folder)` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from lmforge.data.blocks import build_blocks
from lmforge.data.loader import BlockLoader
from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.logging import console
from lmforge.engine.loop import Engine
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_blocks
from lmforge.experts.fisher import fisher_average
from lmforge.models import count_parameters, flops_per_token, load_model
from lmforge.models.ensemble import average_state_dicts
from lmforge.models.moe import (FAMILIES, NOT_ARCHITECTURE, ROUTER, GPT2MoEConfig, GPT2MoEForCausalLM,
                                load_balancing_loss)
from lmforge.objectives.base import token_cross_entropy
from lmforge.objectives.clm import CausalLM
from lmforge.recipe import ExpertsConfig
from lmforge.runs import prepare_run_dir


# ----------------------------------------------------------------------------- merging

def _architecture(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in NOT_ARCHITECTURE and not k.startswith("_")}


def check_experts(experts: list, names: Optional[list[str]] = None) -> str:
    """The experts' family, once every expert is known to share the first one's architecture."""
    names = names or [f"expert {i}" for i in range(len(experts))]
    if not experts:
        raise LmforgeError("--method moe: no experts to merge")
    family = getattr(experts[0].config, "model_type", type(experts[0]).__name__)
    if family not in FAMILIES:
        raise LmforgeError(f"--method moe: experts of family '{family}' cannot be merged into a mixture of "
                           f"experts; supported families: {', '.join(FAMILIES)}")
    reference = _architecture(experts[0].config)
    shapes = {k: tuple(v.shape) for k, v in experts[0].state_dict().items()}
    for name, expert in zip(names[1:], experts[1:]):
        config = _architecture(expert.config)
        differ = sorted(k for k in set(reference) | set(config) if reference.get(k) != config.get(k))
        if not differ and {k: tuple(v.shape) for k, v in expert.state_dict().items()} != shapes:
            differ = ["parameter shapes"]
        if differ:
            raise LmforgeError(f"--method moe: expert '{name}' has a different architecture from '{names[0]}' "
                               f"({', '.join(differ[:5])} differ); all experts must be branches of one seed")
    return family


def _is_ffn(key: str) -> bool:
    return ".mlp." in key


def merge_experts(experts: list, *, top_k: Optional[int] = None, names: Optional[list[str]] = None,
                  seed: int = 0, aux_weight: float = 0.01, fishers: Optional[list[dict]] = None):
    """One MoE causal LM from same-architecture experts: FFNs → experts, everything else averaged (uniformly, or
    Fisher-weighted with `fishers`, one per expert: see experts/fisher.py), new routers."""
    family = check_experts(experts, names)
    n = len(experts)
    top_k = min(2, n) if top_k is None else top_k
    if not 1 <= top_k <= n:
        raise LmforgeError(f"--top-k: {top_k} experts per token, but there are {n} experts")
    states = [e.state_dict() for e in experts]
    shared = [{k: v for k, v in s.items() if not _is_ffn(k)} for s in states]
    state = average_state_dicts(shared) if fishers is None else fisher_average(shared, fishers)
    source = experts[0].config
    if family == "gpt2":
        config = GPT2MoEConfig(**{k: v for k, v in source.to_dict().items()
                                  if k not in ("model_type", "architectures", "transformers_version", "_name_or_path")},
                               num_local_experts=n, num_experts_per_tok=top_k)
        for layer in range(config.n_layer):
            prefix = f"transformer.h.{layer}.mlp."
            for e, s in enumerate(states):
                for key in (k for k in s if k.startswith(prefix)):
                    state[f"{prefix}experts.{e}.{key[len(prefix):]}"] = s[key].clone()
        model_class = GPT2MoEForCausalLM
    else:
        if getattr(source, "attention_bias", False) or getattr(source, "mlp_bias", False):
            raise LmforgeError("--method moe: Llama experts with attention_bias or mlp_bias have no Mixtral "
                               "equivalent (Mixtral's projections have no biases)")
        config = MixtralConfig(
            vocab_size=source.vocab_size, hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
            num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
            num_key_value_heads=source.num_key_value_heads, head_dim=source.head_dim, hidden_act=source.hidden_act,
            max_position_embeddings=source.max_position_embeddings, initializer_range=source.initializer_range,
            rms_norm_eps=source.rms_norm_eps, pad_token_id=source.pad_token_id, bos_token_id=source.bos_token_id,
            eos_token_id=source.eos_token_id, tie_word_embeddings=source.tie_word_embeddings,
            attention_dropout=source.attention_dropout, rope_parameters=dict(source.rope_parameters),
            sliding_window=None, num_local_experts=n, num_experts_per_tok=top_k, router_aux_loss_coef=aux_weight)
        for layer in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer}.mlp."
            state[prefix + "experts.gate_up_proj"] = torch.stack(
                [torch.cat([s[prefix + "gate_proj.weight"], s[prefix + "up_proj.weight"]]) for s in states])
            state[prefix + "experts.down_proj"] = torch.stack([s[prefix + "down_proj.weight"] for s in states])
        model_class = MixtralForCausalLM
    config._attn_implementation = "sdpa"
    model = model_class(config)
    generator = torch.Generator().manual_seed(seed)
    for key, param in model.state_dict().items():
        if key.endswith(ROUTER):
            state[key] = torch.randn(param.shape, generator=generator) * config.initializer_range
    model.load_state_dict(state, strict=True)
    return model.to(next(experts[0].parameters()).dtype)


def router_parameter_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.endswith(ROUTER)]


@torch.no_grad()
def centroid_routers(model, blocks: list, margin: float = 2.0) -> None:
    """Start each router where the experts came from: expert d's row is the mean input of that layer's MoE over
    `blocks[d]` (token ids of domain d's text) minus the mean over all domains, made orthogonal to the overall
    mean (so a logit measures the distance from the average along the domain's direction), scaled so that domain
    d's mean input scores `margin` on expert d. Layers are set bottom-up, each from the inputs that the routers
    below it (already set) produce. Text of one domain then goes first to its own experts' FFNs, instead of
    wherever random routers send it. No other parameter changes."""
    names = router_parameter_names(model)
    if len(blocks) != model.config.num_local_experts:
        raise LmforgeError(f"router init: {len(blocks)} domains' text for {model.config.num_local_experts} experts")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen: list[torch.Tensor] = []

    def capture(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.reshape(-1, x.shape[-1]).double().mean(0))
    try:
        for name in names:
            hook = model.get_submodule(name[:-len(".gate.weight")]).register_forward_pre_hook(capture, with_kwargs=True)
            seen.clear()
            try:
                for ids in blocks:
                    model(input_ids=torch.as_tensor(ids, dtype=torch.long, device=device)[:, :-1])
            finally:
                hook.remove()
            mu = torch.stack(seen)                             # (experts, hidden): each domain's mean input
            overall = mu.mean(0)
            unit = overall / overall.norm().clamp_min(1e-12)
            rows = mu - overall
            rows = rows - (rows @ unit)[:, None] * unit        # orthogonal to the overall mean
            own = (rows * (mu - overall)).sum(1)               # each domain's mean on its own row, before scaling
            param = model.get_parameter(name)
            param.copy_((rows * (margin / own.clamp_min(1e-12))[:, None]).to(param.dtype))
    finally:
        model.train(was_training)


def load_moe(folder: Path):
    """A saved MoE folder (RUN/moe/) back as a causal LM (MixtralForCausalLM or GPT2MoEForCausalLM)."""
    return load_model(folder, "clm")


# ----------------------------------------------------------------------------- training the routers

class RoutedCausalLM(CausalLM):
    """Causal LM loss + aux_weight · load-balancing loss (per loss token, so the engine's mean adds it once)."""

    tally_names = ("aux_loss",)

    def __init__(self, config, tokenizer, top_k: int, aux_weight: float):
        super().__init__(config, tokenizer)
        self.top_k, self.aux_weight = top_k, aux_weight

    def loss(self, model, batch):
        ids = batch["input_ids"]
        kwargs = {"position_ids": batch["position_ids"][:, :-1]} if "position_ids" in batch else {}
        out = model(input_ids=ids[:, :-1], use_cache=False, output_router_logits=True, **kwargs)
        targets = ids[:, 1:]
        losses = token_cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), targets.reshape(-1))
        per_example = losses.view(ids.size(0), -1).sum(1)
        aux = load_balancing_loss(out.router_logits, self.top_k)
        self.tally(model, "aux_loss", aux, 1)
        total = per_example.sum() + self.aux_weight * aux * targets.numel()
        return total, torch.tensor(targets.numel(), device=ids.device), per_example


def experts_engine(model, tokenizer, objective, loader, data, recipe, run_dir: Path, *, active: int, total: int,
                   show_progress: bool = True):
    """The lmforge engine for a model whose FFNs are `total` experts (`.mlp.experts.` parameters), `active` of
    them per token: FLOPs count the active experts only; evaluation is the objective's on `data`'s validation."""
    cfg = recipe.train
    experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    fpt = flops_per_token(model, recipe.objective.block_size) - 6 * experts * (total - active) / total

    def evaluate(m):
        return evaluate_blocks(m, objective, data, batch_size=cfg.batch_size, max_batches=cfg.eval_batches)

    return Engine(model, tokenizer, objective, loader, cfg, run_dir, evaluate=evaluate, flops_per_token=fpt,
                  tensorboard=recipe.output.tensorboard, plots=recipe.output.plots, show_progress=show_progress)


def train_moe(model, tokenizer, recipe, run_dir: Path, *, steps: int, train: str = "router",
              aux_weight: float = 0.01, show_progress: bool = True):
    """Train the merged model for `steps` on the recipe's data (all domains) with the lmforge engine; `train`
    is 'router' (only the routers learn) or 'all'. Metrics, checkpoints and plots go to `run_dir`."""
    if train not in ("router", "all"):
        raise LmforgeError(f"--train: expected 'router' or 'all', got {train!r}")
    r = recipe.model_copy(deep=True)
    r.experts, r.name = None, f"{recipe.name}-moe"
    r.model.path, r.model.family = str(Path(run_dir).parent / "moe"), None
    r.train.max_steps = steps
    r.output.dir = str(run_dir)
    cfg = r.train
    routers = set(router_parameter_names(model))
    for name, param in model.named_parameters():
        param.requires_grad_(train == "all" or name in routers)
    prepare_run_dir(r, resume=False, force=True)
    data = build_blocks(r.data, tokenizer, r.objective)
    loader = BlockLoader(data, cfg.batch_size, cfg.grad_accum, cfg.seed, dist.world_size(), dist.rank())
    top_k = model.config.num_experts_per_tok
    objective = RoutedCausalLM(r.objective, tokenizer, top_k, aux_weight)
    n = model.config.num_local_experts
    engine = experts_engine(model, tokenizer, objective, loader, data, r, run_dir, active=top_k, total=n,
                            show_progress=show_progress)
    if show_progress:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        console.print(f"[bold]{r.name}[/]: {n} experts, top-{top_k}, {count_parameters(model)['total'] / 1e6:.2f}M "
                      f"parameters ({trainable:,} trained: {train}), {steps} steps on the mixture")
    try:
        engine.fit()
    finally:
        for param in model.parameters():
            param.requires_grad_(True)
    return model


def merge_moe(run: Path, recipe, experts: list, domains: list[str], tokenizer, *, top_k: Optional[int] = None,
              steps: Optional[int] = None, train: str = "router", aux_weight: float = 0.01,
              sources: Optional[list[str]] = None, fishers: Optional[list[dict]] = None,
              fisher_blocks: Optional[int] = None, router_blocks: Optional[list] = None,
              show_progress: bool = True) -> Path:
    """Merge the experts into RUN/moe/ (written atomically), after `steps` of training in RUN/moe-run/
    (default: the recipe's experts.seed_steps; 0: merge only). `sources`: the experts' folders, for merge.json;
    `fishers`: Fisher-weighted shared parameters; `router_blocks` (token ids of each domain's text, in expert order):
    routers start at the domains' centroids (centroid_routers) instead of at random."""
    if train not in ("router", "all"):
        raise LmforgeError(f"--train: expected 'router' or 'all', got {train!r}")
    if aux_weight < 0:
        raise LmforgeError(f"--aux-weight: must be 0 or more, got {aux_weight}")
    run = Path(run)
    model = merge_experts(experts, top_k=top_k, names=domains, seed=recipe.train.seed, aux_weight=aux_weight,
                          fishers=fishers)
    if router_blocks is not None:
        centroid_routers(model, router_blocks)
    steps = (recipe.experts or ExpertsConfig()).seed_steps if steps is None else steps
    if steps > 0:
        train_moe(model, tokenizer, recipe, run / "moe-run", steps=steps, train=train, aux_weight=aux_weight,
                  show_progress=show_progress)
    ckpt.save_model(run / "moe", model.cpu(), tokenizer, {"merge.json": {
        "method": "moe", "domains": list(domains), "family": experts[0].config.model_type,
        "experts": list(sources or []), "top_k": model.config.num_experts_per_tok,
        "aux_weight": aux_weight, "steps": steps, "train": train if steps > 0 else None,
        "shared": "fisher" if fishers is not None else "uniform",
        **({"fisher_blocks": fisher_blocks} if fishers is not None else {}),
        "router_init": "centroids" if router_blocks is not None else "random"}})
    return run / "moe"
