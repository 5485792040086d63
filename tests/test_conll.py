"""CoNLL / token-JSONL readers, tag-scheme conversion and entity spans (checked against seqeval)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.tasks.conll import (SCHEMES, Sentence, convert_tags, entity_spans, label_list, read_conll,
                                    read_token_jsonl, validate_tag)

CONLL2003 = Path(__file__).resolve().parents[2] / "shared" / "data" / "conll2003"
TYPES = ("PER", "LOC", "ORG")

# Line 1 DOCSTART, 2 blank, 3-4 sentence, 5 whitespace-only, 6-7 sentence, 8-9 blank, 10 DOCSTART, 11 blank,
# 12-13 sentence with no final newline.
FIXTURE = ("-DOCSTART- -X- -X- O\n"
           "\n"
           "EU NNP B-NP B-ORG\n"
           "rejects\tVBZ\tB-VP\tO\n"
           "  \t \n"
           "Peter NNP B-NP B-PER\n"
           "Blackburn NNP I-NP I-PER\n"
           "\n"
           "\n"
           "-DOCSTART- -X- -X- O\n"
           "\n"
           "BRUSSELS NNP B-NP B-LOC\n"
           "1996-08-22 CD I-NP O")


def write(tmp_path: Path, text: str | bytes, name: str = "data.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def raises(match: str):
    return pytest.raises(LmforgeError, match=match)


def random_bio(rng: random.Random, n: int) -> list[str]:
    """A well-formed BIO sequence; few types, so same-type neighbours (IOB1's B- case) are common."""
    tags = []
    for _ in range(n):
        prev = tags[-1] if tags else "O"
        choices = ["O", "O", *("B-" + t for t in TYPES)] + ([f"I-{prev[2:]}"] * 2 if prev != "O" else [])
        tags.append(rng.choice(choices))
    return tags


def random_tags(rng: random.Random, n: int, prefixes: str = "BI") -> list[str]:
    """Any sequence of O and prefixed tags: I- after O, I- after another type, B- then I- of another type."""
    return [rng.choice(["O", *(f"{p}-{t}" for p in prefixes for t in TYPES)]) for _ in range(n)]


def seqeval_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    from seqeval.metrics.sequence_labeling import get_entities
    return [(type_, start, end + 1) for type_, start, end in get_entities(tags)]


# --- read_conll -------------------------------------------------------------------------------------------

def test_read_conll_fixture(tmp_path):
    path = write(tmp_path, FIXTURE)
    sentences = read_conll(path)
    assert sentences == [
        Sentence(["EU", "rejects"], ["B-ORG", "O"], str(path), 3),
        Sentence(["Peter", "Blackburn"], ["B-PER", "I-PER"], str(path), 6),
        Sentence(["BRUSSELS", "1996-08-22"], ["B-LOC", "O"], str(path), 12),
    ]
    chunks = read_conll(path, tag_column=2)
    assert [s.tags for s in chunks] == [["B-NP", "B-VP"], ["B-NP", "I-NP"], ["B-NP", "I-NP"]]
    assert [s.tokens for s in read_conll(path, token_column=1, tag_column=-2)][0] == ["NNP", "VBZ"]
    assert label_list(sentences) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_read_conll_crlf_and_trailing_blank_lines(tmp_path):
    path = write(tmp_path, "a O\r\nb B-X\r\n\r\nc I-Y\r\n\r\n\r\n")
    assert [(s.tokens, s.tags, s.line) for s in read_conll(path)] == [
        (["a", "b"], ["O", "B-X"], 1), (["c"], ["B-Y"], 4)]


def test_read_conll_converts_to_bio(tmp_path):
    iob1 = write(tmp_path, "Peter I-PER\nBlackburn I-PER\nJohn B-PER\nsaw O\nParis I-LOC\n", "iob1.txt")
    assert read_conll(iob1, scheme="iob1")[0].tags == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]
    iobes = write(tmp_path, "New B-LOC\nYork E-LOC\nin O\nParis S-LOC\n", "iobes.txt")
    assert read_conll(iobes, scheme="iobes")[0].tags == ["B-LOC", "I-LOC", "O", "B-LOC"]
    with raises(r"iobes.txt:2: invalid bio tag 'E-LOC'"):
        read_conll(iobes)


