"""Speculative decoding: greedy output equals the target's alone whatever the draft proposes; the acceptance rule
keeps the target's distribution; the server and the CLI take a draft; a draft that cannot draft is one clear error."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
import torch
from transformers import GPT2LMHeadModel
from typer.testing import CliRunner

from conftest import make_docs
from lmforge.cli import app as cli
from lmforge.generate import Decoding, generate, open_generator
from lmforge.generate.running import Row
from lmforge.generate.speculative import SpeculativeBatch, speculative_generate
from lmforge.recipe import TokenizerConfig
from lmforge.serve import ServedModel, create_app
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from test_serve import client, serving

from test_serve_continuous import _one_thread, lm  # noqa: F401  (fixtures: one thread, the tiny LM)

PROMPTS = ["def value", "The river walked under", "x", "import os\nimport sys\n"]


@pytest.fixture(scope="module")
def draft_dir(tiny_lm_dir, lm, tmp_path_factory):
    """The target's first layer alone (with its embeddings and head): a draft the target often agrees with."""
    model, tok = lm
    config = copy.deepcopy(model.config)
    config.n_layer = 1
    draft = GPT2LMHeadModel(config)
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if ".h.1." not in k})
    folder = tmp_path_factory.mktemp("draft")
    save_tokenizer(load_tokenizer(tiny_lm_dir), folder)
    draft.save_pretrained(folder)
    return folder


def test_greedy_output_is_the_targets_alone(lm, draft_dir):
    model, tok = lm
    draft, _ = open_generator(draft_dir)
    rates = []
    for prompt in PROMPTS:
        settings = Decoding(max_new_tokens=40, temperature=0, stop=("@@",))
        alone = generate(model, tok, [prompt], settings)[0]
        pieces = []
        got, rate = speculative_generate(model, tok, draft, prompt, settings, k=4, emit=pieces.append)
        assert (got.token_ids, got.text, got.finish_reason, got.completion_tokens) == \
               (alone.token_ids, alone.text, alone.finish_reason, alone.completion_tokens)
        assert "".join(pieces) == got.text
        rates.append(rate)
    assert all(0 < r < 1 for r in rates), rates  # the draft is right often, not always
    same, rate = speculative_generate(model, tok, model, "def value", Decoding(max_new_tokens=20, temperature=0))
    assert rate == 1.0 and same.text == generate(model, tok, ["def value"], Decoding(max_new_tokens=20,
                                                                                        temperature=0))[0].text


def test_the_acceptance_rule_keeps_the_targets_distribution(lm):
    """One drafted token drawn from q, kept or replaced by the rule: the token that comes out follows p."""
    model, tok = lm
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    batch = SpeculativeBatch(model, tok, model)
    row = Row([1], Decoding(max_new_tokens=2, temperature=1.0, top_k=None, seed=0), 2)
    batch._start(row)
    counts = torch.zeros(4)
    for _ in range(4000):
        x = int(torch.multinomial(q, 1, generator=row.generator))
        kept, token = batch._verify(row, p.log().repeat(2, 1), [q[None]], [x])
        counts[x if kept else token] += 1
    assert torch.allclose(counts / counts.sum(), p, atol=0.03), counts / counts.sum()


def test_server_and_cli_with_a_draft(tiny_lm_dir, lm, draft_dir, tmp_path):
    model, tok = lm
    draft, _ = open_generator(draft_dir)
    served = ServedModel.of("tiny", model, tok)
    served.draft = draft
    alone = generate(model, tok, ["def value"], Decoding(max_new_tokens=30, temperature=0))[0]
    with serving(create_app({"tiny": served})) as base:
        c = client(base, key="unused")
        r = c.completions.create(model="tiny", prompt="def value", max_tokens=30, temperature=0)
        pieces = [e.choices[0].text for e in c.completions.create(model="tiny", prompt="def value", max_tokens=30,
                                                                  temperature=0, stream=True) if e.choices]
        rate = httpx.get(f"{base}/metrics").json()["models"]["tiny"]["draft_acceptance_rate"]
    assert r.choices[0].text == "".join(pieces) == alone.text and 0 < rate < 1

    runner = CliRunner()
    result = runner.invoke(cli, ["generate", str(tiny_lm_dir), "--prompt", "def value", "--temperature", "0",
                                 "--max-new-tokens", "30", "--draft", str(draft_dir)])
    assert result.exit_code == 0 and result.stdout == "def value" + alone.text + "\n", result.output
    assert "accepted at a rate of" in result.stderr

    # a draft with another tokenizer, and one no smaller than the target: one clear error each, exit status 2
    other = tmp_path / "other-tokenizer"
    save_tokenizer(train_tokenizer(iter(make_docs("prose", 50, seed=5)),
                                   TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)), other)
    GPT2LMHeadModel(copy.deepcopy(draft.config)).save_pretrained(other)
    big = tmp_path / "bigger"
    save_tokenizer(tok, big)
    config = copy.deepcopy(model.config)
    config.n_layer = 3
    GPT2LMHeadModel(config).save_pretrained(big)
    for folder, message in ((other, "tokenizer differs"), (big, "not smaller than the target"),
                            (tmp_path / "missing", "no such run folder")):
        for command in (["generate", str(tiny_lm_dir), "--prompt", "x", "--draft", str(folder)],
                        ["serve", str(tiny_lm_dir), "--draft", str(folder), "--port", "1"]):
            result = runner.invoke(cli, command)
            assert result.exit_code == 2 and message in result.stderr, result.output
            assert result.stderr.startswith("error: --draft")
    assert json.loads((big / "config.json").read_text())["n_layer"] == 3
