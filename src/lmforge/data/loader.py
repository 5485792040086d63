"""Deterministic batch positions: sample k of step s is the same whatever the process count.

Global sample position p = step * G + micro * (B * world) + rank * B + i, where G = B * accum * world.
Position p maps to epoch p // N and a seeded permutation of that epoch, so the data position of a run
is just its step counter and resume is exact. The position also seeds MLM masking (dynamic per epoch).
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from lmforge.data.blocks import BlockData, stream_blocks
from lmforge.errors import LmforgeError

IN_MEMORY_LIMIT = 2 * 1024**3  # bytes of token ids held as one numpy array for fast indexing


def _as_array(ds) -> Optional[np.ndarray]:
    """The blocks as an (n, block) int64 array in memory when they fit comfortably, else None (rows are then read
    from the memory-mapped cache as they are needed)."""
    if ds is None or len(ds) == 0:
        return None
    column = ds["input_ids"]
    if column.size * 8 > IN_MEMORY_LIMIT:
        return None
    return np.asarray(column, dtype=np.int64)


class BlockLoader:
    """Training batches for one rank, addressed by (step, micro-batch)."""

    def __init__(self, data: BlockData, batch_size: int, accum: int, seed: int, world: int = 1, rank: int = 0,
                 domain_weights: Optional[dict[str, float]] = None):
        self.data, self.batch_size, self.accum, self.seed = data, batch_size, accum, seed
        self.world, self.rank = world, rank
        self.n = len(data.train)
        self.ids = _as_array(data.train)
        self.domains = np.asarray(data.train["domain"], dtype=np.int64)
        self._perms: dict[int, np.ndarray] = {}
        self.mixture = self._mixture(domain_weights) if domain_weights else None

    def _mixture(self, weights: dict[str, float]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(cumulative domain shares, block rows of each weighted domain) for weighted sampling."""
        unknown = sorted(set(weights) - set(self.data.domains))
        if unknown:
            raise LmforgeError(f"data.domain_weights: {unknown} not among the training data's domains "
                               f"{self.data.domains}")
        names = [d for d in self.data.domains if d in weights]
        members = [np.flatnonzero(self.domains == self.data.domains.index(d)) for d in names]
        empty = [d for d, m in zip(names, members) if len(m) == 0]
        if empty:
            raise LmforgeError(f"data.domain_weights: domain(s) {empty} have no training block")
        shares = np.array([weights[d] for d in names], dtype=np.float64)
        return np.cumsum(shares / shares.sum()), members

    def weighted_rows(self, positions: np.ndarray) -> np.ndarray:
        """Rows for sample positions under domain weights: the domain, then a block of it, drawn (with
        replacement) from a generator seeded by the position alone, so any rank or resume gets the same."""
        cumulative, members = self.mixture
        rows = np.empty(len(positions), dtype=np.int64)
        for i, p in enumerate(positions.tolist()):
            rng = np.random.default_rng([self.seed, p, 2])
            d = min(int(np.searchsorted(cumulative, rng.random(), side="right")), len(members) - 1)
            rows[i] = members[d][rng.integers(len(members[d]))]
        return rows

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum * self.world

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def positions(self, step: int, micro: int) -> np.ndarray:
        start = step * self.global_batch + micro * self.batch_size * self.world + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size)

    def epoch_offset(self, epoch: int) -> int:
        """Where blocks start in the token stream this epoch: 0 first, then a seeded shift, so a
        repeated epoch sees new windows rather than the same blocks again."""
        block = self.data.block_size
        return 0 if epoch == 0 else int(np.random.default_rng([self.seed, epoch, 1]).integers(1, block))

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, sample positions, domain ids) of one micro-batch."""
        pos = self.positions(step, micro)
        epochs = pos // self.n
        if self.mixture is not None:
            rows = self.weighted_rows(pos)
        else:
            rows = np.array([self._perm(int(e))[int(w)] for e, w in zip(epochs, pos % self.n)])
        if self.ids is None:  # too large for memory: read the blocks as they are
            ids, _ = self.data.batch("train", rows)
        elif not self.data.packed or self.mixture is not None:  # blocks taken whole
            ids = self.ids[rows]
        else:
            ids = self.ids[rows]
            offsets = np.array([self.epoch_offset(int(e)) for e in epochs])
            # A shifted block takes the head of the next block, only where that block continues the
            # same domain's stream (blocks are stored in stream order).
            nxt = np.minimum(rows + 1, self.n - 1)
            shift = (offsets > 0) & (nxt == rows + 1) & (self.domains[nxt] == self.domains[rows])
            if shift.any():
                joined = np.concatenate([self.ids[rows[shift]], self.ids[nxt[shift]]], axis=1)
                take = offsets[shift, None] + np.arange(self.data.block_size)
                ids = ids.copy()
                ids[shift] = np.take_along_axis(joined, take, axis=1)
        return torch.from_numpy(np.ascontiguousarray(ids)), torch.from_numpy(pos), torch.from_numpy(self.domains[rows])


class StreamLoader:
    """Streaming mode: blocks come straight from the sources; resume skips the blocks already used."""

    def __init__(self, data_cfg, tokenizer, objective_cfg, domains: list[str], batch_size: int, accum: int,
                 seed: int, world: int = 1, rank: int = 0):
        self.args = (data_cfg, tokenizer, objective_cfg)
        self.batch_size, self.accum, self.seed, self.world, self.rank = batch_size, accum, seed, world, rank
        self.domain_ids = {d: i for i, d in enumerate(domains)}
        self._iter: Optional[Iterator] = None
        self._next_pos = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum * self.world

    def _forever(self, skip: int):
        epoch, produced = 0, 0
        while True:
            any_block = False
            for block, domain in stream_blocks(*self.args, split="train", seed=self.seed + epoch):
                any_block = True
                if produced >= skip:
                    yield block, domain
                produced += 1
            if not any_block:
                raise LmforgeError("data: the streamed training split holds no full block; add text or lower "
                                   "objective.block_size")
            epoch += 1

    def micro_batch(self, step: int, micro: int):
        start = step * self.global_batch + micro * self.batch_size * self.world
        if self._iter is None or self._next_pos != start:
            self._iter = self._forever(start)
        rows = [next(self._iter) for _ in range(self.batch_size * self.world)]
        self._next_pos = start + len(rows)
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        pos = torch.arange(start + self.rank * self.batch_size, start + (self.rank + 1) * self.batch_size)
        ids = torch.tensor([b for b, _ in mine], dtype=torch.long)
        doms = torch.tensor([self.domain_ids.get(d, 0) for _, d in mine], dtype=torch.long)
        return ids, pos, doms
