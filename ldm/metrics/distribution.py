"""Distances between two sets of features (N, F): Fréchet distance (FID) and kernel distance (KID).

Both work in float64 on CPU whatever the input dtype and device. The feature network that makes the sets lives in
`ldm.metrics.features`.
"""
from __future__ import annotations

import torch


def _as_feature_set(features: torch.Tensor, name: str, min_items: int = 2) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"{name}: expected features (N, F), got shape {tuple(features.shape)}")
    if features.shape[0] < min_items:
        raise ValueError(f"{name}: needs at least {min_items} items, got {features.shape[0]}")
    return features.detach().to("cpu", torch.float64)


def mean_and_covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), float64."""
    features = _as_feature_set(features, "mean_and_covariance")
    return features.mean(dim=0), torch.cov(features.T, correction=1).reshape(features.shape[1], -1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; round-off negative eigenvalues count as 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor,
                                     sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance between N(mu1, S1) and N(mu2, S2).

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the right side is the square root of a symmetric PSD matrix,
    so it is taken through real eigenvalues (clamped at 0) and no imaginary round-off arises, where
    scipy.linalg.sqrtm(S1 @ S2) of the non-symmetric product leaves tiny imaginary parts to discard."""
    mu1, sigma1, mu2, sigma2 = (t.to("cpu", torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    root1 = _psd_sqrt(sigma1)
    cross = root1 @ sigma2 @ root1
    trace_sqrt_product = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product
    return float(distance)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance (FID when the features are Inception's) between feature sets real (N, F) and fake (M, F)."""
    real, fake = _as_feature_set(real, "frechet_distance real"), _as_feature_set(fake, "frechet_distance fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    return frechet_distance_from_statistics(*mean_and_covariance(real), *mean_and_covariance(fake))


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> torch.Tensor:
    """k(a, b) = (gamma a.b + coef)^degree for a (N, F), b (M, F) -> (N, M); gamma defaults to 1 / F."""
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    return (a @ b.T * gamma + coef) ** degree


def unbiased_mmd2(real: torch.Tensor, fake: torch.Tensor, **kernel_options) -> torch.Tensor:
    """Unbiased squared maximum mean discrepancy between two equal-size sets real, fake (m, F) (Gretton et al.
    2012): mean of k(x, x') over x != x' plus the same for y, minus twice the mean of k(x, y) over all pairs."""
    m = real.shape[0]
    k_xx = polynomial_kernel(real, real, **kernel_options)
    k_yy = polynomial_kernel(fake, fake, **kernel_options)
    k_xy = polynomial_kernel(real, fake, **kernel_options)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / m ** 2


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0, degree: int = 3, gamma: float | None = None,
                    coef: float = 1.0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel between random subsets of
    real (N, F) and fake (M, F), as (mean, population std) over `subsets` draws.

    Each draw takes `subset_size` items of each set without replacement (a fresh permutation of real, then of fake,
    from a generator seeded with `seed`); `subset_size` is lowered to the smaller set's size when larger."""
    real, fake = _as_feature_set(real, "kernel_distance real"), _as_feature_set(fake, "kernel_distance fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"kernel_distance: feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    subset_size = min(subset_size, real.shape[0], fake.shape[0])
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        real_subset = real[torch.randperm(real.shape[0], generator=generator)[:subset_size]]
        fake_subset = fake[torch.randperm(fake.shape[0], generator=generator)[:subset_size]]
        values.append(unbiased_mmd2(real_subset, fake_subset, degree=degree, gamma=gamma, coef=coef))
    values = torch.stack(values)
    return float(values.mean()), float(values.std(correction=0))
