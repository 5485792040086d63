"""Typed recipes: one YAML file describes a run; each section is a pydantic model.

Unknown keys are errors that name the closest valid key; wrong types name the field and the value.
`--set train.lr=3e-4` overrides a field before validation.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmforge import registry
from lmforge.errors import LmforgeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Section):
    path: str = Field(description="A file, a folder or a glob (text, JSONL, CSV/TSV, Parquet).")
    domain: str = Field("default", description="Domain tag given to every document of this source.")
    format: Literal["auto", "text", "jsonl", "csv", "tsv", "parquet"] = Field(
        "auto", description="File format; 'auto' picks it from the extension.")
    text_column: str = Field("text", description="Column (or JSON key) holding the text.")
    sample_by: Literal["document", "paragraph", "line"] = Field(
        "paragraph", description="For text files: what one document is.")
    split: Optional[Literal["train", "validation"]] = Field(
        None, description="Put the whole source in this split instead of splitting by fraction.")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description="Where the text comes from.")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0,
                                       description="Seeded fraction of documents held out for validation.")
    split_seed: int = Field(0, description="Seed of the train/validation split.")
    streaming: bool = Field(False, description="Stream sources instead of building an Arrow cache.")
    num_proc: int = Field(1, ge=1, description="Processes used to tokenize.")
    cache_dir: Optional[str] = Field(None, description="Tokenized-data cache (default ~/.cache/lmforge).")
    only_domains: Optional[list[str]] = Field(None, description="Keep only documents of these domains.")
    domain_weights: Optional[dict[str, float]] = Field(
        None, description="Share of each domain in training batches, e.g. {legal: 0.8, general: 0.2} to replay "
                          "general text while adapting to a domain (blocks drawn with replacement within a "
                          "domain); default: every block once per epoch, so domains in proportion to size.")
    domain_clusters: Optional[str] = Field(
        None, description="A clustering folder (RUN/clusters of `lmforge experts branch` with experts.clusters): "
                          "each document's domain becomes its nearest cluster, cluster-<c>.")

    @model_validator(mode="after")
    def _positive_weights(self) -> "DataConfig":
        if self.domain_weights is not None:
            bad = {d: w for d, w in self.domain_weights.items() if not w > 0}
            if bad or not self.domain_weights:
                raise ValueError(f"data.domain_weights: every weight must be positive (got {bad or 'none'})")
        return self


class TokenizerConfig(Section):
    path: Optional[str] = Field(None, description="Reuse the tokenizer of a local HF folder.")
    kind: Literal["wordpiece", "bpe", "unigram", "char"] = Field("bpe", description="Algorithm to train.")
    vocab_size: int = Field(8000, ge=8, description="Target vocabulary size (ignored for 'char').")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for merges.")
    lowercase: bool = Field(False, description="Lowercase text before tokenizing (WordPiece).")
    max_train_documents: Optional[int] = Field(None, ge=1, description="Train on at most this many documents.")


class ModelConfig(Section):
    family: Optional[str] = Field(
        None, description="Architecture family when training from scratch: bert, roberta, electra, gpt2, llama, t5 "
                          "or a registered one.")
    size: Literal["tiny", "small", "base"] = Field("tiny", description="Size preset.")
    path: Optional[str] = Field(None, description="Local HF checkpoint folder to continue from.")
    n_layers: Optional[int] = Field(None, ge=1, description="Override the preset's layer count.")
    d_model: Optional[int] = Field(None, ge=8, description="Override the preset's hidden size.")
    n_heads: Optional[int] = Field(None, ge=1, description="Override the preset's attention heads.")
    d_ff: Optional[int] = Field(None, ge=8, description="Override the feed-forward size (default 4*d_model).")
    max_positions: Optional[int] = Field(None, ge=8, description="Position limit (default: block size).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout everywhere.")

    _known_family = field_validator("family")(lambda cls, v: v if v is None else registry.FAMILIES.check(v))

    @model_validator(mode="after")
    def _one_origin(self) -> "ModelConfig":
        if self.family is None and self.path is None:
            raise ValueError("set model.family (from scratch) or model.path (a local checkpoint)")
        return self



class ObjectiveConfig(Section):
    name: str = Field(
        "clm", description="clm (causal LM), mlm (masked LM), mlm+nsp / mlm+sop (masked LM plus next-sentence or "
                           "sentence-order prediction), electra (replaced-token detection), span (T5 span corruption), "
                           "or a registered objective.")
    block_size: int = Field(128, ge=8, description="Tokens per training sequence (span: raw tokens before noising).")
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="Fraction of tokens selected (MLM, ELECTRA).")
    whole_word: bool = Field(False, description="Mask whole words rather than sub-words (MLM, ELECTRA).")
    document_mask: bool = Field(False, description="Packed documents do not attend to each other (CLM).")
    segment_by: Literal["sentence", "line"] = Field(
        "sentence", description="NSP/SOP: a document's segments are its sentences or its lines.")
    pair_probability: float = Field(0.5, gt=0.0, lt=1.0,
                                    description="NSP: share of random next segments; SOP: share of swapped pairs.")
    generator_fraction: float = Field(0.25, gt=0.0, le=1.0,
                                      description="ELECTRA: generator width as a fraction of the discriminator's.")
    rtd_weight: float = Field(50.0, gt=0.0, description="ELECTRA: weight of the replaced-token-detection loss.")
    noise_density: float = Field(0.15, gt=0.0, lt=1.0, description="Span corruption: fraction of tokens noised.")
    mean_span_length: float = Field(3.0, ge=1.0, description="Span corruption: mean length of a noised span.")
    sentinels: int = Field(100, ge=1, description="Span corruption: sentinel tokens added to the tokenizer.")

    _known_name = field_validator("name")(lambda cls, v: registry.OBJECTIVES.check(v))

    @property
    def kind(self) -> str:
        """The built-in objective this one behaves like: its data layout, model head and families."""
        return registry.objective_kind(self.name)

    @property
    def masked(self) -> bool:
        """Encoder objectives built on masked-LM data (the model is an encoder)."""
        return self.kind in ("mlm", "mlm+nsp", "mlm+sop", "electra")

    @property
    def pairs(self) -> bool:
        return self.kind in ("mlm+nsp", "mlm+sop")


class TrainConfig(Section):
    batch_size: int = Field(32, ge=1, description="Sequences per micro-batch per device.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    lr: float = Field(5e-4, gt=0.0, description="Peak learning rate.")
    min_lr: Optional[float] = Field(None, ge=0.0, description="Final learning rate (default lr/10).")
    warmup_steps: float = Field(0.0, ge=0.0, description="Warmup steps; a value below 1 is a fraction.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decay on 2-D weights only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    grad_clip: Optional[float] = Field(1.0, gt=0.0, description="Clip the gradient norm (null: off).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA when supported, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the model.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    eval_every: int = Field(200, ge=0, description="Evaluate every N steps (0: only at the end).")
    eval_batches: Optional[int] = Field(None, ge=1, description="Cap on validation batches per process per evaluation.")
    log_every: int = Field(10, ge=1, description="Log training metrics every N steps.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: at each evaluation).")
    keep_last: int = Field(2, ge=1, description="Step checkpoints kept (the best is kept apart).")
    early_stopping_patience: Optional[int] = Field(None, ge=1,
                                                   description="Stop after N evaluations without improvement.")
    metric: str = Field("loss", description="Validation metric that picks the best checkpoint.")
    metric_mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many NaN/inf losses in a row.")
    eval_at_start: bool = Field(False, description="Also evaluate before the first step (the 'before' of "
                                                   "continued pretraining).")
    seed: int = Field(0, description="Seed of initialisation, data order, masking and dropout.")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads (default: torch's choice).")


class DistConfig(Section):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: 'ddp' (every process holds the whole model) or 'fsdp' (FSDP2: "
                           "parameters, gradients and optimizer state sharded across processes, checkpoints "
                           "sharded with torch.distributed.checkpoint). One process trains unsharded either way.")
    reshard_after_forward: bool = Field(
        True, description="FSDP: free each block's gathered weights after its forward and gather them again for "
                          "the backward (less memory, one more all-gather per block).")
    cpu_offload: bool = Field(False, description="FSDP on CUDA: keep the sharded parameters, gradients and "
                                                 "optimizer state in CPU memory (ignored on CPU).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in the backward instead of keeping them "
                           "(any strategy).")
    mixed_precision: bool = Field(
        True, description="FSDP on CUDA: bf16 parameters and compute, fp32 gradient reduction (ignored on CPU, "
                          "which trains in fp32).")
    timeout_s: float = Field(600.0, ge=10.0, description="Seconds a collective may wait for the other processes "
                                                        "before the job ends with an error (a dead or stuck rank).")


class OutputConfig(Section):
    dir: str = Field("runs/run", description="Run folder.")
    tensorboard: bool = Field(True, description="Also log to TensorBoard when it is installed.")
    plots: bool = Field(True, description="Write loss-curve PNGs.")


class ExpertsConfig(Section):
    seed: Optional[str] = Field(None, description="Seed model: a run or HF folder (default: train one on the "
                                                  "mixture for seed_steps).")
    seed_steps: int = Field(200, ge=1, description="Steps of the seed model trained on the whole mixture.")
    domains: Optional[list[str]] = Field(None, description="Domains that get an expert (default: every domain).")
    seed_domains: Union[Literal["experts", "all"], list[str]] = Field(
        "experts", description="Domains whose text the seed trains on, and its tokenizer with it: 'experts' (the "
                               "domains that get an expert), 'all' (every domain of the data) or a list. A domain "
                               "left out stays new to both, as one added later with `experts add --source` is.")
    steps: Optional[int] = Field(None, ge=1, description="Training steps per expert (default: train.max_steps).")
    batch_size: Optional[int] = Field(
        None, ge=1, description="Batch size of each expert (default: train.batch_size). As in Branch-Train-Merge's "
                                "compute matching, train.batch_size / k with k experts gives each expert 1/k of the "
                                "hardware and the dense baseline's number of updates; the dense baseline and DEMix "
                                "train at train.batch_size on as many tokens as the experts together.")
    prior: Literal["uniform", "estimated"] = Field(
        "uniform", description="Domain prior of the ensemble: uniform, or estimated on held-out data.")
    top_k: Optional[int] = Field(None, ge=1, description="Ensemble: mix only the k most probable experts.")
    clusters: Optional[int] = Field(None, ge=2, description="Unsupervised domains (c-BTM): cluster the training "
                                                            "documents into k clusters, one expert each (default: "
                                                            "the sources' domain tags).")
    cluster_features: Literal["tfidf", "embeddings"] = Field(
        "tfidf", description="What documents are clustered by: tf-idf, or mean-pooled embeddings of cluster_encoder.")
    cluster_encoder: Optional[str] = Field(None, description="Local HF encoder folder for embedding features "
                                                             "('package:NAME/folder' inside an installed package).")
    cluster_balance: bool = Field(False, description="Balanced clusters (c-BTM): no cluster holds more than 1.1x "
                                                     "its share of the fitted documents.")
    cluster_documents: int = Field(20000, ge=1, description="Fit the clustering on at most this many training "
                                                            "documents (a seeded sample).")
    routing: str = Field(
        "posterior", description="Ensemble weights: the domain posterior (Bayes' rule over the context's likelihood), "
                                 "the context's distance to the cluster centres (clusters: c-BTM; needs clusters), "
                                 "or a registered routing rule.")
    _known_routing = field_validator("routing")(lambda cls, v: registry.ROUTERS.check(v))
    routing_temperature: float = Field(0.1, gt=0.0, description="Cluster routing: T in exp(-distance^2 / T).")
    routing_stride: int = Field(1, ge=1, description="Cluster routing: recompute the weights every N positions "
                                                     "(1: at every position).")

    @model_validator(mode="after")
    def _clusters_needed(self) -> "ExpertsConfig":
        if self.routing == "clusters" and self.clusters is None:
            raise ValueError("experts.routing 'clusters' needs experts.clusters (the number of clusters)")
        if self.clusters and self.cluster_features == "embeddings" and not self.cluster_encoder:
            raise ValueError("experts.cluster_features 'embeddings' needs experts.cluster_encoder (an encoder folder)")
        return self


class DistillConfig(Section):
    teacher: str = Field(description="The teacher: a fine-tuned or pretrained run folder, a model folder, or a "
                                     "domain-experts run (its ensemble, weighted by the domain posterior, teaches).")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature T of the soft targets (the KL term is "
                                                        "scaled by T^2).")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the soft-target (KL) loss; 1 - alpha weighs the "
                                                         "hard labels.")
    hidden_weight: float = Field(0.0, ge=0.0, description="Weight of hidden-state matching (TinyBERT): the MSE "
                                                          "between student and teacher block outputs, paired "
                                                          "uniformly, through a learned projection when the "
                                                          "student is narrower. 0: off.")
    cache_teacher: bool = Field(False, description="Fine-tuning: keep the teacher's outputs for each training "
                                                   "example in memory the first epoch and reuse them after (a few "
                                                   "floats per example; per word for NER).")
    student_layers: Optional[int] = Field(None, ge=1, description="The student is the teacher with this many layers "
                                                                  "(default: the student is the recipe's model).")
    init_layers: Optional[list[int]] = Field(None, description="Teacher layer each student layer starts from "
                                                               "(default: evenly spaced, first and last kept).")
    allow_larger: bool = Field(False, description="Accept a student with more layers or parameters than its teacher "
                                                  "(a warning instead of an error).")

    @model_validator(mode="after")
    def _layers_agree(self) -> "DistillConfig":
        if self.init_layers is not None:
            if self.student_layers is None:
                raise ValueError("distill.init_layers needs distill.student_layers")
            if len(self.init_layers) != self.student_layers:
                raise ValueError(f"distill.init_layers: {len(self.init_layers)} layers listed for "
                                 f"student_layers {self.student_layers}")
            if any(i < 0 for i in self.init_layers) or len(set(self.init_layers)) != len(self.init_layers):
                raise ValueError(f"distill.init_layers: expected distinct layer indices >= 0, got {self.init_layers}")
        return self


class Recipe(Section):
    name: str = Field("run", description="Name of the run.")
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(family="gpt2"))
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    experts: Optional[ExpertsConfig] = Field(None, description="Domain experts (lmforge experts ...).")
    distill: Optional[DistillConfig] = Field(None, description="Knowledge distillation from a teacher "
                                                               "(lmforge distill).")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _model_at(loc: tuple, root: type[BaseModel]) -> Optional[type[BaseModel]]:
    """The pydantic class that owns the key at `loc` (used to suggest the closest valid key)."""
    cls: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        cls = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return None
    return cls


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _override_key(override: str) -> str:
    """'data.sources.0.path=x' → 'data.sources[0].path', the way errors name the field."""
    parts = override.split("=", 1)[0].strip().split(".")
    return _dotted(tuple(int(p) if p.isdigit() else p for p in parts))


# What other tools call some of our fields (Trainer, nanoGPT, run_*.py scripts): a did-you-mean names ours.
OTHER_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
               "train_batch_size": "batch_size", "warmup_ratio": "warmup_steps",
               "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip", "max_seq_length": "max_length",
               "lr_scheduler_type": "schedule", "n_layer": "n_layers", "n_head": "n_heads"}


def closest_key(key: str, valid: list[str]) -> Optional[str]:
    """The valid key a misspelt or foreign `key` most likely means, or None."""
    if OTHER_NAMES.get(key) in valid:
        return OTHER_NAMES[key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def format_validation_error(err: ValidationError, source: str, root: Optional[type[BaseModel]] = None,
                            overrides: Union[list[str], tuple] = ()) -> str:
    """One line naming each bad field; `root` is the recipe class that was validated (default: Recipe). A field
    that a `--set` override wrote is blamed on that override, not on the recipe file."""
    root = root or Recipe
    by_key = {_override_key(o): o for o in overrides if "=" in o}
    lines, suggested, missing = [], set(), {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = _dotted(loc)
        origin = f"--set {by_key[where]}" if where in by_key else source
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc, root)
            valid = list(owner.model_fields) if owner else []
            close = closest_key(str(loc[-1]), valid)
            hint = f"; did you mean '{close}'?" if close else f"; valid keys: {', '.join(valid)}"
            lines.append(f"{origin}: unknown key '{where}'{hint}")
            if close:
                suggested.add(loc[:-1] + (close,))
        else:
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"{origin}: {where or 'recipe'}: {e['msg']}{shown}")
            if e["type"] == "missing":
                missing[loc] = lines[-1]
    # A misspelt required key (`pth`) also reports `path` as missing; the 'did you mean' line says it all.
    redundant = {missing[loc] for loc in suggested if loc in missing}
    lines = [line for line in lines if line not in redundant]
    # One line: the CLI prints "error: <message>" and the message must not spill onto unprefixed lines.
    return "; ".join(lines)


def _index(node: list, part: str, override: str) -> int:
    # A bad list index is the user's mistake: say so instead of raising IndexError/ValueError.
    if not part.isdigit() or int(part) >= len(node):
        raise LmforgeError(f"--set {override!r}: '{part}' is not an index of a list of {len(node)} item(s)")
    return int(part)


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise LmforgeError(f"--set {override!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[_index(node, part, override)]
            continue
        if node.get(part) is None:  # a missing or empty (`train:`) section
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise LmforgeError(f"--set {override!r}: '{part}' is not a section")
    if isinstance(node, list):
        node[_index(node, parts[-1], override)] = value
    else:
        node[parts[-1]] = value


def validate_tree(root: type[BaseModel], tree: dict, source: str, overrides: Union[list[str], tuple] = ()):
    """Apply `--set` overrides to a recipe tree and validate it as `root`, with one-line errors."""
    sections = {k for k, f in root.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    # Deep copy: overrides must not leak into the caller's dict; an empty section (`train:`) means defaults.
    tree = {k: ({} if v is None and k in sections else v) for k, v in copy.deepcopy(tree or {}).items()}
    for override in overrides:
        _apply_override(tree, override)
    try:
        return root.model_validate(tree)
    except ValidationError as err:
        raise LmforgeError(format_validation_error(err, source, root, overrides)) from None


def recipe_from_dict(tree: dict, source: str = "recipe", overrides: Union[list[str], tuple] = ()) -> Recipe:
    return validate_tree(Recipe, tree, source, overrides)


def read_yaml_mapping(path: Union[str, Path], what: str) -> dict:
    """A recipe file's YAML as a dict; a missing file, bad YAML (with its line) or a non-mapping is an error."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: recipe file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LmforgeError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    if tree is not None and not isinstance(tree, dict):
        raise LmforgeError(f"{path}: {what}")
    return tree or {}