@pytest.mark.parametrize("text, kwargs, message", [
    ("a B-X\nb O\n\nc NN O\n", {}, r"data.txt:4: expected 2 columns, found 3"),
    ("a B-X\nb X-PER\n", {}, r"data.txt:2: invalid bio tag 'X-PER'"),
    ("a B-\n", {}, r"data.txt:1: invalid bio tag 'B-'"),
    ("a S-X\n", {"scheme": "iob1"}, r"data.txt:1: invalid iob1 tag 'S-X'"),
    ("-DOCSTART- O\n\na NN O\n", {"tag_column": 3}, r"data.txt:3: tag_column 3 is out of range"),
    ("a NN O\n", {"tag_column": -4}, r"data.txt:1: tag_column -4 is out of range"),
    ("a NN O\n", {"token_column": 2, "tag_column": -1}, r"data.txt:1: token_column and tag_column"),
    ("", {}, r"data.txt: no sentences found"),
    ("-DOCSTART- -X- -X- O\n\n \n", {}, r"data.txt: no sentences found"),
    ("a O\n", {"scheme": "bilou"}, r"unknown tag scheme 'bilou'"),
])
def test_read_conll_errors(tmp_path, text, kwargs, message):
    path = write(tmp_path, text)
    with raises(message):
        read_conll(path, **kwargs)


def test_read_conll_bad_bytes_and_missing_file(tmp_path):
    path = write(tmp_path, "a O\nb O\n\nc\xff O\n".encode("latin-1"))
    with raises(r"data.txt:4: not valid UTF-8 \(byte 0xff\)"):
        read_conll(path)
    with raises(r"nothere.txt: no such file"):
        read_conll(tmp_path / "nothere.txt")


def test_read_conll2003_train():
    path = CONLL2003 / "train.txt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    start = time.perf_counter()
    sentences = read_conll(path)
    seconds = time.perf_counter() - start
    assert len(sentences) == 14041
    assert sum(len(s.tokens) for s in sentences) == 203621
    assert sentences[0].tokens[:2] == ["EU", "rejects"] and sentences[0].line == 3
    assert sentences[-1].tokens == ["Swansea", "1", "Lincoln", "2"]  # the file has no final newline
    assert label_list(sentences) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert seconds < 2.0, f"reading took {seconds:.2f}s"


# --- read_token_jsonl -------------------------------------------------------------------------------------

def test_read_token_jsonl(tmp_path):
    records = [{"tokens": ["New", "York"], "tags": ["B-LOC", "E-LOC"]}, {"tokens": [], "tags": []},
               {"tokens": ["Bob"], "tags": ["S-PER"], "id": 3}]
    path = write(tmp_path, json.dumps(records[0]) + "\n\n" + "\n".join(map(json.dumps, records[1:])), "d.jsonl")
    assert read_token_jsonl(path, scheme="iobes") == [
        Sentence(["New", "York"], ["B-LOC", "I-LOC"], str(path), 1), Sentence(["Bob"], ["B-PER"], str(path), 4)]
    renamed = write(tmp_path, json.dumps({"words": ["x"], "ner": ["I-X"]}) + "\n", "r.jsonl")
    assert read_token_jsonl(renamed, tokens_key="words", tags_key="ner")[0].tags == ["B-X"]


@pytest.mark.parametrize("line, message", [
    ('{"tokens": ["a"], "tags": ["O"]', r"d.jsonl:2: invalid JSON"),
    ('["a"]', r"d.jsonl:2: expected a JSON object, found list"),
    ('{"tokens": ["a"]}', r"d.jsonl:2: missing key 'tags'"),
    ('{"tokens": "a b", "tags": ["O", "O"]}', r"d.jsonl:2: 'tokens' must be a list of strings"),
    ('{"tokens": ["a"], "tags": [0]}', r"d.jsonl:2: 'tags' must be a list of strings"),
    ('{"tokens": ["a", "b"], "tags": ["O"]}', r"d.jsonl:2: 2 tokens but 1 tags"),
    ('{"tokens": ["a"], "tags": ["PER"]}', r"d.jsonl:2: invalid bio tag 'PER'"),
])
def test_read_token_jsonl_errors(tmp_path, line, message):
    path = write(tmp_path, '{"tokens": ["ok"], "tags": ["O"]}\n' + line + "\n", "d.jsonl")
    with raises(message):
        read_token_jsonl(path)


