"""Unsupervised domains, as in c-BTM (Gururangan et al. 2023, "Scaling Expert Language Models with
Unsupervised Domain Discovery"): cluster the training documents, train one expert per cluster, and route a
context to the experts by its distance to the cluster centres.

    RUN/clusters/
      clustering.json       k, the features (tfidf | embeddings), the tf-idf terms in column order or the
                            encoder, and how the clustering was fitted (documents, seed, cluster sizes)
      centres.safetensors   centres (k, dim) float32, and idf (dim,) for tf-idf features
      report.md             cluster sizes, top tf-idf terms, and the source domains found in each cluster

Features h(x) are tf-idf (sublinear tf, a capped vocabulary, rows L2-normalised) or the mean-pooled,
L2-normalised hidden states of a local encoder; the centres are scikit-learn k-means (seeded, fixed
n_init). A document belongs to its nearest centre. `ClusterLabeler` gives every document the domain
`cluster-<c>` when a recipe names the clustering (`data.domain_clusters`), so the per-domain machinery —
`data.only_domains`, per-domain packing and evaluation, the posterior-weighted ensemble — works on
clusters unchanged. Everything is saved as JSON and safetensors (no pickle).

Routing (c-BTM): p(c | x_{≤t}) ∝ top-k of exp(−‖h(x_{≤t}) − centre_c‖² / T), see `ClusterRouter`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.paths import package_path

CLUSTERING = "clustering.json"
CENTRES = "centres.safetensors"
REPORT = "report.md"
MAX_TERMS = 20_000      # tf-idf vocabulary cap: the most frequent terms of the fitted documents
KMEANS_INITS = 4        # k-means restarts; fixed so a seed always gives the same clustering
BALANCE_SLACK = 0.1     # balanced clusterings: no cluster above 1.1 x n/k of the fitted documents
BALANCE_ROUNDS = 10     # balanced k-means: rounds of (balanced assignment, centre update)
ENCODER_MAX_LENGTH = 256
ENCODER_BATCH = 32


def cluster_name(c: int) -> str:
    return f"cluster-{c}"


def _tfidf(terms: Optional[list[str]] = None):
    # scikit-learn loads only where it is used
    from sklearn.feature_extraction.text import TfidfVectorizer
    return TfidfVectorizer(sublinear_tf=True, max_features=None if terms else MAX_TERMS, vocabulary=terms,
                           dtype=np.float32)


def encoder_folder(spec: str) -> Path:
    """A local HF encoder folder; 'package:NAME/sub' is a folder inside an installed Python package."""
    folder = package_path(spec) if spec.startswith("package:") else Path(spec)
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"experts.cluster_encoder: {spec}: not a model folder (no config.json)")
    return folder


class Clustering:
    """Features and centres: assigns texts to their nearest centre and gives their squared distances."""

    def __init__(self, features: str = "tfidf", *, terms: Optional[list[str]] = None,
                 idf: Optional[np.ndarray] = None, encoder: Optional[str] = None,
                 centres: Optional[np.ndarray] = None, offsets: Optional[np.ndarray] = None,
                 info: Optional[dict] = None):
        if features not in ("tfidf", "embeddings"):
            raise LmforgeError(f"experts.cluster_features: expected 'tfidf' or 'embeddings', got {features!r}")
        self.features, self.terms, self.encoder = features, terms, encoder
        self.idf = None if idf is None else np.asarray(idf, dtype=np.float32)
        self.centres = None if centres is None else np.asarray(centres, dtype=np.float32)
        # balanced clusterings: per-cluster additions to the squared distance when documents are assigned
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.float32)
        self.info = dict(info or {})
        self._vectorizer = None
        self._encoder = None

    @property
    def k(self) -> int:
        return len(self.centres)

    @property
    def names(self) -> list[str]:
        return [cluster_name(c) for c in range(self.k)]

    def featurize(self, texts: list[str]):
        """(n, dim) features: a sparse CSR matrix of tf-idf rows, or a dense array of embeddings."""
        texts = [t if isinstance(t, str) else "" for t in texts]
        if self.features == "tfidf":
            if self._vectorizer is None:
                self._vectorizer = _tfidf(self.terms)
                self._vectorizer.idf_ = self.idf
            return self._vectorizer.transform(texts)
        return self._embed(texts)

    def _embed(self, texts: list[str]) -> np.ndarray:
        # the encoder loads only for embedding features
        from transformers import AutoModel, AutoTokenizer
        if self._encoder is None:
            folder = encoder_folder(self.encoder)
            self._encoder = (AutoTokenizer.from_pretrained(str(folder), local_files_only=True),
                             AutoModel.from_pretrained(str(folder), local_files_only=True).eval())
        tokenizer, model = self._encoder
        out = [np.zeros((0, model.config.hidden_size), dtype=np.float32)]
        with torch.no_grad():
            for i in range(0, len(texts), ENCODER_BATCH):
                batch = tokenizer(texts[i:i + ENCODER_BATCH], padding=True, truncation=True,
                                  max_length=ENCODER_MAX_LENGTH, return_tensors="pt")
                hidden = model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"][..., None].float()
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out)

    def distances(self, texts: list[str], features=None) -> np.ndarray:
        """(n, k) squared Euclidean distances of each text's features to every centre."""
        # scikit-learn loads only where it is used
        from sklearn.metrics.pairwise import euclidean_distances
        x = self.featurize(texts) if features is None else features
        return np.maximum(euclidean_distances(x, self.centres, squared=True), 0.0)

    def assign(self, texts: list[str], features=None) -> np.ndarray:
        """Each text's cluster: its nearest centre (after the balancing offsets, when the clustering has them)."""
        if not len(texts):
            return np.zeros(0, dtype=np.int64)
        d = self.distances(texts, features)
        return (d + self.offsets if self.offsets is not None else d).argmin(1)

    def save(self, folder: Union[str, Path]) -> None:
        # safetensors' numpy API, only when a clustering is saved
        from safetensors.numpy import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"centres": np.ascontiguousarray(self.centres)}
        if self.idf is not None:
            tensors["idf"] = np.ascontiguousarray(self.idf)
        if self.offsets is not None:
            tensors["offsets"] = np.ascontiguousarray(self.offsets)
        save_file(tensors, str(folder / CENTRES))
        spec = {"k": self.k, "features": self.features, "names": self.names, "encoder": self.encoder,
                "terms": self.terms, **self.info}
        tmp = folder / f".{CLUSTERING}.tmp"
        tmp.write_text(json.dumps(spec, ensure_ascii=False))
        os.replace(tmp, folder / CLUSTERING)

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "Clustering":
        # safetensors' numpy API, only when a clustering is read
        from safetensors.numpy import load_file
        folder = Path(folder)
        if not (folder / CLUSTERING).is_file() or not (folder / CENTRES).is_file():
            raise LmforgeError(f"{folder}: no clustering here ({CLUSTERING} + {CENTRES}); "
                               "`lmforge experts branch` with experts.clusters writes one")
        spec = json.loads((folder / CLUSTERING).read_text())
        tensors = load_file(str(folder / CENTRES))
        info = {k: v for k, v in spec.items() if k not in ("k", "features", "names", "encoder", "terms")}
        return cls(spec["features"], terms=spec.get("terms"), idf=tensors.get("idf"), encoder=spec.get("encoder"),
                   centres=tensors["centres"], offsets=tensors.get("offsets"), info=info)


