"""Sentence vectors: pool an encoder's token vectors (mean or [CLS]) and L2-normalise them; open an embedding
model from a run folder or a sentence-transformers folder; write the sentence-transformers files that make a
run's model folder load in `SentenceTransformer(folder)` with the same vectors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel

from lmforge.errors import LmforgeError
from lmforge.models.compressed import load_pretrained
from lmforge.tasks import model as tm
from lmforge.tasks.config import BaseModelSpec
from lmforge.tasks.infer import device_of

POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(rows, length, width) token vectors → (rows, width): the mean over real tokens, or the first token's."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def sentence_vectors(model, batch: dict, pooling: str, normalize: bool = True) -> torch.Tensor:
    """The pooled (and normalised) vector of every row of a padded batch, in fp32."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    hidden = model(**inputs).last_hidden_state.float()
    vectors = pool(hidden, batch["attention_mask"], pooling)
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


@dataclass
class SentenceEncoder:
    """An encoder and how it makes sentence vectors; `encode(texts)` gives a (texts, dim) float32 array."""
    model: object
    tokenizer: object
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 128
    folder: Optional[Path] = None

    def to(self, device) -> "SentenceEncoder":
        self.model.to(device)
        return self

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Vectors in input order; batches of similar length (little padding), as sentence-transformers does."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        device = device_of(self.model)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation="longest_first",
                                   max_length=self.max_length, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            out[idx] = sentence_vectors(self.model, batch, self.pooling, self.normalize).cpu().numpy()
        return out

    @cached_property
    def fingerprint(self) -> str:
        """The model folder's fingerprint (hashed once)."""
        return model_fingerprint(self.folder) if self.folder else ""


def model_fingerprint(folder: Path) -> str:
    """A hash of the weights and the sentence settings: an index records it, a query must come from the same."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "pytorch_model.bin", "sentence_bert_config.json",
                 f"{POOLING_DIR}/config.json", "modules.json"):
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def write_sentence_transformers_files(folder: Path, pooling: str, normalize: bool, max_length: int,
                                      dim: int) -> None:
    """modules.json, sentence_bert_config.json and the pooling (+ normalize) module configs: Transformer →
    Pooling → Normalize, as sentence-transformers writes them."""
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR,
                        "type": "sentence_transformers.models.Normalize"})
        (folder / NORMALIZE_DIR).mkdir(exist_ok=True)
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    (folder / POOLING_DIR / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                  "do_lower_case": False}, indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))


def sentence_settings(folder: Path) -> Optional[tuple[str, bool, int]]:
    """(pooling, normalize, max_length) of a sentence-transformers folder; None for any other folder."""
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        return None
    modules = json.loads((folder / "modules.json").read_text())
    types = [m.get("type", "") for m in modules]
    pooling_cfg = folder / POOLING_DIR / "config.json"
    pooling = "mean"
    if pooling_cfg.is_file():
        cfg = json.loads(pooling_cfg.read_text())
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not cfg.get("pooling_mode_mean_tokens", True):
            raise LmforgeError(f"{pooling_cfg}: only mean and CLS pooling are supported")
    settings = folder / "sentence_bert_config.json"
    max_length = json.loads(settings.read_text()).get("max_seq_length", 128) if settings.is_file() else 128
    return pooling, any(t.endswith("Normalize") for t in types), int(max_length)


def is_embedding_folder(path: Path) -> bool:
    """A sentence-transformers folder, or a run folder whose final model is one."""
    path = Path(path)
    return sentence_settings(path) is not None or sentence_settings(path / "final") is not None


def open_encoder(path: Path) -> SentenceEncoder:
    """The encoder of an embedding run (its final/ model) or of a sentence-transformers folder."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path}: no such folder")
    folder = path if sentence_settings(path) is not None else path / "final"
    settings = sentence_settings(folder)
    if settings is None:
        raise LmforgeError(f"{path}: not an embedding model (no modules.json; fine-tune one with task: embedding, "
                           "or give a sentence-transformers folder)")
    pooling, normalize, max_length = settings
    tokenizer = tm.load_task_tokenizer(BaseModelSpec(path=str(folder)), folder)
    model = load_pretrained(AutoModel, folder).eval()
    max_length = min(max_length, tm.position_limit(model.config))
    return SentenceEncoder(model, tokenizer, pooling, normalize, max_length, folder)
