"""The pretraining stage: recipe → tokenizer → packed data → model → engine → run folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from transformers import PreTrainedTokenizerFast

from lmforge.data.blocks import build_blocks, default_cache_dir, text_pieces
from lmforge.data.loader import BlockLoader, StreamLoader
from lmforge.data.sources import fingerprint_sources, iter_texts, load_documents
from lmforge.engine import distributed as dist
from lmforge.engine.hardware import pick_device, threads_note
from lmforge.engine.logging import console
from lmforge.engine.loop import Engine
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_blocks, format_table
from lmforge.models import build_model, count_parameters, flops_per_token, local_path
from lmforge.models.onnx import refuse_inference_only
from lmforge.models.memory import check_fits
from lmforge.objectives import build_objective
from lmforge.objectives.span import add_sentinels, corrupted_lengths, end_with_eos
from lmforge.recipe import Recipe, TokenizerConfig, coerce_recipe, load_recipe
from lmforge.runs import start_run
from lmforge.stage import RunResult, callable_stage
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def train_tokenizer_for(data, config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train `config`'s tokenizer on the training split of a recipe's `data` section. Long documents reach the
    trainer in pieces (cut where whitespace starts, so its words are the same): its memory follows the pieces,
    not the longest document."""
    docs = load_documents(data)
    texts = iter_texts(docs, "train", config.max_train_documents)
    return train_tokenizer((piece for text in texts for piece in text_pieces(text)), config)


