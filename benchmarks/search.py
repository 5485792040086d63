"""Exact vector search: lmforge's memory-mapped index (numpy matmul + partial sort) vs faiss-cpu's IndexFlatIP, in
the same run, on the same random unit vectors (384 dimensions, as all-MiniLM-L6-v2's), top 10.

faiss-cpu is not a dependency of lmforge; this benchmark uses it when it can be imported (for example after
`pip install --target /tmp/faisslib faiss-cpu` and PYTHONPATH=/tmp/faisslib).

    python benchmarks/search.py --docs 10000 100000 --repeats 7
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lmforge.tasks.vectors import VectorIndex, write_index

DIM, K = 384, 10


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm: page cache, BLAS threads
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    try:
        import faiss  # the peer, when it can be imported
    except ImportError:
        faiss = None
        print("faiss-cpu not importable: lmforge's figures only")
    fake_encoder = SimpleNamespace(folder=Path("."), fingerprint="benchmark", pooling="mean", normalize=True,
                                   max_length=128)
    print(f"{'docs':>8} {'queries':>8} {'lmforge ms':>11} {'faiss ms':>9} {'faiss / lmforge':>16} {'same top-10':>12}")
    for n in args.docs:
        docs = unit_vectors(n, 0)
        with tempfile.TemporaryDirectory() as tmp:
            write_index(Path(tmp) / "idx", docs, [str(i) for i in range(n)], [""] * n, fake_encoder)
            index = VectorIndex(Path(tmp) / "idx")
            flat = None
            if faiss is not None:
                flat = faiss.IndexFlatIP(DIM)
                flat.add(docs)
            for q in args.queries:
                queries = unit_vectors(q, 1)
                ours = median_seconds(lambda: index.search(queries, K), args.repeats)
                line = f"{n:>8} {q:>8} {ours * 1e3:>11.2f}"
                if flat is not None:
                    theirs = median_seconds(lambda: flat.search(queries, K), args.repeats)
                    same = all([h.id for h in row] == [str(j) for j in ids]
                               for row, ids in zip(index.search(queries, K), flat.search(queries, K)[1]))
                    line += f" {theirs * 1e3:>9.2f} {theirs / ours:>16.2f} {str(same):>12}"
                print(line)


if __name__ == "__main__":
    main()
