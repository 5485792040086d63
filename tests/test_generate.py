"""Decoding: parity with transformers' generate (greedy, seeded sampling, beam search, repetition penalty),
per-row seeds in batches, stop strings, streaming, logprobs, limits, and the `lmforge generate` command."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, BertConfig, BertForMaskedLM, T5Config,
                          T5ForConditionalGeneration)
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.generate import Decoding, cut_at_stop, generate, open_generator, stream
from lmforge.tokenizer import load_tokenizer

PROMPTS = ["The river", "def value", "Evening rain walked under the", "x"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return open_generator(tiny_lm_dir)


def hf_new_tokens(model, tok, prompt: str, seed=None, **kwargs) -> list[int]:
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def test_greedy_equals_transformers_and_batching_changes_nothing(lm):
    model, tok = lm
    alone = [generate(model, tok, [p], Decoding(max_new_tokens=24, temperature=0))[0] for p in PROMPTS]
    for p, c in zip(PROMPTS, alone):
        assert c.token_ids == hf_new_tokens(model, tok, p, max_new_tokens=24, do_sample=False)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True) and c.text
        assert c.prompt_tokens == len(tok(p, add_special_tokens=False)["input_ids"])
    batched = generate(model, tok, PROMPTS, Decoding(max_new_tokens=24, temperature=0))  # left-padded
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]


def test_seeded_sampling_is_reproducible_and_equals_transformers(lm):
    model, tok = lm
    settings = Decoding(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    first = generate(model, tok, ["The river"], settings)[0]
    assert generate(model, tok, ["The river"], settings)[0].text == first.text
    assert generate(model, tok, ["The river"], Decoding(**{**settings.__dict__, "seed": 8}))[0].text != first.text
    # the same draws as transformers' own sampling after torch.manual_seed(seed)
    assert first.token_ids == hf_new_tokens(model, tok, "The river", seed=7, max_new_tokens=24, do_sample=True,
                                            temperature=0.9, top_k=40, top_p=0.95)
    # each row samples with its own generator: batched with other prompts and settings, the row is unchanged
    rows = [Decoding(max_new_tokens=10, temperature=0), settings, Decoding(max_new_tokens=5, temperature=1.3, seed=1)]
    batched = generate(model, tok, ["def value", "The river", "Evening"], rows)
    assert batched[1].text == first.text
    assert batched[2].completion_tokens <= 5 and batched[0].completion_tokens <= 10


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_lean_loop_decodes_exactly_as_generate(lm, family, monkeypatch):
    """Greedy, seeded sampling, left padding, per-row limits, stop strings and EOS: the same tokens either way."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from lmforge.generate import decode
    model, tok = lm
    if family == "llama":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=128)).eval()
    rows = [Decoding(max_new_tokens=30, temperature=0), Decoding(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3),
            Decoding(max_new_tokens=30, temperature=0, stop=("e",)), Decoding(max_new_tokens=25, temperature=1.5, seed=5)]
    assert decode.lean_decodable(model, rows[0])
    lean = generate(model, tok, PROMPTS, rows)
    monkeypatch.setattr(decode, "lean_decodable", lambda *a: False)
    plain = generate(model, tok, PROMPTS, rows)
    assert [c.token_ids for c in lean] == [c.token_ids for c in plain]
    assert [(c.text, c.finish_reason) for c in lean] == [(c.text, c.finish_reason) for c in plain]
    assert lean[1].completion_tokens <= 12 and lean[2].finish_reason == "stop"
    # a checkpoint whose generation_config asks generate for more (here a repetition penalty) keeps generate
    model.generation_config.repetition_penalty = 1.3
    assert not decode.lean_decodable(model, rows[0])
    model.generation_config.repetition_penalty = 1.0


def test_stop_strings_cut_the_text_and_end_generation(lm):
    model, tok = lm
    full = generate(model, tok, ["def value"], Decoding(max_new_tokens=40, temperature=0))[0]
    stop = full.text[12:15]
    assert len(stop) == 3
    at = full.text.find(stop)
    cut = generate(model, tok, ["def value"], Decoding(max_new_tokens=40, temperature=0, stop=(stop, "zzz")))[0]
    assert cut.text == full.text[:at] and cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens  # generation stopped, not just the text
    assert full.finish_reason == "length" and full.completion_tokens == 40
    assert cut_at_stop("ab:cd;", [";", ":"]) == 2 and cut_at_stop("abc", ["x"]) == 3


def test_beam_search_and_repetition_penalty_equal_transformers(lm):
    model, tok = lm
    for p in PROMPTS[:2]:
        ours = generate(model, tok, [p], Decoding(max_new_tokens=12, num_beams=3, length_penalty=0.8,
                                                  early_stopping=True))[0]
        assert ours.token_ids == hf_new_tokens(model, tok, p, max_new_tokens=12, num_beams=3, do_sample=False,
                                               length_penalty=0.8, early_stopping=True)
        rep = generate(model, tok, [p], Decoding(max_new_tokens=20, temperature=0, repetition_penalty=1.5))[0]
        assert rep.token_ids == hf_new_tokens(model, tok, p, max_new_tokens=20, do_sample=False,
                                              repetition_penalty=1.5)
    beams = generate(model, tok, PROMPTS, Decoding(max_new_tokens=8, num_beams=2))
    assert len(beams) == len(PROMPTS) and all(0 < b.completion_tokens <= 8 for b in beams)


