"""`lmforge export` of a GPT-2 causal LM with a KV cache: the folder opens in plain ONNX Runtime, greedy and
seeded sampled tokens equal PyTorch's, int8 runs and is smaller, `lmforge generate` and the server run on the
folder, and each option the ONNX runtime cannot run is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from conftest import tiny_recipe
from lmforge import pretrain
from lmforge.cli import app as cli
from lmforge.export import export
from lmforge.generate import Decoding, generate, open_generator, stream
from lmforge.models.onnx import OnnxForCausalLM, cache_names
from lmforge.serve import create_app, load_served_model
from lmforge.tokenizer import load_tokenizer, save_tokenizer

PROMPTS = ["The river", "def value", "a", "Children played under the old stone"]  # left-padded in one batch


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exports(tiny_lm_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-decoder")
    export(tiny_lm_dir, root / "fp32")
    export(tiny_lm_dir, root / "int8", quantize="int8")
    return root


def test_folder_holds_the_graph_card_and_tokenizer_and_opens_in_plain_onnxruntime(tiny_lm_dir, exports):
    folder = exports / "fp32"
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "export.json", "README.md", "tokenizer.json"} <= names
    assert not any(n.endswith(".onnx") and n != "model.onnx" for n in names)
    card = json.loads((folder / "export.json").read_text())
    past, present = cache_names(2)
    assert card["opset"] == 17 and card["kv_cache"] is True and card["quantization"] is None
    assert card["task"] == "generate" and card["inputs"] == ["input_ids", "attention_mask", "position_ids", *past]
    assert card["outputs"] == ["logits", *present] and card["fp32_max_abs_logit_diff"] <= 1e-4
    assert card["fusion"].endswith("model_type gpt2") and card["fused_operators"]["SkipLayerNormalization"] >= 2
    readme = (folder / "README.md").read_text()
    assert "| opset | 17 |" in readme and "| KV cache | yes" in readme and "onnxruntime" in readme

    # Plain ONNX Runtime: prefill 5 tokens on an empty cache, then one step on the cache it returned; both
    # steps' logits equal transformers' (its own forward and cache).
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == card["inputs"]
    model = GPT2LMHeadModel.from_pretrained(tiny_lm_dir).eval()
    ids = np.array([[5, 17, 42, 8, 99]], dtype=np.int64)
    empty = np.zeros((1, 2, 0, 16), np.float32)
    out = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                             "position_ids": np.arange(5)[None], **{n: empty for n in past}})
    nxt = np.array([[7]], dtype=np.int64)
    out2 = session.run(None, {"input_ids": nxt, "attention_mask": np.ones((1, 6), np.int64),
                              "position_ids": np.array([[5]]), **dict(zip(past, out[1:]))})
    assert out[0].shape == (1, 5, model.config.vocab_size) and out2[1].shape == (1, 2, 6, 16)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), use_cache=True)
        want2 = model(input_ids=torch.tensor(nxt), past_key_values=want.past_key_values).logits
    assert np.abs(out[0] - want.logits.numpy()).max() <= 1e-4
    assert np.abs(out2[0] - want2.numpy()).max() <= 1e-4


def test_greedy_and_seeded_sampling_tokens_equal_pytorch(tiny_lm_dir, exports):
    lm, tokenizer = open_generator(tiny_lm_dir)
    onnx_lm, onnx_tokenizer = open_generator(exports / "fp32")
    assert isinstance(onnx_lm, OnnxForCausalLM)
    for settings in (Decoding(max_new_tokens=48, temperature=0),
                     Decoding(max_new_tokens=48, temperature=0.9, top_k=20, top_p=0.95, seed=7),
                     Decoding(max_new_tokens=24, temperature=0, logprobs=2, stop=("value",)),
                     Decoding(max_new_tokens=32, temperature=0, repetition_penalty=1.5),  # through the logits
                     Decoding(max_new_tokens=32, temperature=0.8, repetition_penalty=1.3, seed=2)):
        want = generate(lm, tokenizer, PROMPTS, settings)
        got = generate(onnx_lm, onnx_tokenizer, PROMPTS, settings)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        assert sum(len(c.token_ids) for c in got) >= 4 * 10
        if settings.logprobs:
            logprobs = got[0].logprobs[0][2], want[0].logprobs[0][2]
    assert logprobs[0] == pytest.approx(logprobs[1], abs=1e-4)
    greedy = Decoding(max_new_tokens=32, temperature=0)
    assert "".join(stream(onnx_lm, onnx_tokenizer, PROMPTS[0], greedy)) == generate(lm, tokenizer, PROMPTS[:1],
                                                                                      greedy)[0].text


def test_int8_runs_and_is_smaller(exports):
    card = json.loads((exports / "int8" / "export.json").read_text())
    assert card["quantization"].startswith("dynamic int8") and 0 < card["int8_max_abs_logit_diff"] <= 0.5
    fp32, int8 = ((exports / name / "model.onnx").stat().st_size for name in ("fp32", "int8"))
    assert int8 < 0.6 * fp32
    lm, tokenizer = open_generator(exports / "int8")
    done = generate(lm, tokenizer, PROMPTS, Decoding(max_new_tokens=16, temperature=0))
    assert all(c.completion_tokens == 16 and c.text for c in done)


def test_cli_exports_a_pretraining_run_and_generates_from_the_folder(corpus, tmp_path):
    run = pretrain(tiny_recipe(corpus, tmp_path / "run"), show_progress=False)
    runner = CliRunner()
    done = runner.invoke(cli, ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "onnx" / "recipe.yaml").is_file()
    for args in (["--temperature", "0"], ["--seed", "3"], ["--temperature", "0", "--stream"]):
        texts = [runner.invoke(cli, ["generate", str(folder), "--prompt", "The river", "--max-new-tokens", "20",
                                     *args]) for folder in (run, tmp_path / "onnx")]
        assert all(t.exit_code == 0 for t in texts), texts[1].output
        assert texts[0].stdout == texts[1].stdout and texts[1].stdout.startswith("The river")


def test_serve_completions_on_the_folder(tiny_lm_dir, exports):
    served = load_served_model(f"onnx={exports / 'fp32'}")
    assert served.kind == "generate" and isinstance(served.model, OnnxForCausalLM)
    lm, tokenizer = open_generator(tiny_lm_dir)
    want = generate(lm, tokenizer, PROMPTS[:2], Decoding(max_new_tokens=12, temperature=0))
    with TestClient(create_app({"onnx": served})) as http:
        r = http.post("/v1/completions", json={"model": "onnx", "prompt": PROMPTS[:2], "max_tokens": 12,
                                                "temperature": 0})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == [c.text for c in want]
        assert r.json()["usage"]["completion_tokens"] == sum(c.completion_tokens for c in want)
        with http.stream("POST", "/v1/completions", json={"model": "onnx", "prompt": PROMPTS[0], "max_tokens": 12,
                                                           "temperature": 0, "stream": True}) as s:
            pieces = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(p["choices"][0]["text"] for p in pieces) == want[0].text
        r = http.post("/v1/completions", json={"model": "onnx", "prompt": "a", "max_tokens": 4,
                                                "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]


def fails(args: list[str], message: str) -> None:
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error:") and message in done.output and done.output.count("\n") == 1, done.output


def test_bad_inputs_are_one_line(tiny_lm_dir, exports, tmp_path):
    folder = str(exports / "fp32")
    refused = "not available on an ONNX Runtime export"
    fails(["generate", folder, "--prompt", "a", "--num-beams", "2"], f"num_beams 2 (beam search): {refused}")
    fails(["generate", str(tiny_lm_dir), "--prompt", "a", "--draft", folder], f"--draft (speculative decoding; "
                                                                               f"the draft): {refused}")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    fails(["generate", folder, "--prompt", "a", "--json-schema", str(schema)], f"--json-schema (structured output): "
                                                                             f"{refused}")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for entry in Path(folder).iterdir():
        (corrupt / entry.name).write_bytes(entry.read_bytes())
    (corrupt / "model.onnx").write_bytes(b"not a protobuf" * 10)
    fails(["generate", str(corrupt), "--prompt", "a"], "not a valid ONNX model")
    fails(["serve", str(corrupt)], "not a valid ONNX model")

    # A GPT-2 that CachedStep does not reproduce is refused, with nothing written.
    odd = tmp_path / "odd"
    save_tokenizer(load_tokenizer(tiny_lm_dir), odd)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=400, n_positions=32,
                               reorder_and_upcast_attn=True)).save_pretrained(odd)
    fails(["export", str(odd), "--out", str(tmp_path / "odd-onnx")], "no ONNX export rule for GPT2LMHeadModel with "
                                                                      "reorder_and_upcast_attn")
    assert not (tmp_path / "odd-onnx").exists() and not (tmp_path / ".odd-onnx.export-tmp").exists()


def test_a_pruned_gpt2_exports_with_each_layers_heads_and_generates_pytorchs_tokens(tiny_lm_dir, tmp_path):
    """Heads removed unevenly (lmforge compress): the graph's cache has each layer's own head count, and greedy
    tokens on ONNX Runtime are the pruned PyTorch model's."""
    from transformers import AutoModelForCausalLM
    from lmforge.models.compressed import COMPRESSION_KEY
    from lmforge.models.slicing import keep_units, stock_loadable
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    heads = model.config.n_head
    keep_units(model, heads=[[0], list(range(1, heads))], neurons=None)
    setattr(model.config, COMPRESSION_KEY, {"shape": stock_loadable(model)})
    save_tokenizer(load_tokenizer(tiny_lm_dir), tmp_path / "pruned")
    model.save_pretrained(tmp_path / "pruned")
    export(tmp_path / "pruned", tmp_path / "pruned-onnx")
    inputs = {i.name: i.shape for i in ort.InferenceSession(str(tmp_path / "pruned-onnx" / "model.onnx")).get_inputs()}
    assert inputs["past_key_values.0.key"][1] == 1 and inputs["past_key_values.1.value"][1] == heads - 1
    lm, tokenizer = open_generator(tmp_path / "pruned")
    onnx_lm, onnx_tokenizer = open_generator(tmp_path / "pruned-onnx")
    greedy = Decoding(max_new_tokens=24, temperature=0)
    assert [c.token_ids for c in generate(onnx_lm, onnx_tokenizer, PROMPTS, greedy)] == \
        [c.token_ids for c in generate(lm, tokenizer, PROMPTS, greedy)]
