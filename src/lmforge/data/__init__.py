"""Data: files → documents with domain tags → train/validation split → tokenized, packed blocks."""

from lmforge.data.sources import load_documents, expand_paths
from lmforge.data.blocks import BlockData, build_blocks

__all__ = ["load_documents", "expand_paths", "BlockData", "build_blocks"]
