"""Routing rules of an experts ensemble, looked up by name (`experts.routing`, or 'routing' in ensemble.json).

A rule is a factory `(folder, spec, domains, settings) -> router or None`: None keeps the ensemble's own
weights, the Bayes domain posterior; a router maps input ids (B, T) to per-position expert weights (B, T, D)
that use only the tokens seen so far. `lmforge.register_router` adds rules from user code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from lmforge.data.clusters import Clustering, ClusterRouter
from lmforge.recipe import ExpertsConfig, load_recipe
from lmforge.registry import ROUTERS, register_router
from lmforge.tokenizer import load_tokenizer


@register_router("posterior")
def posterior_routing(folder: Path, spec: dict, domains: list[str], settings: ExpertsConfig) -> None:
    """p(d | x_{≤t}) ∝ p(d) · p_d(x_{≤t}): computed by the ensemble itself."""
    return None


@register_router("clusters")
def cluster_routing(folder: Path, spec: dict, domains: list[str], settings: ExpertsConfig) -> ClusterRouter:
    """c-BTM: the context's distance to the cluster centres of RUN/clusters (or ensemble.json's 'clusters')."""
    clustering = Clustering.load((folder / spec["clusters"]).resolve() if spec.get("clusters")
                                 else folder.parent / "clusters")
    tokenizer = load_tokenizer((folder / spec["experts"][0]).resolve())
    return ClusterRouter(clustering, tokenizer, domains,
                         temperature=spec.get("routing_temperature", settings.routing_temperature),
                         top_k=spec.get("top_k"), stride=spec.get("routing_stride", settings.routing_stride))


def ensemble_router(folder: Union[str, Path], spec: dict, domains: list[str]) -> Optional[object]:
    """The router of an ensemble folder. The rule, temperature and stride come from ensemble.json when it records
    them ('routing', 'clusters', 'routing_temperature', 'routing_stride'), else from the experts recipe of the run
    the folder is in (RUN/recipe.yaml)."""
    folder = Path(folder)
    recipe_file = folder.parent / "recipe.yaml"
    settings = (load_recipe(recipe_file).experts if recipe_file.is_file() else None) or ExpertsConfig()
    return ROUTERS.get(spec.get("routing", settings.routing)).value(folder, spec, domains, settings)
