"""Continuous batching: rows joining and leaving a running batch give the tokens they give alone; on the server,
a late request joins a running batch, a cancelled one frees its slot at once, and the limits hold."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.generate import Decoding, encode_prompt, generate, open_generator
from lmforge.generate.running import Row, RunningBatch, continuous_batchable
from lmforge.serve import ServedModel, create_app
from lmforge.tokenizer import load_tokenizer
from test_serve import client, serving, wait_for

PROMPTS = ["def value", "The river walked under", "x", "import os\nimport sys\n", "The quiet village morning light"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return open_generator(tiny_lm_dir)


def test_rows_joining_and_leaving_give_their_tokens_alone(lm):
    model, tok = lm
    assert continuous_batchable(model)
    settings = [Decoding(max_new_tokens=20, temperature=0),
                Decoding(max_new_tokens=7, temperature=0),  # leaves early, while the others go on
                Decoding(max_new_tokens=30, temperature=0.9, top_p=0.9, top_k=None, seed=3),
                Decoding(max_new_tokens=12, temperature=0, repetition_penalty=1.3, logprobs=2),
                Decoding(max_new_tokens=25, temperature=0.7, seed=8, stop=("e ",))]
    alone = [generate(model, tok, [p], s)[0] for p, s in zip(PROMPTS, settings)]
    rows = [Row(encode_prompt(tok, model, p), s, s.max_new_tokens, tag=i)
            for i, (p, s) in enumerate(zip(PROMPTS, settings))]
    batch, got, widths = RunningBatch(model, tok), {}, []
    # rows 0-1 start together; 2-3 join after 3 steps, 4 after 8 (by then row 1 has left)
    for step in range(40):
        joining = {0: rows[:2], 3: rows[2:4], 8: rows[4:]}.get(step, [])
        got.update((r.tag, c) for r, c in batch.join(joining) + batch.step())
        widths.append(len(batch))
    assert widths[:3] == [2, 2, 2] and widths[3] == 4 and widths[8] == 4  # row 1 left at step 6, row 4 came
    assert len(got) == 5 and len(batch) == 0 and batch.cache is None
    for i in range(5):
        assert (got[i].text, got[i].token_ids, got[i].finish_reason, got[i].completion_tokens) == \
               (alone[i].text, alone[i].token_ids, alone[i].finish_reason, alone[i].completion_tokens), i
    assert len(got[3].logprobs) == 12  # the same tokens and log-probabilities (up to float rounding in a batch)
    for (token, offset, logp, alts), want in zip(got[3].logprobs, alone[3].logprobs):
        assert (token, offset, list(alts)) == (want[0], want[1], list(want[3])) and logp == pytest.approx(want[2], abs=1e-5)


def test_dropped_rows_leave_and_free_their_columns(lm):
    model, tok = lm
    cancel = threading.Event()
    long = Row(encode_prompt(tok, model, "The quiet village morning light " * 4), Decoding(max_new_tokens=50,
               temperature=0), 50, dropped=cancel.is_set)
    short = Row(encode_prompt(tok, model, "x"), Decoding(max_new_tokens=50, temperature=0), 50)
    batch = RunningBatch(model, tok)
    batch.join([long, short])
    batch.step()
    wide = batch.mask.shape[1]
    cancel.set()
    assert batch.step() == [(long, None)] and batch.rows == [short]
    # the long prompt's columns are gone: only the short row's prompt and tokens remain
    assert batch.mask.shape[1] == len(short.prompt_ids) + len(short.tokens) - 1 < wide
    assert all(layer.keys.shape[:3] == (1, 2, batch.mask.shape[1]) for layer in batch.cache.layers)


@pytest.fixture(scope="module")
def slow_model(tiny_lm_dir):
    """The tiny LM made slow (10 ms a forward) and endless (it never chooses EOS), so that requests stay in
    flight as long as their max_tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = load_tokenizer(tiny_lm_dir)
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))

    def never_eos(module, args, logits):
        logits[..., tok.eos_token_id] = -1e9

    model.lm_head.register_forward_hook(never_eos)
    return ServedModel.of("slow", model, tok)


def test_a_late_request_joins_the_running_batch(slow_model):
    alone = generate(slow_model.model, slow_model.tokenizer, ["The river"], Decoding(max_new_tokens=5, temperature=0))
    with serving(create_app({"slow": slow_model}, max_tokens_cap=300)) as base:
        c = client(base, key="unused")
        first = []
        long = threading.Thread(target=lambda: first.append(time.monotonic() if c.completions.create(
            model="slow", prompt="def value", max_tokens=150, temperature=0) else None))
        long.start()
        wait_for(lambda: httpx.get(f"{base}/metrics").json()["batches"] >= 5)  # the long request is decoding
        short = c.completions.create(model="slow", prompt="The river", max_tokens=5, temperature=0)
        short_done = time.monotonic()
        long.join(timeout=60)
        m = httpx.get(f"{base}/metrics").json()
    # the short request joined the running batch and left it long before the long one ended (not after it)
    assert short.choices[0].text == alone[0].text and first[0] - short_done > 0.5
    assert m["largest_batch"] == 2 and m["generated_tokens"] == 150 + 5


def test_a_cancelled_request_frees_its_slot(slow_model):
    # one row at a time and no queue: a second request is refused while the stream runs, and can only run once
    # the stream has left the batch
    app = create_app({"slow": slow_model}, max_batch=1, max_concurrent=1, max_queue=0, max_tokens_cap=300)
    with serving(app) as base:
        c = client(base, key="unused")
        body = {"model": "slow", "prompt": "def value", "max_tokens": 250, "temperature": 0, "stream": True}
        with httpx.Client(base_url=base, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()  # (held: a dropped line iterator closes the response)
            assert next(lines).startswith("data: ")
            busy = httpx.post(f"{base}/v1/completions", json={"model": "slow", "prompt": "x"})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        wait_for(lambda: httpx.get(f"{base}/metrics").json()["in_flight"] == 0)  # the stream's client has gone
        t0 = time.monotonic()
        r = c.completions.create(model="slow", prompt="The river", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3 and time.monotonic() - t0 < 1.5  # not after 250 steps (> 2.5 s)
        m = httpx.get(f"{base}/metrics").json()
        assert m["cancelled"] == 1 and m["generated_tokens"] < 100 and m["largest_batch"] == 1


def test_cache_bound_and_the_micro_batching_path(lm):
    model, tok = lm
    served = ServedModel.of("tiny", model, tok)
    direct = generate(model, tok, ["def value"], Decoding(max_new_tokens=15, temperature=0))[0].text
    with serving(create_app({"tiny": served}, max_cache_tokens=40)) as base:
        c = client(base, key="unused")
        with pytest.raises(openai.BadRequestError) as err:  # (prompt + 30) x n 2 > 40 cache tokens
            c.completions.create(model="tiny", prompt="def value", max_tokens=30, n=2)
        assert err.value.body["code"] == "context_length_exceeded" and "40" in err.value.body["message"]
        both = c.completions.create(model="tiny", prompt="def value", max_tokens=15, n=2, temperature=0)
        assert both.choices[0].text == both.choices[1].text == direct
    micro = create_app({"tiny": served}, batching="micro")
    with serving(micro) as base:
        r = client(base, key="unused").completions.create(model="tiny", prompt="def value", max_tokens=15,
                                                          temperature=0)
        assert r.choices[0].text == direct and type(micro.state.server.engines["tiny"]).__name__ == "Batcher"
