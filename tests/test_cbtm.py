"""Unsupervised domains (c-BTM): clustering recovers the corpus's two kinds of text, survives saving, names
the domains of the data, routes contexts to the right expert, and a clustered experts run works end to end."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.experts import branch, evaluate, load_ensemble, merge, train
from lmforge.data.clusters import Clustering, ClusterRouter, fit_clustering
from lmforge.recipe import load_recipe, recipe_from_dict

from conftest import make_docs, tiny_recipe


def purity(labels: np.ndarray, truth: np.ndarray) -> float:
    return sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels)) / len(labels)


@pytest.fixture
def mixed(tmp_path):
    """One untagged JSONL source holding prose and code in a seeded random order; and each text's kind."""
    docs = [(t, 0) for t in make_docs("prose", 150, seed=0)] + [(t, 1) for t in make_docs("code", 150, seed=1)]
    random.Random(0).shuffle(docs)
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in docs))
    return path, {t: kind for t, kind in docs}


def test_tfidf_clustering_recovers_the_two_kinds_and_loads_back_identically(mixed, tmp_path):
    path, kinds = mixed
    texts = list(kinds)
    clustering, labels = fit_clustering(texts, 2, seed=0)
    truth = np.array([kinds[t] for t in texts])
    assert purity(labels, truth) > 0.95
    clustering.save(tmp_path / "clusters")
    assert sorted(p.name for p in (tmp_path / "clusters").iterdir()) == ["centres.safetensors", "clustering.json"]
    again = Clustering.load(tmp_path / "clusters")
    np.testing.assert_array_equal(again.assign(texts), labels)
    np.testing.assert_array_equal(again.distances(texts[:20]), clustering.distances(texts[:20]))
    # The same seed gives the same clustering.
    np.testing.assert_array_equal(fit_clustering(texts, 2, seed=0)[0].centres, clustering.centres)


def test_balanced_clustering_caps_cluster_sizes_and_assigns_by_document_alone(tmp_path):
    from lmforge.data.clusters import BALANCE_SLACK, balancing_offsets
    # 240 prose documents and 60 code documents: plain k-means with k = 3 leaves one cluster far too large.
    texts = make_docs("prose", 240, seed=3) + make_docs("code", 60, seed=4)
    plain = np.bincount(fit_clustering(texts, 3, seed=0)[1], minlength=3)
    clustering, labels = fit_clustering(texts, 3, seed=0, balanced=True)
    sizes = np.bincount(labels, minlength=3)
    cap = (1 + BALANCE_SLACK) * len(texts) / 3
    assert plain.max() > cap >= sizes.max() and sizes.min() > 0, (plain, sizes)
    assert clustering.info["balanced"] is True and clustering.info["sizes"] == sizes.tolist()
    clustering.save(tmp_path / "clusters")
    again = Clustering.load(tmp_path / "clusters")  # the offsets are saved: any process assigns the same way
    np.testing.assert_array_equal(again.offsets, clustering.offsets)
    np.testing.assert_array_equal(again.assign(texts), labels)
    np.testing.assert_array_equal(again.assign(texts[:7]), labels[:7])  # one document at a time, same answer
    # The auction itself: skewed distances end balanced within the slack.
    d = np.random.default_rng(0).random((1000, 4)) * np.array([0.2, 1.0, 1.0, 1.0])
    counts = np.bincount((d + balancing_offsets(d)).argmin(1), minlength=4)
    assert counts.max() <= 1.1 * 250 and np.bincount(d.argmin(1), minlength=4).max() > 500


def test_embedding_clustering_recovers_the_two_kinds(mixed, minilm_dir):
    _, kinds = mixed
    texts = list(kinds)[:40]
    clustering, labels = fit_clustering(texts, 2, "embeddings", encoder=str(minilm_dir))
    assert purity(labels, np.array([kinds[t] for t in texts])) > 0.95
    assert clustering.centres.shape == (2, 384)


