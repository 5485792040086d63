"""Semantic search: reading a corpus, the on-disk index and its retrieval order, the model check, the CLI, and the
server's /v1/embeddings (through the official openai client) and /v1/search."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from typer.testing import CliRunner

from lmforge.cli import app as cli
from lmforge.errors import LmforgeError
from lmforge.finetune import finetune
from lmforge.index import index, read_documents, retrieve
from lmforge.serve import create_app, load_served_model
from lmforge.tasks.embed import open_encoder
from lmforge.tasks.vectors import VectorIndex

from test_embedding import embed_recipe
from test_finetune import base_dir  # noqa: F401  (the tiny BERT fixture)
from test_serve import serving

DOCS = ["john flew to paris", "mary met rome", "the film was dreadful", "lucy flew to vienna", "peter met london"]


def tiny_embedding_run(base, tmp_path: Path, seed: int) -> Path:
    tmp_path.mkdir()
    tree = embed_recipe(base, tmp_path)
    tree["data"].pop("validation")
    tree["train"].update(max_steps=2, eval_at_start=False, seed=seed)
    return finetune(tree, show_progress=False).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir):  # noqa: F811
    """Two tiny embedding runs that differ only in their seed, and a JSONL corpus with ids."""
    root = tmp_path_factory.mktemp("embed-runs")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"doc": f"d{i}", "body": t}) + "\n" for i, t in enumerate(DOCS)))
    return tiny_embedding_run(base_dir, root / "a", 0), tiny_embedding_run(base_dir, root / "b", 1), corpus


def test_documents_from_text_jsonl_and_csv(tmp_path):
    (tmp_path / "d.txt").write_text("first doc\n\nsecond doc\n")
    assert read_documents(tmp_path / "d.txt") == (["1", "3"], ["first doc", "second doc"])
    (tmp_path / "d.csv").write_text("id,text\nx,alpha\n,beta\n")
    assert read_documents(tmp_path / "d.csv") == (["x", "3"], ["alpha", "beta"])


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "text": "a"}\n{"id": 2, "text": " "}\n', r"d.jsonl:2: document without text \(field 'text' is empty\)"),
    ('{"id": 1, "body": "a"}\n', r"d.jsonl:1: no field 'text' \(fields: id, body\); set --text-field"),
    ('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', r"the id '1' is used twice \(documents 1 and 2\)"),
])
def test_bad_documents_name_the_file_and_line(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(LmforgeError, match=message):
        read_documents(tmp_path / "d.jsonl")


def test_index_is_memory_mapped_and_ranks_as_brute_force(runs, tmp_path):
    run, _, corpus = runs
    built = index(run, corpus, tmp_path / "idx", text_field="body", id_field="doc")
    assert built.metrics["documents"] == len(DOCS)
    found = VectorIndex(tmp_path / "idx")
    assert isinstance(found.vectors, np.memmap) and found.vectors.shape == (len(DOCS), 64)
    encoder = open_encoder(run)
    queries = ["mary met rome", "who flew to paris"]
    expected = np.argsort(-(encoder.encode(queries) @ encoder.encode(DOCS).T), axis=1, kind="stable")[:, :3]
    hits = retrieve(tmp_path / "idx", queries, k=3)
    assert [[h.id for h in row] for row in hits] == [[f"d{j}" for j in row] for row in expected]
    assert hits[0][0].id == "d1" and hits[0][0].score == pytest.approx(1.0, abs=1e-5)  # the query's own text
    assert all(a.score >= b.score for row in hits for a, b in zip(row, row[1:]))


def test_index_of_another_model_is_refused_with_exit_2(runs, tmp_path):
    run, other, corpus = runs
    runner = CliRunner()
    built = runner.invoke(cli, ["index", str(run), "--input", str(corpus), "--out", str(tmp_path / "idx"),
                                "--text-field", "body", "--id-field", "doc"])
    assert built.exit_code == 0, built.output
    again = runner.invoke(cli, ["index", str(run), "--input", str(corpus), "--out", str(tmp_path / "idx")])
    assert again.exit_code == 2 and "holds an index; pass --force" in again.output
    ok = runner.invoke(cli, ["retrieve", str(tmp_path / "idx"), "--query", "lucy flew to vienna", "-k", "2", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output.splitlines()[0])["hits"][0]["id"] == "d3"
    refused = runner.invoke(cli, ["retrieve", str(tmp_path / "idx"), "--query", "x y", "--model", str(other)])
    assert refused.exit_code == 2
    assert "the index was built with the model" in refused.output and "rebuild the index" in refused.output
    missing = runner.invoke(cli, ["index", str(run), "--input", str(corpus), "--out", str(tmp_path / "bad")])
    assert missing.exit_code == 2 and "docs.jsonl:1: no field 'text'" in missing.output
    assert not (tmp_path / "bad").exists()


def test_served_embeddings_and_search(runs, tmp_path):
    run, other, corpus = runs
    index(run, corpus, run / "index", text_field="body", id_field="doc", force=True)
    index(other, corpus, other / "index", text_field="body", id_field="doc", force=True)
    (other / "index").replace(tmp_path / "other-index")
    app = create_app({"emb": load_served_model(f"emb={run}"), "plain": load_served_model(f"plain={other}")})
    vectors = open_encoder(run).encode(["john flew to paris", "mary"])
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        got = client.embeddings.create(model="emb", input=["john flew to paris", "mary"])
        assert np.abs(np.array([d.embedding for d in got.data]) - vectors).max() < 1e-6
        assert got.usage.prompt_tokens > 0
        raw = httpx.post(f"{url}/v1/embeddings", json={"model": "emb", "input": "mary",
                                                        "encoding_format": "base64"}).json()
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        assert np.abs(decoded - vectors[1]).max() < 1e-6
        found = httpx.post(f"{url}/v1/search", json={"model": "emb", "query": ["lucy flew to vienna"], "k": 2}).json()
        assert [h["id"] for h in found["data"][0]["hits"]] == [h.id for h in retrieve(run / "index",
                                                                                       "lucy flew to vienna", k=2)[0]]
        no_index = httpx.post(f"{url}/v1/search", json={"model": "plain", "query": "x"})
        assert no_index.status_code == 400 and no_index.json()["error"]["code"] == "no_index"
        empty = httpx.post(f"{url}/v1/embeddings", json={"model": "emb", "input": [""]})
        assert empty.status_code == 400
    shutil.rmtree(run / "index")
    (tmp_path / "other-index").replace(run / "index")  # an index another model built is refused at start-up
    with pytest.raises(LmforgeError, match="the index was built with the model"):
        load_served_model(f"emb={run}")
