"""Data sources (formats, folders, globs, domains, splits, streaming), input errors, packed block caches."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lmforge.data.blocks as blocks_mod
from lmforge.data.blocks import build_blocks, cache_key, pack_documents, stream_blocks
from lmforge.data.sources import expand_paths, fingerprint_sources, iter_texts, load_documents, split_of
from lmforge.errors import LmforgeError
from lmforge.recipe import DataConfig, ObjectiveConfig, TokenizerConfig
from lmforge.tokenizer import special_ids, train_tokenizer


def config(tmp_path: Path, sources: list, **kw) -> DataConfig:
    kw.setdefault("validation_fraction", 0.0)
    return DataConfig(sources=sources, cache_dir=str(tmp_path / "cache"), **kw)


def rows(tmp_path, sources, streaming=False, **kw) -> list[tuple[str, str, str]]:
    return [(r["text"], r["domain"], r["split"])
            for r in load_documents(config(tmp_path, sources, **kw), streaming=streaming)]


def texts(tmp_path, sources, **kw) -> list[str]:
    return [t for t, _, _ in rows(tmp_path, sources, **kw)]


def write_jsonl(path: Path, docs: list, key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


TEXT = "Para one, line one.\nPara one, line two.\n\nPara two.\n\nPara three\nends here.\n"


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("sample_by, expected", [
    ("document", [TEXT]),
    ("paragraph", ["Para one, line one.\nPara one, line two.", "Para two.", "Para three\nends here."]),
    ("line", ["Para one, line one.", "Para one, line two.", "Para two.", "Para three", "ends here."]),
])
def test_text_sample_by(tmp_path, sample_by, expected):
    (tmp_path / "a.txt").write_text(TEXT)
    got = texts(tmp_path, [{"path": str(tmp_path / "a.txt"), "sample_by": sample_by}])
    assert [t.rstrip("\n") for t in got] == [e.rstrip("\n") for e in expected]


def test_jsonl_with_text_column_and_domain(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["first doc", "second doc", "   "], key="body")
    got = rows(tmp_path, [{"path": str(tmp_path / "a.jsonl"), "text_column": "body", "domain": "web"}])
    assert got == [("first doc", "web", "train"), ("second doc", "web", "train")]  # blank row dropped


def test_csv_quoted_fields_and_text_column(tmp_path):
    (tmp_path / "a.csv").write_text('id,body\n1,"hello, world"\n2,"two\nlines"\n3,plain\n')
    assert texts(tmp_path, [{"path": str(tmp_path / "a.csv"), "text_column": "body"}]) == [
        "hello, world", "two\nlines", "plain"]


def test_tsv(tmp_path):
    (tmp_path / "a.tsv").write_text("label\tsentence\npos\tgood, fine film\nneg\tbad film\n")
    assert texts(tmp_path, [{"path": str(tmp_path / "a.tsv"), "text_column": "sentence"}]) == [
        "good, fine film", "bad film"]


def test_parquet(tmp_path):
    pq.write_table(pa.table({"n": [1, 2, 3], "content": ["p one", "p two", "p three"]}), tmp_path / "a.parquet")
    got = rows(tmp_path, [{"path": str(tmp_path / "a.parquet"), "text_column": "content", "domain": "pq"}])
    assert got == [("p one", "pq", "train"), ("p two", "pq", "train"), ("p three", "pq", "train")]


def test_numeric_and_null_text_values_become_strings(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": 12}\n{"text": null}\n{"text": "words"}\n')
    assert texts(tmp_path, [{"path": str(tmp_path / "a.jsonl")}]) == ["12", "words"]


def test_explicit_format_for_unknown_extension(tmp_path):
    (tmp_path / "notes.log").write_text("l1\nl2\n")
    src = {"path": str(tmp_path / "notes.log"), "sample_by": "line"}
    with pytest.raises(LmforgeError, match=r"notes\.log: unknown file type '\.log'; set 'format' on this source"):
        load_documents(config(tmp_path, [src]))
    assert texts(tmp_path, [{**src, "format": "text"}]) == ["l1", "l2"]


# ---------------------------------------------------------------- folders, globs, domains


def make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("text b\n")
    (root / "sub" / "a.md").write_text("markdown a\n")
    write_jsonl(root / "sub" / "c.jsonl", ["json c1", "json c2"])
    (root / "sub" / "skip.bin").write_text("not a data file\n")
    return root


def test_folder_is_searched_recursively_for_known_extensions(tmp_path):
    root = make_tree(tmp_path / "corpus")
    assert expand_paths(str(root)) == [root / "b.txt", root / "sub" / "a.md", root / "sub" / "c.jsonl"]
    got = sorted(t.strip() for t in texts(tmp_path, [{"path": str(root)}]))
    assert got == ["json c1", "json c2", "markdown a", "text b"]


def test_glob(tmp_path):
    root = make_tree(tmp_path / "corpus")
    assert [t.strip() for t in texts(tmp_path, [{"path": str(root / "**" / "*.md")}])] == ["markdown a"]
    assert expand_paths(str(root / "*.txt")) == [root / "b.txt"]


def test_domain_tags_per_source(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", ["prose one", "prose two"])
    (tmp_path / "c.csv").write_text("text\ncode one\n")
    got = rows(tmp_path, [{"path": str(tmp_path / "p.jsonl"), "domain": "prose"},
                          {"path": str(tmp_path / "c.csv"), "domain": "code"}])
    assert got == [("prose one", "prose", "train"), ("prose two", "prose", "train"), ("code one", "code", "train")]


# ---------------------------------------------------------------- splits


def many_docs(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice("abcdefghij") * rng.randint(1, 4) for _ in range(6)) + f" {i}" for i in range(n)]


def test_split_by_fraction_is_seeded_and_deterministic(tmp_path):
    docs = many_docs()
    write_jsonl(tmp_path / "a.jsonl", docs)
    src = [{"path": str(tmp_path / "a.jsonl")}]
    a = rows(tmp_path, src, validation_fraction=0.25, split_seed=0)
    b = rows(tmp_path, src, validation_fraction=0.25, split_seed=0)
    c = rows(tmp_path, src, validation_fraction=0.25, split_seed=1)
    assert a == b
    assert [t for t, _, _ in a] == docs  # order kept, nothing lost
    split_a, split_c = [s for _, _, s in a], [s for _, _, s in c]
    assert split_a != split_c
    n_val = split_a.count("validation")
    assert 60 <= n_val <= 140  # about a quarter of 400
    assert 60 <= split_c.count("validation") <= 140
    # order-free: a document's split depends only on its text and the seed
    write_jsonl(tmp_path / "rev.jsonl", docs[::-1])
    rev = rows(tmp_path, [{"path": str(tmp_path / "rev.jsonl")}], validation_fraction=0.25, split_seed=0)
    assert dict((t, s) for t, _, s in rev) == dict((t, s) for t, _, s in a)


def test_split_of_keeps_duplicates_together_and_zero_fraction_is_all_train():
    assert {split_of("same text", 7, 0.5) for _ in range(5)} == {split_of("same text", 7, 0.5)}
    assert {split_of(f"doc {i}", 3, 0.0) for i in range(100)} == {"train"}
    assert Counter(split_of(f"doc {i}", 3, 0.5) for i in range(1000))["validation"] in range(430, 571)


def test_split_validation_source_is_all_validation(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", many_docs(50))
    write_jsonl(tmp_path / "held.jsonl", [f"held out {i}" for i in range(30)])
    got = rows(tmp_path, [{"path": str(tmp_path / "train.jsonl"), "domain": "t"},
                          {"path": str(tmp_path / "held.jsonl"), "domain": "h", "split": "validation"}],
               validation_fraction=0.5)
    held = [s for _, d, s in got if d == "h"]
    assert held == ["validation"] * 30
    assert "train" in {s for _, d, s in got if d == "t"}
    docs = load_documents(config(tmp_path, [{"path": str(tmp_path / "held.jsonl"), "split": "validation"}]))
    assert list(iter_texts(docs, "validation", limit=3)) == ["held out 0", "held out 1", "held out 2"]
    assert list(iter_texts(docs, "train")) == []


# ---------------------------------------------------------------- streaming


def test_streaming_yields_the_same_documents_as_map_mode(tmp_path):
    root = make_tree(tmp_path / "corpus")  # one source of three formats
    write_jsonl(tmp_path / "long.jsonl", many_docs(120))
    (tmp_path / "short.csv").write_text("text\nonly one\n")
    sources = [{"path": str(root), "domain": "tree"}, {"path": str(tmp_path / "long.jsonl"), "domain": "long"},
               {"path": str(tmp_path / "short.csv"), "domain": "short", "split": "validation"}]
    mapped = rows(tmp_path, sources, validation_fraction=0.2, split_seed=5)
    streamed = rows(tmp_path, sources, streaming=True, validation_fraction=0.2, split_seed=5)
    assert len(mapped) == 4 + 120 + 1
    assert sorted(streamed) == sorted(mapped)
    # each source keeps its own order in the mixed stream
    assert [r for r in streamed if r[1] == "long"] == [r for r in mapped if r[1] == "long"]


def test_streaming_from_the_config_flag(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x", "y"])
    docs = load_documents(config(tmp_path, [{"path": str(tmp_path / "a.jsonl")}], streaming=True))
    assert type(docs).__name__ == "IterableDataset"
    assert [r["text"] for r in docs] == ["x", "y"]


# ---------------------------------------------------------------- bad input


def load_error(tmp_path, sources, streaming=False) -> str:
    with pytest.raises(LmforgeError) as info:
        load_documents(config(tmp_path, sources), streaming=streaming)
    return str(info.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert load_error(tmp_path, [{"path": str(missing)}]) == \
        f"data.sources[0].path: {missing}: no such file or folder"


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert load_error(tmp_path, [{"path": str(tmp_path / "empty.txt")}]) == f"{tmp_path / 'empty.txt'}: the file is empty"


def test_whitespace_only_file(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    assert load_error(tmp_path, [{"path": str(tmp_path / "blank.txt")}]) == \
        f"{tmp_path / 'blank.txt'}: no non-empty documents"


@pytest.mark.parametrize("streaming", [False, True])
def test_non_utf8_names_file_and_line(tmp_path, streaming):
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\nbroken \xff\xfe here\nlast\n")
    msg = load_error(tmp_path, [{"path": str(tmp_path / "bad.txt")}], streaming=streaming)
    assert msg == f"{tmp_path / 'bad.txt'}: line 3: not valid UTF-8 (byte 0xff at column 8)"


@pytest.mark.parametrize("streaming", [False, True])
def test_csv_without_the_named_column(tmp_path, streaming):
    (tmp_path / "a.csv").write_text("id,body\n1,hello\n")
    msg = load_error(tmp_path, [{"path": str(tmp_path / "a.csv"), "text_column": "content"}], streaming=streaming)
    assert msg == f"{tmp_path / 'a.csv'}: no column 'content' (columns: id, body); set 'text_column' on this source"


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "*.parquet")
    write_jsonl(tmp_path / "ok.jsonl", ["fine"])
    assert load_error(tmp_path, [{"path": str(tmp_path / "ok.jsonl")}, {"path": pattern}]) == \
        f"data.sources[1].path: {pattern}: no data files found"


def test_folder_without_data_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_text("?")
    assert load_error(tmp_path, [{"path": str(tmp_path / "d")}]).endswith("no data files found")


def test_broken_jsonl_names_file_and_line(tmp_path, capfd):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": \n')
    assert load_error(tmp_path, [{"path": str(tmp_path / "a.jsonl")}]) == \
        f"{tmp_path / 'a.jsonl'}: line 3, column 11: not valid JSON (Expecting value)"
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": "a\tbroken\n')  # a raw tab inside a string
    capfd.readouterr()
    assert load_error(tmp_path, [{"path": str(tmp_path / "b.jsonl")}]) == \
        f"{tmp_path / 'b.jsonl'}: line 2, column 12: not valid JSON (Invalid control character)"
    assert "Failed to load JSON" not in "".join(capfd.readouterr())  # no log line of datasets' before the error


def test_no_sources(tmp_path):
    assert load_error(tmp_path, []) == "data.sources: the recipe names no data sources"


# ---------------------------------------------------------------- packing and the block cache


LETTERS = "abcde "
DIGITS = "01234 "


def two_domain_files(tmp_path: Path, n: int = 40) -> tuple[dict, list[str]]:
    rng = random.Random(1)
    docs = {
        "letters": ["".join(rng.choice(LETTERS) for _ in range(rng.randint(5, 30))).strip() or "a" for _ in range(n)],
        "digits": ["".join(rng.choice(DIGITS) for _ in range(rng.randint(5, 30))).strip() or "0" for _ in range(n)],
    }
    paths = {d: write_jsonl(tmp_path / f"{d}.jsonl", docs[d]) for d in docs}
    return paths, docs


@pytest.fixture
def char_setup(tmp_path):
    paths, docs = two_domain_files(tmp_path)
    tok = train_tokenizer(docs["letters"] + docs["digits"], TokenizerConfig(kind="char"))
    data = config(tmp_path, [{"path": str(p), "domain": d} for d, p in paths.items()])
    return data, tok, docs, paths


def expected_blocks(tok, docs: list[str], head: list[int], tail: list[int], block_size: int) -> list[list[int]]:
    vocab = tok.get_vocab()
    stream = [i for d in docs for i in head + [vocab[c] for c in d] + tail]
    return [stream[i:i + block_size] for i in range(0, len(stream) // block_size * block_size, block_size)]


def blocks_by_domain(bd, split="train") -> dict:
    ds = bd.train if split == "train" else bd.validation
    out: dict = {}
    for row in ds:
        out.setdefault(bd.domains[row["domain"]], []).append(row["input_ids"])
    return out


def test_clm_blocks_are_exact_single_domain_and_eos_separated(char_setup):
    data, tok, docs, _ = char_setup
    eos = special_ids(tok)["eos"]
    bd = build_blocks(data, tok, ObjectiveConfig(name="clm", block_size=16))
    assert bd.domains == ["digits", "letters"] and bd.block_size == 16 and bd.validation is None
    got = blocks_by_domain(bd)
    for domain in ("letters", "digits"):
        assert got[domain] == expected_blocks(tok, docs[domain], [], [eos], 16)
    ids, domains = bd.batch("train", range(len(bd.train)))
    assert ids.shape == (len(bd.train), 16)
    assert (ids == eos).sum() > 0
    vocab = tok.get_vocab()
    allowed = {"letters": {vocab[c] for c in LETTERS} | {eos}, "digits": {vocab[c] for c in DIGITS} | {eos}}
    for block, d in zip(ids.tolist(), domains.tolist()):
        assert set(block) <= allowed[bd.domains[d]]


def test_mlm_blocks_wrap_documents_in_cls_and_sep(char_setup):
    data, tok, docs, _ = char_setup
    ids = special_ids(tok)
    bd = build_blocks(data, tok, ObjectiveConfig(name="mlm", block_size=16))
    got = blocks_by_domain(bd)
    for domain in ("letters", "digits"):
        blocks = got[domain]
        assert blocks == expected_blocks(tok, docs[domain], [ids["cls"]], [ids["sep"]], 16)
        stream = [t for b in blocks for t in b]
        assert stream[0] == ids["cls"]
        follows = [stream[i + 1] for i, t in enumerate(stream[:-1]) if t == ids["sep"]]
        assert follows and set(follows) == {ids["cls"]}


def test_wordpiece_mlm_blocks_with_validation_split(tmp_path):
    paths, docs = two_domain_files(tmp_path, n=60)
    tok = train_tokenizer(docs["letters"] + docs["digits"],
                          TokenizerConfig(kind="wordpiece", vocab_size=60, min_frequency=1))
    data = config(tmp_path, [{"path": str(paths["letters"]), "domain": "letters"},
                             {"path": str(paths["digits"]), "domain": "digits", "split": "validation"}])
    bd = build_blocks(data, tok, ObjectiveConfig(name="mlm", block_size=8))
    assert set(bd.train["domain"]) == {bd.domains.index("letters")}
    assert set(bd.validation["domain"]) == {bd.domains.index("digits")}
    for split in ("train", "validation"):
        ids, _ = bd.batch(split, range(len(bd.train if split == "train" else bd.validation)))
        assert ids.shape[1] == 8 and (ids == tok.cls_token_id).any() and (ids == tok.sep_token_id).any()


def test_cache_is_reused(char_setup, monkeypatch):
    data, tok, _, _ = char_setup
    objective = ObjectiveConfig(name="clm", block_size=16)
    first = build_blocks(data, tok, objective)
    root = Path(data.cache_dir) / "blocks"
    assert [p.name for p in root.iterdir()] == [cache_key(data, tok, objective)]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")
    monkeypatch.setattr(blocks_mod, "_build_cache", no_rebuild)
    monkeypatch.setattr(blocks_mod, "load_documents", no_rebuild)
    second = build_blocks(data, tok, objective)
    assert len(list(root.iterdir())) == 1
    assert np.array_equal(second.train["input_ids"], first.train["input_ids"])


def test_changed_source_changes_the_cache_key(char_setup):
    data, tok, docs, paths = char_setup
    objective = ObjectiveConfig(name="clm", block_size=16)
    key = cache_key(data, tok, objective)
    before = build_blocks(data, tok, objective)
    assert cache_key(data, tok, objective) == key  # stable while nothing changes
    with open(paths["letters"], "a") as fh:
        fh.write(json.dumps({"text": "abcde " * 20}) + "\n")
    assert cache_key(data, tok, objective) != key
    after = build_blocks(data, tok, objective)
    assert len(list((Path(data.cache_dir) / "blocks").iterdir())) == 2
    assert len(after.train) > len(before.train)
    # other inputs of the key
    assert cache_key(data, tok, ObjectiveConfig(name="clm", block_size=32)) != cache_key(data, tok, objective)
    assert cache_key(data, tok, ObjectiveConfig(name="mlm", block_size=16)) != cache_key(data, tok, objective)
    other = data.model_copy(update={"split_seed": 9})
    assert fingerprint_sources(other) != fingerprint_sources(data)


def test_no_full_block_is_an_error(char_setup):
    data, tok, _, _ = char_setup
    with pytest.raises(LmforgeError, match="no full block of 4096 tokens in the training split"):
        build_blocks(data, tok, ObjectiveConfig(name="clm", block_size=4096))


def test_stream_blocks_match_cached_blocks(char_setup):
    data, tok, _, _ = char_setup
    objective = ObjectiveConfig(name="clm", block_size=16)
    cached = blocks_by_domain(build_blocks(data, tok, objective))
    streamed: dict = {}
    for block, domain in stream_blocks(data, tok, objective, split="train", buffer=1):
        assert len(block) == 16
        streamed.setdefault(domain, []).append(block)
    assert streamed == cached


def test_pack_documents_drops_each_domains_tail():
    blocks, domains = pack_documents([[1, 2, 3], [4, 5], [9, 9, 9, 9, 9], [6]], ["a", "a", "b", "a"], 2)
    assert blocks.tolist() == [[1, 2], [3, 4], [5, 6], [9, 9], [9, 9]]
    assert domains == ["a", "a", "a", "b", "b"]
    blocks, _ = pack_documents([[1, 2], [3]], ["a", "a"], 3, head=[7], tail=[8])  # documents between affixes
    assert blocks.tolist() == [[7, 1, 2], [8, 7, 3]]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram", "char"])
def test_long_documents_tokenize_in_pieces_to_the_same_ids(kind, monkeypatch):
    """A document is tokenized in pieces cut where whitespace starts: the ids are those of the whole text, for
    every tokenizer kind, with runs of spaces, tabs and newlines at the cuts."""
    blocks_module = blocks_mod
    rng = random.Random(0)
    words = ["river", "Bridge", "x=1;", "naïve", "data,", "12.5", "(code)", "ün", "   ", "\t", "\n\n", "a  b"]
    text = " ".join(rng.choice(words) for _ in range(30_000))
    tok = train_tokenizer([text[:20_000]], TokenizerConfig(kind=kind, vocab_size=300, min_frequency=1))
    monkeypatch.setattr(blocks_module, "PIECE_CHARS", 997)
    monkeypatch.setattr(blocks_module, "TOKENIZE_CHARS", 5_000)
    assert len(blocks_module.text_pieces(text)) > 100
    assert "".join(blocks_module.text_pieces(text)) == text
    whole = tok(text, add_special_tokens=False)["input_ids"]
    texts = ["short one", text, "", text[:3000]]
    got = list(blocks_module.tokenize_documents(tok, texts))
    assert [g.tolist() for g in got] == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert got[1].tolist() == whole


def test_a_long_line_is_prepared_in_bounded_memory(tmp_path):
    """A 13 MB text file with no line break used to take 5.5 GB on its way to packed blocks; now the whole
    pretraining run fits in 1 GiB of address space above what its imports take."""
    import random
    rng = random.Random(0)
    words = "the river flows under a bridge while code compiles and tests run quickly over data".split()
    source = tmp_path / "oneline.txt"
    source.write_text(" ".join(rng.choice(words) for _ in range(2_400_000)))
    script = tmp_path / "limited.py"
    script.write_text(f"""