def resolve_path(p: Optional[str], base: Path) -> Optional[str]:
    """A relative path is read from the current folder, else from the recipe's folder."""
    if p is None or Path(p).is_absolute() or Path(p).exists():
        return p
    candidate = os.path.normpath(base / p)
    return candidate if Path(candidate).exists() or any(ch in p for ch in "*?[") else p


def load_recipe(path: Union[str, Path], overrides: Union[list[str], tuple] = ()) -> Recipe:
    tree = read_yaml_mapping(path, "a recipe is a mapping of sections (data, model, train, ...)")
    recipe = recipe_from_dict(tree, str(path), overrides)
    _resolve_paths(recipe, Path(path).parent)
    return recipe


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    for src in recipe.data.sources:
        src.path = resolve_path(src.path, base)
    recipe.model.path = resolve_path(recipe.model.path, base)
    recipe.tokenizer.path = resolve_path(recipe.tokenizer.path, base)
    recipe.data.domain_clusters = resolve_path(recipe.data.domain_clusters, base)
    if recipe.distill:
        recipe.distill.teacher = resolve_path(recipe.distill.teacher, base)
    if recipe.experts and recipe.experts.cluster_encoder and not recipe.experts.cluster_encoder.startswith("package:"):
        recipe.experts.cluster_encoder = resolve_path(recipe.experts.cluster_encoder, base)