def test_stream_pieces_join_to_the_same_text(lm):
    model, tok = lm
    for settings in (Decoding(max_new_tokens=30, temperature=0.8, seed=3),
                     Decoding(max_new_tokens=40, temperature=0, stop=("range len",))):
        pieces = list(stream(model, tok, "def value", settings))
        whole = generate(model, tok, ["def value"], settings)[0].text
        assert len(pieces) > 3 and "".join(pieces) == whole
    # the stop string ("range len") was cut off; its start ("range") was held back, never shown
    assert "range" not in pieces[-1] and not whole.endswith("range")
    # closing the iterator early stops generation (the call returns; the thread is joined)
    it = stream(model, tok, "The river", Decoding(max_new_tokens=200, temperature=0.8, seed=1))
    next(it)
    it.close()


def test_logprobs_match_a_forward_pass(lm):
    model, tok = lm
    c = generate(model, tok, ["The river"], Decoding(max_new_tokens=6, temperature=0, logprobs=2))[0]
    prompt = tok("The river", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([prompt + c.token_ids])).logits[0].log_softmax(-1)
    for k, (token, offset, value, alts) in enumerate(c.logprobs):
        expected = logp[len(prompt) - 1 + k, c.token_ids[k]].item()
        assert value == pytest.approx(expected, abs=1e-4)
        assert len(alts) == 2 and max(alts.values()) == pytest.approx(value, abs=1e-4)  # greedy: the best one
        assert c.text[offset:offset + len(token)] == token


def test_limits_and_model_kinds(lm, tmp_path):
    model, tok = lm
    long_prompt = "The river " * 200  # more tokens than the 256 positions
    with pytest.raises(LmforgeError, match="exceed the model's limit of 256"):
        generate(model, tok, [long_prompt], Decoding(max_new_tokens=4))
    near = "The river"
    while len(tok(near + " The river", add_special_tokens=False)["input_ids"]) < 200:
        near += " The river"
    n = len(tok(near, add_special_tokens=False)["input_ids"])
    with pytest.raises(LmforgeError, match="max_new_tokens 100"):
        generate(model, tok, [near], Decoding(max_new_tokens=100))
    clamped = generate(model, tok, [near], Decoding(max_new_tokens=100, temperature=0), clamp=True)[0]
    assert clamped.completion_tokens <= 256 - n
    with pytest.raises(LmforgeError, match="temperature"):
        Decoding(temperature=-1)
    with pytest.raises(LmforgeError, match="beam search"):
        Decoding(num_beams=2, logprobs=1)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64))
    with pytest.raises(LmforgeError, match="masked LM"):
        generate(mlm, tok, ["x"])


def test_encoder_decoder_generates_like_transformers(tiny_lm_dir, tmp_path):
    tok = load_tokenizer(tiny_lm_dir)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_layers=1,
                                             num_heads=2, pad_token_id=tok.pad_token_id,
                                             eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
    t5.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    model, tok = open_generator(tmp_path / "t5")
    ours = generate(model, tok, ["The river", "def"], Decoding(max_new_tokens=8, temperature=0))
    for prompt, c in zip(["The river", "def"], ours):
        enc = tok(prompt, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False)[0, 1:].tolist()
        ref = ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert c.token_ids == [t for t in ref if t != tok.pad_token_id]


def test_cli_generate(tiny_lm_dir):
    runner = CliRunner()
    base = ["generate", str(tiny_lm_dir), "--prompt", "def value", "--max-new-tokens", "30"]
    greedy = runner.invoke(app, base + ["--temperature", "0"])
    assert greedy.exit_code == 0, greedy.output
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tok = load_tokenizer(tiny_lm_dir)
    expected = tok.decode(hf_new_tokens(model, tok, "def value", max_new_tokens=30, do_sample=False))
    assert greedy.stdout == "def value" + expected + "\n"
    streamed = runner.invoke(app, base + ["--temperature", "0", "--stream"])
    assert streamed.stdout == greedy.stdout
    stop = expected[10:13]
    stopped = runner.invoke(app, base + ["--temperature", "0", "--stop", stop])
    assert stopped.stdout == "def value" + expected[:expected.find(stop)] + "\n"
    newline = runner.invoke(app, base + ["--temperature", "0", "--stop", "\\n"])  # typed as backslash-n
    assert "\n" in expected and newline.stdout == "def value" + expected[:expected.find("\n")] + "\n"
    sampled = [runner.invoke(app, base + ["--seed", "5", "--top-p", "0.9"]).stdout for _ in range(2)]
    assert sampled[0] == sampled[1]
    beams = runner.invoke(app, base + ["--num-beams", "3", "--length-penalty", "1.2", "--repetition-penalty", "1.2"])
    assert beams.exit_code == 0 and beams.stdout.startswith("def value")
    clamped = runner.invoke(app, base[:-1] + ["1000", "--temperature", "0"])
    assert clamped.exit_code == 0 and "lowered to" in clamped.stderr
    bad = runner.invoke(app, base + ["--num-beams", "2", "--stream"])
    assert bad.exit_code == 2 and "num_beams" in bad.stderr
