"""The compress recipe: a model, the steps that shrink it (prune, finetune, quantize — in the order given), what
the report measures, and the output folder.

    name: sst2-compressed
    model: runs/sst2-minilm
    steps:
      - prune: {heads: 0.5, ffn: 0.3}
      - finetune: {recipe: recipes/sst2-minilm.yaml, set: {train.epochs: 1}}
      - quantize: {scheme: int8-dynamic}
    eval: {split: validation}
    output: {dir: runs/sst2-compressed}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, model_validator

from lmforge.recipe import Section, read_yaml_mapping, resolve_path, validate_tree

Fraction = Union[float, list[float]]


def _check_fraction(value, field: str) -> None:
    for i, f in enumerate(value if isinstance(value, list) else [value]):
        if not 0.0 <= f < 1.0:
            where = f"{field}[{i}]" if isinstance(value, list) else field
            raise ValueError(f"{where}: {f} is outside [0, 1); 1 would remove every unit of a layer")


class PruneStep(Section):
    heads: Optional[Fraction] = Field(None, description="Share of attention heads removed in each layer (one value, "
                                                        "or one per layer), ranked by gradient importance.")
    ffn: Optional[Fraction] = Field(None, description="Share of FFN neurons removed in each layer (one value, or one "
                                                      "per layer), ranked by gradient importance.")
    sparsity: Optional[float] = Field(None, description="Unstructured: share of the transformer layers' weights set "
                                                        "to zero by magnitude, in [0, 1).")
    scope: Literal["global", "layer"] = Field("global", description="Unstructured: rank magnitudes over all layers "
                                                                    "together or in each weight matrix.")
    batches: int = Field(8, ge=1, description="Training batches whose loss gradient ranks heads and neurons.")
    batch_size: int = Field(32, ge=1, description="Examples per importance batch.")

    @model_validator(mode="after")
    def _something_to_prune(self) -> "PruneStep":
        if self.heads is None and self.ffn is None and self.sparsity is None:
            raise ValueError("prune: give heads, ffn (structured) or sparsity (unstructured)")
        for field in ("heads", "ffn", "sparsity"):
            if getattr(self, field) is not None:
                _check_fraction(getattr(self, field), field)
        return self


class FinetuneStep(Section):
    recipe: str = Field(description="The fine-tuning recipe that recovers the model (a pretraining recipe, clm, for a "
                                    "causal LM); its model.path and output.dir are set by the step.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides of that recipe, {field: value}.")
    sparsity: Optional[float] = Field(None, description="Prune by magnitude while fine-tuning, gradually up to this "
                                      "share of the layers' weights (Zhu & Gupta's cubic schedule); pruned weights "
                                      "are held at zero, those of an earlier prune step too.")
    scope: Literal["global", "layer"] = Field("global", description="Gradual pruning: rank magnitudes over all "
                                              "layers together or in each matrix.")
    prune_steps: int = Field(100, ge=1, description="Gradual pruning: optimizer steps over which the sparsity rises "
                                                    "to `sparsity`; the steps after it recover at that sparsity.")
    prune_every: int = Field(10, ge=1, description="Gradual pruning: steps between pruning events.")

    @model_validator(mode="after")
    def _fraction(self) -> "FinetuneStep":
        if self.sparsity is not None:
            _check_fraction(self.sparsity, "sparsity")
        return self


class DistillStep(Section):
    recipe: str = Field(description="The fine-tuning recipe the student trains with (its data, train settings); the "
                                    "step sets the teacher (the previous step's model), model.path and output.dir.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides of that recipe, {field: value}.")
    student_layers: int = Field(ge=1, description="The student: the teacher with this many layers, started from "
                                                  "evenly spaced teacher layers.")
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature of the soft targets.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the soft-target loss; 1 - alpha on the labels.")
    hidden_weight: float = Field(0.0, ge=0.0, description="Weight of hidden-state matching (0: off).")


class QuantizeStep(Section):
    scheme: Literal["int8-dynamic", "int8-weight", "int4-weight"] = Field(
        "int8-dynamic", description="int8-dynamic (int8 weights and run-time int8 activations), int8-weight "
                                    "(weight-only, size not speed), int4-weight (refused: no CPU kernel here).")
    runtime: Literal["torch", "onnx"] = Field("torch", description="Where the quantized model runs: PyTorch "
                                                                   "(fbgemm kernels) or ONNX Runtime.")


STEP_KINDS = ("distill", "prune", "finetune", "quantize")


class Step(Section):
    distill: Optional[DistillStep] = Field(None, description="Distil the model into a student with fewer layers.")
    prune: Optional[PruneStep] = Field(None, description="Prune heads / FFN neurons, or weights by magnitude.")
    finetune: Optional[FinetuneStep] = Field(None, description="Fine-tune (recover) with a fine-tuning recipe.")
    quantize: Optional[QuantizeStep] = Field(None, description="Quantize the weights for CPU inference.")

    @model_validator(mode="after")
    def _one_kind(self) -> "Step":
        given = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step is one of {', '.join(STEP_KINDS)}; got {given or 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


class CompressEval(Section):
    split: Literal["validation", "test"] = Field("validation", description="Split of the model's fine-tuning "
                                                                           "recipe whose metric the report shows.")


class BenchSettings(Section):
    threads: int = Field(1, ge=1, description="CPU threads for the latency measurement.")
    repeats: int = Field(7, ge=1, description="Timed repeats per batch size (the median is reported).")
    seq_len: int = Field(64, ge=2, description="Tokens per input row.")
    batch_sizes: list[int] = Field([1, 32], description="Batch sizes timed.")


class CompressOutput(Section):
    dir: str = Field("runs/compress", description="Folder: one sub-folder per step, compress.md, compress.png.")


class CompressRecipe(Section):
    name: str = Field("compress", description="Name of the run.")
    model: str = Field(description="A fine-tuning run folder (classifier or tagger), a causal LM's pretraining run "
                                   "folder, or a model folder.")
    steps: list[Step] = Field(description="Steps in order, each {distill: ...}, {prune: ...}, {finetune: ...} or "
                                          "{quantize: ...}.")
    eval: CompressEval = Field(default_factory=CompressEval)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    output: CompressOutput = Field(default_factory=CompressOutput)

    @model_validator(mode="after")
    def _order(self) -> "CompressRecipe":
        if not self.steps:
            raise ValueError("steps: give at least one step")
        kinds = [s.kind for s in self.steps]
        trained = [k for k in kinds[kinds.index("quantize"):] if k in ("finetune", "distill")] if "quantize" in kinds \
            else []
        if trained:
            raise ValueError(f"steps: a {trained[0]} step after quantize cannot train int8 weights (order: "
                             f"{' -> '.join(kinds)}); quantize last")
        if kinds.count("quantize") > 1:
            raise ValueError("steps: quantize once")
        return self

    def to_yaml(self) -> str:
        """The resolved recipe; a step shows only its own kind (unset fields of a step are left out)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def load_compress_recipe(path, overrides=()) -> CompressRecipe:
    tree = read_yaml_mapping(path, "a compress recipe is a mapping (name, model, steps, eval, output)")
    recipe = validate_tree(CompressRecipe, tree, str(path), overrides)
    base = Path(path).parent
    recipe.model = resolve_path(recipe.model, base)
    for step in recipe.steps:
        for trained in (step.finetune, step.distill):
            if trained is not None:
                trained.recipe = resolve_path(trained.recipe, base)
    return recipe
