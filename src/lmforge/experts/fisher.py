"""Fisher-weighted parameter averaging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

A uniform average treats every weight of every expert as equally trustworthy. Experts branched from one seed
and trained on different domains move different weights: a code expert rewrites the embeddings of code tokens
that the legal expert never reads, and the plain average keeps only a quarter of that change. Weighting each
expert's value of a weight by that expert's diagonal Fisher information, the mean squared gradient of its
loss on its own domain's text, keeps each weight closest to the expert that relies on it:

    merged[w] = sum_d (F_d[w] + eps) * theta_d[w] / sum_d (F_d[w] + eps)

This is the empirical Fisher (gradients of the loss on the real next tokens), one gradient per training
block. `eps` is a small floor relative to the largest Fisher value, so a weight no expert's text touches (a
token that occurs in no domain) falls back to the uniform average.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError

FLOOR = 1e-8   # eps as a fraction of the largest Fisher value of any expert


def diagonal_fisher(model, blocks: np.ndarray) -> dict[str, torch.Tensor]:
    """The mean over `blocks` ((N, T) token ids, one gradient per block: T-1 inputs, each predicting the next
    token) of each parameter's squared gradient of the causal-LM loss, keyed by state-dict name (tied parameters appear under each of their names)."""
    if len(blocks) == 0:
        raise LmforgeError("Fisher weights: no text to estimate them on")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model that is merged
    params = {name: p for name, p in model.named_parameters()}
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    try:
        for row in blocks:
            ids = torch.as_tensor(row, dtype=torch.long, device=device)[None]
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids[:, :-1]).logits.float()   # a block's T-1 inputs, as training reads it
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
            for name, p in params.items():
                if p.grad is not None:
                    total[name] += p.grad.float().square()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    by_storage = {p.data_ptr(): total[name] / len(blocks) for name, p in params.items()}
    return {key: by_storage[t.data_ptr()] for key, t in model.state_dict().items()
            if torch.is_floating_point(t) and t.data_ptr() in by_storage}


def fisher_average(states: list[dict], fishers: list[dict], keys: Optional[set] = None) -> dict:
    """The Fisher-weighted average of `states` (state dicts of one architecture) over `keys` (default: all).
    Floating-point entries without a Fisher value (buffers) are averaged uniformly; others come from the first."""
    floor = FLOOR * max(float(f.max()) for fisher in fishers for f in fisher.values()) or 1.0
    out = {}
    for key, first in states[0].items():
        if keys is not None and key not in keys:
            continue
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        if any(key not in f for f in fishers):
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(first.dtype)
            continue
        num = torch.zeros_like(first, dtype=torch.float64)
        den = torch.zeros_like(first, dtype=torch.float64)
        for state, fisher in zip(states, fishers):
            w = fisher[key].double() + floor
            num += w * state[key].double()
            den += w
        out[key] = (num / den).to(first.dtype)
    return out


def domain_blocks(data, domain: str, n: int, seed: int = 0) -> np.ndarray:
    """Up to `n` training blocks of `domain` (a seeded sample) from a BlockData of the mixture."""
    if domain not in data.domains:
        raise LmforgeError(f"Fisher weights: the run's data has no blocks tagged '{domain}' "
                           f"(its domains: {', '.join(data.domains)})")
    tags = np.asarray(data.train["domain"], dtype=np.int64)
    rows = np.flatnonzero(tags == data.domains.index(domain))
    if not len(rows):
        raise LmforgeError(f"Fisher weights: no training block of domain '{domain}'")
    rows = np.random.default_rng(seed).permutation(rows)[:n]
    ids, _ = data.batch("train", sorted(rows.tolist()))
    return ids
