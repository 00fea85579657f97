"""Feature diversity within one condition: the mean pairwise distance and the Vendi score of the
samples that share a class label or caption, averaged over conditions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["diversity", "vendi_score", "mean_pairwise_distance"]


def mean_pairwise_distance(features: Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j of (n, D) features (float64)."""
    f = features.double()
    if f.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 samples of a condition, got {f.shape[0]}")
    return float(torch.pdist(f).mean())


def vendi_score(features: Tensor) -> float:
    """Vendi score (Friedman & Dieng, 2023): exp of the Shannon entropy of the eigenvalues of
    K / n, with K the cosine-similarity kernel of the features (unit diagonal). 1 for identical
    samples, n for mutually orthogonal ones."""
    f = features.double()
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"Vendi score needs at least 2 samples of a condition, got {n}")
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lam = torch.linalg.eigvalsh(f @ f.T / n).clamp_min(0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


def diversity(features: Tensor, groups: Sequence[Any]) -> dict[str, Any]:
    """Within-condition diversity: mean pairwise feature distance and Vendi score, computed per
    group of samples that share a condition (class label or caption) and averaged over groups.

    Args:
        features: (N, D) features of the samples.
        groups:   N condition keys; groups with fewer than 2 samples are skipped.
    """
    if len(groups) != features.shape[0]:
        raise ValueError(f"{len(groups)} group keys for {features.shape[0]} feature rows")
    by: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    dists, vendis, sizes = [], [], []
    for idx in by.values():
        if len(idx) < 2:
            continue
        f = features[idx]
        dists.append(mean_pairwise_distance(f))
        vendis.append(vendi_score(f))
        sizes.append(len(idx))
    if not dists:
        raise ValueError("diversity needs a condition with at least 2 samples; none has")
    return {
        "diversity": float(np.mean(dists)),
        "vendi": float(np.mean(vendis)),
        "diversity_groups": len(dists),
        "diversity_group_size": int(np.median(sizes)),
    }
