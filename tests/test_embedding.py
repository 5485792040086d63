"""Sentence embeddings: each loss on a hand-computed case, in-batch duplicate masking, pair reading and its errors,
a tiny contrastive run, and sentence-transformers loading the run's folder with the same vectors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.finetune import finetune, finetune_recipe_from_dict
from lmforge.finetune.contrastive import cosine_regression_loss, false_negative_mask, in_batch_negatives_loss
from lmforge.tasks.config import SplitFile, TaskData
from lmforge.tasks.embed import open_encoder, pool
from lmforge.tasks.pairs import collate_pairs, encode_pairs, next_sentence_pairs, read_pairs
from lmforge.tasks.retrieval import gold_ranks, ranking_metrics

from conftest import SHARED
from test_finetune import CITIES, NAMES, base_dir  # noqa: F401  (the tiny BERT fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_in_batch_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = in_batch_negatives_loss(q, p, None, temperature=0.5)
    # row 0 scores [1, 0.6] / 0.5, row 1 scores [0, 0.8] / 0.5; the target is the diagonal
    expected = [-2.0 + math.log(math.exp(2.0) + math.exp(1.2)), -1.6 + math.log(math.exp(0.0) + math.exp(1.6))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_hard_negatives_join_the_candidates():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    n = torch.tensor([[0.8, 0.6], [0.0, -1.0]])
    loss = in_batch_negatives_loss(q, p, n, temperature=1.0)
    # row 0: positives [1, 0.6], negatives [0.8, 0]; row 1: positives [0, 0.8], negatives [0.6, -1]
    row0 = -1.0 + math.log(math.exp(1.0) + math.exp(0.6) + math.exp(0.8) + math.exp(0.0))
    row1 = -0.8 + math.log(math.exp(0.0) + math.exp(0.8) + math.exp(0.6) + math.exp(-1.0))
    assert loss.tolist() == pytest.approx([row0, row1], abs=1e-6)


def test_duplicates_in_a_batch_are_masked_as_false_negatives():
    # rows 0 and 1 share a positive text; rows 0 and 2 share a query; row 1's hard negative is that positive
    mask = false_negative_mask(torch.tensor([5, 6, 5]), torch.tensor([1, 1, 2]), torch.tensor([3, 1, 4]))
    assert mask.tolist() == [[False, True, True, False, True, False],
                             [True, False, False, False, True, False],
                             [True, False, False, False, False, False]]
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    masked = in_batch_negatives_loss(q, p, None, 1.0, false_negative_mask(torch.tensor([5, 6, 5]),
                                                                          torch.tensor([1, 1, 2])))
    # row 0 keeps only its own positive: no negative left, loss 0; rows 1 and 2 keep positives 1 and 2
    assert masked[0].item() == pytest.approx(0.0, abs=1e-7)
    assert masked[1].item() == pytest.approx(-0.0 + math.log(math.exp(0.0) + math.exp(1.0)), abs=1e-6)
    assert masked[2].item() == pytest.approx(-0.8 + math.log(math.exp(0.6) + math.exp(0.8)), abs=1e-6)
    unmasked = in_batch_negatives_loss(q, p, None, 1.0)
    assert unmasked[0].item() > 0.5  # the duplicate counted as a negative scores as high as the positive


def test_cosine_regression_loss_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    loss = cosine_regression_loss(a, b, torch.tensor([0.5, 0.2]))
    assert loss.tolist() == pytest.approx([(1 / math.sqrt(2) - 0.5) ** 2, (1.0 - 0.2) ** 2], abs=1e-6)


def test_mean_and_cls_pooling_ignore_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]


def test_recall_and_mrr_from_ranks():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    corpus = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    ranks = gold_ranks(queries, corpus, np.array([0, 2, 2]))
    assert ranks.tolist() == [1, 2, 1]  # query 1 prefers row 1 (1.0) over its gold row 2 (0.6)
    metrics = ranking_metrics(ranks, [1, 5])
    assert metrics == pytest.approx({"recall@1": 2 / 3, "recall@5": 1.0, "mrr": (1 + 0.5 + 1) / 3})
    # row 1 is query 1's own text (a query that is also another pair's positive): it is left out of its ranking
    assert gold_ranks(queries, corpus, np.array([0, 2, 2]), itself=np.array([-1, 1, -1])).tolist() == [1, 1, 1]


def test_a_positive_equal_to_the_query_is_masked():
    # consecutive sentences: row 1's query is row 0's positive (key 7)
    mask = false_negative_mask(torch.tensor([6, 7]), torch.tensor([7, 8]), torch.tensor([6, 9]))
    assert mask.tolist() == [[False, False, True, False], [True, False, False, False]]


def pair_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        rows.append({"query": f"{name} flew to {city}", "positive": f"{name.capitalize()} met {city.capitalize()}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def embed_recipe(base, tmp_path: Path) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", pair_rows(256, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", pair_rows(40, 1))
    tree = {"name": "e", "task": "embedding",
            "data": {"train": {"path": str(train)}, "validation": {"path": str(dev)}, "max_length": 16},
            "model": {"path": str(base)},
            "train": {"max_steps": 30, "batch_size": 16, "lr": 3e-3, "log_every": 1, "eval_every": 30,
                      "eval_at_start": True, "seed": 0, "threads": 1},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "plots": False}}
    return tree


def test_contrastive_run_learns_and_loads_in_sentence_transformers(tmp_path, base_dir):  # noqa: F811
    st = pytest.importorskip("sentence_transformers")
    run = finetune(embed_recipe(base_dir, tmp_path), show_progress=False)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [h for h in history if h.get("split") == "validation"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert evals[-1]["mrr"] > evals[0]["mrr"] + 0.1 and losses[-1] < losses[0]
    result = json.loads((run / "results.json").read_text())
    assert result["validation"]["corpus"] == len({r["positive"] for r in pair_rows(40, 1)})
    again = CliRunner().invoke(app, ["eval", str(run), "--json"])  # the exported final/ scores as reported
    assert again.exit_code == 0 and json.loads((run / "eval-validation.json").read_text())["mrr"] == \
        pytest.approx(result["validation"]["mrr"], abs=1e-6)
    texts = ["john flew to paris", "Mary met Rome", "anna"]
    ours = open_encoder(run.run_dir).encode(texts)
    theirs = st.SentenceTransformer(str(run / "final"), device="cpu", local_files_only=True).encode(texts)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.linalg.norm(ours, axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)


def test_cls_pooling_and_scored_pairs_load_in_sentence_transformers(tmp_path, base_dir):  # noqa: F811
    st = pytest.importorskip("sentence_transformers")
    rng = random.Random(0)
    rows = [{"a": f"{x} flew to {y}", "b": f"{x} flew to {z}", "s": 5.0 if y == z else 1.0}
            for x, y, z in ((rng.choice(NAMES), rng.choice(CITIES[:2]), rng.choice(CITIES[:2])) for _ in range(64))]
    scored = str(write_jsonl(tmp_path / "scored.jsonl", rows))
    tree = embed_recipe(base_dir, tmp_path)
    tree["embedding"] = {"loss": "cosine", "pooling": "cls", "score_max": 5.0}
    tree["data"].update(train={"path": scored}, validation={"path": scored}, query_column="a",
                        positive_column="b", score_column="s")
    tree["train"].update(max_steps=4, eval_every=4)
    run = finetune(tree, show_progress=False)
    assert set(run.metrics["validation"]) == {"spearman", "pearson"}
    assert json.loads((run / "final" / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"]
    ours = open_encoder(run.run_dir).encode(["john flew to paris", "lucy"])
    theirs = st.SentenceTransformer(str(run / "final"), device="cpu", local_files_only=True).encode(
        ["john flew to paris", "lucy"])
    assert np.abs(ours - theirs).max() < 1e-5


def test_pairs_encode_with_shared_keys_and_collate_sides(tmp_path, base_dir):  # noqa: F811
    from lmforge.tasks.model import load_task_tokenizer
    from lmforge.tasks.config import BaseModelSpec
    rows = [{"query": "john flew to paris", "positive": "John met Paris", "negative": "Mary met Rome"},
            {"query": "mary flew to rome", "positive": "Mary met Rome", "negative": "John met Paris"}]
    data = TaskData(negative_column="negative")
    pairs = read_pairs(SplitFile(path=str(write_jsonl(tmp_path / "p.jsonl", rows))), data)
    tok = load_task_tokenizer(BaseModelSpec(path=str(base_dir)), base_dir)
    enc = encode_pairs(tok, pairs, 16)
    assert enc.keys["positive"] == [enc.keys["negative"][1], enc.keys["negative"][0]]  # equal texts, equal keys
    batch = collate_pairs(enc, [0, 1], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["negative_key"].tolist() == enc.keys["negative"]


def test_next_sentence_pairs_skip_headings_and_short_sentences(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(" = Title = \n The river runs far . It reaches the sea in spring . Yes . Boats sail on it daily .\n"
                    " One sentence only here .\n")
    pairs = next_sentence_pairs(path)
    assert [(p.query, p.positive, p.line) for p in pairs] == [
        ("The river runs far .", "It reaches the sea in spring .", 2),
        ("It reaches the sea in spring .", "Boats sail on it daily .", 2)]


@pytest.mark.parametrize("rows, message", [
    ([{"query": "a b", "positive": "c d"}, {"query": "e f", "positive": "  "}], "p.jsonl:2: pair with an empty positive"),
    ([{"query": "a b", "answer": "c d"}], "p.jsonl:1: no column 'positive' (columns: query, answer); "
                                          "set data.positive_column"),
])
def test_bad_pairs_name_the_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_pairs(SplitFile(path=str(path)), TaskData())


def test_cli_refuses_a_pair_with_an_empty_side_with_exit_2(tmp_path, base_dir):  # noqa: F811
    tree = embed_recipe(base_dir, tmp_path)
    write_jsonl(Path(tree["data"]["train"]["path"]), [{"query": "john", "positive": "Paris"}, {"query": "", "positive": "x"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tree))
    result = CliRunner().invoke(app, ["finetune", str(recipe), "--no-progress"])
    assert result.exit_code == 2
    assert "train.jsonl:2: pair with an empty query (column 'query')" in result.output
    assert not (tmp_path / "run").exists()


def test_recipe_refuses_a_loss_that_does_not_fit_the_data(tmp_path):
    with pytest.raises(LmforgeError, match="embedding.loss"):
        finetune_recipe_from_dict({"task": "embedding", "data": {"train": {"path": "x.jsonl"}, "score_column": "s"},
                                   "model": {"path": "m"}})


def test_shipped_recipe_builds_pairs_from_the_shared_data():
    if not (SHARED / "wikitext2" / "valid.txt").is_file():
        pytest.skip("shared data not found")
    from lmforge.tasks.pairs import read_pair_splits
    from lmforge.tasks.config import load_finetune_recipe
    recipe = load_finetune_recipe(ROOT / "recipes" / "pairs-minilm-embed.yaml")
    splits = read_pair_splits(recipe)
    assert len(splits["train"]) > 3000 and len(splits["validation"]) == recipe.data.max_eval_examples
    assert not {p.query for p in splits["train"]} & {p.query for p in splits["validation"]}
