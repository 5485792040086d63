"""Data: files → documents with domain tags → train/validation split → tokenized, packed blocks
(`lmforge.data.sources`, `lmforge.data.blocks`). Nothing is imported here, so a stage that needs only the sources
(prep) does not load the tokenizer, torch or transformers."""