def coerce_recipe(recipe, overrides: Union[list[str], tuple], root: type[BaseModel], load) -> BaseModel:
    """A stage's recipe from what a caller holds: a file (read with `load`), a dict, or a recipe object; `--set`
    style `overrides` are applied and the result validated again."""
    if isinstance(recipe, (str, os.PathLike)):
        return load(recipe, overrides)
    if isinstance(recipe, dict):
        return validate_tree(root, recipe, "recipe", overrides)
    if isinstance(recipe, root):
        return validate_tree(root, recipe.model_dump(mode="json"), "recipe", overrides) if overrides else recipe
    raise LmforgeError(f"expected a {root.__name__}, a recipe file or a dict, got {type(recipe).__name__}")


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None")


def _section_class(annotation) -> Optional[type[BaseModel]]:
    inner = getattr(annotation, "__args__", (annotation,))
    for a in (annotation, *inner):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        nested = getattr(a, "__args__", ())  # list[SourceConfig]
        found = next((n for n in nested if isinstance(n, type) and issubclass(n, BaseModel)), None)
        if found:
            return found
    return None


def field_rows(root: type[BaseModel]) -> dict[str, list[tuple[str, str, str, str]]]:
    """Every field of a recipe class, by section: (dotted name, type, default, meaning); list entries as `[]`."""
    rows: dict[str, list[tuple[str, str, str, str]]] = {}

    def walk(cls: type[BaseModel], prefix: str, section: str) -> None:
        for name, f in cls.model_fields.items():
            sub = _section_class(f.annotation)
            key = f"{prefix}{name}"
            if sub is not None:
                many = "list" in str(f.annotation)
                walk(sub, f"{key}[]." if many else f"{key}.", key if not prefix else section)
                continue
            default = "required" if f.is_required() else repr(f.default if f.default_factory is None
                                                                else f.default_factory())
            rows.setdefault(section, []).append((key, _type_name(f.annotation), default, f.description or ""))

    walk(root, "", "")
    return rows


def fields_text(root: type[BaseModel], title: str) -> str:
    """The plain listing of `lmforge recipe fields`: one line per field, grouped by section."""
    out = [f"# {title}"]
    for section, rows in field_rows(root).items():
        if section:
            out.append(f"[{section}]")
        out += [f"  {key} = {default}  — {meaning}" for key, _, default, meaning in rows]
    return "\n".join(out)


def fields_markdown(root: type[BaseModel], title: str) -> str:
    """A Markdown reference of every field of a recipe class: one table per section (docs/recipes.md)."""
    out = [f"## {title}", ""]
    for section, rows in field_rows(root).items():
        out += [f"### `{section}`" if section else "### top level", "",
                "| field | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{key}` | {kind.replace('|', chr(92) + '|')} | `{default}` | "
                f"{meaning.replace('|', chr(92) + '|')} |" for key, kind, default, meaning in rows]
        out.append("")
    return "\n".join(out)
