"""Which files a data source names: a file, a folder searched for known extensions, or a glob. Kept apart from
`lmforge.data.sources` (which reads them with `datasets`) so that `lmforge prep` finds files without loading it."""

from __future__ import annotations

import glob
from pathlib import Path

from lmforge.errors import LmforgeError

EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".py": "text", ".jsonl": "jsonl",
              ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def expand_paths(spec: str, where: str = "data.sources") -> list[Path]:
    """A file, a folder (searched recursively for known extensions) or a glob → sorted files."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS]
    elif path.is_file():
        files = [path]
    else:
        raise LmforgeError(f"{where}: {spec}: no such file or folder")
    if not files:
        raise LmforgeError(f"{where}: {spec}: no data files found")
    return sorted(files)
