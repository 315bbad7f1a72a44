"""Sample diversity: mean similarity (MS-SSIM or SSIM) over pairs of samples; lower means more diverse.

Report it beside the same figure on pairs of real images, which sets the level a faithful model should reach.
"""
from __future__ import annotations

import torch

from ldm.metrics.reconstruction import RECONSTRUCTION_METRICS

SIMILARITIES = ("ms_ssim", "ssim")


def sample_pairs(count: int, max_pairs: int | None = None, seed: int = 0) -> torch.Tensor:
    """Index pairs (P, 2), i < j, of `count` samples: all of them, or `max_pairs` drawn without replacement by a
    generator seeded with `seed` when there are more."""
    pairs = torch.combinations(torch.arange(count), r=2)
    if max_pairs is not None and len(pairs) > max_pairs:
        chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        pairs = pairs[chosen.sort().values]
    return pairs


def pairwise_similarity(samples: torch.Tensor, similarity: str = "ms_ssim", max_pairs: int | None = None,
                        seed: int = 0, batch_size: int = 16) -> torch.Tensor:
    """Similarity of each pair of samples (N, C, *spatial) in [-1, 1] -> (P,) float32, pairs as `sample_pairs`."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity: {similarity!r} is not one of {', '.join(SIMILARITIES)}")
    if samples.shape[0] < 2:
        raise ValueError(f"pairwise_similarity: needs at least 2 samples, got shape {tuple(samples.shape)}")
    metric = RECONSTRUCTION_METRICS[similarity]
    pairs = sample_pairs(samples.shape[0], max_pairs, seed)
    values = [metric(samples[chunk[:, 0]], samples[chunk[:, 1]]) for chunk in pairs.split(batch_size)]
    return torch.cat(values)


def mean_pairwise_similarity(samples: torch.Tensor, similarity: str = "ms_ssim", max_pairs: int | None = None,
                             seed: int = 0) -> float:
    """Mean of `pairwise_similarity` over the pairs: one diversity figure for a set of samples."""
    return float(pairwise_similarity(samples, similarity, max_pairs, seed).mean())