def test_routing_weights_sum_to_one_concentrate_on_the_right_cluster_and_are_causal(mixed):
    from lmforge.recipe import TokenizerConfig
    from lmforge.tokenizer import train_tokenizer
    _, kinds = mixed
    texts = list(kinds)
    clustering, labels = fit_clustering(texts, 2)
    code_cluster = int(np.bincount(labels[[kinds[t] == 1 for t in texts]]).argmax())
    tok = train_tokenizer(iter(texts), TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1))
    prose, code = make_docs("prose", 1, seed=7)[0], make_docs("code", 1, seed=8)[0]
    ids = torch.tensor([tok(t)["input_ids"][:24] for t in (prose, code)])
    router = ClusterRouter(clustering, tok, clustering.names)
    w = router(ids)
    assert w.shape == (2, 24, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 24))
    assert (w[0, 8:, 1 - code_cluster] > 0.9).all() and (w[1, 8:, code_cluster] > 0.9).all()
    # Position t sees only x_{≤t}: changing later tokens leaves earlier weights alone.
    changed = ids.clone()
    changed[:, 12:] = ids.flip(0)[:, 12:]
    torch.testing.assert_close(router(changed)[:, :12], w[:, :12])
    # A stride reuses the weights of the latest computed position.
    strided = ClusterRouter(clustering, tok, clustering.names, stride=4)(ids)
    torch.testing.assert_close(strided[:, 8:12], w[:, 8:9].expand(-1, 4, -1))
    # Top-1 routing is a hard choice; experts named in another order get their own cluster's weight.
    assert set(ClusterRouter(clustering, tok, clustering.names, top_k=1)(ids)[:, 8:].unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(ClusterRouter(clustering, tok, clustering.names[::-1])(ids), w.flip(-1))


def test_the_clustering_names_the_domains_and_keys_the_block_cache(mixed, tmp_path):
    from lmforge.data.blocks import cache_key
    from lmforge.data.sources import load_documents
    from lmforge.recipe import DataConfig, ObjectiveConfig, TokenizerConfig
    from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    path, kinds = mixed
    texts = list(kinds)
    clustering, _ = fit_clustering(texts, 2, seed=0)
    folder = tmp_path / "clusters"
    clustering.save(folder)
    docs = load_documents(DataConfig(sources=[{"path": str(path)}], domain_clusters=str(folder)))
    assert set(docs["domain"]) == {"cluster-0", "cluster-1"}
    truth = np.array([kinds[t] for t in docs["text"]])
    assert purity(np.array([int(d[-1]) for d in docs["domain"]]), truth) > 0.95
    only = load_documents(DataConfig(sources=[{"path": str(path)}], domain_clusters=str(folder),
                                     only_domains=["cluster-1"]))
    assert set(only["domain"]) == {"cluster-1"} and 0 < len(only) < len(docs)
    save_tokenizer(train_tokenizer(iter(texts), TokenizerConfig(kind="bpe", vocab_size=300, min_frequency=1)),
                   tmp_path / "tok")
    tok, objective = load_tokenizer(tmp_path / "tok"), ObjectiveConfig(name="clm", block_size=32)
    data = DataConfig(sources=[{"path": str(path)}], domain_clusters=str(folder))
    key = cache_key(data, tok, objective)
    assert cache_key(data, tok, objective) == key
    fit_clustering(texts, 3, seed=0)[0].save(folder)  # same folder, new assignment
    assert cache_key(data, tok, objective) != key
    with pytest.raises(LmforgeError, match="data.domain_clusters"):
        cache_key(DataConfig(sources=[{"path": str(path)}], domain_clusters=str(tmp_path / "none")), tok, objective)


def test_bad_cluster_settings_are_one_clear_error(mixed, tmp_path):
    path, _ = mixed
    tree = tiny_recipe({"default": path}, tmp_path / "run", "clm")
    with pytest.raises(LmforgeError, match=r"experts\.clusters.*greater than or equal to 2"):
        recipe_from_dict({**tree, "experts": {"clusters": 1}})
    with pytest.raises(LmforgeError, match=r"experts\.routing 'clusters' needs experts\.clusters"):
        recipe_from_dict({**tree, "experts": {"routing": "clusters"}})
    with pytest.raises(LmforgeError, match=r"experts\.cluster_encoder"):
        recipe_from_dict({**tree, "experts": {"clusters": 2, "cluster_features": "embeddings"}})
    with pytest.raises(LmforgeError, match="unknown key 'experts.cluster'; did you mean 'clusters'"):
        recipe_from_dict({**tree, "experts": {"cluster": 2}})
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs("prose", 3, seed=0)))
    tree = tiny_recipe({"default": small}, tmp_path / "run", "clm")
    tree["data"]["validation_fraction"] = 0.0
    with pytest.raises(LmforgeError, match=r"experts\.clusters: 5 clusters but only 3 training document"):
        branch(recipe_from_dict({**tree, "experts": {"clusters": 5, "seed_steps": 1}}), show_progress=False)


def test_clustered_experts_branch_train_merge_and_evaluate(mixed, tmp_path):
    path, kinds = mixed
    tree = tiny_recipe({"default": path}, tmp_path / "cbtm", "clm", max_steps=4, eval_every=0, lr=5e-3,
                       batch_size=4, eval_batches=1)
    tree["data"]["validation_fraction"] = 0.2
    tree["experts"] = {"clusters": 2, "seed_steps": 2, "routing": "clusters"}
    run = branch(recipe_from_dict(tree), show_progress=False)
    info = json.loads((run / "experts.json").read_text())
    assert info["domains"] == ["cluster-0", "cluster-1"]
    assert (run / "clusters" / "report.md").read_text().count("| cluster-") == 2
    expert = load_recipe(run / "experts" / "cluster-1.yaml")
    assert expert.data.only_domains == ["cluster-1"] and expert.data.domain_clusters == str(run / "clusters")
    train(run, show_progress=False)
    from lmforge.data.blocks import build_blocks
    from lmforge.tokenizer import load_tokenizer
    blocks = build_blocks(expert.data, load_tokenizer(run / "seed"), expert.objective)  # the expert's own cache
    assert blocks.domains == ["cluster-1"] and len(blocks.train) > 0
    merge(run, "ensemble")
    ensemble = load_ensemble(run / "ensemble")
    assert isinstance(ensemble.router, ClusterRouter)
    results = evaluate(run, max_batches=2)
    assert set(results) == {"seed", "cluster-0", "cluster-1", "ensemble"}  # each expert alone, and together
    for model in results.values():
        for name in ("cluster-0", "cluster-1"):
            assert math.isfinite(model[f"ppl/{name}"]) and model[f"ppl/{name}"] > 1.0
    # Fisher weights read each expert's own cluster from the run's data: the documents carry cluster names.
    merge(run, "average", weights="fisher", show_progress=False)
    assert json.loads((run / "average" / "merge.json").read_text())["weights"] == "fisher"
