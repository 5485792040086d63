"""Branch-Train-Merge: branch a seed model into one expert per domain, train each expert on its domain only
(independently: separate processes or machines), then merge them into an ensemble, a parameter average or
(Branch-Train-MiX) one mixture-of-experts model.

    RUN/
      recipe.yaml  experts.json        the experts recipe and the manifest (domains, seed, expert folders)
      clusters/                        with experts.clusters (c-BTM): the clustering that names the domains
      seed/                            the seed model + tokenizer (HF folder), trained on experts.seed_domains
      seed-run/                        the seed's pretraining run, when the recipe trains it
      experts/<domain>.yaml            the recipe of each expert
      experts/<domain>/                one ordinary pretraining run per domain (its recipe.yaml, final/, ...)
      experts/<domain>-init/           an added expert's starting point: the relevance-weighted average of the
                                       existing experts (`add_expert`; experts.json "added" records the weights)
      dense/                           optional baseline: the seed trained on every expert's domain, as many
                                       tokens as the experts together (the ones added later too)
      eval-cache.json                  each (model, domain) result of `evaluate`, keyed by the model's files and
                                       the domain's validation blocks
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

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lmforge.data.blocks import build_blocks
from lmforge.data.clusters import cluster_name
from lmforge.data.files import expand_paths
from lmforge.engine import checkpoint as ckpt
from lmforge.engine.logging import console
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_blocks
from lmforge.experts.budget import expert_budget, mixture_steps
from lmforge.experts.cluster import cluster_recipe_documents
from lmforge.experts.demix import train_demix
from lmforge.experts.launch import finished_domains
from lmforge.experts.fisher import diagonal_fisher, domain_blocks, fisher_average
from lmforge.experts.moe import load_moe, merge_moe
from lmforge.experts.prior import estimate_prior
from lmforge.models import load_model
from lmforge.models.ensemble import ExpertEnsemble, average_state_dicts
from lmforge.models.onnx import refuse_inference_only
from lmforge.objectives import build_objective
from lmforge.paths import PREPARED_MARKER
from lmforge.pretrain import pretrain
from lmforge.recipe import DataConfig, ExpertsConfig, Recipe, SourceConfig, load_recipe
from lmforge.runs import MANIFEST, load_ensemble, manifest, model_folder
from lmforge.tokenizer import load_tokenizer

FISHER_BLOCKS = 256  # training blocks of its domain on which each expert's Fisher is estimated (--weights fisher)
WHOLE_RUN_MODELS = ("seed", "dense", "ensemble", "average", "moe", "demix")  # an expert's column never takes these
EVAL_CACHE = "eval-cache.json"  # RUN/eval-cache.json: each (model, domain) result of `evaluate`, keyed by content
ROUTER_BLOCKS = 32   # training blocks of each domain whose mean hidden states start the routers (--router-init)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    _write_text(path, json.dumps(payload, indent=2))


def data_domains(data: DataConfig, clusters: Optional[int] = None) -> list[str]:
    """The domains of some data: its sources' tags (a prepared folder's own list), or with `clusters` (c-BTM)
    the cluster names, which replace the tags."""
    if clusters:
        return [cluster_name(c) for c in range(clusters)]
    present = set()
    for s in data.sources:
        marker = Path(s.path) / PREPARED_MARKER
        present |= set(json.loads(marker.read_text()).get("domains", [])) if marker.is_file() else {s.domain}
    return sorted(present)


def _known(wanted: list[str], present: list[str], field: str) -> list[str]:
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise LmforgeError(f"{field}: {unknown} not among the data's domains {present}")
    return list(wanted)


def _domains(recipe: Recipe) -> list[str]:
    present = data_domains(recipe.data, recipe.experts and recipe.experts.clusters)
    wanted = _known(recipe.experts.domains or present, present, "experts.domains")
    if len(wanted) < 1:
        raise LmforgeError("data.sources: no domains to branch into")
    return wanted


def _seed_domains(recipe: Recipe, domains: list[str]) -> list[str]:
    """The domains the seed (and a tokenizer trained with it) sees: experts.seed_domains."""
    choice = recipe.experts.seed_domains
    if choice == "experts":
        return list(domains)
    present = data_domains(recipe.data, recipe.experts.clusters)
    return present if choice == "all" else _known(choice, present, "experts.seed_domains")


def branch(recipe: Recipe, *, force: bool = False, show_progress: bool = True) -> Path:
    """Make the seed (copy it, or pretrain it on the mixture) and one expert recipe per domain."""
    if recipe.experts is None:
        recipe = recipe.model_copy(update={"experts": ExpertsConfig()})
    if recipe.objective.name != "clm":
        raise LmforgeError("objective.name: domain experts are causal LMs here (objective 'clm')")
    domains = _domains(recipe)
    seed_domains = None if recipe.experts.seed else _seed_domains(recipe, domains)
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
        if set(seed_domains) != set(data_domains(recipe.data, recipe.experts.clusters)):
            seed_recipe.data.only_domains = seed_domains
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
    # What the seed and its tokenizer saw (null: made elsewhere, unknown), so a domain added later is known new.
    tokenizer_domains = None if recipe.tokenizer.path else seed_domains
    _write_json(run / MANIFEST, {"domains": domains, "seed": "seed", "experts": experts,
                                 "steps_per_expert": steps, "expert_batch_size": batch,
                                 "seed_domains": seed_domains, "tokenizer_domains": tokenizer_domains})
    console.print(f"branched {len(domains)} experts from {seed}: {', '.join(domains)}"
                  + (f" (seed trained on: {', '.join(seed_domains)})" if seed_domains else ""))
    return run


def _from_seed(recipe: Recipe, seed: Path, out: Path, name: str) -> Recipe:
    r = recipe.model_copy(deep=True)
    r.experts, r.name = None, f"{recipe.name}-{name}"
    r.model.path, r.model.family = str(seed), None
    r.tokenizer.path = str(seed)
    r.output.dir = str(out)
    return r


def expert_recipe(recipe: Recipe, domain: str, seed: Path, out: Path) -> Recipe:
    """The pretraining recipe of one expert: the run's data restricted to its domain (a row-level filter, so
    prepared folders with rows of many domains work too), from `seed`, at the experts' budget."""
    r = _from_seed(recipe, seed, out, domain)
    r.data.only_domains = [domain]
    r.train.max_steps, r.train.batch_size = expert_budget(recipe)
    return r


