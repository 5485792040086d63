"""Registries: objectives, model families and routing rules added from user code, and the errors for unknown
names."""

import json

import pytest
import torch
from transformers import GPT2Config

from lmforge import LmforgeError, register_family, register_objective, register_router
from lmforge.models import build_model
from lmforge.models.routers import ensemble_router
from lmforge.objectives import build_objective
from lmforge.objectives.mlm import MaskedLM
from lmforge.recipe import recipe_from_dict
from lmforge.registry import FAMILIES, OBJECTIVES, ROUTERS
from lmforge.recipe import TokenizerConfig
from lmforge.tokenizer import train_tokenizer


def test_unknown_names_suggest_the_closest():
    with pytest.raises(LmforgeError, match="unknown objective 'mlmm'; did you mean 'mlm'"):
        recipe_from_dict({"objective": {"name": "mlmm"}})
    with pytest.raises(LmforgeError, match="unknown model family 'gtp2'; did you mean 'gpt2'"):
        recipe_from_dict({"model": {"family": "gtp2"}})
    with pytest.raises(LmforgeError, match="unknown routing rule 'cluster'; did you mean 'clusters'"):
        recipe_from_dict({"experts": {"routing": "cluster"}})


def test_registered_objective_is_built_by_name():
    @register_objective("test-mlm", like="mlm")
    class TestMaskedLM(MaskedLM):
        pass

    try:
        recipe = recipe_from_dict({"objective": {"name": "test-mlm"}, "model": {"family": "bert"}})
        assert recipe.objective.kind == "mlm" and recipe.objective.masked and not recipe.objective.pairs
        tok = _wordpiece()
        objective = build_objective(recipe.objective, tok, seed=3)
        assert type(objective) is TestMaskedLM
        model = build_model(recipe.model, recipe.objective, tok)
        assert type(model).__name__ == "BertForMaskedLM"  # the head of the objective it is like
    finally:
        OBJECTIVES._entries.pop("test-mlm")
    with pytest.raises(LmforgeError, match="like='mlm2' is not a built-in objective"):
        register_objective("x", like="mlm2")


def test_registered_family_builds_from_scratch():
    @register_family("test-gpt2-narrow", kind="decoder")
    def narrow(dims, cfg, objective, tokenizer):
        return GPT2Config(n_embd=dims["d"], n_layer=1, n_head=dims["heads"], n_inner=dims["d"],
                          n_positions=objective.block_size, vocab_size=len(tokenizer))

    try:
        tok = _wordpiece()
        recipe = recipe_from_dict({"model": {"family": "test-gpt2-narrow", "d_model": 32, "n_heads": 2},
                                   "objective": {"name": "clm", "block_size": 16}})
        model = build_model(recipe.model, recipe.objective, tok)
        assert model.config.n_layer == 1 and model.config.n_inner == 32
        masked = recipe_from_dict({"model": {"family": "test-gpt2-narrow"}, "objective": {"name": "mlm"}})
        with pytest.raises(LmforgeError, match="'test-gpt2-narrow' is a decoder; objective 'mlm' needs"):
            build_model(masked.model, masked.objective, tok)
    finally:
        FAMILIES._entries.pop("test-gpt2-narrow")


def test_registered_router_is_used_by_an_ensemble_folder(tmp_path):
    @register_router("test-uniform")
    def uniform(folder, spec, domains, settings):
        return lambda ids: torch.full((*ids.shape, len(domains)), 1.0 / len(domains))

    try:
        assert recipe_from_dict({"experts": {"routing": "test-uniform"}}).experts.routing == "test-uniform"
        spec = {"experts": ["a", "b"], "domains": ["x", "y"], "routing": "test-uniform"}
        (tmp_path / "ensemble.json").write_text(json.dumps(spec))
        router = ensemble_router(tmp_path, spec, spec["domains"])
        assert torch.equal(router(torch.zeros(2, 3, dtype=torch.long)), torch.full((2, 3, 2), 0.5))
        assert ensemble_router(tmp_path, {**spec, "routing": "posterior"}, spec["domains"]) is None
    finally:
        ROUTERS._entries.pop("test-uniform")


def _wordpiece():
    return train_tokenizer(["the cat sat on the mat", "a dog ran in the park"] * 20,
                           TokenizerConfig(kind="wordpiece", vocab_size=60))
