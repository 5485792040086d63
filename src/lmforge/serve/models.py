"""The models a server holds: what each one is for (text generation, classification, NER, embeddings) and its limits.

Models are loaded once, at start-up, from the paths given on the command line; no request can name a
path or load anything.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lmforge.errors import LmforgeError
from lmforge.generate import check_generative, open_generator
from lmforge.generate.speculative import check_draft
from lmforge.serve.embeddings import open_embedding_model
from lmforge.tasks.embed import is_embedding_folder
from lmforge.tasks.predict import is_task_run, open_task_model

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
KINDS = ("generate", "classification", "ner", "embedding")


@dataclass
class ServedModel:
    name: str
    kind: str                       # "generate", "classification", "ner" or "embedding"
    model: object
    tokenizer: object
    source: str = ""
    max_length: Optional[int] = None  # classification/NER: longest input in tokens (longer inputs are truncated)
    created: int = field(default_factory=lambda: int(time.time()))
    draft: object = None            # a smaller model of the same tokenizer: speculative decoding

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @classmethod
    def of(cls, name: str, model, tokenizer, source: str = "", max_length: Optional[int] = None) -> "ServedModel":
        """Wrap an already loaded model; its kind comes from its class."""
        cls_name = type(model).__name__
        if "TokenClassification" in cls_name:
            kind = "ner"
        elif "SequenceClassification" in cls_name:
            kind = "classification"
        else:
            check_generative(model)
            kind = "generate"
        if not NAME.match(name):
            raise LmforgeError(f"model name {name!r}: use letters, digits and . _ : - (at most 128 characters)")
        model.eval()
        return cls(name, kind, model, tokenizer, source, max_length)


def parse_spec(spec: str) -> tuple[str, Path]:
    """'NAME=PATH' or 'PATH' (the name is then the folder's name)."""
    name, sep, path = spec.partition("=")
    if sep and NAME.match(name) and path:
        return name, Path(path)
    path = Path(spec)
    return re.sub(r"[^A-Za-z0-9._:-]", "-", path.resolve().name) or "model", path


def load_served_model(spec: str) -> ServedModel:
    """Open a pretraining run (causal LM), a fine-tuning run (classifier or tagger) or a plain HF folder."""
    name, path = parse_spec(spec)
    if not path.exists():
        raise LmforgeError(f"{path}: no such run folder")
    if is_embedding_folder(path):
        served = open_embedding_model(path)
        return ServedModel(name, "embedding", served, served.encoder.tokenizer, str(path), served.encoder.max_length)
    if is_task_run(path) or _is_classifier(path):
        recipe, model, tokenizer, _ = open_task_model(path)
        max_length = recipe.data.max_length if recipe else None
    else:
        model, tokenizer = open_generator(path)
        max_length = None
    return ServedModel.of(name, model, tokenizer, str(path), max_length)


def load_served_models(specs: list[str]) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for spec in specs:
        served = load_served_model(spec)
        if served.name in models:
            raise LmforgeError(f"{spec}: a second model named {served.name!r}; name them with NAME=PATH")
        models[served.name] = served
    if not models:
        raise LmforgeError("serve: name at least one run folder")
    return models


def attach_draft(models: dict[str, ServedModel], path: Path) -> ServedModel:
    """Load the draft model at `path` for the one text-generation model served; returns that model."""
    generators = [m for m in models.values() if m.kind == "generate"]
    if len(generators) != 1:
        raise LmforgeError(f"--draft: serve exactly one text-generation model with a draft (got {len(generators)})")
    if not Path(path).exists():
        raise LmforgeError(f"--draft {path}: no such run folder")
    served = generators[0]
    draft, tokenizer = open_generator(Path(path))
    check_draft(served.model, served.tokenizer, draft, tokenizer)
    served.draft = draft.eval()
    return served


def _is_classifier(path: Path) -> bool:
    for folder in (path / "final", path):
        if (folder / "config.json").is_file():
            archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
            return any("Classification" in a for a in archs)
    return False
