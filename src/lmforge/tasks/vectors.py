"""An exact vector index on disk: the documents' sentence vectors as one float32 matrix (memory-mapped, so a
search reads only what it needs and many processes share the pages), their ids and texts, and the fingerprint of
the model that made them. A query must be embedded by that same model: any other is refused.

    INDEX/
      index.json     model folder, model fingerprint, pooling, dimension, count
      vectors.f32    count x dim float32, row-major, L2-normalised rows
      docs.jsonl     one {"id", "text"} per row, in row order
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.tasks.embed import SentenceEncoder, open_encoder

MANIFEST, VECTORS, DOCS = "index.json", "vectors.f32", "docs.jsonl"


def write_index(out: Path, vectors: np.ndarray, ids: list[str], texts: list[str], encoder: SentenceEncoder) -> None:
    """Write the index folder under a temporary name, then rename it into place (nothing half-written)."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        np.ascontiguousarray(vectors, dtype=np.float32).tofile(tmp / VECTORS)
        with open(tmp / DOCS, "w", encoding="utf-8") as fh:
            for doc_id, text in zip(ids, texts):
                fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        (tmp / MANIFEST).write_text(json.dumps({
            "model": str(Path(encoder.folder).resolve()), "fingerprint": encoder.fingerprint,
            "pooling": encoder.pooling, "normalize": encoder.normalize, "max_length": encoder.max_length,
            "dim": int(vectors.shape[1]), "count": int(vectors.shape[0])}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@dataclass
class Hit:
    id: str
    score: float
    text: str


class VectorIndex:
    """An index folder opened for search; `search(vectors, k)` ranks every row by dot product (cosine)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise LmforgeError(f"{self.folder}: not an index (no {MANIFEST}); build one with `lmforge index`")
        self.meta = json.loads(manifest.read_text())
        self.vectors = np.memmap(self.folder / VECTORS, dtype=np.float32, mode="r",
                                 shape=(self.meta["count"], self.meta["dim"]))
        with open(self.folder / DOCS, encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh]
        self.ids, self.texts = [d["id"] for d in docs], [d["text"] for d in docs]

    def __len__(self) -> int:
        return len(self.ids)

    def check_encoder(self, encoder: SentenceEncoder, where: str = "query") -> None:
        """Refuse an encoder other than the one that built the index: its vectors live in another space."""
        if encoder.fingerprint != self.meta["fingerprint"]:
            raise LmforgeError(f"{self.folder}: the index was built with the model {self.meta['model']} "
                               f"(fingerprint {self.meta['fingerprint']}), but the {where} model {encoder.folder} "
                               f"has fingerprint {encoder.fingerprint}; rebuild the index with `lmforge index` "
                               "or query it with the model that built it")

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The k best rows for each query vector, best first (ties: the lower row first)."""
        k = min(k, len(self))
        scores = np.asarray(queries, dtype=np.float32) @ self.vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(self) else \
            np.tile(np.arange(len(self)), (len(scores), 1))
        out = []
        for row, cand in zip(scores, top):
            best = sorted(cand.tolist(), key=lambda j: (-row[j], j))
            out.append([Hit(self.ids[j], float(row[j]), self.texts[j]) for j in best])
        return out


def open_index(folder: Path, model: Optional[Path] = None) -> tuple[VectorIndex, SentenceEncoder]:
    """The index and the encoder for its queries: `model` when given (refused unless it built the index), else
    the model recorded in the index (refused if its weights changed since)."""
    index = VectorIndex(folder)
    if model is None:
        recorded = Path(index.meta["model"])
        if not recorded.exists():
            raise LmforgeError(f"{folder}: the model that built the index ({recorded}) is gone; pass --model")
        encoder = open_encoder(recorded)
        index.check_encoder(encoder, "recorded")
    else:
        encoder = open_encoder(model)
        index.check_encoder(encoder)
    return index, encoder
