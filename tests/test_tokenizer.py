"""Tokenizers: train each kind, save in Hugging Face format, load back, round-trip; MiniLM; the CLI command."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from conftest import make_docs
from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.recipe import TokenizerConfig
from lmforge.tokenizer import load_tokenizer, special_ids, train_tokenizer, word_start_table

CORPUS = make_docs("prose", 80, seed=0) + make_docs("code", 80, seed=1)
TARGETS = {"wordpiece": 150, "bpe": 300, "unigram": 150, "char": 8000}
SPECIALS = {
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "eos": "[SEP]"},
    **{k: {"pad": "<pad>", "unk": "<unk>", "cls": "<s>", "sep": "</s>", "mask": "<mask>", "eos": "</s>"}
       for k in ("bpe", "unigram", "char")},
}
# Only characters of the training corpus, with newlines and indentation (code documents have both).
SAMPLE = "The river walked under the old stone.\n    def value x:\n    return x\n\nEvening rain."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each kind trained once and saved; the folder per kind."""
    root = tmp_path_factory.mktemp("toks")
    out = {}
    for kind, size in TARGETS.items():
        tok = train_tokenizer(iter(CORPUS), TokenizerConfig(kind=kind, vocab_size=size, min_frequency=1))
        tok.save_pretrained(str(root / kind))
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", list(TARGETS))
def test_trains_saves_and_loads_with_autotokenizer(saved, kind):
    assert (saved[kind] / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(saved[kind]))
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids  # every character was seen in training
    decoded = tok.decode(ids)
    if kind in ("char", "bpe", "unigram"):
        assert decoded == SAMPLE  # exact, newlines and indentation included
    else:  # WordPiece's normaliser turns newlines and indentation into single spaces
        assert decoded == "The river walked under the old stone. def value x : return x Evening rain."
    assert load_tokenizer(saved[kind]).get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("kind", list(TARGETS))
