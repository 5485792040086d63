"""The prep recipe: one YAML file, one pydantic model per section, the same error style as run recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import Field, model_validator

from lmforge.recipe import Section, SourceConfig, read_yaml_mapping, resolve_path, validate_tree


class NormalizeConfig(Section):
    unicode: Literal["NFC", "NFKC", "none"] = Field("NFKC", description="Unicode normal form of every document.")
    control_chars: bool = Field(True, description="Drop control and zero-width characters (tabs and newlines stay).")
    whitespace: bool = Field(True, description="Collapse runs of spaces, strip line ends, keep at most one blank line.")
    boilerplate_min_docs: Optional[int] = Field(
        None, ge=2, description="Drop lines found in at least this many documents of a domain (null: off).")
    boilerplate_min_chars: int = Field(10, ge=1, description="Shorter lines are never treated as boilerplate.")
    max_doc_chars: int = Field(1_000_000, ge=1000, description="Longer records are cut into pieces of this size.")


class FilterConfig(Section):
    """Gopher-style rules for prose; a threshold of null turns that rule off."""
    min_words: Optional[int] = Field(50, ge=0, description="Fewest words in a document.")
    max_words: Optional[int] = Field(100_000, ge=1, description="Most words in a document.")
    min_mean_word_length: Optional[float] = Field(3.0, ge=0, description="Shortest mean word length (characters).")
    max_mean_word_length: Optional[float] = Field(10.0, ge=0, description="Longest mean word length (characters).")
    max_symbol_word_ratio: Optional[float] = Field(0.1, ge=0, description="Most '#' and ellipses per word.")
    min_punct_line_fraction: Optional[float] = Field(
        None, ge=0, le=1, description="Least fraction of lines ending in terminal punctuation (C4 rule).")
    max_ellipsis_line_fraction: Optional[float] = Field(
        0.3, ge=0, le=1, description="Most lines ending in an ellipsis.")
    max_bullet_line_fraction: Optional[float] = Field(0.9, ge=0, le=1, description="Most lines starting with a bullet.")
    max_non_alpha_word_fraction: Optional[float] = Field(
        0.2, ge=0, le=1, description="Most words without any alphabetic character.")
    max_dup_line_fraction: Optional[float] = Field(0.3, ge=0, le=1, description="Most lines that repeat another line.")
    max_dup_line_char_fraction: Optional[float] = Field(
        0.2, ge=0, le=1, description="Most characters in repeated lines.")
    max_top_ngram_char_fraction: dict[int, float] = Field(
        {2: 0.20, 3: 0.18, 4: 0.16}, description="n → most characters covered by the most frequent word n-gram.")
    max_dup_ngram_char_fraction: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n → most characters covered by repeated word n-grams.")


class CodeFilterConfig(Section):
    """Rules for code domains (as used for The Stack); prose rules do not apply to them."""
    domains: list[str] = Field(["code"], description="Domains that hold source code.")
    min_chars: Optional[int] = Field(20, ge=0, description="Fewest characters in a document.")
    max_line_length: Optional[int] = Field(1000, ge=1, description="Longest line (characters).")
    max_mean_line_length: Optional[float] = Field(100.0, ge=1, description="Longest mean line length.")
    min_alnum_fraction: Optional[float] = Field(
        0.25, ge=0, le=1, description="Least fraction of alphanumeric characters.")


class PrepSourceConfig(SourceConfig):
    id_column: Optional[str] = Field(
        None, description="Column (or JSON key) holding each document's unique id (null: file and line/row).")


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop documents whose normalised text (lowercase, words only) repeats.")
    near: bool = Field(True, description="Drop near-duplicates found with MinHash + LSH.")
    ngram: int = Field(2, ge=1, le=16, description="Word n-gram size of MinHash shingles.")
    threshold: float = Field(
        0.5, gt=0, le=1, description="Jaccard similarity of the word n-gram sets from which two documents are "
                                     "near-duplicates.")
    verify: bool = Field(
        True, description="Check every LSH candidate pair with the true Jaccard of its shingle sets (false: accept "
                          "the MinHash estimate: faster, some wrong removals and misses near the threshold).")
    num_perm: int = Field(128, ge=8, le=1024, description="MinHash permutations (signature length).")
    bands: Optional[int] = Field(
        None, ge=1, description="LSH bands (null: from the threshold, so a pair at the threshold is a candidate "
                                "with probability >= 0.99).")
    seed: int = Field(1, description="Seed of the MinHash permutations.")


class SplitConfig(Section):
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Seeded fraction of each domain held out.")
    validation_count: Optional[int] = Field(
        None, ge=0, description="Hold out exactly this many documents per domain instead (null: use the fraction).")
    seed: int = Field(0, description="Seed of the split.")


class MixConfig(Section):
    temperature: float = Field(1.0, gt=0, description="Sampling ∝ size^(1/T): 1 keeps natural sizes; more flattens.")
    weights: Optional[dict[str, float]] = Field(None, description="Explicit domain → weight (overrides temperature).")
    by: Literal["tokens", "words", "documents"] = Field("tokens", description="What a domain's size counts.")
    resample: bool = Field(True, description="Repeat or drop training documents so the stream follows the weights.")
    seed: int = Field(0, description="Seed of the resampling.")


class OutputConfig(Section):
    dir: str = Field("data/prepared", description="Dataset folder to write (replaced only when complete).")
    tokenizer: Optional[str] = Field(
        None, description="Local HF tokenizer folder used to count tokens (null: words and punctuation marks).")
    plots: bool = Field(True, description="Write the report's PNG figures.")
    examples: int = Field(5, ge=0, description="Duplicate clusters shown in the report.")


class PrepRecipe(Section):
    name: str = Field("prep", description="Name of the dataset.")
    sources: list[PrepSourceConfig] = Field(default_factory=list, description="Raw inputs, each with a domain tag.")
    engine: Literal["local", "ray"] = Field(
        "local", description="Who runs the stages: local processes, or Ray Data (a local Ray, or a cluster with "
                             "--address); both give the same dataset.")
    num_proc: int = Field(1, ge=1, description="Worker processes (local engine; the ray engine uses the cluster's CPUs).")
    shard_mb: float = Field(16.0, gt=0, description="Input megabytes per work unit (units are resumable).")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    code: CodeFilterConfig = Field(default_factory=CodeFilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _check(self) -> "PrepRecipe":
        if not self.sources:
            raise ValueError("the recipe names no sources")
        if self.dedup.bands is not None and self.dedup.num_perm % self.dedup.bands:
            raise ValueError(f"dedup.bands ({self.dedup.bands}) must divide dedup.num_perm ({self.dedup.num_perm})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def prep_recipe_from_dict(tree: dict, source: str = "recipe", overrides: Union[list[str], tuple] = ()) -> PrepRecipe:
    return validate_tree(PrepRecipe, tree, source, overrides)


def load_prep_recipe(path: Union[str, Path], overrides: Union[list[str], tuple] = ()) -> PrepRecipe:
    tree = read_yaml_mapping(path, "a prep recipe is a mapping (sources, filters, dedup, ...)")
    recipe = prep_recipe_from_dict(tree, str(path), overrides)
    for src in recipe.sources:
        src.path = resolve_path(src.path, Path(path).parent)
    return recipe
