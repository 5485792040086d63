"""The domain prior p(d) of an ensemble or a DEMix model, estimated on held-out blocks."""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError


def estimate_prior(posterior, data, batch_size: int = 16, max_batches: int = 20) -> torch.Tensor:
    """p(d) = the mean over held-out blocks of the posterior at each block's last position (uniform start);
    `posterior(input_ids)` gives (B, T, D) weights (an ExpertEnsemble's, a DEMix model's)."""
    if data.validation is None or len(data.validation) == 0:
        raise LmforgeError("the data has no validation split to estimate the domain prior on")
    total, n = None, 0
    with torch.no_grad():
        for start in range(0, min(len(data.validation), batch_size * max_batches), batch_size):
            rows = list(range(start, min(start + batch_size, len(data.validation))))
            ids, _ = data.batch("validation", rows)
            last = posterior(torch.from_numpy(ids)[:, :-1])[:, -1].double().sum(0)  # the T-1 positions a causal LM sees
            total = last if total is None else total + last
            n += len(rows)
    return (total / max(n, 1)).float()