def clustering_fingerprint(folder: Union[str, Path]) -> str:
    """Changes whenever the saved clustering (and so any document's cluster) changes."""
    folder = Path(folder)
    h = hashlib.sha256()
    for name in (CLUSTERING, CENTRES):
        if not (folder / name).is_file():
            raise LmforgeError(f"data.domain_clusters: {folder}: no clustering here (no {name}); "
                               "`lmforge experts branch` with experts.clusters writes one")
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def balancing_offsets(d: np.ndarray, slack: float = BALANCE_SLACK, rounds: int = 400) -> np.ndarray:
    """Per-cluster offsets b such that argmin_c (d[:, c] + b[c]) puts at most (1 + slack)·n/k rows in any
    cluster: a price on each cluster, raised while it is over-full and lowered while it is under-full (an
    auction; the best balance found is kept if the bound is not reached)."""
    n, k = d.shape
    cap = (1 + slack) * n / k
    ordered = np.sort(d, axis=1)
    step = float(np.median(ordered[:, 1] - ordered[:, 0])) if k > 1 else 0.0
    step = step or float(d.std()) or 1.0
    offsets = np.zeros(k, dtype=np.float64)
    best, best_max = offsets.copy(), np.inf
    for r in range(rounds):
        counts = np.bincount((d + offsets).argmin(1), minlength=k)
        if counts.max() < best_max:
            best, best_max = offsets.copy(), counts.max()
        if counts.max() <= cap:
            break
        offsets += step * (counts / (n / k) - 1.0) / (1 + r / 50)
        offsets -= offsets.min()
    return best.astype(np.float32)