def dense_recipe(recipe: Recipe, domains: list[str], seed: Path, out: Path) -> Recipe:
    """The dense baseline's recipe: the seed trained on the text of every expert's domain (`domains`, the ones
    added later too) at train.batch_size, on as many tokens as those experts together."""
    r = _from_seed(recipe, seed, out, "dense")
    r.data.only_domains = list(domains)
    r.train.max_steps = mixture_steps(recipe, len(domains))
    return r


def run_tokens(recipe: Recipe) -> int:
    """Training tokens a run's recipe asks for (per process): steps x batch size x accumulation x block size."""
    return recipe.train.max_steps * recipe.train.batch_size * recipe.train.grad_accum * recipe.objective.block_size


def relevance(ensemble: ExpertEnsemble, input_ids: torch.Tensor, top_k: Optional[int] = None) -> dict[str, float]:
    """How relevant each expert is to some text: the mean over its blocks of the posterior at the last position
    (uniform prior), kept for the `top_k` most relevant experts and renormalised to sum to one."""
    with torch.no_grad():
        mean = ensemble.posterior_from(ensemble.expert_logprobs(input_ids), input_ids)[:, -1].double().mean(0)
    keep = mean.topk(min(top_k or len(mean), len(mean))).indices.tolist()
    total = float(mean[keep].sum())
    return {ensemble.domains[i]: float(mean[i]) / total for i in sorted(keep)}


