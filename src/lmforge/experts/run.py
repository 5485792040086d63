"""Branch-Train-Merge: branch a seed model into one expert per domain, train each expert on its domain only
(independently: separate processes or machines), then merge them into an ensemble, a parameter average or
(Branch-Train-MiX) one mixture-of-experts model.

    RUN/
      recipe.yaml  experts.json        the experts recipe and the manifest (domains, seed, expert folders)
      clusters/                        with experts.clusters (c-BTM): the clustering that names the domains
      seed/                            the seed model + tokenizer (HF folder)
      seed-run/                        the seed's pretraining run, when the recipe trains it
      experts/<domain>.yaml            the recipe of each expert
      experts/<domain>/                one ordinary pretraining run per domain (its recipe.yaml, final/, ...)
      experts/<domain>-init/           an added expert's starting point: the relevance-weighted average of the
                                       existing experts (`add_expert`; experts.json "added" records the weights)
      dense/                           optional baseline: the seed trained on the mixture, as many tokens as the
                                       experts together
      ensemble/ensemble.json           experts, domains, prior and top-k of the posterior-weighted ensemble
      average/                         one HF model: the weighted parameter average of the experts
      moe/                             one HF model: the experts' FFNs as MoE experts, the rest averaged, trained
                                       routers (merge.json: domains, top-k, aux weight, steps); see experts/moe.py
      moe-run/                         the MoE's short training on the mixture (metrics.jsonl, checkpoints/)
      demix/                           one HF model with DEMix layers: an FFN expert per domain, shared attention
                                       (demix.json: domains, prior, history of train/add/remove); experts/demix.py
      demix-run/, demix-add-<domain>/  the DEMix training run, and each added expert's
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from lmforge.data.blocks import build_blocks
from lmforge.data.clusters import cluster_name
from lmforge.data.sources import PREPARED_MARKER
from lmforge.engine import checkpoint as ckpt
from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_blocks
from lmforge.experts.budget import expert_budget, mixture_steps
from lmforge.experts.cluster import cluster_recipe_documents
from lmforge.experts.demix import train_demix
from lmforge.experts.fisher import diagonal_fisher, domain_blocks, fisher_average
from lmforge.experts.moe import load_moe, merge_moe
from lmforge.experts.prior import estimate_prior
from lmforge.models import load_model
from lmforge.models.ensemble import ExpertEnsemble, average_state_dicts
from lmforge.models.onnx import refuse_inference_only
from lmforge.objectives import build_objective
from lmforge.pretrain import pretrain
from lmforge.recipe import ExpertsConfig, Recipe, load_recipe
from lmforge.runs import MANIFEST, load_ensemble, manifest, model_folder
from lmforge.tokenizer import load_tokenizer

FISHER_BLOCKS = 256  # training blocks of its domain on which each expert's Fisher is estimated (--weights fisher)
ROUTER_BLOCKS = 32   # training blocks of each domain whose mean hidden states start the routers (--router-init)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def _domains(recipe: Recipe) -> list[str]:
    present = set()
    for s in recipe.data.sources:
        marker = Path(s.path) / PREPARED_MARKER
        present |= set(json.loads(marker.read_text()).get("domains", [])) if marker.is_file() else {s.domain}
    present = sorted(present)
    if recipe.experts and recipe.experts.clusters:  # unsupervised domains: the clusters replace the tags
        present = [cluster_name(c) for c in range(recipe.experts.clusters)]
    wanted = recipe.experts.domains or present
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise LmforgeError(f"experts.domains: {unknown} not among the data's domains {present}")
    if len(wanted) < 1:
        raise LmforgeError("data.sources: no domains to branch into")
    return list(wanted)


def branch(recipe: Recipe, *, force: bool = False, show_progress: bool = True) -> Path:
    """Make the seed (copy it, or pretrain it on the mixture) and one expert recipe per domain."""
    if recipe.experts is None:
        recipe = recipe.model_copy(update={"experts": ExpertsConfig()})
    if recipe.objective.name != "clm":
        raise LmforgeError("objective.name: domain experts are causal LMs here (objective 'clm')")
    domains = _domains(recipe)
    run = Path(recipe.output.dir)
    if (run / MANIFEST).exists() and not force:
        raise LmforgeError(f"{run}: already branched; pass --force to start over")
    if force and run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    if recipe.experts.clusters:  # c-BTM: fit the clusters; from here on documents carry domain cluster-<c>
        cluster_recipe_documents(recipe, run / "clusters")
        recipe = recipe.model_copy(deep=True)
        recipe.data.domain_clusters = str(run / "clusters")
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    seed = run / "seed"
    if recipe.experts.seed:
        source = model_folder(Path(recipe.experts.seed))
        refuse_inference_only(source, "experts.seed")
        shutil.copytree(source, seed, ignore=shutil.ignore_patterns("trainer_state.pt"))
        if not (seed / "tokenizer.json").exists() and not (seed / "vocab.txt").exists():
            raise LmforgeError(f"{source}: the seed folder has no tokenizer")
    else:
        seed_recipe = recipe.model_copy(deep=True)
        seed_recipe.experts = None
        seed_recipe.train.max_steps = recipe.experts.seed_steps
        seed_recipe.output.dir = str(run / "seed-run")
        seed_recipe.name = f"{recipe.name}-seed"
        pretrain(seed_recipe, force=True, show_progress=show_progress)
        shutil.copytree(run / "seed-run" / "final", seed)
    experts = {}
    for domain in domains:
        r = expert_recipe(recipe, domain, seed, run / "experts" / domain)
        (run / "experts").mkdir(parents=True, exist_ok=True)
        # Beside the expert's run folder, not in it: training with --force replaces the run folder.
        (run / "experts" / f"{domain}.yaml").write_text(r.to_yaml())
        experts[domain] = f"experts/{domain}"
    steps, batch = expert_budget(recipe)
    _write_json(run / MANIFEST, {"domains": domains, "seed": "seed", "experts": experts,
                                 "steps_per_expert": steps, "expert_batch_size": batch})
    console.print(f"branched {len(domains)} experts from {seed}: {', '.join(domains)}")
    return run


def expert_recipe(recipe: Recipe, domain: Optional[str], seed: Path, out: Path) -> Recipe:
    """The pretraining recipe of one expert (domain) or of the dense baseline (domain None)."""
    r = recipe.model_copy(deep=True)
    r.experts = None
    if domain is not None:  # a row-level filter, so prepared folders (rows with their own domains) work too
        r.data.only_domains = [domain]
        r.name = f"{recipe.name}-{domain}"
    else:
        r.name = f"{recipe.name}-dense"
    r.model.path, r.model.family = str(seed), None
    r.tokenizer.path = str(seed)
    if domain is None:
        r.train.max_steps = mixture_steps(recipe, len(_domains(recipe)))
    else:
        r.train.max_steps, r.train.batch_size = expert_budget(recipe)
    r.output.dir = str(out)
    return r


def relevance(ensemble: ExpertEnsemble, input_ids: torch.Tensor, top_k: Optional[int] = None) -> dict[str, float]:
    """How relevant each expert is to some text: the mean over its blocks of the posterior at the last position
    (uniform prior), kept for the `top_k` most relevant experts and renormalised to sum to one."""
    with torch.no_grad():
        mean = ensemble.posterior_from(ensemble.expert_logprobs(input_ids), input_ids)[:, -1].double().mean(0)
    keep = mean.topk(min(top_k or len(mean), len(mean))).indices.tolist()
    total = float(mean[keep].sum())
    return {ensemble.domains[i]: float(mean[i]) / total for i in sorted(keep)}


def add_expert(run: Path, domain: str, *, init: str = "average", top_k: Optional[int] = 2,
               blocks: int = 64) -> Path:
    """Add an expert for `domain` (text of it must be in the run's data) to a branched run, to train later with
    `train(run, [domain])`. `init`: 'average' starts it from the parameter average of the trained experts
    most relevant to the new domain, weighted by their relevance (`relevance` on up to `blocks` training
    blocks of the domain; `top_k` experts, None: all), as Branch-Train-Merge does; 'seed' from the seed."""
    run = Path(run)
    info = manifest(run)
    recipe = load_recipe(run / "recipe.yaml")
    if domain in info["domains"]:
        raise LmforgeError(f"--domain: '{domain}' already has an expert in {run}")
    if init not in ("average", "seed"):
        raise LmforgeError(f"--init: expected 'average' or 'seed', got {init!r}")
    tokenizer = load_tokenizer(run / info["seed"])
    try:
        data = build_blocks(recipe.data.model_copy(update={"only_domains": [domain], "domain_weights": None}),
                            tokenizer, recipe.objective)
    except LmforgeError as err:
        if "only_domains" not in str(err):
            raise
        raise LmforgeError(f"--domain: no text of domain '{domain}' in this run's data (data.sources)") from None
    if data.train is None or len(data.train) == 0:
        raise LmforgeError(f"--domain: no training text of domain '{domain}' in this run's data")
    source, record = run / info["seed"], {"from": "seed"}
    if init == "average":
        trained = [d for d in info["domains"] if (run / info["experts"][d] / "final" / "config.json").is_file()]
        if not trained:
            raise LmforgeError(f"{run}: no trained expert to average yet; train some first or use --init seed")
        experts = [load_model(run / info["experts"][d] / "final", "clm").eval() for d in trained]
        ids, _ = data.batch("train", list(range(min(len(data.train), blocks))))
        weights = relevance(ExpertEnsemble(experts, trained), torch.from_numpy(ids)[:, :-1], top_k)
        chosen = [trained.index(d) for d in weights]
        merged = experts[chosen[0]]
        merged.load_state_dict(average_state_dicts([experts[i].state_dict() for i in chosen],
                                                   list(weights.values())))
        source = run / "experts" / f"{domain}-init"
        ckpt.save_model(source, merged, tokenizer)
        record = {"from": "average", "weights": weights}
        console.print(f"new expert '{domain}' starts from " + " + ".join(f"{w:.2f}·{d}" for d, w in weights.items()))
    r = expert_recipe(recipe, domain, source, run / "experts" / domain)
    (run / "experts" / f"{domain}.yaml").write_text(r.to_yaml())
    info["domains"].append(domain)
    info["experts"][domain] = f"experts/{domain}"
    info.setdefault("added", {})[domain] = record
    _write_json(run / MANIFEST, info)
    return run / "experts" / f"{domain}.yaml"


def train(run: Path, domains: Optional[list[str]] = None, dense: bool = False, *, demix: bool = False,
          show_progress: bool = True) -> list:
    """Train the named experts (None: all; [] none), each as an ordinary pretraining run; `dense` also trains
    the equal-compute baseline, `demix` the DEMix model (one model, an FFN expert per domain; experts/demix.py)."""
    run = Path(run)
    info = manifest(run)
    todo = list(info["domains"] if domains is None else domains)
    unknown = sorted(set(todo) - set(info["domains"]))
    if unknown:
        raise LmforgeError(f"--domain: {unknown} not among this run's experts {info['domains']}")
    done = []
    for domain in todo:
        recipe = load_recipe(run / f"{info['experts'][domain]}.yaml")
        console.print(f"[bold]expert {domain}[/]: {recipe.train.max_steps} steps on its domain only")
        done.append(pretrain(recipe, force=True, show_progress=show_progress))
    if dense:
        base = load_recipe(run / "recipe.yaml")
        recipe = expert_recipe(base, None, run / info["seed"], run / "dense")
        console.print(f"[bold]dense baseline[/]: {recipe.train.max_steps} steps on the mixture")
        done.append(pretrain(recipe, force=True, show_progress=show_progress))
    if demix:
        done.append(train_demix(run, show_progress=show_progress))
    return done


def _expert_models(run: Path, info: dict) -> list:
    models = []
    for domain in info["domains"]:
        folder = run / info["experts"][domain] / "final"
        if not (folder / "config.json").is_file():
            raise LmforgeError(f"{folder.parent}: expert '{domain}' is not trained yet "
                               f"(lmforge experts train {run} --domain {domain})")
        models.append(load_model(folder, "clm").eval())
    return models


def merge(run: Path, method: str, *, weights: str = "uniform", top_k: Optional[int] = None,
          steps: Optional[int] = None, train: str = "router", aux_weight: float = 0.01,
          fisher_blocks: Optional[int] = None, router_init: str = "random", show_progress: bool = True) -> Path:
    """ensemble: write ensemble/ensemble.json; average: write average/ (one HF model); moe: write moe/ (one
    mixture-of-experts model, its routers trained for `steps` on the mixture; see experts/moe.py)."""
    run = Path(run)
    info = manifest(run)
    recipe = load_recipe(run / "recipe.yaml")
    if weights not in ("uniform", "prior", "fisher") or (method == "moe" and weights == "prior"):
        raise LmforgeError(f"--weights: expected 'uniform', 'prior' (average) or 'fisher', got {weights!r} "
                           f"for --method {method}")
    if router_init not in ("random", "centroids"):
        raise LmforgeError(f"--router-init: expected 'random' or 'centroids', got {router_init!r}")
    experts = _expert_models(run, info)
    tokenizer = load_tokenizer(run / info["seed"])
    fishers, router_blocks = None, None
    if (weights == "fisher" and method in ("average", "moe")) or (method == "moe" and router_init == "centroids"):
        data = build_blocks(recipe.data, tokenizer, recipe.objective)
        if weights == "fisher":
            fisher_blocks = fisher_blocks or FISHER_BLOCKS
            fishers = expert_fishers(experts, info["domains"], data, n_blocks=fisher_blocks, seed=recipe.train.seed,
                                     show_progress=show_progress)
        if method == "moe" and router_init == "centroids":
            router_blocks = [domain_blocks(data, d, ROUTER_BLOCKS, recipe.train.seed) for d in info["domains"]]
    if method == "moe":
        return merge_moe(run, recipe, experts, info["domains"], tokenizer, top_k=top_k, steps=steps, train=train,
                         aux_weight=aux_weight, sources=[f"../{info['experts'][d]}/final" for d in info["domains"]],
                         fishers=fishers, fisher_blocks=fisher_blocks, router_blocks=router_blocks,
                         show_progress=show_progress)
    cfg = recipe.experts or ExpertsConfig()
    ensemble = ExpertEnsemble(experts, info["domains"], top_k=top_k or cfg.top_k)
    prior = None
    if (method == "ensemble" and cfg.prior == "estimated") or (method == "average" and weights == "prior"):
        data = build_blocks(recipe.data, tokenizer, recipe.objective)
        prior = estimate_prior(lambda ids: ensemble(ids).posterior, data)
    if method == "ensemble":
        folder = run / "ensemble"
        folder.mkdir(exist_ok=True)
        _write_json(folder / "ensemble.json", {
            "method": "ensemble", "domains": info["domains"],
            "experts": [f"../{info['experts'][d]}/final" for d in info["domains"]],
            "prior": (prior.tolist() if prior is not None else [1.0 / len(experts)] * len(experts)),
            "top_k": top_k or cfg.top_k, "routing": cfg.routing,
            **({"clusters": "../clusters", "routing_temperature": cfg.routing_temperature,
                "routing_stride": cfg.routing_stride} if cfg.routing == "clusters" else {})})
        return folder
    if method != "average":
        raise LmforgeError(f"--method: expected 'ensemble', 'average' or 'moe', got {method!r}")
    w = prior.tolist() if prior is not None else None
    states = [e.state_dict() for e in experts]
    merged = experts[0]
    if fishers is not None:
        merged.load_state_dict(fisher_average(states, fishers))
        record = {"weights": "fisher", "fisher_blocks": fisher_blocks}
    else:
        merged.load_state_dict(average_state_dicts(states, w))
        record = {"weights": w or [1.0 / len(experts)] * len(experts)}
    ckpt.save_model(run / "average", merged, tokenizer,
                    {"merge.json": {"method": "average", "domains": info["domains"], **record}})
    return run / "average"


def expert_fishers(experts: list, domains: list[str], data, *, n_blocks: Optional[int] = None, seed: int = 0,
                   show_progress: bool = True) -> list[dict]:
    """Each expert's diagonal Fisher on `n_blocks` (default FISHER_BLOCKS) training blocks of its own domain."""
    n_blocks = n_blocks or FISHER_BLOCKS
    out = []
    for model, domain in zip(experts, domains):
        if show_progress:
            console.print(f"Fisher weights of expert '{domain}' on {n_blocks} blocks of its domain")
        out.append(diagonal_fisher(model, domain_blocks(data, domain, n_blocks, seed)))
    return out


def evaluate(run: Path, *, max_batches: Optional[int] = None, batch_size: int = 8, data_config=None,
             extra: Optional[dict] = None) -> dict:
    """Per-domain validation perplexity of every model the run holds: seed, dense, experts' ensemble, average,
    moe, demix (and `extra`: name -> model folder); on the run recipe's data, or on `data_config` (e.g. with
    domains no model trained on)."""
    run = Path(run)
    info = manifest(run)
    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = load_tokenizer(run / info["seed"])
    data = build_blocks(data_config or recipe.data, tokenizer, recipe.objective)
    objective = build_objective(recipe.objective, tokenizer)
    models = {"seed": lambda: load_model(run / info["seed"], "clm")}
    if (run / "dense" / "final" / "config.json").is_file():
        models["dense"] = lambda: load_model(run / "dense" / "final", "clm")
    if (run / "ensemble" / "ensemble.json").is_file():
        models["ensemble"] = lambda: load_ensemble(run / "ensemble")
    if (run / "average" / "config.json").is_file():
        models["average"] = lambda: load_model(run / "average", "clm")
    if (run / "moe" / "config.json").is_file():
        models["moe"] = lambda: load_moe(run / "moe")
    if (run / "demix" / "config.json").is_file():
        models["demix"] = lambda: load_model(run / "demix", "clm")
    for name, folder in (extra or {}).items():
        models[name] = lambda folder=folder: load_model(Path(folder), "clm")
    results = {}
    for name, make in models.items():
        model = make().eval()
        results[name] = evaluate_blocks(model, objective, data, batch_size=batch_size, max_batches=max_batches)
    return results


def format_comparison(results: dict) -> str:
    """Markdown table: rows are domains (+ all), columns the models, cells perplexity."""
    names = list(results)
    domains = sorted({k.split("/", 1)[1] for m in results.values() for k in m if k.startswith("ppl/")})
    lines = ["| domain | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for d in domains + ["all"]:
        key = "ppl" if d == "all" else f"ppl/{d}"
        lines.append(f"| {d} | " + " | ".join(f"{results[n].get(key, float('nan')):.2f}" for n in names) + " |")
    return "\n".join(lines)
