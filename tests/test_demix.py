"""DEMix layers: identities with the dense model, routing, the posterior, adding and removing experts without
changing the others, the saved format, bad input, and a toy two-domain run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
    LlamaForCausalLM

from lmforge.errors import LmforgeError
from lmforge.experts import branch, evaluate, train
from lmforge.experts.demix import add_domain, remove_domain
from lmforge.models.demix import add_expert, demix_from_dense, expert_parameter_names, remove_expert
from lmforge.recipe import recipe_from_dict

from conftest import tiny_recipe

VOCAB = 60


def tiny_gpt2(seed: int, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides})).eval()


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0)).eval()


MAKERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, **kwargs).logits


def scrambled(model, seed: int = 5):
    """The model with every expert's FFN made different (so routing matters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_demix_of_a_dense_model_equals_it_whatever_the_routing(family):
    dense = MAKERS[family](0)
    ids = torch.randint(0, VOCAB, (3, 16))
    reference = logits(dense, ids)
    demix = demix_from_dense(dense, ["a", "b", "c"])
    assert type(demix).__name__ == {"gpt2": "GPT2DEMixForCausalLM", "llama": "LlamaDEMixForCausalLM"}[family]
    torch.testing.assert_close(logits(demix, ids), reference, atol=1e-5, rtol=1e-5)                  # posterior
    torch.testing.assert_close(logits(demix, ids, domain=torch.tensor([2, 0, 1])), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(demix, ids, domain_weights=torch.tensor([0.2, 0.5, 0.3]).expand(3, 3)),
                               reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = demix.generate(ids[:, :5], attention_mask=torch.ones(3, 5, dtype=torch.long), max_new_tokens=6,
                             do_sample=False)
        assert torch.equal(out, dense.generate(ids[:, :5], attention_mask=torch.ones(3, 5, dtype=torch.long),
                                               max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hard_routing_sends_each_row_to_its_expert(family):
    demix = scrambled(demix_from_dense(MAKERS[family](1), ["a", "b", "c"]))
    ids = torch.randint(0, VOCAB, (4, 12))
    alone = [logits(demix, ids, domain=e) for e in range(3)]
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    mixed = logits(demix, ids, domain=torch.tensor([2, 0, 2, 1]))
    for row, e in enumerate([2, 0, 2, 1]):
        torch.testing.assert_close(mixed[row], alone[e][row], atol=1e-5, rtol=1e-5)
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0, 2, 1]), 3).float()
    torch.testing.assert_close(logits(demix, ids, domain_weights=one_hot), mixed, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expert indices must lie in 0..2"):
        logits(demix, ids, domain=3)


def test_posterior_sums_to_one_and_concentrates_on_the_expert_that_explains_the_text():
    # One layer; embeddings and attention write nothing, so the residual stream is the FFN's output bias:
    # expert "low" writes +u, expert "high" -u, and the LM head maps +u to tokens < 30 and -u to tokens >= 30.
    dense = tiny_gpt2(2, n_layer=1, tie_word_embeddings=False)
    demix = demix_from_dense(dense, ["low", "high"])
    u = torch.tensor([1.0, -1.0] * 16)
    with torch.no_grad():
        for name, p in demix.named_parameters():
            if name.startswith(("transformer.wte", "transformer.wpe")) or ".attn." in name or ".mlp." in name:
                p.zero_()
        block = demix.transformer.h[0].mlp
        block.experts[0].c_proj.bias.copy_(u)
        block.experts[1].c_proj.bias.copy_(-u)
        demix.lm_head.weight.copy_(torch.cat([u.expand(30, 32), -u.expand(30, 32)]) * 0.5)
    ids = torch.randint(30, VOCAB, (2, 10))  # text of the "high" domain
    posterior = demix.domain_posterior(ids)
    torch.testing.assert_close(posterior.sum(-1), torch.ones(2, 10))
    torch.testing.assert_close(posterior[:, 0], torch.full((2, 2), 0.5))  # the prior before any evidence
    assert (posterior[:, 3:, 1] > 0.99).all()
    # The forward mixes with that posterior: after a few tokens it predicts like the "high" expert alone.
    torch.testing.assert_close(logits(demix, ids)[:, 4:], logits(demix, ids, domain=1)[:, 4:], atol=1e-3, rtol=1e-3)
    demix.config.demix_prior = [0.9, 0.1]
    torch.testing.assert_close(demix.domain_posterior(ids)[:, 0], torch.tensor([[0.9, 0.1]]).expand(2, 2))
    demix.config.demix_top_k = 1
    assert set(demix.domain_posterior(ids).flatten().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adding_and_removing_experts_leaves_the_others_unchanged(family):
    demix = scrambled(demix_from_dense(MAKERS[family](3), ["a", "b"]))
    ids = torch.randint(0, VOCAB, (2, 12))
    before = {d: logits(demix, ids, domain=i) for i, d in enumerate(demix.domains)}
    grown = add_expert(demix, "c", init_from="b")
    assert grown.domains == ["a", "b", "c"]
    torch.testing.assert_close(logits(grown, ids, domain=2), before["b"], atol=0, rtol=0)  # a copy of b's expert
    for i, d in enumerate(["a", "b"]):
        assert torch.equal(logits(grown, ids, domain=i), before[d])
    shrunk = remove_expert(grown, "a")
    assert shrunk.domains == ["b", "c"]
    assert torch.equal(logits(shrunk, ids, domain=0), before["b"])
    assert all(".mlp.experts.1." in n for n in expert_parameter_names(shrunk, "c"))
    with pytest.raises(LmforgeError, match="already has an expert"):
        add_expert(demix, "a", init_from="b")
    with pytest.raises(LmforgeError, match="no expert 'z' to initialise from"):
        add_expert(demix, "c", init_from="z")
    with pytest.raises(LmforgeError, match="no expert 'z' to remove"):
        remove_expert(demix, "z")
    with pytest.raises(LmforgeError, match="the only expert"):
        remove_expert(remove_expert(demix, "a"), "b")


def test_concurrent_forwards_in_threads_keep_their_own_routing():
    import copy
    import threading
    demix = scrambled(demix_from_dense(tiny_gpt2(6), ["a", "b"]))
    ids = torch.randint(0, VOCAB, (2, 12))
    expected = [logits(demix, ids, domain=e) for e in range(2)]
    results, barrier = {}, threading.Barrier(4)

    def run(k: int) -> None:
        barrier.wait()
        for _ in range(5):
            results.setdefault(k, []).append(logits(demix, ids, domain=k % 2))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, outs in results.items():
        assert all(torch.equal(o, expected[k % 2]) for o in outs), k
    twin = copy.deepcopy(demix)  # copies work, and start with no routing of their own
    assert torch.equal(logits(twin, ids, domain=1), expected[1])


def test_saved_demix_loads_back_bit_identical_with_the_auto_classes(tmp_path):
    demix = scrambled(demix_from_dense(tiny_gpt2(4), ["x", "y"]))
    demix.config.demix_prior = [0.25, 0.75]
    demix.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lmforge_gpt2_demix" and config["demix_domains"] == ["x", "y"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.domains == ["x", "y"] and again.config.demix_prior == [0.25, 0.75]
    for key, value in demix.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    ids = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(logits(again, ids), logits(demix, ids))


def test_unsupported_family_is_a_clear_error():
    bert = BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, is_decoder=True))
    with pytest.raises(LmforgeError, match="family 'bert' are not supported; use gpt2 or llama"):
        demix_from_dense(bert, ["a", "b"])
    with pytest.raises(LmforgeError, match="domains must be distinct"):
        demix_from_dense(tiny_gpt2(0), ["a", "a"])


