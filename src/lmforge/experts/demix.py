"""DEMix layers in an experts run: train one expert per domain with hard routing by the data's domain tag, add a
domain (a new expert initialised from the one its text prefers, trained alone) or remove one. The model classes
and their surgery live in `lmforge.models.demix`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmforge.data.blocks import build_blocks
from lmforge.data.loader import BlockLoader
from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.experts.budget import mixture_steps
from lmforge.experts.moe import experts_engine
from lmforge.experts.prior import estimate_prior
from lmforge.models import count_parameters, load_model
from lmforge.models.demix import add_expert, demix_from_dense, expert_parameter_names, remove_expert
from lmforge.objectives.clm import CausalLM
from lmforge.recipe import ExpertsConfig, load_recipe
from lmforge.runs import manifest, prepare_run_dir
from lmforge.tokenizer import load_tokenizer

# ----------------------------------------------------------------------------- training in an experts run

class DomainRoutedCausalLM(CausalLM):
    """Causal LM loss with each row sent to its domain's expert: `expert_of[data domain index]` (-1: none)."""

    def __init__(self, config, tokenizer, expert_of: torch.Tensor):
        super().__init__(config, tokenizer)
        self.expert_of = expert_of

    def forward_kwargs(self, batch) -> dict:
        experts = self.expert_of[batch["domains"].cpu()]
        if bool((experts < 0).any()):
            raise LmforgeError("DEMix training: a batch holds text of a domain without an expert")
        return {"domain": experts.to(batch["input_ids"].device)}


def _domain_blocks(data_cfg, tokenizer, objective, domains: list[str]):
    """The blocks of `domains`' text only, or a clear error naming the domains the data lacks."""
    try:
        return build_blocks(data_cfg.model_copy(update={"only_domains": list(domains), "domain_weights": None}),
                            tokenizer, objective)
    except LmforgeError as err:
        if "only_domains" not in str(err):
            raise
        raise LmforgeError(f"--domain: no training text of domain(s) {', '.join(map(repr, domains))} in this run's "
                           f"data (its recipe's data.sources)") from None


def _train(model, tokenizer, recipe, run_dir, *, domains: list[str], steps: int, name: str,
           show_progress: bool = True) -> int:
    """Train `model` (its trainable parameters) for `steps` on `domains`' text, equal shares, each row routed to
    its domain's expert; metrics and checkpoints in `run_dir`. Returns the training tokens."""
    r = recipe.model_copy(deep=True)
    r.experts, r.name = None, name
    r.model.path, r.model.family = str(Path(run_dir).parent / "demix"), None
    r.data.only_domains = list(domains)
    r.data.domain_weights = None
    r.train.max_steps = steps
    r.output.dir = str(run_dir)
    cfg = r.train
    data = _domain_blocks(r.data, tokenizer, r.objective, domains)
    prepare_run_dir(r, resume=False, force=True)
    present = set(np.asarray(data.train["domain"]).tolist())
    missing = [d for d in domains if d not in data.domains or data.domains.index(d) not in present]
    if missing:
        raise LmforgeError(f"data.sources: no training text of domain(s) {missing} in this run's data")
    weights = {d: 1.0 for d in domains} if len(domains) > 1 else None
    loader = BlockLoader(data, cfg.batch_size, cfg.grad_accum, cfg.seed, dist.world_size(), dist.rank(),
                         domain_weights=weights)
    expert_of = torch.tensor([model.domains.index(d) if d in model.domains else -1 for d in data.domains])
    objective = DomainRoutedCausalLM(r.objective, tokenizer, expert_of)
    n = len(model.domains)
    engine = experts_engine(model, tokenizer, objective, loader, data, r, run_dir, active=1, total=n,
                            show_progress=show_progress)  # one expert per token
    if show_progress:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        console.print(f"[bold]{name}[/]: {n} domain experts per layer, {count_parameters(model)['total'] / 1e6:.2f}M "
                      f"parameters ({trainable:,} trained), {steps} steps on {', '.join(domains)}")
    engine.fit()
    return steps * loader.global_batch * r.objective.block_size


def _posterior_prior(model, data, batch_size: int = 16, max_batches: int = 20) -> list[float]:
    return estimate_prior(lambda ids: model.domain_posterior(ids), data, batch_size, max_batches).tolist()