def test_vocab_size_and_special_tokens(saved, kind):
    tok = AutoTokenizer.from_pretrained(str(saved[kind]))
    vocab = tok.get_vocab()
    if kind == "char":  # one token per distinct character, plus the specials
        assert len(tok) == len(set("".join(CORPUS))) + 5
    else:
        assert len(tok) <= TARGETS[kind]
        assert len(tok) >= (TARGETS[kind] // 2 if kind != "bpe" else 256 + 5)
    for name, token in SPECIALS[kind].items():
        assert getattr(tok, f"{name}_token") == token
        assert token in vocab
    # specials come first, in a fixed order: pad, unk, cls, sep, mask
    assert [vocab[SPECIALS[kind][n]] for n in ("pad", "unk", "cls", "sep", "mask")] == [0, 1, 2, 3, 4]
    assert special_ids(tok) == {"pad": 0, "eos": 3, "bos": 2, "cls": 2, "sep": 3, "mask": 4}


def test_char_round_trips_any_seen_text_exactly(saved):
    tok = AutoTokenizer.from_pretrained(str(saved["char"]))
    for text in CORPUS[:20] + ["\n\n  x\n", " leading and trailing spaces  "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text


def test_bpe_round_trips_unseen_bytes(saved):
    tok = AutoTokenizer.from_pretrained(str(saved["bpe"]))
    text = "Ünïcödé ✓ 漢字\n\ttab\r\nwindows line\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_wordpiece_adds_cls_and_sep_like_bert(saved):
    tok = AutoTokenizer.from_pretrained(str(saved["wordpiece"]))
    with_specials = tok("the river")["input_ids"]
    without = tok("the river", add_special_tokens=False)["input_ids"]
    assert with_specials == [tok.cls_token_id] + without + [tok.sep_token_id]
    pair = tok("the river", "old stone")
    second = tok("old stone", add_special_tokens=False)["input_ids"]
    assert pair["input_ids"] == with_specials + second + [tok.sep_token_id]


def test_wordpiece_lowercase_option():
    tok = train_tokenizer(CORPUS, TokenizerConfig(kind="wordpiece", vocab_size=150, min_frequency=1,
                                                  lowercase=True))
    assert tok.tokenize("THE RIVER") == tok.tokenize("the river") == ["the", "river"]


def test_training_is_deterministic():
    config = TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)
    assert train_tokenizer(CORPUS, config).get_vocab() == train_tokenizer(CORPUS, config).get_vocab()


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("texts", [[], ["", "   ", "\n"]])
def test_empty_training_text_is_an_error(kind, texts):
    with pytest.raises(LmforgeError, match="tokenizer: training text is empty; no vocabulary was learnt"):
        train_tokenizer(iter(texts), TokenizerConfig(kind=kind, vocab_size=TARGETS[kind]))


def test_bpe_vocab_below_byte_alphabet_is_an_error():
    with pytest.raises(LmforgeError) as info:
        train_tokenizer(CORPUS, TokenizerConfig(kind="bpe", vocab_size=100))
    assert str(info.value) == ("tokenizer.vocab_size: byte-level BPE needs at least 261 tokens "
                               "(256 bytes + 5 special tokens), got 100")


# ---------------------------------------------------------------- loading


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(LmforgeError) as info:
        load_tokenizer(tmp_path / "empty")
    assert str(info.value) == f"{tmp_path / 'empty'}: no tokenizer files (tokenizer.json / vocab.txt) in this folder"
    with pytest.raises(LmforgeError) as info:
        load_tokenizer(tmp_path / "missing")
    assert str(info.value) == f"{tmp_path / 'missing'}: tokenizer folder not found"


def test_load_tokenizer_corrupt_file_names_the_folder(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmforgeError, match=f"^{tmp_path}: could not load the tokenizer"):
        load_tokenizer(tmp_path)


def test_minilm_tokenizer_loads(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    assert len(tok) == 30522
    assert tok("Hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert special_ids(tok) == {"pad": 0, "eos": 102, "bos": None, "cls": 101, "sep": 102, "mask": 103}
    table = word_start_table(tok)
    vocab = tok.get_vocab()
    assert len(table) == 30522
    assert table[vocab["##ing"]] is False and table[vocab["##s"]] is False
    assert table[vocab["the"]] is True and table[vocab["[CLS]"]] is True and table[vocab["[MASK]"]] is True


# ---------------------------------------------------------------- whole-word table


def test_word_start_table_wordpiece(saved):
    tok = AutoTokenizer.from_pretrained(str(saved["wordpiece"]))
    table = word_start_table(tok)
    vocab = tok.get_vocab()
    continuations = [t for t in vocab if t.startswith("##")]
    assert continuations
    assert all(table[vocab[t]] is False for t in continuations)
    assert all(table[i] is True for t, i in vocab.items() if not t.startswith("##"))


def test_word_start_table_bpe(saved):
    tok = AutoTokenizer.from_pretrained(str(saved["bpe"]))
    table = word_start_table(tok)
    vocab = tok.get_vocab()
    starts = [t for t in vocab if t.startswith("Ġ") and t[1:2].isalnum()]
    assert len(starts) > 5 and all(table[vocab[t]] is True for t in starts)
    assert table[vocab["<s>"]] is True and table[vocab["<mask>"]] is True
    inner = [t for t in vocab if not t.startswith("Ġ") and t[:1].isalnum() and t not in tok.all_special_tokens]
    assert len(inner) > 20
    assert all(table[vocab[t]] is False for t in inner)
    # a word split in pieces: only the first piece starts a word
    ids = tok(" mountainous", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and [table[i] for i in ids] == [True] + [False] * (len(ids) - 1)


def test_word_start_table_unigram_and_char(saved):
    uni = AutoTokenizer.from_pretrained(str(saved["unigram"]))
    table, vocab = word_start_table(uni), uni.get_vocab()
    assert all(table[i] for t, i in vocab.items() if t.startswith("▁"))
    assert any(not table[i] for t, i in vocab.items() if t[:1].isalnum())
    char = AutoTokenizer.from_pretrained(str(saved["char"]))
    assert all(word_start_table(char))  # no continuation marks: every character counts as a word


# ---------------------------------------------------------------- CLI


def test_cli_tokenizer_train_writes_a_loadable_folder(tmp_path, corpus):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"sources": [{"path": str(p), "domain": d} for d, p in corpus.items()],
                 "validation_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
        "tokenizer": {"kind": "wordpiece", "vocab_size": 200, "min_frequency": 1},
    }))
    out = tmp_path / "tok"
    result = CliRunner().invoke(app, ["tokenizer", "train", str(recipe), "--out", str(out),
                                      "--set", "tokenizer.kind=bpe", "--set", "tokenizer.vocab_size=300"])
    assert result.exit_code == 0, result.output
    tok = AutoTokenizer.from_pretrained(str(out))
    assert result.stdout.strip() == f"bpe tokenizer with {len(tok)} tokens saved to {out}"
    assert 261 < len(tok) <= 300
    text = "The river walked.\n    return x:"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert not list(tmp_path.glob(".tok.tmp*"))
    # a second run replaces the folder
    result = CliRunner().invoke(app, ["tokenizer", "train", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"


def test_cli_tokenizer_train_bad_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tokenizer:\n  knd: bpe\n")
    result = CliRunner().invoke(app, ["tokenizer", "train", str(recipe), "--out", str(tmp_path / "tok")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {recipe}: unknown key 'tokenizer.knd'; did you mean 'kind'?"]
    assert not (tmp_path / "tok").exists()
