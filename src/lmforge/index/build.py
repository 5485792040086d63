"""Build a vector index from a corpus (`index`) and search it (`retrieve`).

A corpus is a text file (one document per non-empty line, its id the line number), or JSONL / CSV / TSV /
Parquet records with a text field and an optional id field (default: the line number). Every error names the
file and the line; a failed build leaves no index behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from lmforge.errors import LmforgeError
from lmforge.stage import RunResult
from lmforge.tasks.config import SplitFile
from lmforge.tasks.embed import open_encoder
from lmforge.tasks.tables import _check_readable, _records, format_of
from lmforge.tasks.vectors import MANIFEST, Hit, open_index, write_index

TEXT_SUFFIXES = (".txt", ".text")


def read_documents(path: Path, text_field: str = "text", id_field: str = "id") -> tuple[list[str], list[str]]:
    """(ids, texts) of a corpus file; a record without text, a missing text field or a repeated id is an error."""
    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        lines = path.read_text(encoding="utf-8").splitlines()
        found = [(str(n), line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        found = []
        for line, rec in _records(path, format_of(SplitFile(path=str(path)))):
            if text_field not in rec:
                raise LmforgeError(f"{path}:{line}: no field {text_field!r} (fields: {', '.join(map(str, rec))}); "
                                   "set --text-field")
            text = rec[text_field]
            if text is None or not str(text).strip():
                raise LmforgeError(f"{path}:{line}: document without text (field {text_field!r} is empty)")
            doc_id = rec.get(id_field)
            found.append((str(doc_id) if doc_id is not None and str(doc_id) != "" else str(line), str(text).strip()))
    if not found:
        raise LmforgeError(f"{path}: no documents in this file")
    seen: dict[str, int] = {}
    for n, (doc_id, _) in enumerate(found):
        if doc_id in seen:
            raise LmforgeError(f"{path}: the id {doc_id!r} is used twice (documents {seen[doc_id] + 1} and {n + 1})")
        seen[doc_id] = n
    return [i for i, _ in found], [t for _, t in found]


def index(run: Union[str, Path], input: Union[str, Path], out: Union[str, Path], *, text_field: str = "text",
          id_field: str = "id", batch_size: int = 64, force: bool = False) -> RunResult:
    """Embed every document of `input` with the embedding model of `run` (an embedding run folder or a
    sentence-transformers folder) into an index folder `out`; returns it with the count, dimension and time."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        what = "holds an index" if (out / MANIFEST).is_file() else "is not empty"
        raise LmforgeError(f"{out}: the folder {what}; pass --force to replace it")
    encoder = open_encoder(Path(run))
    ids, texts = read_documents(Path(input), text_field, id_field)
    started = time.perf_counter()
    vectors = encoder.encode(texts, batch_size)
    seconds = time.perf_counter() - started
    write_index(out, vectors, ids, texts, encoder)
    return RunResult(out, {"documents": len(ids), "dim": encoder.dim, "seconds": round(seconds, 3),
                           "documents_per_s": round(len(ids) / max(seconds, 1e-9), 1)})


def retrieve(index_dir: Union[str, Path], queries: Union[str, list[str]], k: int = 5,
             model: Optional[Union[str, Path]] = None) -> list[list[Hit]]:
    """The k nearest documents of each query, best first; queries are embedded by the model that built the index
    (or `model`, refused unless it is that model)."""
    if k < 1:
        raise LmforgeError(f"-k: expected at least 1, got {k}")
    queries = [queries] if isinstance(queries, str) else list(queries)
    if not queries or any(not q.strip() for q in queries):
        raise LmforgeError("--query: an empty query")
    found, encoder = open_index(Path(index_dir), Path(model) if model else None)
    return found.search(encoder.encode(queries), k)
