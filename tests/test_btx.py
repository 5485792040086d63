"""Branch-Train-MiX: the merged MoE's identities (identical experts, averaged shared parameters, exact reload), the
load-balancing loss, bad input, and a toy two-domain run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import (AutoModelForCausalLM, BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from lmforge.errors import LmforgeError
from lmforge.experts import branch, evaluate, load_balancing_loss, load_moe, merge, merge_experts, train
from lmforge.experts.moe import router_parameter_names
from lmforge.recipe import recipe_from_dict

from conftest import tiny_recipe

VOCAB = 60


def tiny_gpt2(seed: int, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, activation_function="gelu",
                  bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**config, **overrides})).eval()


def tiny_llama(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, bos_token_id=0,
                  eos_token_id=0)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


MAKERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_moe_of_identical_experts_equals_the_expert(family):
    make = MAKERS[family]
    expert = make(0)
    ids = torch.randint(0, VOCAB, (3, 16))
    reference = logits(expert, ids)
    for top_k in (1, 2):
        moe = merge_experts([make(0), make(0), make(0)], top_k=top_k)
        torch.testing.assert_close(logits(moe, ids), reference, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # any router ("trained" or not) mixes identical FFNs into that FFN
            for name in router_parameter_names(moe):
                moe.get_parameter(name).normal_(0.0, 3.0)
        torch.testing.assert_close(logits(moe, ids), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shared_parameters_are_averaged_and_ffns_become_experts(family):
    a, b = MAKERS[family](1), MAKERS[family](2)
    moe = merge_experts([a, b], top_k=1)
    sa, sb, sm = a.state_dict(), b.state_dict(), moe.state_dict()
    shared = [k for k in sa if ".mlp." not in k]
    assert len(shared) > 10
    for key in shared:
        torch.testing.assert_close(sm[key], (sa[key] + sb[key]) / 2, msg=key)
    assert moe.config.num_local_experts == 2 and moe.config.num_experts_per_tok == 1
    for e, s in enumerate((sa, sb)):
        if family == "gpt2":
            for part in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
                assert torch.equal(sm[f"transformer.h.1.mlp.experts.{e}.{part}"], s[f"transformer.h.1.mlp.{part}"])
        else:  # Mixtral's fused layout: gate_up_proj[e] = [gate_proj; up_proj], down_proj[e] = down_proj
            p = "model.layers.1.mlp."
            assert torch.equal(sm[p + "experts.gate_up_proj"][e], torch.cat([s[p + "gate_proj.weight"],
                                                                              s[p + "up_proj.weight"]]))
            assert torch.equal(sm[p + "experts.down_proj"][e], s[p + "down_proj.weight"])
    routers = router_parameter_names(moe)
    assert len(routers) == 2 and all(moe.get_parameter(n).shape == (2, 32) for n in routers)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_centroid_routers_send_each_domain_to_its_own_expert(family):
    from lmforge.experts.moe import centroid_routers
    experts = [MAKERS[family](seed) for seed in (0, 1)]
    moe = merge_experts(experts, names=["low", "high"], top_k=1).eval()
    generator = torch.Generator().manual_seed(0)
    low = torch.randint(1, VOCAB // 2, (4, 17), generator=generator)     # two "domains": disjoint vocabularies
    high = torch.randint(VOCAB // 2, VOCAB, (4, 17), generator=generator)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    centroid_routers(moe, [low.numpy(), high.numpy()], margin=2.0)
    routers = set(router_parameter_names(moe))
    assert all(torch.equal(v, before[k]) != (k in routers) for k, v in moe.state_dict().items())
    seen = {}
    mlps = [moe.get_submodule(name[:-len(".gate.weight")]) for name in sorted(routers)]
    hooks = [m.register_forward_pre_hook(lambda _m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"])),
                                         with_kwargs=True) for i, m in enumerate(mlps)]
    for d, ids in enumerate((low, high)):
        with torch.no_grad():
            moe(input_ids=ids[:, :-1])
        for i, name in enumerate(sorted(routers)):
            x = seen[i].reshape(-1, seen[i].shape[-1])
            mean_logits = x.mean(0) @ moe.get_parameter(name).T
            torch.testing.assert_close(mean_logits[d], torch.tensor(2.0), atol=1e-3, rtol=0)  # the margin, exactly
            assert mean_logits[d] > mean_logits[1 - d]
            assert (x @ moe.get_parameter(name).T).argmax(-1).eq(d).float().mean() > 0.5  # most tokens go home
    for h in hooks:
        h.remove()
    with pytest.raises(LmforgeError, match="3 domains' text for 2 experts"):
        centroid_routers(moe, [low.numpy()] * 3)


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_collapsed():
    n, tokens = 4, 512
    assert load_balancing_loss([torch.zeros(tokens, n)], top_k=2).item() == pytest.approx(1.0)
    torch.manual_seed(0)
    balanced = [torch.randn(tokens, n) * 0.01 for _ in range(2)]
    assert load_balancing_loss(balanced, top_k=2).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.zeros(tokens, n)
    collapsed[:, 0] = 10.0
    assert load_balancing_loss([collapsed], top_k=1).item() == pytest.approx(n, rel=1e-3)
    assert load_balancing_loss([collapsed], top_k=2).item() == pytest.approx(n / 2, rel=1e-3)
    assert load_balancing_loss([collapsed, torch.zeros(tokens, n)], top_k=2).item() == pytest.approx((n / 2 + 1) / 2,
                                                                                                    rel=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_moe_loads_back_bit_identical(tmp_path, family):
    moe = merge_experts([MAKERS[family](3), MAKERS[family](4), MAKERS[family](5)], top_k=2, seed=7)
    moe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == {"gpt2": "lmforge_gpt2_moe", "llama": "mixtral"}[family]
    ids = torch.randint(0, VOCAB, (2, 20))
    again = load_moe(tmp_path)
    assert type(again) is type(moe)
    assert torch.equal(logits(again, ids), logits(moe, ids))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers alone (gpt2: once lmforge.experts is imported)
    assert torch.equal(logits(plain, ids), logits(moe, ids))
    with torch.no_grad():
        out = again(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (40, 3)


def test_bad_experts_give_clear_errors():
    torch.manual_seed(0)
    bert = BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, is_decoder=True))
    with pytest.raises(LmforgeError, match="family 'bert'"):
        merge_experts([bert, bert])
    with pytest.raises(LmforgeError, match="expert 'b' has a different architecture.*n_layer"):
        merge_experts([tiny_gpt2(0), tiny_gpt2(0, n_layer=3)], names=["a", "b"])
    with pytest.raises(LmforgeError, match="different architecture"):
        merge_experts([tiny_gpt2(0), tiny_llama(0)])
    with pytest.raises(LmforgeError, match="--top-k: 3 experts per token, but there are 2 experts"):
        merge_experts([tiny_llama(0), tiny_llama(1)], top_k=3)


def test_branch_train_mix_end_to_end(tmp_path, corpus):
    from lmforge.generate.decode import open_generator
    tree = tiny_recipe(corpus, tmp_path / "btx", "clm", max_steps=4, eval_every=0, eval_batches=1, log_every=1)
    tree["experts"] = {"seed_steps": 2, "steps": 4}
    run = branch(recipe_from_dict(tree), show_progress=False)
    train(run, show_progress=False)
    merge(run, "moe", steps=0)  # merged, untrained routers
    before = load_moe(run / "moe").state_dict()
    assert json.loads((run / "moe" / "merge.json").read_text())["train"] is None
    merge(run, "moe", steps=3, train="router", aux_weight=0.05, show_progress=False)
    after = load_moe(run / "moe").state_dict()
    routers = [k for k in after if k.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    for key, value in after.items():
        assert torch.equal(value, before[key]) != (key in routers), key  # only the routers moved
    info = json.loads((run / "moe" / "merge.json").read_text())
    assert info | {"experts": None} == {"method": "moe", "domains": ["code", "prose"], "family": "gpt2",
                                        "experts": None, "top_k": 2, "aux_weight": 0.05, "steps": 3,
                                        "train": "router", "shared": "uniform", "router_init": "random"}
    records = [json.loads(line) for line in (run / "moe-run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "split" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(0.9 < r["aux_loss"] < 2.0 for r in steps)  # n = k = 2: every token uses both experts
    results = evaluate(run, max_batches=2)
    assert {"seed", "moe"} <= set(results)
    for domain in ("code", "prose"):
        assert math.isfinite(results["moe"][f"ppl/{domain}"]) and results["moe"][f"ppl/{domain}"] > 1
    model, tokenizer = open_generator(run / "moe")  # an HF folder like any other: generation works
    ids = torch.tensor([tokenizer("def x", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.size(1) + 4)
    # Fisher-weighted shared parameters: the same experts, each shared weight pulled towards the expert whose
    # domain's gradients it carries; the FFN experts are the experts' own.
    merge(run, "moe", weights="fisher", steps=0, router_init="centroids", show_progress=False)
    fisher = load_moe(run / "moe").state_dict()
    info = json.loads((run / "moe" / "merge.json").read_text())
    assert info["shared"] == "fisher" and info["router_init"] == "centroids"
    assert all(not torch.equal(fisher[k], before[k]) for k in routers)
    assert not torch.allclose(fisher["transformer.wte.weight"], before["transformer.wte.weight"])
    ffn = [k for k in fisher if ".mlp.experts." in k]
    assert ffn and all(torch.equal(fisher[k], before[k]) for k in ffn)
    from typer.testing import CliRunner
    from lmforge.cli import app
    done = CliRunner().invoke(app, ["experts", "merge", str(run), "--method", "moe", "--weights", "prior"])
    assert done.exit_code == 2 and "moe: uniform|fisher" in done.output