import re, resource
import datasets  # imported on first use by lmforge: counted with the imports, before the limit
from lmforge.pretrain import pretrain
size = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))
tree = {{"name": "long", "data": {{"sources": [{{"path": "{source}", "domain": "x"}}], "validation_fraction": 0.1,
        "cache_dir": "{tmp_path / 'cache'}"}}, "tokenizer": {{"kind": "char"}}, "model": {{"family": "gpt2", "size": "tiny"}},
        "objective": {{"name": "clm", "block_size": 64}}, "train": {{"max_steps": 1, "batch_size": 2, "eval_every": 0}},
        "output": {{"dir": "{tmp_path / 'run'}", "plots": False, "tensorboard": False}}}}
print("blocks", pretrain(tree, show_progress=False).run_dir)
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_later_epochs_read_the_stream_at_a_new_offset():
    """Epoch 0 serves the stored blocks; later epochs serve windows shifted along the same stream."""
    import numpy as np

    from lmforge.data.blocks import BlockData, Blocks
    from lmforge.data.loader import BlockLoader

    stream = np.arange(40 * 8)  # one domain, 40 blocks of 8 consecutive ids
    train = Blocks.from_dict({"input_ids": stream.reshape(40, 8), "domain": [0] * 40})
    loader = BlockLoader(BlockData(train=train, validation=None, domains=["d"], block_size=8), 4, 1, seed=0)
    first = np.concatenate([loader.micro_batch(s, 0)[0].numpy() for s in range(10)])
    assert sorted(first[:, 0].tolist()) == list(range(0, 320, 8))  # every stored block once
    second = np.concatenate([loader.micro_batch(s, 0)[0].numpy() for s in range(10, 20)])
    offset = loader.epoch_offset(1)
    assert 0 < offset < 8
    for window in second:
        assert (np.diff(window) == 1).all()  # still a contiguous piece of the stream
        assert window[0] % 8 in (offset, 0)  # shifted, except the last block, which has no successor
    assert (second[:, 0] % 8 == offset).sum() == 39