def fit_clustering(texts: list[str], k: int, features: str = "tfidf", encoder: Optional[str] = None,
                   seed: int = 0, balanced: bool = False) -> tuple[Clustering, np.ndarray]:
    """k-means over the texts' features; returns the clustering and each text's cluster. `balanced` (as
    c-BTM): alternate balanced assignment (`balancing_offsets`) and centre updates, and keep the offsets,
    so that every document's cluster is still a function of the document alone."""
    # scikit-learn loads only where it is used
    from sklearn.cluster import KMeans
    if len(texts) < k:
        raise LmforgeError(f"experts.clusters: {k} clusters but only {len(texts)} training document(s) to "
                           "cluster; lower experts.clusters or add documents")
    if features == "tfidf":
        try:
            vectorizer = _tfidf().fit(texts)
        except ValueError:  # scikit-learn: "empty vocabulary"
            raise LmforgeError("experts.clusters: the training documents hold no words to cluster by") from None
        clustering = Clustering("tfidf", terms=vectorizer.get_feature_names_out().tolist(), idf=vectorizer.idf_)
    else:
        if not encoder:
            raise LmforgeError("experts.cluster_encoder: embedding features need a local encoder folder")
        clustering = Clustering("embeddings", encoder=encoder)
    x = clustering.featurize(texts)
    kmeans = KMeans(n_clusters=k, n_init=KMEANS_INITS, random_state=seed).fit(x)
    clustering.centres = kmeans.cluster_centers_.astype(np.float32)
    if balanced:
        for _ in range(BALANCE_ROUNDS):
            d = clustering.distances(texts, features=x)
            clustering.offsets = balancing_offsets(d)
            labels = (d + clustering.offsets).argmin(1)
            centres = np.stack([np.asarray(x[labels == c].mean(0)).ravel() if (labels == c).any()
                                else clustering.centres[c] for c in range(k)]).astype(np.float32)
            if np.allclose(centres, clustering.centres, atol=1e-6):
                break
            clustering.centres = centres
        clustering.offsets = balancing_offsets(clustering.distances(texts, features=x))
    # Assigned again through the saved-and-loaded path (float32 centres), so training-time and load-time
    # assignments are the same function.
    labels = clustering.assign(texts, features=x)
    sizes = np.bincount(labels, minlength=k)
    if (sizes == 0).any():
        raise LmforgeError(f"experts.clusters: only {int((sizes > 0).sum())} of {k} clusters hold documents "
                           f"(the {len(texts)} documents are too alike); lower experts.clusters")
    clustering.info.update({"fitted_on": len(texts), "seed": seed, "balanced": balanced, "sizes": sizes.tolist()})
    return clustering, labels


def top_terms(clustering: Clustering, texts: list[str], labels: np.ndarray, n: int = 8) -> list[list[str]]:
    """Each cluster's n heaviest terms of the mean tf-idf of its documents (the centre, for tf-idf features)."""
    if clustering.features == "tfidf":
        weights, terms = clustering.centres, clustering.terms
    else:  # embeddings have no terms: describe the clusters by a tf-idf fitted only for this report
        try:
            vectorizer = _tfidf().fit(texts)
        except ValueError:
            return [[] for _ in range(clustering.k)]
        x, terms = vectorizer.transform(texts), vectorizer.get_feature_names_out().tolist()
        weights = np.stack([np.asarray(x[labels == c].mean(0)).ravel() for c in range(clustering.k)])
    return [[terms[i] for i in np.argsort(-row)[:n] if row[i] > 0] for row in weights]