def _with_sources(recipe: Recipe, domain: str, sources: list[str]) -> Recipe:
    """The run's recipe with a new domain's text added as sources tagged `domain` (read, tokenized and split by
    the run's own rules), after checking that the name is new to the data and every source exists."""
    if recipe.experts and recipe.experts.clusters:
        raise LmforgeError("--source: this run's domains are clusters (experts.clusters); new text would be "
                           "assigned to them, not become a domain of its own")
    if domain in data_domains(recipe.data):
        raise LmforgeError(f"--domain: '{domain}' is already a domain of this run's data; leave out --source to "
                           f"add an expert on that text, or give the new text another name")
    for path in sources:
        if (Path(path) / PREPARED_MARKER).is_file():
            raise LmforgeError(f"--source: {path} is a prepared folder, whose rows keep their own domains; give "
                               "the new domain's raw files (text, JSONL, CSV/TSV, Parquet)")
        expand_paths(str(path), "--source")
    r = recipe.model_copy(deep=True)
    r.data.sources += [SourceConfig(path=str(p), domain=domain) for p in sources]
    return r


def _novelty(info: dict, domain: str) -> dict:
    """Whether the seed and the tokenizer saw text of `domain` (None: unknown, made outside this run)."""
    seen = {who: (None if info.get(f"{who}_domains") is None else domain in info[f"{who}_domains"])
            for who in ("seed", "tokenizer")}
    if seen["seed"] is False and seen["tokenizer"] is not True:
        console.print(f"'{domain}' is new to the seed" + (" and the tokenizer" if seen["tokenizer"] is False else "")
                      + f" (they saw: {', '.join(info['seed_domains'])})")
    elif seen["seed"]:
        console.print(f"[yellow]note:[/] the seed trained on '{domain}' text (experts.seed_domains)")
    return {"seen_by_seed": seen["seed"], "seen_by_tokenizer": seen["tokenizer"]}


def add_expert(run: Path, domain: str, *, sources: Optional[list] = None, init: str = "average",
               top_k: Optional[int] = 2, blocks: int = 64) -> Path:
    """Add an expert for `domain` to a branched run, to train later with `train(run, [domain])`. `sources`
    (files, folders or globs) bring the domain's text: they join the run's data tagged `domain`, tokenized with
    the run's tokenizer and split by its rule; without them the domain's text must be in the run's data.
    `init`: 'average' starts it from the parameter average of the trained experts most relevant to the new
    domain, weighted by their relevance (`relevance` on up to `blocks` training blocks of the domain; `top_k`
    experts, None: all), as Branch-Train-Merge does; 'seed' from the seed. experts.json records (under
    "added") where it started, its sources and whether the seed and the tokenizer saw its text."""
    run = Path(run)
    info = manifest(run)
    recipe = load_recipe(run / "recipe.yaml")
    if domain in info["domains"]:
        raise LmforgeError(f"--domain: '{domain}' already has an expert in {run}")
    if init not in ("average", "seed"):
        raise LmforgeError(f"--init: expected 'average' or 'seed', got {init!r}")
    if sources:
        recipe = _with_sources(recipe, domain, list(sources))
    tokenizer = load_tokenizer(run / info["seed"])
    try:
        data = build_blocks(recipe.data.model_copy(update={"only_domains": [domain], "domain_weights": None}),
                            tokenizer, recipe.objective)
    except LmforgeError as err:
        if "only_domains" not in str(err):
            raise
        raise LmforgeError(f"--domain: no text of domain '{domain}' in this run's data (data.sources); "
                           "give its text with --source") from None
    if data.train is None or len(data.train) == 0:
        raise LmforgeError(f"--domain: no training text of domain '{domain}' in this run's data")
    trained = [d for d in info["domains"] if (run / info["experts"][d] / "final" / "config.json").is_file()]
    if init == "average" and not trained:
        raise LmforgeError(f"{run}: no trained expert to average yet; train some first or use --init seed")
    source, record = run / info["seed"], {"from": "seed"}
    if init == "average":
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
    if sources:
        record["sources"] = [str(p) for p in sources]
    record.update(_novelty(info, domain))
    r = expert_recipe(recipe, domain, source, run / "experts" / domain)
    _write_text(run / "experts" / f"{domain}.yaml", r.to_yaml())
    if sources:
        _write_text(run / "recipe.yaml", recipe.to_yaml())
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
        recipe = dense_recipe(load_recipe(run / "recipe.yaml"), info["domains"], run / info["seed"], run / "dense")
        console.print(dense_budget(run, info, recipe))
        done.append(pretrain(recipe, force=True, show_progress=show_progress))
    if demix:
        done.append(train_demix(run, show_progress=show_progress))
    return done


