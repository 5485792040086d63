"""Seq2seq fine-tuning (task `seq2seq`): an encoder-decoder model (a T5 from span-corruption pretraining, or any
local HF T5 folder) trained with teacher forcing on (source, target) pairs, evaluated by generating.

    RUN/
      recipe.yaml  metrics.jsonl  loss.png  results.json  README.md
      final/        the model + tokenizer, its generation_config.json set to the run's decoding
      best/ checkpoints/
      eval-{split}.json  report-{split}.txt  predictions-{split}.jsonl    ROUGE-1/2/L, BLEU, loss; every prediction
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from lmforge.engine import checkpoint as ckpt
from lmforge.engine import distributed as dist
from lmforge.engine.hardware import threads_note
from lmforge.engine.logging import console
from lmforge.engine.loop import Engine
from lmforge.errors import LmforgeError
from lmforge.finetune.flops import seq2seq_batch_flops
from lmforge.finetune.setup import fit_and_pick, open_base, train_settings
from lmforge.models.compressed import is_quantized, load_pretrained
from lmforge.objectives.base import Objective
from lmforge.runs import start_run
from lmforge.stage import RunResult
from lmforge.tasks import model as tm
from lmforge.tasks.config import FinetuneRecipe
from lmforge.tasks.seq2seq import (ROUGE_KEYS, generation_ids, score_seq2seq, teacher_forced_logits,
                                   write_seq2seq_report)
from lmforge.tasks.seq2seq_data import Seq2SeqLoader, encode_splits, read_seq2seq_splits
from lmforge.tasks.splits import source_of, write_text_atomic


class Seq2SeqObjective(Objective):
    """Teacher forcing: the decoder reads the target shifted right (from its start token) and predicts each next
    token; the loss is summed over target tokens (labels -100 on padding are left out), one unit per token."""

    name = "seq2seq"

    def make_batch(self, batch, _positions=None, _domains=None) -> dict:
        return batch

    def token_counts(self, batch: dict) -> torch.Tensor:
        return (batch["labels"] != -100).sum(dim=1)

    def count_inputs(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())

    def loss(self, model, batch: dict):
        logits = teacher_forced_logits(model, batch)
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                ignore_index=-100, reduction="sum")
        return total, self.token_counts(batch).sum(), None


def build_seq2seq_model(folder: Path, tokenizer, dropout: Optional[float], seed: int):
    """The base checkpoint as an encoder-decoder LM; anything else is refused in one line."""
    torch.manual_seed(seed)
    if is_quantized(folder):
        raise LmforgeError(f"{folder}: an int8 model is for inference only; fine-tune the model it was quantized "
                           "from, then quantize again")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if not getattr(config, "is_encoder_decoder", False):
        raise LmforgeError(f"model.path: {folder} holds a {config.model_type} model, not an encoder-decoder; task "
                           "seq2seq needs a T5-family model (e.g. a run of recipes/wikitext2-t5-span.yaml)")
    if getattr(config, "decoder_start_token_id", None) is None:  # T5 starts decoding from its pad token
        config.decoder_start_token_id = config.pad_token_id
    if dropout is not None and hasattr(config, "dropout_rate"):
        config.dropout_rate = dropout
    try:
        model = load_pretrained(AutoModelForSeq2SeqLM, folder, config=config)
    except (ValueError, KeyError) as err:
        raise LmforgeError(f"{folder}: cannot load as a seq2seq model: {str(err).splitlines()[0]}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise LmforgeError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
                           f"{model.get_input_embeddings().num_embeddings}; use the checkpoint's own tokenizer")
    return model.train()


def set_generation_config(model, tokenizer, recipe: FinetuneRecipe) -> None:
    """The saved generation_config.json starts, stops and pads as the run evaluated, and allows its target length.
    Beams stay out of it: `lmforge predict` takes them from the recipe, and `generate` / `serve` callers choose
    their own decoding (a streamed completion cannot use beams)."""
    gen = model.generation_config
    for name, value in generation_ids(model, tokenizer).items():
        setattr(gen, name, value)
    gen.max_new_tokens = recipe.seq2seq.max_new_tokens or recipe.data.max_target_length


def finetune_seq2seq(recipe: FinetuneRecipe, *, resume: bool = False, force: bool = False,
                     show_progress: bool = True,
                     on_eval: Optional[Callable[[int, dict], Optional[str]]] = None) -> RunResult:
    """`finetune()` for task `seq2seq`: train with teacher forcing, report the held-out splits by generating."""
    cfg = recipe.train
    folder, tokenizer, t0 = open_base(recipe)
    splits = read_seq2seq_splits(recipe)
    encoded = encode_splits(recipe, tokenizer, splits)
    with start_run(recipe, resume, force) as run_dir:  # a failed set-up leaves nothing
        model = build_seq2seq_model(folder, tokenizer, recipe.model.dropout, cfg.seed)
        tm.apply_freezing(model, recipe.strategy)
        trainable, total = tm.trainable_counts(model)
        if not trainable:
            raise LmforgeError("strategy: every parameter is frozen; nothing would train")
        loader = Seq2SeqLoader(encoded["train"], cfg.batch_size, cfg.grad_accum, cfg.seed, tokenizer.pad_token_id,
                               group_by_length=cfg.group_by_length, world=dist.world_size(), rank=dist.rank())
        train_cfg = train_settings(recipe, loader)
        scored_at = {}  # validation scores by step: the final report reuses those of the weights it reports on

        def evaluate(m) -> dict:
            if "validation" not in splits:
                return {}
            scored_at[engine.state.step] = score_seq2seq(m, tokenizer, splits["validation"], encoded["validation"],
                                                         recipe)
            return {k: v for k, v in scored_at[engine.state.step]["metrics"].items() if isinstance(v, float)}

        engine = Engine(model, tokenizer, Seq2SeqObjective(), loader, train_cfg, run_dir, evaluate=evaluate,
                        started=t0, on_eval=on_eval, dist_cfg=recipe.dist, batch_flops=seq2seq_batch_flops(model),
                        tensorboard=recipe.output.tensorboard, plots=recipe.output.plots,
                        show_progress=show_progress,
                        param_groups=tm.param_groups(model, cfg.weight_decay, recipe.strategy, cfg.lr))
        if resume:
            engine.resume()
        if dist.is_main():
            console.print(f"[bold]{recipe.name}[/]: seq2seq, {len(splits['train']):,} training pairs, "
                          f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained, {train_cfg.max_steps} "
                          f"steps ({loader.steps_per_epoch} per epoch) on {engine.device_type}"
                          f"{threads_note(cfg.threads, engine.device_type)}")
    state, model, reported_step = fit_and_pick(engine, run_dir)
    results = {}
    if dist.is_main():
        model.eval()
        for split in ("validation", "test"):
            if split in splits:
                known = scored_at.get(reported_step) if split == "validation" else None
                scored = known or score_seq2seq(model, tokenizer, splits[split], encoded[split], recipe)
                title = f"{recipe.name}: {split} ({source_of(recipe.data, split)})"
                results[split] = write_seq2seq_report(run_dir, split, title, splits[split], scored)
        set_generation_config(model, tokenizer, recipe)
        ckpt.save_model(run_dir / "final", model, tokenizer)
        seconds = engine.wall_seconds()
        write_seq2seq_card(run_dir, recipe, splits, results, state, seconds)
        (run_dir / "results.json").write_text(json.dumps(
            {"steps": state.step, "seconds": seconds, "best_step": state.best_step, **results}, indent=2))
    dist.barrier()
    dist.teardown()
    return RunResult(run_dir, {split: {k: v for k, v in m.items() if isinstance(v, float)}
                               for split, m in results.items()})


def write_seq2seq_card(run_dir: Path, recipe: FinetuneRecipe, splits: dict, results: dict, state,
                       seconds: float) -> None:
    s2s = recipe.seq2seq
    decoding = "greedy decoding" if s2s.num_beams == 1 else f"beam search ({s2s.num_beams} beams)"
    lines = [f"# {recipe.name}", "",
             f"A seq2seq model fine-tuned with lmforge from `{recipe.model.path}`; evaluated with {decoding}.", "",
             "## Data", ""]
    lines += [f"- {split}: `{source_of(recipe.data, split)}` ({len(pairs):,} pairs)" for split, pairs in splits.items()]
    lines += ["", "## Training", "",
              f"- {state.step} steps, batch {recipe.train.batch_size} x {recipe.train.grad_accum}, "
              f"lr {recipe.train.lr}, {seconds:.0f} s wall time",
              f"- best {recipe.metric} on validation at step {state.best_step}: {state.best_metric}", "",
              "## Scores", "", "| split | " + " | ".join(ROUGE_KEYS) + " | bleu |", "|---" * (len(ROUGE_KEYS) + 2) + "|"]
    for split, m in results.items():
        lines.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" for k in ROUGE_KEYS) + f" | {m['bleu']:.2f} |")
    lines += ["", "Predictions: `predictions-*.jsonl`; reports: `report-*.txt`; the full recipe: `recipe.yaml`.", "",
              "## Use", "", "```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
              f"model = AutoModelForSeq2SeqLM.from_pretrained('{run_dir}/final')", "```", "",
              f"or `lmforge predict {run_dir} --input FILE.jsonl --output preds.jsonl`.", ""]
    write_text_atomic(Path(run_dir) / "README.md", "\n".join(lines))
