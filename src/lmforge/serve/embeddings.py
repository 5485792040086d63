"""Embedding models in the server: OpenAI-compatible `/v1/embeddings` and `/v1/search` over the model's index.

An embedding run is served with the index at RUN/index when there is one (`lmforge index RUN --out RUN/index`);
an index built by another model is refused at start-up. Work runs on the model's own thread, bounded by the
server's admission and timeout like classification.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
from fastapi import APIRouter, Request
from pydantic import Field, field_validator

from lmforge.serve.errors import APIError
from lmforge.serve.schemas import MAX_TEXT_CHARS, MAX_TEXTS, Strict
from lmforge.tasks.embed import SentenceEncoder, open_encoder
from lmforge.tasks.vectors import MANIFEST, VectorIndex

MAX_K = 100


@dataclass
class EmbeddingModel:
    """A served encoder and, when its run has one, the index `/v1/search` reads."""
    encoder: SentenceEncoder
    index: Optional[VectorIndex] = None

    def to(self, device) -> "EmbeddingModel":
        self.encoder.to(device)
        return self


def open_embedding_model(path: Path) -> EmbeddingModel:
    served = EmbeddingModel(open_encoder(path))
    folder = Path(path) / "index"
    if (folder / MANIFEST).is_file():
        served.index = VectorIndex(folder)
        served.index.check_encoder(served.encoder, "served")
    return served


def _texts(value: Union[str, list[str]]) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts or len(texts) > MAX_TEXTS:
        raise ValueError(f"expected 1 to {MAX_TEXTS} texts")
    if any(not t.strip() for t in texts):
        raise ValueError("an empty text")
    if any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise ValueError(f"a text has more than {MAX_TEXT_CHARS} characters")
    return texts


class EmbeddingsRequest(Strict):
    """OpenAI's embeddings request; `dimensions` (shortened vectors) is not offered."""
    model: str = Field(..., min_length=1, max_length=256)
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        _texts(value)
        return value


class SearchRequest(Strict):
    model: str = Field(..., min_length=1, max_length=256)
    query: Union[str, list[str]]
    k: int = Field(5, ge=1, le=MAX_K)

    @field_validator("query")
    @classmethod
    def _query(cls, value):
        _texts(value)
        return value


def _encoded(vector: np.ndarray, encoding: str):
    if encoding == "base64":  # OpenAI's base64: little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def embedding_routes(server) -> APIRouter:
    """The routes of embedding models, for `server` (a `serve.app.Server`)."""
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request):
        m = server.model(body.model, "embedding")
        texts = _texts(body.input)
        vectors = await server.run_task(m, lambda: m.model.encoder.encode(texts), request)
        tokens = sum(len(ids) for ids in m.tokenizer(texts, truncation=True, max_length=m.max_length)
                     ["input_ids"])
        return {"object": "list", "model": m.name,
                "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @router.post("/v1/search")
    async def search(body: SearchRequest, request: Request):
        m = server.model(body.model, "embedding")
        if m.model.index is None:
            raise APIError(400, f"the model {m.name!r} has no index; build one with `lmforge index {m.source} "
                                f"--out {m.source}/index` and restart the server", param="model", code="no_index")
        queries = _texts(body.query)
        hits = await server.run_task(m, lambda: m.model.index.search(m.model.encoder.encode(queries), body.k), request)
        return {"object": "list", "model": m.name,
                "data": [{"index": i, "query": q, "hits": [vars(h) for h in found]}
                         for i, (q, found) in enumerate(zip(queries, hits))]}

    return router
