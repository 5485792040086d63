"""Branch-Train-Merge: the posterior, ensemble and average identities, and a toy two-domain run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmforge.experts import ExpertEnsemble, average_state_dicts, branch, evaluate, load_ensemble, merge, train
from lmforge.recipe import recipe_from_dict

from conftest import tiny_recipe


def tiny_gpt2(seed: int, vocab: int = 50) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()


def test_ensemble_of_identical_experts_equals_the_expert():
    expert = tiny_gpt2(0)
    twin = tiny_gpt2(0)
    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        single = torch.log_softmax(expert(input_ids=ids).logits, -1)
        out = ExpertEnsemble([expert, twin], ["a", "b"], prior=torch.tensor([0.3, 0.7]))(ids)
    torch.testing.assert_close(out.logits, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.posterior[:, 0], torch.tensor([[0.3, 0.7]]).expand(3, 2))  # prior before evidence
    torch.testing.assert_close(out.posterior.sum(-1), torch.ones(3, 12))


def low_and_high_experts() -> list:
    """Expert "low" puts almost all mass on tokens < 25, expert "high" on tokens >= 25."""
    experts = []
    for low in (True, False):
        model = tiny_gpt2(1)
        with torch.no_grad():
            bias = torch.full((50,), -8.0)
            bias[:25 if low else 50][(0 if low else 25):] = 8.0
            model.lm_head = torch.nn.Linear(16, 50, bias=True)
            model.lm_head.weight.zero_()
            model.lm_head.bias.copy_(bias)
        experts.append(model)
    return experts


def test_posterior_concentrates_on_the_expert_that_explains_the_text():
    experts = low_and_high_experts()
    ensemble = ExpertEnsemble(experts, ["low", "high"])
    ids = torch.randint(25, 50, (2, 10))  # text of the "high" domain
    with torch.no_grad():
        out = ensemble(ids)
    assert torch.allclose(out.posterior.sum(-1), torch.ones(2, 10))
    assert (out.posterior[:, 3:, 1] > 0.99).all()
    top1 = ExpertEnsemble(experts, ["low", "high"], top_k=1)
    with torch.no_grad():
        assert set(top1(ids).posterior[:, 2:].flatten().tolist()) <= {0.0, 1.0}


def _perturbed(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def test_ensemble_generates_like_a_causal_lm(tiny_lm_dir):
    from lmforge.models.ensemble import EnsembleForCausalLM
    from lmforge.generate import Decoding, generate
    from lmforge.models import load_model
    from lmforge.tokenizer import load_tokenizer
    torch.set_num_threads(1)
    tok = load_tokenizer(tiny_lm_dir)
    expert = load_model(tiny_lm_dir, "clm").eval()
    prompts = ["The river", "def value", "Evening rain walked under the"]
    greedy = Decoding(max_new_tokens=12, temperature=0)
    alone = [c.token_ids for c in generate(expert, tok, prompts, greedy)]
    twins = EnsembleForCausalLM(ExpertEnsemble([expert, load_model(tiny_lm_dir, "clm").eval()], ["a", "b"])).eval()
    assert [c.token_ids for c in generate(twins, tok, prompts, greedy)] == alone  # identical experts: the expert
    # Different experts: a left-padded batch gives what each prompt gives alone (padding is no evidence), and
    # the text is the mixture's greedy continuation, computed here token by token.
    mixed = EnsembleForCausalLM(ExpertEnsemble([expert, _perturbed(load_model(tiny_lm_dir, "clm").eval(), 1)],
                                               ["a", "b"], prior=torch.tensor([0.3, 0.7]))).eval()
    batched = [c.token_ids for c in generate(mixed, tok, prompts, greedy)]
    assert batched == [generate(mixed, tok, [p], greedy)[0].token_ids for p in prompts]
    ids = torch.tensor([tok("def value", add_special_tokens=False)["input_ids"]])
    for token in batched[1]:
        with torch.no_grad():
            assert int(mixed(input_ids=ids).logits[0, -1].argmax()) == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    sampled = [generate(mixed, tok, ["The river"], Decoding(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3))[0]
               for _ in range(2)]
    assert sampled[0].token_ids == sampled[1].token_ids and len(sampled[0].token_ids) > 0


def test_relevance_weights_favour_the_expert_that_explains_the_new_text():
    from lmforge.experts.run import relevance
    experts = low_and_high_experts()
    ensemble = ExpertEnsemble(experts + [tiny_gpt2(7)], ["low", "high", "plain"])
    ids = torch.randint(25, 50, (4, 10))
    weights = relevance(ensemble, ids, top_k=None)
    assert set(weights) == {"low", "high", "plain"} and abs(sum(weights.values()) - 1) < 1e-9
    assert weights["high"] > 0.99
    top2 = relevance(ensemble, ids, top_k=2)
    assert list(top2) != ["low", "plain"] and "high" in top2 and len(top2) == 2


def test_an_expert_added_later_starts_from_the_relevant_experts_average(tmp_path, corpus):
    from lmforge.experts.run import add_expert
    from lmforge.errors import LmforgeError
    from lmforge.models import load_model
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": " ".join(str((i * 7 + k) % 100) for k in range(40))}) + "\n"
                               for i in range(200)))
    tree = tiny_recipe({**corpus, "numbers": numbers}, tmp_path / "add", "clm", max_steps=6, eval_every=0)
    tree["experts"] = {"seed_steps": 4, "steps": 6, "domains": ["code", "prose"]}
    run = branch(recipe_from_dict(tree), show_progress=False)
    with pytest.raises(LmforgeError, match="no trained expert to average yet"):
        add_expert(run, "numbers")
    train(run, show_progress=False)
    with pytest.raises(LmforgeError, match="'code' already has an expert"):
        add_expert(run, "code")
    with pytest.raises(LmforgeError, match="no text of domain 'legal' in this run's data"):
        add_expert(run, "legal")
    add_expert(run, "numbers", top_k=2)
    info = json.loads((run / "experts.json").read_text())
    assert info["domains"] == ["code", "prose", "numbers"] and info["added"]["numbers"]["from"] == "average"
    weights = info["added"]["numbers"]["weights"]
    assert set(weights) == {"code", "prose"} and abs(sum(weights.values()) - 1) < 1e-9
    states = {d: load_model(run / "experts" / d / "final", "clm").state_dict() for d in weights}
    start = load_model(run / "experts" / "numbers-init", "clm").state_dict()
    key = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(start[key], sum(w * states[d][key] for d, w in weights.items()))
    train(run, ["numbers"], show_progress=False)  # an ordinary expert from here on
    merge(run, "ensemble")
    assert json.loads((run / "ensemble" / "ensemble.json").read_text())["domains"] == ["code", "prose", "numbers"]


def test_average_of_identical_experts_is_the_identity():
    a, b = tiny_gpt2(2), tiny_gpt2(2)
    merged = average_state_dicts([a.state_dict(), b.state_dict()], [0.25, 0.75])
    for key, value in a.state_dict().items():
        assert torch.allclose(merged[key], value), key
    c = tiny_gpt2(3)
    half = average_state_dicts([a.state_dict(), c.state_dict()])
    key = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(half[key], (a.state_dict()[key] + c.state_dict()[key]) / 2)


@pytest.mark.slow
def test_branch_train_merge_improves_each_domain_over_the_seed(tmp_path, corpus):
    tree = tiny_recipe(corpus, tmp_path / "btm", "clm", max_steps=30, eval_every=0, lr=5e-3, batch_size=8)
    tree["data"]["validation_fraction"] = 0.2
    tree["experts"] = {"seed_steps": 10, "steps": 30}
    run = branch(recipe_from_dict(tree), show_progress=False)
    info = json.loads((run / "experts.json").read_text())
    assert info["domains"] == ["code", "prose"] and (run / "seed" / "config.json").is_file()
    train(run, ["code"], show_progress=False)          # experts train independently: one call per domain
    train(run, ["prose"], show_progress=False)
    assert (run / "experts" / "prose" / "final" / "config.json").is_file()
    assert (run / "experts" / "code.yaml").is_file()  # kept for retraining: training replaces the run folder
    merge(run, "ensemble")
    merge(run, "average")
    results = evaluate(run)
    for domain in ("code", "prose"):
        assert results["ensemble"][f"ppl/{domain}"] < 0.8 * results["seed"][f"ppl/{domain}"], domain
    # The saved ensemble loads back exactly.
    again = load_ensemble(run / "ensemble")
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, load_ensemble(run / "ensemble")(ids).logits)
    assert json.loads((run / "average" / "merge.json").read_text())["weights"] == [0.5, 0.5]
    uniform = results["average"]
    merge(run, "average", weights="fisher", fisher_blocks=8, show_progress=False)
    record = json.loads((run / "average" / "merge.json").read_text())
    assert record["weights"] == "fisher" and record["fisher_blocks"] == 8
    fisher = evaluate(run)["average"]
    for domain in ("code", "prose"):
        assert 1 < fisher[f"ppl/{domain}"] < uniform[f"ppl/{domain}"] * 1.5, domain
    # Generation and serving take the experts run folder (the ensemble by default) or one of its models.
    from typer.testing import CliRunner
    from lmforge.cli import app
    from lmforge.models.ensemble import EnsembleForCausalLM
    from lmforge.generate import open_generator
    from lmforge.serve.models import load_served_model
    assert isinstance(open_generator(run)[0], EnsembleForCausalLM)
    assert isinstance(open_generator(run / "ensemble")[0], EnsembleForCausalLM)
    assert type(open_generator(run, "average")[0]).__name__ == "GPT2LMHeadModel"
    assert load_served_model(f"btm={run}").name == "btm"
    runner = CliRunner()
    for which in ("ensemble", "average", "seed"):
        done = runner.invoke(app, ["generate", str(run), "--model", which, "--prompt", "def", "--max-new-tokens", "5",
                                   "--temperature", "0"])
        assert done.exit_code == 0 and done.stdout.startswith("def"), done.output
    done = runner.invoke(app, ["generate", str(run), "--model", "moe", "--prompt", "def"])
    assert done.exit_code == 2
    assert "no 'moe' model in this experts run yet (it has: ensemble, average, seed)" in done.output
    done = runner.invoke(app, ["generate", str(run), "--model", "final", "--prompt", "def"])
    assert done.exit_code == 2 and "an experts run holds ensemble, moe, demix, average, dense, seed" in done.output


def test_experts_at_a_smaller_batch_and_the_dense_baseline_see_the_same_tokens(tmp_path, corpus):
    from pathlib import Path
    from lmforge.experts.run import dense_recipe, expert_recipe, mixture_steps
    tree = tiny_recipe(corpus, tmp_path / "btm", "clm", max_steps=30, batch_size=16)
    tree["experts"] = {"steps": 120, "batch_size": 4}       # BTM's compute matching: a quarter of the batch each
    recipe = recipe_from_dict(tree)
    expert = expert_recipe(recipe, "code", Path("seed"), tmp_path / "code")
    dense = dense_recipe(recipe, ["code", "prose"], Path("seed"), tmp_path / "dense")
    assert (expert.train.batch_size, expert.train.max_steps) == (4, 120)
    assert (dense.train.batch_size, dense.train.max_steps) == (16, 60)  # 2 domains x 120 x 4 / 16
    assert mixture_steps(recipe, 4) == 120 and mixture_steps(recipe, 1) == 30
    tree["experts"] = {"steps": 50}                         # default: the recipe's batch, n x the steps
    recipe = recipe_from_dict(tree)
    assert expert_recipe(recipe, "code", Path("seed"), tmp_path / "c").train.batch_size == 16
    assert dense_recipe(recipe, ["code", "prose"], Path("seed"), tmp_path / "d").train.max_steps == 100


def test_only_domains_keeps_rows_of_those_domains(corpus):
    from lmforge.data.sources import load_documents
    from lmforge.errors import LmforgeError
    from lmforge.recipe import DataConfig
    sources = [{"path": str(p), "domain": d} for d, p in corpus.items()]
    docs = load_documents(DataConfig(sources=sources, only_domains=["code"]))
    assert set(docs["domain"]) == {"code"} and len(docs) == 300
    with pytest.raises(LmforgeError, match="data.only_domains: no documents"):
        load_documents(DataConfig(sources=sources, only_domains=["legal"]))


def test_a_one_token_prompt_generates_from_an_ensemble_and_a_demix_model():
    """The domain posterior of a one-token context is the prior (no evidence yet), not an empty tensor."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from lmforge.generate import Decoding, generate
    from lmforge.models.demix import demix_from_dense
    from lmforge.models.ensemble import EnsembleForCausalLM, ExpertEnsemble, domain_posterior
    from lmforge.recipe import TokenizerConfig
    from lmforge.tokenizer import train_tokenizer
    tok = train_tokenizer(["the river flows under the bridge"] * 50,
                          TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))
    assert len(tok("the", add_special_tokens=False)["input_ids"]) == 1
    prior = torch.tensor([0.25, 0.75]).log()
    assert torch.allclose(domain_posterior(torch.zeros(2, 3, 0), prior), torch.tensor([0.25, 0.75]).expand(3, 1, 2))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    ensemble = EnsembleForCausalLM(ExpertEnsemble([GPT2LMHeadModel(config).eval() for _ in range(2)], ["a", "b"]))
    demix = demix_from_dense(GPT2LMHeadModel(config), ["a", "b"])
    for model in (ensemble.eval(), demix.eval()):
        out = generate(model, tok, ["the"], Decoding(max_new_tokens=3, temperature=0))[0]
        assert len(tok(out.text, add_special_tokens=False)["input_ids"]) >= 1
