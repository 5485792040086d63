"""The fine-tuning recipe: a task (classification, NER, sentence embeddings or seq2seq), its data files and columns, the base model,
the training strategy (full, frozen layers, layer-wise LR decay, LoRA/peft) and the usual train/output sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import Field, model_validator

from lmforge.recipe import (DistConfig, DistillConfig, OutputConfig, Section, TrainConfig, read_yaml_mapping,
                            resolve_path, validate_tree)

TABLE_FORMATS = Literal["auto", "csv", "tsv", "jsonl", "parquet", "conll"]


class SplitFile(Section):
    path: str = Field(description="A CSV/TSV/JSONL/Parquet file (classification) or a CoNLL/JSONL file (NER).")
    format: TABLE_FORMATS = Field("auto", description="File format; 'auto' picks it from the extension.")


class SplitShares(Section):
    validation: float = Field(0.1, ge=0.0, lt=1.0, description="Share of data.train held out for validation.")
    test: float = Field(0.0, ge=0.0, lt=1.0, description="Share of data.train held out for test.")
    seed: int = Field(0, description="Seed of the split.")


class TaskData(Section):
    train: Optional[SplitFile] = Field(None, description="Training file.")
    validation: Optional[SplitFile] = Field(None, description="Development file: early stopping and the best checkpoint.")
    test: Optional[SplitFile] = Field(None, description="Test file, evaluated once at the end.")
    # classification
    header: bool = Field(True, description="CSV/TSV: the first row names the columns; false: there is no header "
                                          "and columns are 0-based indexes (text_column: 1).")
    text_column: Union[str, int] = Field("text", description="Column holding the text (classification): a name, "
                                                             "or a 0-based index.")
    text_pair_column: Optional[Union[str, int]] = Field(None, description="Column holding the second text of a pair.")
    label_column: Union[str, int] = Field("label", description="Column holding the label (classification).")
    label_names: Optional[Union[dict[Union[int, str], str], str]] = Field(
        None, description="Names of label codes, {0: negative, 1: positive}, or a file with one name per line "
                          "(line i names code i): reports, predictions and the model's id2label carry the names.")
    multi_label: bool = Field(False, description="Each row may carry several labels (sigmoid outputs).")
    label_separator: str = Field(",", description="Separates labels in one cell (multi-label); lists also work.")
    labels: Optional[list[str]] = Field(None, description="The label set, in order (default: inferred from train).")
    unknown_label: Optional[str] = Field(
        None, description="Map labels outside the label set to this label (default: such a label is an error).")
    # token classification
    token_column: int = Field(0, description="CoNLL column of the words.")
    tag_column: int = Field(-1, description="CoNLL column of the tags (negative counts from the end).")
    tokens_key: str = Field("tokens", description="JSONL key of the word list (NER).")
    tags_key: str = Field("tags", description="JSONL key of the tag list (NER).")
    scheme: Literal["bio", "iob1", "iobes"] = Field("bio", description="Tag scheme of the files (NER).")
    max_length: Optional[int] = Field(
        None, ge=8, description="Sub-word tokens per example (default: 128 or the model's limit if lower).")
    max_examples: Optional[int] = Field(None, ge=1, description="Use at most this many training examples.")
    # sentence embeddings
    pairs: Literal["columns", "next_sentence", "heading", "title"] = Field(
        "columns", description="Embedding or seq2seq pairs: 'columns' reads them from the columns below "
                               "(CSV/TSV/JSONL/Parquet); 'next_sentence' (embedding) makes them from a plain text "
                               "file: each sentence and the next sentence of its paragraph (one paragraph per line); "
                               "'heading' (seq2seq) makes (paragraph, the heading of its section) pairs from a "
                               "WikiText-style file (' = = Heading = = ' lines); 'title' (seq2seq) pairs each "
                               "paragraph with its article's title (' = Title = ').")
    query_column: Union[str, int] = Field("query", description="Column of the query (embedding pairs).")
    positive_column: Union[str, int] = Field(
        "positive", description="Column of the text that answers the query (embedding pairs), or the second text "
                                "of a scored pair.")
    negative_column: Optional[Union[str, int]] = Field(
        None, description="Column of a hard negative: a text that looks like an answer but is not (embedding pairs).")
    score_column: Optional[Union[str, int]] = Field(
        None, description="Column of a similarity score of the two texts (scored pairs, loss 'cosine').")
    # seq2seq
    source_column: Union[str, int] = Field("source", description="Column of the input text (seq2seq).")
    target_column: Union[str, int] = Field("target", description="Column of the text to generate (seq2seq).")
    max_target_length: int = Field(64, ge=2, description="Seq2seq: tokens per target, its end-of-sequence token "
                                                         "included; longer targets are truncated (with a warning).")
    max_eval_examples: Optional[int] = Field(
        None, ge=1, description="Use at most this many validation / test examples (the first ones).")
    split: Optional[SplitShares] = Field(
        None, description="Split data.train itself into train / validation / test, seeded (stratified by label for "
                          "classification, by sentence for NER), when there is no validation or test file.")


class BaseModelSpec(Section):
    path: str = Field(description="A local Hugging Face model folder, an lmforge run folder, or "
                                  "'package:NAME/folder' inside an installed Python package.")
    tokenizer: Optional[str] = Field(None, description="Tokenizer folder (default: the model's own).")
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Override the checkpoint's dropout.")


class PeftSpec(Section):
    method: Literal["lora", "ia3", "loha", "lokr"] = Field("lora", description="Which peft method.")
    r: int = Field(8, ge=1, description="Adapter rank (LoRA, LoHa, LoKr).")
    alpha: float = Field(16.0, gt=0.0, description="LoRA scaling numerator (alpha / r).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: Optional[list[str]] = Field(
        None, description="Module names to adapt (default: the attention projections of the family).")


class StrategyConfig(Section):
    method: Literal["full", "frozen", "peft"] = Field(
        "full", description="'full': train everything; 'frozen': freeze as below; 'peft': adapters (see peft).")
    freeze_embeddings: bool = Field(False, description="Do not train the embeddings.")
    freeze_layers: int = Field(0, ge=0, description="Do not train the bottom k transformer layers.")
    head_only: bool = Field(False, description="Train only the task head.")
    layer_lr_decay: float = Field(1.0, gt=0.0, le=1.0,
                                  description="Layer-wise LR decay: layer i of n gets lr * decay**(n - i).")
    head_lr: Optional[float] = Field(None, gt=0.0, description="Learning rate of the task head (default: train.lr).")
    peft: PeftSpec = Field(default_factory=PeftSpec, description="Adapter settings for method 'peft'.")


class EmbeddingConfig(Section):
    pooling: Literal["mean", "cls"] = Field("mean", description="Sentence vector: the mean of the token vectors, "
                                                                "or the first ([CLS]) token's vector.")
    loss: Literal["in_batch", "cosine"] = Field(
        "in_batch", description="'in_batch': multiple-negatives ranking (InfoNCE): each query's positive against "
                                "the other positives and hard negatives of the batch; 'cosine': the cosine of a "
                                "scored pair regressed onto its score.")
    temperature: float = Field(0.05, gt=0.0, description="Softmax temperature of the in-batch loss "
                                                         "(0.05: cosines scaled by 20).")
    mask_duplicates: bool = Field(True, description="In-batch loss: an other row's text equal to this row's query or "
                                                    "positive is not counted as a negative (it is a false negative).")
    score_max: float = Field(1.0, gt=0.0, description="Scored pairs: the score that means 'same meaning' "
                                                      "(5 for STS); scores are divided by it to match cosines.")
    recall_at: list[int] = Field([1, 5, 10], description="Evaluation: recall@k for each k (and MRR) when each "
                                                        "held-out query ranks every held-out positive.")


class Seq2SeqConfig(Section):
    num_beams: int = Field(1, ge=1, description="Evaluation and predict: 1 decodes greedily, more runs beam search "
                                                "with this many beams.")
    length_penalty: float = Field(1.0, description="Beam search: scores are divided by length ** length_penalty "
                                                   "(above 0 favours longer outputs).")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Tokens generated per example at most (default: "
                                                                  "data.max_target_length).")
    source_prefix: str = Field("", description="Text put before every source (T5's task prefix, "
                                               "e.g. 'summarize: ').")


class FinetuneTrain(TrainConfig):
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps (default: from epochs).")
    epochs: float = Field(3.0, gt=0.0, description="Passes over the training data.")
    lr: float = Field(5e-5, gt=0.0, description="Peak learning rate.")
    min_lr: Optional[float] = Field(0.0, ge=0.0, description="Final learning rate.")
    warmup_steps: float = Field(0.06, ge=0.0, description="Warmup steps; a value below 1 is a fraction.")
    schedule: Literal["cosine", "linear", "constant"] = Field("linear", description="Decay after warmup.")
    eval_every: Optional[int] = Field(None, ge=0, description="Evaluate every N steps (default: each epoch).")
    metric: Optional[str] = Field(None, description="Dev metric for the best checkpoint (default: accuracy / f1).")
    metric_mode: Literal["min", "max"] = Field("max", description="Whether lower or higher is better.")
    keep_last: int = Field(1, ge=1, description="Step checkpoints kept (the best is kept apart).")
    class_weights: Optional[Union[Literal["balanced"], dict[str, float]]] = Field(
        None, description="Loss weights per label: 'balanced' (inverse frequency) or a mapping label → weight.")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding).")
    eval_batch_size: int = Field(128, ge=1, description="Examples per evaluation batch.")
    adversarial: Literal["none", "fgm", "pgd"] = Field(
        "none", description="Adversarial training (classification, NER): 'fgm' runs each batch again on word "
                            "embeddings moved by adversarial_epsilon along their gradient (about one more forward "
                            "and backward per step); 'pgd' moves them adversarial_steps times by adversarial_alpha, "
                            "kept within adversarial_epsilon (about adversarial_steps more); the share of step time "
                            "is logged as adversarial_share.")
    adversarial_epsilon: float = Field(1.0, gt=0.0, description="FGM step, or PGD's bound: the L2 norm of the "
                                                                "perturbation of the embedding matrix.")
    adversarial_alpha: float = Field(0.3, gt=0.0, description="PGD: the L2 norm of each of its moves (before the "
                                                              "projection onto the adversarial_epsilon ball).")
    adversarial_steps: int = Field(3, ge=1, description="PGD: moves (each one more forward and backward) per "
                                                        "training step.")


class FinetuneRecipe(Section):
    name: str = Field("finetune", description="Name of the run.")
    task: Literal["classification", "ner", "embedding", "seq2seq"] = Field(
        description="Sequence classification, token classification, sentence embeddings or seq2seq (an "
                    "encoder-decoder model generating a target text from a source text).")
    data: TaskData = Field(default_factory=TaskData)
    model: BaseModelSpec
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: FinetuneTrain = Field(default_factory=FinetuneTrain)
    dist: DistConfig = Field(default_factory=DistConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig, description="Sentence embeddings "
                                                                                     "(task: embedding).")
    seq2seq: Seq2SeqConfig = Field(default_factory=Seq2SeqConfig, description="Generation settings (task: seq2seq).")
    output: OutputConfig = Field(default_factory=lambda: OutputConfig(dir="runs/finetune"))
    distill: Optional[DistillConfig] = Field(None, description="Knowledge distillation from a fine-tuned teacher "
                                                               "(lmforge distill).")

    @model_validator(mode="after")
    def _needs_train(self) -> "FinetuneRecipe":
        if self.data.train is None:
            raise ValueError("data.train: a fine-tuning recipe needs a training file")
        shares = self.data.split
        if shares is not None:
            if shares.validation + shares.test >= 1.0:
                raise ValueError("data.split: validation + test must leave some of data.train for training")
            for name in ("validation", "test"):
                if getattr(shares, name) > 0 and getattr(self.data, name) is not None:
                    raise ValueError(f"data.split.{name}: data.{name} is a file already; set data.split.{name}: 0 "
                                     f"or leave data.{name} out")
        if self.task == "embedding":
            scored = self.data.score_column is not None
            if scored != (self.embedding.loss == "cosine"):
                raise ValueError("embedding.loss: 'cosine' trains on scored pairs (set data.score_column), "
                                 "'in_batch' on (query, positive[, negative]) pairs (no data.score_column)")
            if self.strategy.method == "peft":
                raise ValueError("strategy.method: peft is for classification and NER; embeddings train fully "
                                 "or with frozen layers")
            if self.train.adversarial != "none":
                raise ValueError("train.adversarial: adversarial training is for classification and NER")
        if self.task == "seq2seq":
            # freezing and layer-wise decay find layers by an encoder's numbering, which T5's blocks do not follow
            st = self.strategy
            changed = [name for name, on in (("method", st.method != "full"),
                                             ("freeze_embeddings", st.freeze_embeddings),
                                             ("freeze_layers", st.freeze_layers > 0), ("head_only", st.head_only),
                                             ("layer_lr_decay", st.layer_lr_decay != 1.0),
                                             ("head_lr", st.head_lr is not None)) if on]
            if changed:
                raise ValueError(f"strategy.{changed[0]}: seq2seq trains every weight at train.lr; freezing, "
                                 "layer-wise decay, a head learning rate and peft are for classification and NER")
            if self.train.adversarial != "none":
                raise ValueError("train.adversarial: adversarial training is for classification and NER")
        if self.data.pairs == "next_sentence" and self.task != "embedding":
            raise ValueError("data.pairs: 'next_sentence' makes embedding pairs (task: embedding)")
        if self.data.pairs in ("heading", "title") and self.task != "seq2seq":
            raise ValueError(f"data.pairs: '{self.data.pairs}' makes seq2seq pairs (task: seq2seq)")
        return self

    @property
    def metric(self) -> str:
        if self.task == "seq2seq":
            return self.train.metric or "rougeL"
        if self.task == "embedding":
            return self.train.metric or ("spearman" if self.embedding.loss == "cosine" else "mrr")
        return self.train.metric or ("accuracy" if self.task == "classification" else "f1")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def finetune_recipe_from_dict(tree: dict, source: str = "recipe", overrides=()) -> FinetuneRecipe:
    return validate_tree(FinetuneRecipe, tree, source, overrides)


def load_finetune_recipe(path, overrides=()) -> FinetuneRecipe:
    tree = read_yaml_mapping(path, "a fine-tuning recipe is a mapping of sections (task, data, model, ...)")
    recipe = finetune_recipe_from_dict(tree, str(path), overrides)
    base = Path(path).parent
    for split in ("train", "validation", "test"):
        spec = getattr(recipe.data, split)
        if spec is not None:
            spec.path = resolve_path(spec.path, base)
    if not recipe.model.path.startswith("package:"):
        recipe.model.path = resolve_path(recipe.model.path, base)
    recipe.model.tokenizer = resolve_path(recipe.model.tokenizer, base)
    if isinstance(recipe.data.label_names, str):
        recipe.data.label_names = resolve_path(recipe.data.label_names, base)
    if recipe.distill:
        recipe.distill.teacher = resolve_path(recipe.distill.teacher, base)
    return recipe
