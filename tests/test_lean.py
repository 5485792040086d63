"""The lean GPT-2 forward: bit-identical logits, gradients and dropout draws, and when it steps aside."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmforge.engine.dropout import use_fast_dropout
from lmforge.models.lean import causal_logits, lean_applies


def gpt2(dropout=0.0, attn_dropout=0.0, **kw):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=attn_dropout, bos_token_id=0, eos_token_id=0, **kw)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def run(model, ids, lean: bool):
    """Logits and parameter gradients of a summed loss, by the lean path or by transformers."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout draws on both paths
    logits = causal_logits(model, ids, use_cache=False) if lean else model(input_ids=ids, use_cache=False).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("fast_dropout", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_lean_forward_is_bit_identical_to_transformers(dropout, fast_dropout, activation):
    model = gpt2(dropout, activation_function=activation)
    if fast_dropout:
        use_fast_dropout(model)
    ids = torch.randint(0, 50, (3, 17))
    for training in (True, False):
        model.train(training)
        assert lean_applies(model, use_cache=False)
        logits, grads = run(model, ids, lean=True)
        ref_logits, ref_grads = run(model, ids, lean=False)
        assert torch.equal(logits, ref_logits)
        assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    assert logits.shape == (3, 17, 50)


def test_lean_forward_steps_aside_when_results_could_differ():
    model = gpt2(attn_dropout=0.1)
    ids = torch.randint(0, 50, (2, 9))
    assert not lean_applies(model.train())  # attention dropout in effect
    assert lean_applies(model.eval())  # ... but not in evaluation
    model = gpt2()
    assert not lean_applies(model, position_ids=torch.arange(9)[None])  # document masking
    assert not lean_applies(model, attention_mask=torch.ones(2, 9))
    assert lean_applies(model, position_ids=None, use_cache=False)
    assert not lean_applies(gpt2(reorder_and_upcast_attn=True))
    hooked = gpt2()
    handle = hooked.transformer.h[1].mlp.register_forward_hook(lambda *a: None)
    assert not lean_applies(hooked)
    handle.remove()
    assert lean_applies(hooked)
    checkpointed = gpt2()
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    assert not lean_applies(checkpointed.train())
    compiled = gpt2()
    compiled.transformer.h[0].compile()
    assert not lean_applies(compiled)
    eager = gpt2()
    eager.config._attn_implementation = "eager"
    assert not lean_applies(eager)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=32))
    assert not lean_applies(llama)
    # stepping aside gives transformers' own result
    llama.eval()
    assert torch.equal(causal_logits(llama, ids), llama(input_ids=ids).logits)


def test_a_subclass_is_not_taken_for_gpt2():
    class Routed(GPT2LMHeadModel):
        pass

    model = gpt2()
    routed = Routed(copy.deepcopy(model.config))
    assert lean_applies(model) and not lean_applies(routed)