def test_read_token_jsonl_bad_bytes_and_empty(tmp_path):
    with raises(r"d.jsonl:2: not valid UTF-8"):
        read_token_jsonl(write(tmp_path, b'{"tokens": [], "tags": []}\n{"tokens": ["\xe9"]}\n', "d.jsonl"))
    with raises(r"e.jsonl: no sentences found"):
        read_token_jsonl(write(tmp_path, "\n\n", "e.jsonl"))


# --- tags -------------------------------------------------------------------------------------------------

def test_validate_tag():
    assert validate_tag("O", "bio") and validate_tag("B-PER", "iob1") and validate_tag("E-MISC-X", "iobes")
    assert not any(validate_tag(t, "bio") for t in ("S-PER", "B-", "B_PER", "X-PER", "o", "", "BPER"))
    with raises("unknown tag scheme"):
        validate_tag("O", "BIO")


@pytest.mark.parametrize("source, tags, bio", [
    ("iob1", "I-PER I-PER B-PER", "B-PER I-PER B-PER"),
    ("iob1", "I-PER I-LOC O I-LOC B-LOC", "B-PER B-LOC O B-LOC B-LOC"),
    ("iob1", "B-PER I-PER", "B-PER I-PER"),  # B- after O is not IOB1 but reads as a start
    ("iobes", "S-LOC", "B-LOC"),
    ("iobes", "B-ORG E-ORG O S-ORG S-ORG", "B-ORG I-ORG O B-ORG B-ORG"),
    ("iobes", "B-ORG I-ORG E-ORG S-LOC", "B-ORG I-ORG I-ORG B-LOC"),
    ("bio", "O I-PER I-PER B-LOC I-ORG", "O B-PER I-PER B-LOC B-ORG"),  # malformed BIO comes out well formed
])
def test_convert_hand_written(source, tags, bio):
    assert convert_tags(tags.split(), source, "bio") == bio.split()


def test_convert_to_iob1_and_iobes():
    bio = "B-PER I-PER B-PER O B-LOC B-ORG I-ORG I-ORG".split()
    assert convert_tags(bio, "bio", "iob1") == "I-PER I-PER B-PER O I-LOC I-ORG I-ORG I-ORG".split()
    assert convert_tags(bio, "bio", "iobes") == "B-PER E-PER S-PER O S-LOC B-ORG I-ORG E-ORG".split()
    assert convert_tags([], "iob1", "iobes") == []
    with raises(r"invalid bio tag 'E-PER'"):
        convert_tags(["E-PER"], "bio", "iob1")


def test_convert_round_trips_all_directions():
    scheme_module = pytest.importorskip("seqeval.scheme")
    strict = {"iob1": scheme_module.IOB1, "bio": scheme_module.IOB2, "iobes": scheme_module.IOBES}
    rng = random.Random(0)
    for _ in range(3000):
        bio = random_bio(rng, rng.randint(0, 12))
        spans = entity_spans(bio)
        written = {scheme: convert_tags(bio, "bio", scheme) for scheme in SCHEMES}
        for source in SCHEMES:
            # Well-formed output: seqeval's strict mode for that scheme finds the same entities.
            found = scheme_module.Entities([written[source]], strict[source]).entities[0]
            assert [(e.tag, e.start, e.end) for e in found] == spans, (source, written[source])
            for target in SCHEMES:
                assert convert_tags(written[source], source, target) == written[target], (source, target, bio)
        assert entity_spans(convert_tags(written["iob1"], "iob1", "bio")) == spans


def test_entity_spans_match_seqeval():
    pytest.importorskip("seqeval")
    rng = random.Random(1)
    for _ in range(3000):
        tags = random_tags(rng, rng.randint(0, 10))
        assert entity_spans(tags) == seqeval_spans(tags), tags
        # Conversion keeps the entities seqeval sees, even from malformed input.
        assert seqeval_spans(convert_tags(tags, "bio", "bio")) == seqeval_spans(tags), tags
    for _ in range(1000):
        tags = random_tags(rng, rng.randint(0, 10), "BIES")
        assert entity_spans(tags) == seqeval_spans(tags), tags
    assert entity_spans(["B-PER", "I-LOC", "I-LOC", "O", "I-PER"]) == [("PER", 0, 1), ("LOC", 1, 3), ("PER", 4, 5)]
