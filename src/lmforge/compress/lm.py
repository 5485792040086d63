"""What a compress step needs of a causal LM (a GPT-2 pretraining run) in place of a classifier's task data: the
run's pretraining recipe, next-token loss on its training blocks to rank heads and neurons by, and validation
perplexity as the quality the report shows. Recovery is continued pretraining with a pretraining recipe
(`finetune: {recipe: recipes/shakespeare-gpt2-clm.yaml}`), the model loaded from the previous step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from lmforge.data.blocks import build_blocks
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate_blocks
from lmforge.objectives import build_objective
from lmforge.recipe import Recipe, load_recipe
from lmforge.tasks.report import write_text_atomic

LM_HEADS = ("LMHeadModel", "ForCausalLM")


def is_causal_lm(config: dict) -> bool:
    return any(a.endswith(LM_HEADS) for a in config.get("architectures") or [])


def lm_recipe(source: Path, trained: list[tuple[str, list[str]]]) -> Recipe:
    """The pretraining recipe whose corpus ranks units and scores perplexity: the run's own, else the first
    finetune step's; anything but a causal LM objective is refused."""
    if (source / "recipe.yaml").is_file():
        recipe, where = load_recipe(source / "recipe.yaml"), source / "recipe.yaml"
    elif trained:
        recipe, where = load_recipe(trained[0][0], trained[0][1]), trained[0][0]
    else:
        raise LmforgeError(f"model: {source} is a model folder without a recipe; the steps need its corpus: give "
                           "its pretraining run folder or a finetune step with a pretraining recipe")
    if recipe.objective.name != "clm":
        raise LmforgeError(f"{where}: objective.name is {recipe.objective.name!r}; compress works on causal LMs "
                           "(clm) among pretrained models")
    if recipe.data.streaming:
        raise LmforgeError(f"{where}: data.streaming: compress scores perplexity on the cached blocks; use the "
                           "recipe without streaming")
    if recipe.data.validation_fraction == 0 and not any(s.split == "validation" for s in recipe.data.sources):
        raise LmforgeError(f"{where}: the data has no validation documents to score perplexity on (raise "
                           "data.validation_fraction or give a source with split: validation)")
    return recipe


def mean_loss_of(objective) -> Callable:
    """`loss_of(model, batch)`: the objective's loss per counted token, what structured pruning ranks units by."""
    def loss_of(model, batch):
        total, count, _ = objective.loss(model, batch)
        return total / count.clamp(min=1)
    return loss_of


class LmData:
    """The recipe's token blocks and objective, for a model with `tokenizer`."""

    def __init__(self, recipe: Recipe, tokenizer):
        self.recipe = recipe
        self.objective = build_objective(recipe.objective, tokenizer, seed=recipe.train.seed)
        self.blocks = build_blocks(recipe.data, tokenizer, recipe.objective)

    def train_batches(self, count: int, size: int) -> list[dict]:
        """The first `count` batches of `size` training blocks (fewer when the corpus is smaller)."""
        n = min(count * size, len(self.blocks.train))
        batches = []
        for start in range(0, n, size):
            rows = list(range(start, min(start + size, n)))
            ids, domains = self.blocks.batch("train", rows)
            batches.append(self.objective.make_batch(torch.from_numpy(ids), torch.tensor(rows),
                                                     torch.from_numpy(domains)))
        return batches

    def mean_loss(self) -> Callable:
        return mean_loss_of(self.objective)

    def scores(self, model, split: str) -> dict:
        if split == "validation" and self.blocks.validation is None:
            raise LmforgeError("the pretraining recipe's data has no validation documents to score perplexity on "
                               "(raise data.validation_fraction)")
        metrics = evaluate_blocks(model, self.objective, self.blocks, split=split,
                                  batch_size=self.recipe.train.batch_size)
        if "ppl" not in metrics:
            raise LmforgeError("the pretraining recipe's validation documents hold no full block of "
                               f"{self.recipe.objective.block_size} tokens to score perplexity on")
        return metrics

    def write_scores(self, folder: Path, model, split: str) -> dict:
        """eval-SPLIT.json as `lmforge eval` writes it for a pretraining run; returns the scores."""
        metrics = self.scores(model, split)
        write_text_atomic(folder / f"eval-{split}.json", json.dumps(metrics, indent=2))
        return metrics
