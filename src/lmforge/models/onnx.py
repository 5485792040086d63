"""The ONNX Runtime side of a model folder: a folder written by `lmforge export` (model.onnx beside config.json
and the tokenizer) opens as an object that answers like the transformers model it was exported from —
`model(**inputs).logits`, `.config`, `.device`, `.eval()` — so prediction, evaluation and serving take either
without knowing which runtime runs it. The folder is inference-only: nothing trains from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from transformers import AutoConfig, GenerationConfig

from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    import onnxruntime as ort

ONNX_FILE = "model.onnx"
EXPORT_CARD = "export.json"  # what the export holds: runtime, opset, fusion, quantization, source


def cache_heads(config) -> list[int]:
    """Attention heads of each layer of a GPT-2 config: `n_head` everywhere, or the counts a model pruned by
    `lmforge compress` keeps (`lmforge_compression.shape.heads`)."""
    shape = (getattr(config, "lmforge_compression", None) or {}).get("shape") or {}
    return list(shape.get("heads") or [config.n_head] * config.n_layer)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """Names of a causal LM graph's cache inputs (`past_key_values.N.key` / `.value`) and outputs
    (`present.N.key` / `.value`), layer by layer."""
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_key_values", "present") for name in past]


def is_onnx_folder(folder) -> bool:
    return (Path(folder) / ONNX_FILE).is_file()


def refuse_inference_only(folder, field: str) -> None:
    """An ONNX export given where a trainable PyTorch checkpoint is needed: one line saying where to look."""
    folder = Path(folder)
    if not is_onnx_folder(folder):
        return
    card = folder / EXPORT_CARD
    source = json.loads(card.read_text()).get("source") if card.is_file() else None
    hint = f"use the run it was exported from ({source})" if source else "use the PyTorch run it was exported from"
    raise LmforgeError(f"{field}: {folder} is an ONNX export (model.onnx), which is inference-only; {hint}")


def _ort():
    """onnxruntime, imported when a session is opened: every other command (training above all) is spared its
    import (about 30 MB of memory)."""
    import onnxruntime

    return onnxruntime


def session_options(threads: Optional[int] = None) -> "ort.SessionOptions":
    """Threads as PyTorch's (`torch.get_num_threads()`, which the CLI and recipes set), all graph
    optimisations on."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    return options


def open_session(path: Path, threads: Optional[int] = None) -> "ort.InferenceSession":
    try:
        return _ort().InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types, all of them plain Exceptions
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LmforgeError(f"{path}: not a valid ONNX model ({reason[:200]}); export it again") from None


@dataclass
class OnnxOutput:
    logits: torch.Tensor


class OnnxModel:
    """A model on ONNX Runtime that answers like its transformers class (inference only, on the CPU)."""

    device = torch.device("cpu")
    training = False

    def __init__(self, session: "ort.InferenceSession", config, folder: Path):
        self.session, self.config, self.folder = session, config, Path(folder)
        self.input_names = [i.name for i in session.get_inputs()]

    def eval(self):
        return self

    def to(self, *_args, **_kwargs):
        """ONNX Runtime runs this model on the CPU whatever the device asked for."""
        return self

    def feeds(self, inputs: dict) -> dict:
        """The graph's inputs as int64 numpy arrays; `token_type_ids` as zeros when the caller has none."""
        out = {}
        for name in self.input_names:
            value = inputs.get(name)
            if value is None and name == "token_type_ids":
                value = torch.zeros_like(inputs["input_ids"])
            if value is None:
                raise LmforgeError(f"{self.folder}: the ONNX graph needs input {name!r}")
            out[name] = value.cpu().numpy().astype(np.int64) if torch.is_tensor(value) else np.asarray(value, np.int64)
        return out

    def __call__(self, **inputs) -> OnnxOutput:
        logits = self.session.run(["logits"], self.feeds(inputs))[0]
        return OnnxOutput(logits=torch.from_numpy(logits))


class OnnxForSequenceClassification(OnnxModel):
    """A sequence classifier on ONNX Runtime (its class name tells the server its kind)."""


class OnnxForTokenClassification(OnnxModel):
    """A token classifier on ONNX Runtime."""


class OnnxCache:
    """The KV cache between steps of an ONNX causal LM: the graph's `present.*` outputs, fed back as its
    `past_key_values.*` inputs."""

    def __init__(self, arrays: list):
        self.arrays = arrays

    def get_seq_length(self) -> int:
        return int(self.arrays[0].shape[2])


@dataclass
class OnnxCausalOutput:
    logits: torch.Tensor
    past_key_values: OnnxCache


class OnnxForCausalLM(OnnxModel):
    """A GPT-2-family causal LM on ONNX Runtime, one step per call with its KV cache: it answers the forward
    call lmforge's decoding loop makes (`input_ids`, `attention_mask`, `position_ids`, `past_key_values`,
    `logits_to_keep`), so greedy and sampled decoding take it as they take the transformers model. Beam search
    and the other paths that need transformers' `generate` do not run on it."""

    def __init__(self, session: "ort.InferenceSession", config, folder: Path):
        super().__init__(session, config, folder)
        self.past_names, self.present_names = cache_names(config.n_layer)
        missing = [n for n in ("input_ids", "attention_mask", "position_ids", *self.past_names)
                   if n not in self.input_names]
        if missing:
            raise LmforgeError(f"{folder / ONNX_FILE}: not a causal LM graph with a KV cache (no input "
                               f"{missing[0]!r}); export it again")
        self.output_names = ["logits", *self.present_names]
        head_dim = config.n_embd // config.n_head
        self.cache_shapes = [(heads, 0, head_dim) for heads in cache_heads(config) for _ in ("key", "value")]
        try:
            self.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
        except OSError:  # no generation_config.json: the model config's tokens, as transformers does
            self.generation_config = GenerationConfig.from_model_config(config)

    def can_generate(self) -> bool:
        return True

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values: Optional[OnnxCache] = None,
                 use_cache: bool = True, logits_to_keep: int = 0, **_ignored) -> OnnxCausalOutput:
        ids = input_ids.cpu().numpy().astype(np.int64)
        batch, step = ids.shape
        past = past_key_values.arrays if past_key_values is not None else \
            [np.zeros((batch, *shape), np.float32) for shape in self.cache_shapes]
        seen = past[0].shape[2]
        mask = (np.ones((batch, seen + step), np.int64) if attention_mask is None
                else attention_mask.cpu().numpy().astype(np.int64))
        positions = (np.broadcast_to(np.arange(seen, seen + step, dtype=np.int64), (batch, step))
                     if position_ids is None else position_ids.cpu().numpy().astype(np.int64))
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions),
                 **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(self.output_names, feeds)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return OnnxCausalOutput(logits=torch.from_numpy(np.ascontiguousarray(logits)),
                                past_key_values=OnnxCache(present))


def load_onnx_model(folder, threads: Optional[int] = None) -> OnnxModel:
    """The model of an exported folder, its class chosen by the architecture config.json names."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    archs = config.architectures or []
    if any("TokenClassification" in a for a in archs):
        cls = OnnxForTokenClassification
    elif any("SequenceClassification" in a for a in archs):
        cls = OnnxForSequenceClassification
    elif any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in archs):
        cls = OnnxForCausalLM
    else:
        raise LmforgeError(f"{folder}: the ONNX runtime runs classifiers, taggers and causal LMs; this export "
                           f"holds {archs}")
    return cls(open_session(folder / ONNX_FILE, threads), config, folder)