def _save(run, model, tokenizer, record: dict) -> None:
    folder = Path(run) / "demix"
    history = []
    if (folder / "demix.json").is_file():
        history = json.loads((folder / "demix.json").read_text()).get("history", [])
    ckpt.save_model(folder, model.cpu(), tokenizer, {"demix.json": {
        "method": "demix", "domains": model.domains, "prior": model.config.demix_prior,
        "top_k": model.config.demix_top_k, "history": history + [record]}})


def train_demix(run, *, steps: Optional[int] = None, show_progress: bool = True):
    """RUN/demix/: the seed with one copy of its FFNs per domain, trained `steps` (default: as many tokens as the
    experts together, at the recipe's batch size) on the experts' domains in equal shares."""
    run = Path(run)
    info = manifest(run)
    recipe = load_recipe(run / "recipe.yaml")
    cfg = recipe.experts or ExpertsConfig()
    domains = list(info["domains"])
    tokenizer = load_tokenizer(run / info["seed"])
    model = demix_from_dense(load_model(run / info["seed"], "clm"), domains, top_k=cfg.top_k)
    steps = steps or mixture_steps(recipe, len(domains))
    console.print(f"[bold]DEMix[/]: {steps} steps on {len(domains)} domains, each row through its domain's expert")
    tokens = _train(model, tokenizer, recipe, run / "demix-run", domains=domains, steps=steps,
                    name=f"{recipe.name}-demix", show_progress=show_progress)
    if cfg.prior == "estimated":
        data = build_blocks(recipe.data, tokenizer, recipe.objective)
        model.config.demix_prior = _posterior_prior(model.eval(), data)
    _save(run, model, tokenizer, {"op": "train", "domains": domains, "steps": steps, "tokens": tokens})
    return run / "demix"


def _load_demix(run):
    folder = Path(run) / "demix"
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"{run}: no DEMix model yet; run `lmforge experts train {run} --demix` first")
    return load_model(folder, "clm")


def add_domain(run, domain: str, *, steps: Optional[int] = None, init: str = "nearest", show_progress: bool = True):
    """Add an expert for `domain` (text of it must be in the run's data) to RUN/demix/ and train only that
    expert on the domain; every other parameter stays as it was. `init`: 'nearest' (the expert whose domain
    the new text is likeliest under: highest mean posterior on its training blocks) or an expert's domain."""
    run = Path(run)
    manifest(run)
    recipe = load_recipe(run / "recipe.yaml")
    model = _load_demix(run).eval()
    if domain in model.domains:
        raise LmforgeError(f"--domain: '{domain}' already has an expert ({', '.join(model.domains)})")
    tokenizer = load_tokenizer(run / "demix")
    if init == "nearest":
        data = _domain_blocks(recipe.data, tokenizer, recipe.objective, [domain])
        rows = list(range(min(len(data.train), 64)))
        with torch.no_grad():
            ids, _ = data.batch("train", rows)
            mean = model.domain_posterior(torch.from_numpy(ids)[:, :-1])[:, -1].mean(0)
        init = model.domains[int(mean.argmax())]
        console.print(f"new expert '{domain}' starts from '{init}' (mean posterior "
                      + ", ".join(f"{d} {p:.2f}" for d, p in zip(model.domains, mean.tolist())) + ")")
    model = add_expert(model, domain, init)
    trainable = set(expert_parameter_names(model, domain))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    # as many tokens as an expert of the run (experts may train at a smaller batch than the recipe's)
    steps = steps or mixture_steps(recipe, 1)
    tokens = _train(model.train(), tokenizer, recipe, run / f"demix-add-{domain}", domains=[domain], steps=steps,
                    name=f"{recipe.name}-demix-{domain}", show_progress=show_progress)
    for param in model.parameters():
        param.requires_grad_(True)
    _save(run, model, tokenizer, {"op": "add", "domain": domain, "init": init, "steps": steps, "tokens": tokens})
    return run / "demix"


def remove_domain(run, domain: str):
    """Drop `domain`'s expert from RUN/demix/; the other experts and shared parameters are kept as they are."""
    model = remove_expert(_load_demix(run), domain)
    _save(run, model, load_tokenizer(Path(run) / "demix"), {"op": "remove", "domain": domain})
    return Path(run) / "demix"