def format_report(clustering: Clustering, texts: list[str], labels: np.ndarray, tags: list[str]) -> str:
    """Markdown: documents per cluster, their top terms and, when the sources carry tags, the tags in it."""
    terms = top_terms(clustering, texts, labels)
    tagged = len(set(tags)) > 1
    lines = [f"# Clusters: k = {clustering.k}, {clustering.features} features, "
             f"fitted on {len(texts)} training documents (seed {clustering.info.get('seed', 0)})", "",
             "| cluster | documents | share | top terms |" + (" source domains |" if tagged else ""),
             "|---|---:|---:|---|" + ("---|" if tagged else "")]
    for c, name in enumerate(clustering.names):
        members = labels == c
        row = f"| {name} | {int(members.sum())} | {members.mean():.1%} | {', '.join(terms[c])} |"
        if tagged:
            found, counts = np.unique(np.asarray(tags)[members], return_counts=True)
            order = np.argsort(-counts)[:3]
            row += " " + ", ".join(f"{found[i]} {counts[i]}" for i in order) + " |"
        lines.append(row)
    return "\n".join(lines) + "\n"


class ClusterLabeler:
    """A `datasets.map` function: each row's domain becomes its nearest cluster, `cluster-<c>`.

    It pickles (for `datasets`' cache fingerprint and worker processes) as its folder and the clustering's
    fingerprint only, so the cached mapping is reused exactly while the clustering is unchanged.
    """

    def __init__(self, folder: Union[str, Path]):
        self.folder = str(folder)
        self.fingerprint = clustering_fingerprint(folder)
        self._clustering: Optional[Clustering] = None

    def __call__(self, batch: dict) -> dict:
        if self._clustering is None:
            self._clustering = Clustering.load(self.folder)
        return {"domain": [cluster_name(int(c)) for c in self._clustering.assign(batch["text"])]}

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "fingerprint": self.fingerprint, "_clustering": None}


class ClusterRouter:
    """c-BTM routing for `ExpertEnsemble`: the weight of expert c at position t is

        p(c | x_{≤t}) ∝ top-k of exp(−‖h(x_{≤t}) − centre_c‖² / T)

    where h is the clustering's feature (tf-idf or embedding) of the text decoded from the tokens seen so
    far, x_{≤t} (special tokens skipped). It is computed per position at a stride s: positions 0, s, 2s, …
    decode and featurise their own prefix, and the positions between reuse the latest computed weights, so a
    weight never depends on a later token. s = 1 is exact per position and costs B·T decodes of prefixes up to
    T tokens per batch; a larger s divides that cost. A prefix with no known term (tf-idf) gets uniform weights.
    """

    def __init__(self, clustering: Clustering, tokenizer, domains: list[str], temperature: float = 0.1,
                 top_k: Optional[int] = None, stride: int = 1):
        unknown = [d for d in domains if d not in clustering.names]
        if unknown:
            raise LmforgeError(f"cluster routing: experts {unknown} are not clusters of {clustering.names}")
        self.clustering, self.tokenizer = clustering, tokenizer
        self.index = [clustering.names.index(d) for d in domains]
        self.temperature, self.stride = float(temperature), max(1, int(stride))
        self.top_k = top_k if top_k and top_k < len(domains) else None

    def weights(self, texts: list[str]) -> torch.Tensor:
        """(n, D) routing weights of whole texts."""
        x = self.clustering.featurize(texts)
        d2 = torch.from_numpy(self.clustering.distances(texts, features=x)[:, self.index]).double()
        scores = -d2 / self.temperature
        if self.top_k:
            kth = scores.topk(self.top_k, dim=1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        w = torch.softmax(scores, dim=1)
        if self.clustering.features == "tfidf":
            empty = torch.from_numpy(np.asarray(x.getnnz(axis=1)) == 0)
            w[empty] = 1.0 / len(self.index)
        return w.float()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, D) weights at every position of a batch of token ids."""
        b, t = input_ids.shape
        starts = list(range(0, t, self.stride))
        rows = input_ids.tolist()
        prefixes = [row[:p + 1] for row in rows for p in starts]
        texts = self.tokenizer.batch_decode(prefixes, skip_special_tokens=True)
        w = self.weights(texts).view(b, len(starts), -1)
        return w[:, torch.arange(t) // self.stride]
