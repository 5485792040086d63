"""Experts and compressed models behind the server: a BTM ensemble, a DEMix model and a GPT-2 MoE decode in the
continuous loop with the texts they give alone; responses say which domains the posterior chose and /metrics
counts them; pruned and int8 folders load and serve."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch
from transformers import GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

from conftest import make_docs
from lmforge.data.clusters import ClusterRouter, fit_clustering
from lmforge.engine import checkpoint as ckpt
from lmforge.generate import Decoding, encode_prompt, generate, open_generator
from lmforge.generate.mixtures import (DEMixBatch, EnsembleBatch, batch_invariant, decode_loop_runs,
                                       running_batch)
from lmforge.generate.running import Row, run_rows
from lmforge.errors import LmforgeError
from lmforge.models.compressed import COMPRESSION_KEY
from lmforge.models.demix import demix_from_dense
from lmforge.models.ensemble import EnsembleForCausalLM, ExpertEnsemble
from lmforge.models.moe import GPT2MoEConfig, GPT2MoEForCausalLM
from lmforge.models.quantized import quantize_modules
from lmforge.models.slicing import keep_units, stock_loadable
from lmforge.serve import create_app, load_served_model
from lmforge.serve.scheduler import Scheduler
from lmforge.tokenizer import load_tokenizer
from test_serve import client, serving

PROMPTS = ["def value return result append list:\n    for x in range", "The river walked under the quiet old",
           "import len sum max:\n    if x else", "Evening wind and rain over the village garden"]
GREEDY = Decoding(max_new_tokens=16, temperature=0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _tuned(base, tok, domain: str, steps: int = 30):
    """A copy of the tiny LM trained a few steps on one domain's text: an expert that prefers it."""
    model = GPT2LMHeadModel.from_pretrained(base)
    ids = [t for d in make_docs(domain, 80, seed=5) for t in tok(d, add_special_tokens=False)["input_ids"]]
    blocks = torch.tensor(ids[:len(ids) // 32 * 32]).view(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (8,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def experts_run(tiny_lm_dir, tmp_path_factory):
    """An experts run's ensemble/ folder as `lmforge experts merge` writes it: a prose and a code expert."""
    run = tmp_path_factory.mktemp("experts")
    tok = load_tokenizer(tiny_lm_dir)
    for domain in ("prose", "code"):
        ckpt.save_model(run / domain / "final", _tuned(tiny_lm_dir, tok, domain), tok)
    (run / "ensemble").mkdir()
    (run / "ensemble" / "ensemble.json").write_text(json.dumps(
        {"method": "ensemble", "domains": ["prose", "code"], "experts": ["../prose/final", "../code/final"],
         "prior": [0.5, 0.5], "top_k": None, "routing": "posterior"}))
    return run / "ensemble"


def test_an_ensemble_decodes_in_the_loop_as_it_generates_alone(experts_run):
    model, tok = open_generator(experts_run)
    assert decode_loop_runs(model) and isinstance(running_batch(model, tok), EnsembleBatch)
    settings = [GREEDY, Decoding(max_new_tokens=9, temperature=0),
                Decoding(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=4), GREEDY]
    alone = [generate(model, tok, [p], s)[0] for p, s in zip(PROMPTS, settings)]
    rows = [Row(encode_prompt(tok, model, p), s, s.max_new_tokens) for p, s in zip(PROMPTS, settings)]
    batch = running_batch(model, tok)
    done = {id(r): c for r, c in batch.join(rows[:2])}
    for _ in range(3):
        done.update((id(r), c) for r, c in batch.step())
    done.update((id(r), c) for r, c in batch.join(rows[2:]))  # two rows join a running batch
    while len(batch):
        done.update((id(r), c) for r, c in batch.step())
    got = [done[id(r)] for r in rows]
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert [c.text for c in got] == [c.text for c in alone]
    # the prompt's posterior picks the expert of its domain; the reported posterior is a distribution
    assert [max(c.prompt_domains, key=c.prompt_domains.get) for c in got] == ["code", "prose", "code", "prose"]
    assert all(abs(sum(c.domains.values()) - 1) < 1e-3 for c in got)


@pytest.mark.parametrize("stride", [1, 3])
def test_a_cluster_routed_ensemble_decodes_in_the_loop_as_it_generates_alone(experts_run, stride):
    tok = load_tokenizer(experts_run.parent / "prose" / "final")
    texts = make_docs("prose", 60, seed=1) + make_docs("code", 60, seed=2)
    clustering, _ = fit_clustering(texts, 2)
    experts = [GPT2LMHeadModel.from_pretrained(experts_run.parent / d / "final").eval() for d in ("prose", "code")]
    model = EnsembleForCausalLM(ExpertEnsemble(experts, clustering.names, router=ClusterRouter(
        clustering, tok, clustering.names, stride=stride))).eval()
    assert decode_loop_runs(model)
    alone = [generate(model, tok, [p], GREEDY)[0] for p in PROMPTS]
    got = run_rows(running_batch(model, tok), [Row(encode_prompt(tok, model, p), GREEDY, 16) for p in PROMPTS])
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert len({max(c.prompt_domains, key=c.prompt_domains.get) for c in got}) == 2  # both clusters chosen


def test_an_experts_run_served_continuous_says_its_domains_and_counts_them(experts_run):
    served = load_served_model(f"experts={experts_run}")
    alone = [generate(served.model, served.tokenizer, [p], GREEDY)[0].text for p in PROMPTS]
    app = create_app({"experts": served}, max_batch=8)
    with serving(app) as base:
        assert isinstance(app.state.server.engines["experts"].batch, EnsembleBatch)
        c = client(base, key="unused")
        results = [None] * len(PROMPTS)

        def ask(i):
            results[i] = c.completions.create(model="experts", prompt=PROMPTS[i], max_tokens=16, temperature=0)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [r.choices[0].text for r in results] == alone
        bodies = [r.model_dump() for r in results]
        assert [b["lmforge"]["domain"] for b in bodies] == ["code", "prose", "code", "prose"]
        assert set(bodies[0]["choices"][0]["lmforge"]["domains"]) == {"prose", "code"}
        body = {"model": "experts", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == alone[0]
        assert chunks[-1]["choices"][0]["finish_reason"] and chunks[-1]["lmforge"]["domain"] == "code"
        metrics = httpx.get(f"{base}/metrics").json()
        prom = httpx.get(f"{base}/metrics?format=prometheus").text
    assert metrics["domains"] == {"experts": {"code": 3, "prose": 2}} and metrics["largest_batch"] >= 2
    assert 'lmforge_domain_requests_total{domain="code",model="experts"} 3.0' in prom


def test_the_micro_path_gives_the_same_texts_and_domains(experts_run):
    served = load_served_model(f"experts={experts_run}")
    app = create_app({"experts": served}, batching="micro")
    with serving(app) as base:
        r = client(base, key="unused").completions.create(model="experts", prompt=PROMPTS[1], max_tokens=16,
                                                          temperature=0)
    alone = generate(served.model, served.tokenizer, [PROMPTS[1]], GREEDY)[0]
    assert r.choices[0].text == alone.text and r.model_dump()["lmforge"]["domain"] == "prose"


def test_demix_and_moe_models_decode_in_the_loop_as_alone(tiny_lm_dir):
    model, tok = open_generator(tiny_lm_dir)
    demix = demix_from_dense(model, ["prose", "code"]).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in demix.named_parameters():
            if ".mlp.experts.1." in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    moe = GPT2MoEForCausalLM(GPT2MoEConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128,
                                           num_local_experts=3, num_experts_per_tok=2,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                               num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=128,
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    plain = type(running_batch(model, tok))
    for m, kind in ((demix, DEMixBatch), (moe, plain), (mixtral, plain)):
        assert decode_loop_runs(m) and type(running_batch(m, tok)) is kind
        alone = [generate(m, tok, [p], GREEDY)[0] for p in PROMPTS]
        got = run_rows(running_batch(m, tok), [Row(encode_prompt(tok, m, p), GREEDY, 16) for p in PROMPTS])
        assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert got[0].domains is None and set(run_rows(running_batch(demix, tok), [Row(
        encode_prompt(tok, demix, PROMPTS[0]), GREEDY, 4)])[0].domains) == {"prose", "code"}


@pytest.mark.parametrize("scheme", [None, "int8-weight", "int8-dynamic"])
def test_pruned_and_int8_folders_serve(tiny_lm_dir, tmp_path, scheme):
    model, tok = open_generator(tiny_lm_dir)
    keep_units(model, heads=[[1], [0, 1]], neurons=[list(range(40)), list(range(100))])
    record = {"shape": stock_loadable(model)}
    if scheme:
        record["quantization"] = {"scheme": scheme, "modules": quantize_modules(model, scheme)}
    setattr(model.config, COMPRESSION_KEY, record)
    ckpt.save_model(tmp_path / "final", model, tok)
    served = load_served_model(f"small={tmp_path / 'final'}")
    alone = [generate(served.model, tok, [p], GREEDY)[0].text for p in PROMPTS[:2]]
    assert decode_loop_runs(served.model) and batch_invariant(served.model) == (scheme != "int8-dynamic")
    app = create_app({"small": served}, max_batch=8)
    with serving(app) as base:
        engine = app.state.server.engines["small"]
        # int8-dynamic quantizes a whole batch's activations with one scale: its rows decode one at a time
        assert isinstance(engine, Scheduler) and engine.max_batch == (1 if scheme == "int8-dynamic" else 8)
        r = client(base, key="unused").completions.create(model="small", prompt=PROMPTS[:2], max_tokens=16,
                                                          temperature=0)
    assert [ch.text for ch in r.choices] == alone and "lmforge" not in r.model_dump()


def test_folders_the_loop_cannot_run_are_refused_in_one_line(tiny_lm_dir, tmp_path):
    model, tok = open_generator(tiny_lm_dir)
    setattr(model.config, COMPRESSION_KEY, {"quantization": {"scheme": "int4-weight", "modules": {}}})
    ckpt.save_model(tmp_path / "int4", model, tok)
    with pytest.raises(LmforgeError, match=r"quantization.scheme 'int4-weight' cannot be loaded here"):
        load_served_model(str(tmp_path / "int4"))
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "config.json").write_text((tiny_lm_dir / "config.json").read_text())
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"")
    with pytest.raises(LmforgeError, match="not a valid ONNX model"):  # an export runs on ONNX Runtime
        load_served_model(str(tmp_path / "onnx"))
