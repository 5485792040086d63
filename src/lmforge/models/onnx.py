"""The ONNX Runtime side of a model folder: a folder written by `lmforge export` (model.onnx beside config.json
and the tokenizer) opens as an object that answers like the transformers model it was exported from —
`model(**inputs).logits`, `.config`, `.device`, `.eval()` — so prediction, evaluation and serving take either
without knowing which runtime runs it. The folder is inference-only: nothing trains from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoConfig

from lmforge.errors import LmforgeError

ONNX_FILE = "model.onnx"
EXPORT_CARD = "export.json"  # what the export holds: runtime, opset, fusion, quantization, source


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


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    """Threads as PyTorch's (`torch.get_num_threads()`, which the CLI and recipes set), all graph
    optimisations on."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    return options


def open_session(path: Path, threads: Optional[int] = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
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

    def __init__(self, session: ort.InferenceSession, config, folder: Path):
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


def load_onnx_model(folder, threads: Optional[int] = None) -> OnnxModel:
    """The model of an exported folder, its class chosen by the architecture config.json names."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    archs = config.architectures or []
    if any("TokenClassification" in a for a in archs):
        cls = OnnxForTokenClassification
    elif any("SequenceClassification" in a for a in archs):
        cls = OnnxForSequenceClassification
    else:
        raise LmforgeError(f"{folder}: the ONNX runtime runs classifiers and taggers; this export holds {archs}")
    return cls(open_session(folder / ONNX_FILE, threads), config, folder)