def cached_tokenizer_for(data, config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """The tokenizer `config` trains on `data`, reused when an earlier run trained it on the same files with the same
    settings (kept beside the tokenized data): training is deterministic, so the cached one is the one training gives."""
    key = hashlib.sha256(f"{fingerprint_sources(data)} {config.model_dump_json()}".encode()).hexdigest()[:16]
    cached = (Path(data.cache_dir) if data.cache_dir else default_cache_dir()) / "tokenizers" / key
    if (cached / "tokenizer.json").exists():
        return load_tokenizer(cached)
    tokenizer = train_tokenizer_for(data, config)
    tmp = cached.with_name(f".{key}.{os.getpid()}.tmp")
    try:  # a full or read-only cache costs only the reuse
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, tmp)
        tmp.rename(cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def get_tokenizer(recipe: Recipe, run_dir: Path):
    """The recipe's tokenizer: reused from a folder, from the run (on resume), or trained now."""
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return load_tokenizer(saved)
    source = recipe.tokenizer.path or recipe.model.path
    if source:
        return objective_tokenizer(load_tokenizer(local_path(source)), recipe)
    if dist.is_main():
        save_tokenizer(objective_tokenizer(cached_tokenizer_for(recipe.data, recipe.tokenizer), recipe), saved)
    dist.barrier()
    return load_tokenizer(saved)


def objective_tokenizer(tokenizer, recipe: Recipe):
    """What an objective adds to any tokenizer: span corruption's sentinels and closing EOS."""
    if recipe.objective.kind == "span":
        end_with_eos(add_sentinels(tokenizer, recipe.objective.sentinels))
    return tokenizer


def pretrain(recipe: Union[Recipe, str, Path, dict], *, overrides: Union[list[str], tuple] = (), resume: bool = False,
             force: bool = False, show_progress: bool = True,
             on_eval: Optional[Callable[[int, dict], Optional[str]]] = None,
             train_objective: Optional[Callable] = None) -> RunResult:
    """Pretrain as the recipe (object, YAML file or dict, plus `--set` style overrides) says; returns the run
    folder and its last validation metrics. `on_eval(step, metrics)` sees each evaluation and may stop the run by
    returning a reason (a tuner's pruner). `train_objective(objective, model, tokenizer)` gives the objective
    training uses in place of the recipe's (a distiller's); evaluation keeps the recipe's."""
    recipe = coerce_recipe(recipe, overrides, Recipe, load_recipe)
    if recipe.distill and train_objective is None:
        raise LmforgeError("distill: this recipe distils from a teacher; run it with `lmforge distill`")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    if recipe.model.path:
        refuse_inference_only(local_path(recipe.model.path), "model.path")
    check_fits(recipe, pick_device(recipe.train.device))  # before anything is built or written
    world, rank = _join_process_group(recipe)  # first: the set-up below uses barriers
    with start_run(recipe, resume, force) as run_dir:  # a failed set-up leaves nothing
        t0 = time.perf_counter()
        tokenizer = get_tokenizer(recipe, run_dir)
        objective = build_objective(recipe.objective, tokenizer, seed=recipe.train.seed)
        cfg = recipe.train
        if recipe.data.streaming and recipe.data.domain_weights:
            raise LmforgeError("data.domain_weights: weighted domain sampling needs the cached (non-streaming) data")
        if recipe.data.streaming and recipe.objective.pairs:
            raise LmforgeError(f"data.streaming: objective '{recipe.objective.name}' builds sentence pairs from whole "
                               "documents and needs the cached (non-streaming) data")
        if recipe.data.streaming:
            data = None
            domains = sorted({s.domain for s in recipe.data.sources})
            loader = StreamLoader(recipe.data, tokenizer, recipe.objective, domains, cfg.batch_size, cfg.grad_accum,
                                  cfg.seed, world, rank)
        else:
            data = build_blocks(recipe.data, tokenizer, recipe.objective)
            loader = BlockLoader(data, cfg.batch_size, cfg.grad_accum, cfg.seed, world, rank,
                                 recipe.data.domain_weights)
        model = build_model(recipe.model, recipe.objective, tokenizer, seed=cfg.seed)
        fpt = flops_per_token(model, recipe.objective.block_size, head_fraction(recipe.objective))

        def evaluate(m):
            if data is None:
                return {}
            cap = cfg.eval_batches * world if cfg.eval_batches else None  # eval_batches is per process
            return evaluate_blocks(m, objective, data, batch_size=cfg.batch_size, max_batches=cap)

        trained_by = train_objective(objective, model, tokenizer) if train_objective else objective
        engine = Engine(model, tokenizer, trained_by, loader, cfg, run_dir, evaluate=evaluate, flops_per_token=fpt,
                        started=t0, on_eval=on_eval, dist_cfg=recipe.dist,
                        tensorboard=recipe.output.tensorboard, plots=recipe.output.plots, show_progress=show_progress)
        if resume:
            engine.resume()
        if dist.is_main():
            n = count_parameters(model)
            console.print(f"[bold]{recipe.name}[/]: {recipe.objective.name} on {engine.device_type}"
                          f"{threads_note(cfg.threads, engine.device_type)} "
                          f"({engine.precision}), {n['total'] / 1e6:.2f}M parameters, "
                          f"{len(data.train) if data else 'streamed'} training blocks of "
                          f"{recipe.objective.block_size}, "
                          f"global batch {loader.global_batch}")
    state = engine.fit()
    final = next((h for h in reversed(state.history) if h.get("split") == "validation"), {})
    engine.save_model(run_dir / "final")  # one consolidated folder, also after sharded training
    if dist.is_main():
        write_summary(run_dir, recipe, state, final, engine.wall_seconds(), count_parameters(model))
    dist.barrier()
    dist.teardown()
    return RunResult(run_dir, final)


def before_after_table(start: dict, final: dict) -> str:
    """Per-domain perplexity before the first step and after the last (continued pretraining)."""
    domains = sorted(k.split("/", 1)[1] for k in final if k.startswith("ppl/"))
    lines = ["## Before and after (validation perplexity)", "", "| domain | before | after | change |",
             "|---|---:|---:|---:|"]
    for d, key in [(d, f"ppl/{d}") for d in domains] + [("**all**", "ppl")]:
        if key in start and key in final:
            lines.append(f"| {d} | {start[key]:.2f} | {final[key]:.2f} | {final[key] / start[key] - 1:+.1%} |")
    return "\n".join(lines)


def head_fraction(objective) -> float:
    """Share of the input tokens the output layer runs on."""
    if objective.masked:
        return objective.mlm_probability
    if objective.kind == "span":
        inputs, targets = corrupted_lengths(objective.block_size, objective.noise_density, objective.mean_span_length)
        return targets / (inputs + targets)
    return 1.0


def _join_process_group(recipe: Recipe) -> tuple[int, int]:
    dist.setup(pick_device(recipe.train.device), recipe.dist.timeout_s)
    return dist.world_size(), dist.rank()


def write_summary(run_dir: Path, recipe: Recipe, state, final: dict, seconds: float, params: dict) -> None:
    stop = next((h["stop_reason"] for h in reversed(state.history) if "stop_reason" in h), "max_steps")
    lines = [f"# {recipe.name}", "",
             f"- objective: **{recipe.objective.name}**, model: **{recipe.model.family or recipe.model.path}** "
             f"({params['total'] / 1e6:.2f}M parameters)",
             f"- steps: {state.step} ({stop}), tokens seen: {state.tokens:,}, wall time: {seconds:.0f} s",
             f"- best {recipe.train.metric}: {state.best_metric if state.best_metric is not None else 'n/a'}"
             f" at step {state.best_step}", ""]
    start = next((h for h in state.history if h.get("split") == "validation" and h.get("step") == 0), None)
    if start and final:
        lines += [before_after_table(start, final), ""]
    if final:
        lines += [format_table(final, "## Validation (final step)"), ""]
    if (run_dir / "loss.png").exists():
        lines += ["![loss curve](loss.png)", ""]
    lines += ["Files: `recipe.yaml` (resolved recipe), `metrics.jsonl`, `final/` (model + tokenizer in Hugging Face "
              "format), `best/`, `checkpoints/` (resumable).", ""]
    (run_dir / "summary.md").write_text("\n".join(lines))
    (run_dir / "results.json").write_text(json.dumps({"steps": state.step, "tokens": state.tokens,
                                                      "seconds": seconds, "validation": final}, indent=2))

callable_stage(__name__)  # `from lmforge import pretrain` can be called: pretrain(...)