def dense_budget(run: Path, info: dict, dense: Recipe) -> str:
    """The line that says how many tokens the dense baseline trains on against every expert's."""
    experts = {d: run_tokens(load_recipe(run / f"{info['experts'][d]}.yaml")) for d in info["domains"]}
    return (f"[bold]dense baseline[/]: {dense.train.max_steps} steps x batch {dense.train.batch_size} on "
            f"{len(experts)} domains = {run_tokens(dense):,} tokens; the {len(experts)} experts together: "
            f"{sum(experts.values()):,} (" + ", ".join(f"{d} {n:,}" for d, n in experts.items()) + ")")


def _expert_models(run: Path, info: dict, domains: list[str]) -> list:
    models = []
    for domain in domains:
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
    domains, missing = finished_domains(run)
    if not domains:
        raise LmforgeError(f"{run}: no expert is trained yet (lmforge experts train {run})")
    if missing:
        console.print(f"[yellow]merging the {len(domains)} trained experts ({', '.join(domains)}); not trained yet: "
                      f"{', '.join(missing)}[/] (lmforge experts status {run})")
    experts = _expert_models(run, info, domains)
    tokenizer = load_tokenizer(run / info["seed"])
    fishers, router_blocks = None, None
    if (weights == "fisher" and method in ("average", "moe")) or (method == "moe" and router_init == "centroids"):
        data = build_blocks(recipe.data, tokenizer, recipe.objective)
        if weights == "fisher":
            fisher_blocks = fisher_blocks or FISHER_BLOCKS
            fishers = expert_fishers(experts, domains, data, n_blocks=fisher_blocks, seed=recipe.train.seed,
                                     show_progress=show_progress)
        if method == "moe" and router_init == "centroids":
            router_blocks = [domain_blocks(data, d, ROUTER_BLOCKS, recipe.train.seed) for d in domains]
    if method == "moe":
        return merge_moe(run, recipe, experts, domains, tokenizer, top_k=top_k, steps=steps, train=train,
                         aux_weight=aux_weight, sources=[f"../{info['experts'][d]}/final" for d in domains],
                         fishers=fishers, fisher_blocks=fisher_blocks, router_blocks=router_blocks,
                         show_progress=show_progress)
    cfg = recipe.experts or ExpertsConfig()
    ensemble = ExpertEnsemble(experts, domains, top_k=top_k or cfg.top_k)
    prior = None
    if (method == "ensemble" and cfg.prior == "estimated") or (method == "average" and weights == "prior"):
        data = build_blocks(recipe.data, tokenizer, recipe.objective)
        prior = estimate_prior(lambda ids: ensemble(ids).posterior, data)
    if method == "ensemble":
        folder = run / "ensemble"
        folder.mkdir(exist_ok=True)
        _write_json(folder / "ensemble.json", {
            "method": "ensemble", "domains": domains,
            "experts": [f"../{info['experts'][d]}/final" for d in domains],
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
                    {"merge.json": {"method": "average", "domains": domains, **record}})
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


def _files_key(paths: list[Path]) -> str:
    """A key that changes when any file of these folders changes: names, sizes, modification times (a run folder
    moved elsewhere keeps its keys)."""
    h = hashlib.sha256()
    for i, path in enumerate(paths):
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{i}:{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:24]


def expert_column(domain: str) -> str:
    """The name of an expert's column (and --model): its domain, or `expert:<domain>` when a whole-run model has
    that name."""
    return f"expert:{domain}" if domain in WHOLE_RUN_MODELS else domain


def run_models(run: Path, info: dict, extra: Optional[dict] = None) -> dict[str, tuple[Callable, list[Path]]]:
    """Every model an experts run holds, by column name in table order: seed, dense, each trained expert alone
    (named by its domain; `expert:<domain>` when that name is taken), ensemble, average, moe, demix, then `extra`
    (name -> model folder). Each comes with its loader and the files that make it (its results' cache key)."""
    folders = {"seed": run / info["seed"], "dense": run / "dense" / "final"}
    experts = {d: run / info["experts"][d] / "final" for d in info["domains"]}
    models = {name: (lambda f=f: load_model(f, "clm"), [f]) for name, f in folders.items()
              if (f / "config.json").is_file()}
    for domain, folder in experts.items():
        if (folder / "config.json").is_file():
            models[expert_column(domain)] = (lambda f=folder: load_model(f, "clm"), [folder])
    if (run / "ensemble" / "ensemble.json").is_file():
        spec = json.loads((run / "ensemble" / "ensemble.json").read_text())
        parts = [run / "ensemble", *((run / "ensemble" / p).resolve() for p in spec["experts"])]
        models["ensemble"] = (lambda: load_ensemble(run / "ensemble"),
                              parts + ([run / "clusters"] if spec.get("routing") == "clusters" else []))
    loaders = {"average": lambda: load_model(run / "average", "clm"), "moe": lambda: load_moe(run / "moe"),
               "demix": lambda: load_model(run / "demix", "clm")}
    for name, load in loaders.items():
        if (run / name / "config.json").is_file():
            models[name] = (load, [run / name])
    for name, folder in (extra or {}).items():
        models[name] = (lambda f=Path(folder): load_model(f, "clm"), [Path(folder)])
    return models


def _validation_blocks(data: DataConfig, domain: str, tokenizer, objective) -> Optional[tuple]:
    """The validation blocks of one domain and the key of their content, or None when it has none."""
    blocks = build_blocks(data.model_copy(update={"only_domains": [domain]}), tokenizer, objective, need_train=False)
    if blocks.validation is None or len(blocks.validation) == 0:
        return None
    ids = np.asarray(blocks.validation["input_ids"], dtype=np.int64)
    return blocks, hashlib.sha256(ids.tobytes() + f"{objective.name}:{ids.shape}".encode()).hexdigest()[:24]


def _combined(per_domain: dict[str, dict]) -> dict:
    """A model's metrics from its per-domain losses: each domain's, and all of them weighted by tokens."""
    tokens = sum(r["eval_tokens"] for r in per_domain.values())
    if not tokens:
        return {}
    loss = sum(r["loss"] * r["eval_tokens"] for r in per_domain.values()) / tokens
    metrics = {"loss": loss, "ppl": _exp(loss), "eval_tokens": tokens}
    for domain, r in per_domain.items():
        metrics[f"loss/{domain}"], metrics[f"ppl/{domain}"] = r["loss"], _exp(r["loss"])
    return metrics


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def training_tokens(run: Path, info: dict, names: list[str]) -> dict[str, int]:
    """Tokens each model was trained on beyond the seed, from its run's results.json (the seed's own; the
    ensemble and the average: the experts' together)."""
    def read(folder: Path) -> Optional[int]:
        path = folder / "results.json"
        return json.loads(path.read_text()).get("tokens") if path.is_file() else None
    experts = {d: read(run / info["experts"][d]) for d in info["domains"]}
    found = {"seed": read(run / "seed-run"), "dense": read(run / "dense"),
             **{expert_column(d): n for d, n in experts.items()}}
    if all(n is not None for n in experts.values()):
        found["ensemble"] = found["average"] = sum(experts.values())
    return {name: found[name] for name in names if found.get(name) is not None}


def evaluate(run: Path, *, max_batches: Optional[int] = None, batch_size: int = 8, data_config=None,
             extra: Optional[dict] = None, domains: Optional[list[str]] = None, models: Optional[list[str]] = None,
             cache: bool = True) -> dict:
    """Per-domain validation perplexity of every model the run holds (`run_models`: seed, dense, each expert
    alone, ensemble, average, moe, demix, and `extra`: name -> model folder), or of the `models` named, on every
    domain of the run recipe's data (or of `data_config`, e.g. with domains no model trained on), or on the
    `domains` named; `max_batches` per domain. Each (model, domain) result is kept in RUN/eval-cache.json under
    the key of the model's files and the domain's validation blocks, and read back instead of evaluated again
    (`cache` False: evaluate all again); a model's overall figures weight its domains by their tokens."""
    run = Path(run)
    info = manifest(run)
    recipe = load_recipe(run / "recipe.yaml")
    data_cfg = data_config or recipe.data
    present = data_domains(data_cfg, recipe.experts.clusters if recipe.experts and data_cfg.domain_clusters else None)
    wanted = _known(domains, present, "--domain") if domains else present
    available = run_models(run, info, extra)
    for name in models or []:
        if name not in available:
            raise LmforgeError(f"--model: no {name!r} model in this experts run (it has: {', '.join(available)})")
    chosen = {name: available[name] for name in (models or available)}
    tokenizer = load_tokenizer(run / info["seed"])
    objective = build_objective(recipe.objective, tokenizer)
    blocks = {d: found for d in wanted if (found := _validation_blocks(data_cfg, d, tokenizer, recipe.objective))}
    cache_file = run / EVAL_CACHE
    stored = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    settings = f"{batch_size}:{max_batches}"
    per_model, fresh = {}, 0
    for name, (load, files) in chosen.items():
        model_key, model, per_model[name] = _files_key(files), None, {}
        for domain, (data, data_key) in blocks.items():
            key = hashlib.sha256(f"{model_key}:{data_key}:{settings}".encode()).hexdigest()[:32]
            if key not in stored or not cache:
                model = model or load().eval()
                metrics = evaluate_blocks(model, objective, data, batch_size=batch_size, max_batches=max_batches)
                stored[key] = {"model": name, "domain": domain, "loss": metrics["loss"],
                               "eval_tokens": metrics["eval_tokens"]}
                fresh += 1
            per_model[name][domain] = stored[key]
        if model is not None:
            _write_json(cache_file, stored)
    total = len(chosen) * len(blocks)
    console.print(f"evaluated {fresh} of {total} (model, domain) pairs; {total - fresh} read from {cache_file}")
    results = {name: _combined(per_domain) for name, per_domain in per_model.items()}
    for name, tokens in training_tokens(run, info, list(results)).items():
        results[name]["train_tokens"] = tokens
    return results


def format_comparison(results: dict) -> str:
    """Markdown table: rows are domains (+ all), columns the models, cells perplexity; a last row gives each
    model's training tokens beyond the seed when known."""
    names = list(results)
    domains = sorted({k.split("/", 1)[1] for m in results.values() for k in m if k.startswith("ppl/")})
    lines = ["| domain | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for d in domains + ["all"]:
        key = "ppl" if d == "all" else f"ppl/{d}"
        lines.append(f"| {d} | " + " | ".join(f"{results[n].get(key, float('nan')):.2f}" for n in names) + " |")
    if any("train_tokens" in m for m in results.values()):
        lines.append("| train tokens | " + " | ".join(f"{results[n]['train_tokens']:,}" if "train_tokens" in
                                                        results[n] else "–" for n in names) + " |")
    return "\n".join(lines)
