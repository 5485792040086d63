"""Fine-tuning for sentence embeddings (task `embedding`): pairs → encoder → contrastive engine run → a run folder
whose final/ model is also a sentence-transformers folder.

    RUN/
      recipe.yaml  metrics.jsonl  loss.png  results.json  README.md
      final/        encoder + tokenizer + modules.json, sentence_bert_config.json, 1_Pooling/ (+ 2_Normalize/):
                    AutoModel and SentenceTransformer load it
      best/ checkpoints/
      eval-{split}.json  report-{split}.txt    recall@k and MRR (or Spearman for scored pairs)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.checkpoint import load_weights
from lmforge.engine.logging import console
from lmforge.engine.loop import Engine
from lmforge.errors import LmforgeError
from lmforge.finetune.contrastive import EmbeddingObjective
from lmforge.finetune.flops import task_batch_flops
from lmforge.finetune.setup import open_base, train_settings
from lmforge.models.compressed import load_pretrained
from lmforge.runs import start_run
from lmforge.stage import RunResult
from lmforge.tasks import model as tm
from lmforge.tasks.config import FinetuneRecipe
from lmforge.tasks.embed import SentenceEncoder, write_sentence_transformers_files
from lmforge.tasks.pairs import PairLoader, encode_pairs, read_pair_splits
from lmforge.tasks.report import source_of, write_text_atomic
from lmforge.tasks.retrieval import pair_metrics, write_pair_report

DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
            "attention_dropout")


def build_encoder(folder: Path, tokenizer, dropout: Optional[float], seed: int):
    """The base checkpoint's encoder (any head it had is left out) with the recipe's dropout."""
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    for name in DROPOUTS if dropout is not None else ():
        if hasattr(config, name):
            setattr(config, name, dropout)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a masked-LM head is expected to be left out, a pooler to be new
    try:
        model = load_pretrained(AutoModel, folder, config=config)
    except (ValueError, KeyError) as err:
        raise LmforgeError(f"{folder}: cannot load as an encoder: {str(err).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise LmforgeError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
                           f"{model.get_input_embeddings().num_embeddings}; use the checkpoint's own tokenizer")
    return model.train()


def finetune_embedding(recipe: FinetuneRecipe, *, resume: bool = False, force: bool = False,
                       show_progress: bool = True,
                       on_eval: Optional[Callable[[int, dict], Optional[str]]] = None) -> RunResult:
    """`finetune()` for task `embedding`: train on the pairs, report the held-out splits, export final/."""
    cfg, emb = recipe.train, recipe.embedding
    folder, tokenizer, t0 = open_base(recipe)
    splits = read_pair_splits(recipe)
    train = encode_pairs(tokenizer, splits["train"], recipe.data.max_length)
    if train.truncated:
        console.print(f"[yellow]{source_of(recipe.data, 'train')}: {train.truncated} texts truncated to "
                      f"{recipe.data.max_length} tokens")
    with start_run(recipe, resume, force) as run_dir:  # a failed set-up leaves nothing
        model = build_encoder(folder, tokenizer, recipe.model.dropout, cfg.seed)
        tm.apply_freezing(model, recipe.strategy)
        trainable, total = tm.trainable_counts(model)
        if not trainable:
            raise LmforgeError("strategy: every parameter is frozen; nothing would train")
        loader = PairLoader(train, cfg.batch_size, cfg.grad_accum, cfg.seed, tokenizer.pad_token_id,
                            group_by_length=cfg.group_by_length, world=dist.world_size(), rank=dist.rank())
        train_cfg = train_settings(recipe, loader)
        encoder = SentenceEncoder(model, tokenizer, emb.pooling, True, recipe.data.max_length)

        scored_at = {}  # validation scores by step: the final report reuses those of the weights it reports on

        def evaluate(_model) -> dict:
            if "validation" not in splits:
                return {}
            scored_at[engine.state.step] = pair_metrics(encoder, splits["validation"], emb.recall_at,
                                                        cfg.eval_batch_size)
            return scored_at[engine.state.step]

        engine = Engine(model, tokenizer, EmbeddingObjective(emb), loader, train_cfg, run_dir, evaluate=evaluate,
                        started=t0, on_eval=on_eval, dist_cfg=recipe.dist,
                        batch_flops=task_batch_flops(model, "embedding", False),
                        tensorboard=recipe.output.tensorboard, plots=recipe.output.plots,
                        show_progress=show_progress,
                        param_groups=tm.param_groups(model, cfg.weight_decay, recipe.strategy, cfg.lr))
        if resume:
            engine.resume()
        if dist.is_main():
            console.print(f"[bold]{recipe.name}[/]: embedding ({emb.loss}, {emb.pooling} pooling), "
                          f"{len(train):,} training pairs, {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
                          f"trained, {train_cfg.max_steps} steps ({loader.steps_per_epoch} per epoch)")
    state = engine.fit()
    results = {}
    if dist.is_main():
        reported_step = state.step
        if (run_dir / "best").is_dir():  # the dev metric's best step, not the last one
            load_weights(model, run_dir / "best", engine.device)
            reported_step = state.best_step
        model.eval()
        for split in ("validation", "test"):
            if split in splits:
                known = scored_at.get(reported_step) if split == "validation" else None
                results[split] = write_pair_report(run_dir, recipe, split, known or pair_metrics(
                    encoder, splits[split], emb.recall_at, cfg.eval_batch_size))
        export_encoder(run_dir, model, tokenizer, recipe)
        seconds = engine.wall_seconds()
        write_embedding_card(run_dir, recipe, splits, results, state, seconds)
        (run_dir / "results.json").write_text(json.dumps(
            {"steps": state.step, "seconds": seconds, "best_step": state.best_step, **results}, indent=2))
    dist.barrier()
    dist.teardown()
    return RunResult(run_dir, {split: {k: v for k, v in m.items() if isinstance(v, float)}
                               for split, m in results.items()})


def export_encoder(run_dir: Path, model, tokenizer, recipe: FinetuneRecipe) -> None:
    """final/: the encoder, its tokenizer and the sentence-transformers files, put in place in one rename."""
    tmp = run_dir / ".final.sentence"
    ckpt.save_model(tmp, model, tokenizer)
    write_sentence_transformers_files(tmp, recipe.embedding.pooling, True, recipe.data.max_length,
                                      model.config.hidden_size)
    final = run_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_embedding_card(run_dir: Path, recipe: FinetuneRecipe, splits: dict, results: dict, state,
                         seconds: float) -> None:
    emb = recipe.embedding
    lines = [f"# {recipe.name}", "",
             f"A sentence-embedding model fine-tuned with lmforge from `{recipe.model.path}`: {emb.pooling} pooling, "
             f"L2-normalised vectors, loss `{emb.loss}`"
             + (f" (temperature {emb.temperature})" if emb.loss == "in_batch" else "") + ".", "", "## Data", ""]
    lines += [f"- {split}: `{source_of(recipe.data, split)}` ({len(pairs):,} pairs)" for split, pairs in splits.items()]
    lines += ["", "## Training", "",
              f"- {state.step} steps, batch {recipe.train.batch_size} x {recipe.train.grad_accum}, "
              f"lr {recipe.train.lr}, {seconds:.0f} s wall time",
              f"- best {recipe.metric} on validation at step {state.best_step}: {state.best_metric}", "",
              "## Scores", ""]
    for split, metrics in results.items():
        lines.append(f"- {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    lines += ["", "## Use", "", "```python", "from sentence_transformers import SentenceTransformer",
              f"model = SentenceTransformer('{run_dir}/final')", "```", "",
              f"or `lmforge index {run_dir} --input DOCS.jsonl --out {run_dir}/index`, then `lmforge retrieve`.", ""]
    write_text_atomic(Path(run_dir) / "README.md", "\n".join(lines))
