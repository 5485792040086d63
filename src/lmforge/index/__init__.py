"""`lmforge index`: embed a corpus (text, JSONL or CSV/TSV with ids) with an embedding run's model into an exact vector
index on disk; `retrieve` answers queries from it with the model that built it."""

from lmforge.index.build import index, read_documents, retrieve
from lmforge.stage import callable_stage

__all__ = ["index", "read_documents", "retrieve"]

callable_stage(__name__)  # `from lmforge import index` can be called: index(...)
