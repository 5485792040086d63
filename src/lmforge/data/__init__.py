"""Data: files → documents with domain tags → train/validation split → tokenized, packed blocks."""

from lmforge.data.blocks import BlockData, build_blocks
from lmforge.data.sources import expand_paths, load_documents

__all__ = ["load_documents", "expand_paths", "BlockData", "build_blocks"]
