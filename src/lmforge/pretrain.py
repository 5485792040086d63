"""The pretraining stage: recipe → tokenizer → packed data → model → engine → run folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from lmforge.data.blocks import build_blocks
from lmforge.data.loader import BlockLoader, StreamLoader
from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.hardware import pick_device
from lmforge.engine.logging import console
from lmforge.engine.loop import Engine
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_blocks, format_table
from lmforge.models import build_model, count_parameters, flops_per_token, local_path
from lmforge.objectives import build_objective
from lmforge.recipe import Recipe
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer_for


RUN_ARTEFACTS = {"recipe.yaml", "metrics.jsonl", "tensorboard", "tokenizer", "best", "checkpoints", "final",
                 "loss.png", "summary.md", "results.json", "eval-validation.json", "eval-train.json",
                 ".tokenizer.tmp", ".recipe.yaml.tmp", "adapter", "README.md", "eval-test.json",
                 *(f"report-{s}.{ext}" for s in ("train", "validation", "test") for ext in ("txt", "png"))}


def prepare_run_dir(recipe: Recipe, resume: bool, force: bool) -> Path:
    run_dir = Path(recipe.output.dir)
    if dist.is_main() and run_dir.is_dir() and not resume:
        entries = {p.name for p in run_dir.iterdir()}
        trained = entries & {"checkpoints", "final"}
        if (trained or entries - RUN_ARTEFACTS) and not force:
            what = "holds a trained run" if trained else "holds files lmforge did not write"
            raise LmforgeError(f"{run_dir}: the run folder {what}; pass --resume to continue it "
                               "or --force to start over")
        if trained or force:
            shutil.rmtree(run_dir)
        else:  # leftovers of a run that failed before its first checkpoint
            for name in entries:
                shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise LmforgeError(f"{run_dir}: cannot write the run folder ({err.strerror})") from None
        tmp = run_dir / ".recipe.yaml.tmp"
        tmp.write_text(recipe.to_yaml())
        os.replace(tmp, run_dir / "recipe.yaml")
    dist.barrier()
    return run_dir


def get_tokenizer(recipe: Recipe, run_dir: Path):
    """The recipe's tokenizer: reused from a folder, from the run (on resume), or trained now."""
    saved = run_dir / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return load_tokenizer(saved)
    source = recipe.tokenizer.path or recipe.model.path
    if source:
        return objective_tokenizer(load_tokenizer(local_path(source)), recipe)
    if dist.is_main():
        save_tokenizer(objective_tokenizer(train_tokenizer_for(recipe.data, recipe.tokenizer), recipe), saved)
    dist.barrier()
    return load_tokenizer(saved)


def objective_tokenizer(tokenizer, recipe: Recipe):
    """What an objective adds to any tokenizer: span corruption's sentinels and closing EOS."""
    if recipe.objective.name == "span":
        from lmforge.objectives.span import add_sentinels, end_with_eos
        end_with_eos(add_sentinels(tokenizer, recipe.objective.sentinels))
    return tokenizer


def pretrain(recipe: Recipe, *, resume: bool = False, force: bool = False, show_progress: bool = True) -> Path:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    world, rank = _join_process_group(recipe)  # first: the set-up below uses barriers
    run_dir = prepare_run_dir(recipe, resume, force)
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
        loader = BlockLoader(data, cfg.batch_size, cfg.grad_accum, cfg.seed, world, rank, recipe.data.domain_weights)
    model = build_model(recipe.model, recipe.objective, tokenizer, seed=cfg.seed)
    fpt = flops_per_token(model, recipe.objective.block_size, head_fraction(recipe.objective))

    def evaluate(m):
        if data is None:
            return {}
        cap = cfg.eval_batches * world if cfg.eval_batches else None  # eval_batches is per process
        return evaluate_blocks(m, objective, data, batch_size=cfg.batch_size, max_batches=cap)

    engine = Engine(model, tokenizer, objective, loader, cfg, run_dir, evaluate=evaluate, flops_per_token=fpt,
                    tensorboard=recipe.output.tensorboard, plots=recipe.output.plots, show_progress=show_progress)
    if resume:
        engine.resume()
    if dist.is_main():
        n = count_parameters(model)
        console.print(f"[bold]{recipe.name}[/]: {recipe.objective.name} on {engine.device_type} "
                      f"({engine.precision}), {n['total'] / 1e6:.2f}M parameters, "
                      f"{len(data.train) if data else 'streamed'} training blocks of {recipe.objective.block_size}, "
                      f"global batch {loader.global_batch}")
    state = engine.fit()
    if dist.is_main():
        ckpt.save_model(run_dir / "final", model, tokenizer)
        final = next((h for h in reversed(state.history) if h.get("split") == "validation"), {})
        write_summary(run_dir, recipe, state, final, time.perf_counter() - t0, count_parameters(model))
    dist.barrier()
    dist.teardown()
    return run_dir


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
    if objective.name == "span":
        from lmforge.objectives.span import corrupted_lengths
        inputs, targets = corrupted_lengths(objective.block_size, objective.noise_density, objective.mean_span_length)
        return targets / (inputs + targets)
    return 1.0


def _join_process_group(recipe: Recipe) -> tuple[int, int]:
    dist.setup(pick_device(recipe.train.device))
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