def test_demix_trains_adds_and_removes_a_domain_end_to_end(tmp_path, corpus):
    from lmforge.generate.decode import open_generator
    from lmforge.models import load_model
    tree = tiny_recipe(corpus, tmp_path / "demix", "clm", max_steps=20, eval_every=0, eval_batches=2, lr=5e-3)
    tree["data"]["validation_fraction"] = 0.2
    tree["experts"] = {"seed_steps": 10, "steps": 20, "domains": ["prose"]}
    run = branch(recipe_from_dict(tree), show_progress=False)
    train(run, [], demix=True, show_progress=False)           # DEMix alone: one expert (prose) for now
    info = json.loads((run / "demix" / "demix.json").read_text())
    assert info["domains"] == ["prose"] and info["history"][0] | {"tokens": 0} == {
        "op": "train", "domains": ["prose"], "steps": 20, "tokens": 0}
    assert info["history"][0]["tokens"] == 20 * 8 * 32
    first = load_model(run / "demix", "clm").eval()
    ids = torch.randint(0, first.config.vocab_size, (2, 16))
    prose_before = logits(first, ids, domain=0)

    add_domain(run, "code", steps=60, show_progress=False)   # only the new expert trains
    grown = load_model(run / "demix", "clm").eval()
    assert grown.domains == ["prose", "code"]
    new = set(expert_parameter_names(grown, "code"))
    for key, value in first.state_dict().items():
        assert torch.equal(grown.state_dict()[key], value), key   # shared parameters and prose's expert as they were
    assert any(not torch.equal(grown.get_parameter(n), grown.get_parameter(n.replace(".experts.1.", ".experts.0.")))
               for n in new)                                         # the new expert learned
    assert torch.equal(logits(grown, ids, domain=0), prose_before)
    history = json.loads((run / "demix" / "demix.json").read_text())["history"]
    assert [h["op"] for h in history] == ["train", "add"] and history[1]["init"] == "prose"

    results = evaluate(run, max_batches=4)
    for domain in ("code", "prose"):
        assert math.isfinite(results["demix"][f"ppl/{domain}"])
    assert results["demix"]["ppl/prose"] < 0.8 * results["seed"]["ppl/prose"]
    assert results["demix"]["ppl/code"] < 0.97 * results["seed"]["ppl/code"]  # shared parameters were fit to prose
    model, tokenizer = open_generator(run / "demix")          # an HF folder like any other: generation works
    prompt = torch.tensor([tokenizer("def x", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt.size(1) + 4)

    with pytest.raises(LmforgeError, match="'code' already has an expert"):
        add_domain(run, "code", show_progress=False)
    remove_domain(run, "prose")
    shrunk = load_model(run / "demix", "clm").eval()
    assert shrunk.domains == ["code"] and torch.equal(logits(shrunk, ids, domain=0), logits(grown, ids, domain=1))
    with pytest.raises(LmforgeError, match="'code' is the only expert"):
        remove_domain(run, "code")

    from typer.testing import CliRunner
    from lmforge.cli import app
    runner = CliRunner()
    done = runner.invoke(app, ["experts", "demix-remove", str(run), "--domain", "legal"])
    assert done.exit_code == 2 and "no expert 'legal' to remove (experts: ['code'])" in done.output
    done = runner.invoke(app, ["experts", "demix-add", str(run), "--domain", "legal", "--no-progress"])
    assert done.exit_code == 2 and "no training text of domain(s) 'legal' in this run's data" in done.output
    done = runner.invoke(app, ["experts", "demix-add", str(tmp_path / "nothing"), "--domain", "x"])
    assert done.exit_code == 2 and "not an experts run" in done.output
