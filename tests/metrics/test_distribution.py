import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ldm.metrics.distribution import frechet_distance, frechet_distance_from_statistics, kernel_distance


class IdentityFeatures(torch.nn.Module):
    """Lets torchmetrics' FID / KID take raw features (N, F) in place of images."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def feature_sets(n=64, m=48, f=6, shift=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(f, f, generator=g, dtype=torch.float64)
    real = torch.randn(n, f, generator=g, dtype=torch.float64) @ mixing
    fake = torch.randn(m, f, generator=g, dtype=torch.float64) @ mixing * 1.3 + shift
    return real, fake


def random_covariance(f, seed):
    a = np.random.default_rng(seed).normal(size=(f, f))
    return a @ a.T + 0.1 * np.eye(f)


def test_fid_of_a_set_with_itself_is_zero():
    real, _ = feature_sets()
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_two_gaussians_is_the_closed_form():
    f = 5
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    s1, s2 = random_covariance(f, 1), random_covariance(f, 2)
    sqrt_product = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * sqrt_product)
    got = frechet_distance_from_statistics(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert got == pytest.approx(expected, rel=1e-9)
    # Diagonal covariances commute: the distance is sum (mu1 - mu2)^2 + (sqrt(s1) - sqrt(s2))^2.
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    diagonal = frechet_distance_from_statistics(torch.zeros(3), torch.diag(torch.from_numpy(d1)), torch.ones(3),
                                                torch.diag(torch.from_numpy(d2)))
    assert diagonal == pytest.approx(3 + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))


def test_fid_matches_torchmetrics():
    real, fake = feature_sets()
    reference = FrechetInceptionDistance(feature=IdentityFeatures(real.shape[1]))
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(reference.compute()), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics_with_the_same_subsets():
    real, fake = feature_sets()
    reference = KernelInceptionDistance(feature=IdentityFeatures(real.shape[1]), subsets=5, subset_size=20)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    torch.manual_seed(3)  # torchmetrics draws its permutations from the global generator
    expected_mean, expected_std = (float(v) for v in reference.compute())
    mean, std = kernel_distance(real, fake, subsets=5, subset_size=20, seed=3)
    assert (mean, std) == pytest.approx((expected_mean, expected_std), rel=1e-6)
    assert std > 0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    real, _ = feature_sets(n=200, m=200, shift=0.0)
    same = feature_sets(n=200, m=200, shift=0.0, seed=1)[0]
    close, _ = kernel_distance(real, same, subsets=10, subset_size=100)
    far, _ = kernel_distance(real, feature_sets(n=200, m=200, shift=2.0)[1], subsets=10, subset_size=100)
    assert abs(close) < 0.1 * far


def test_feature_sizes_must_agree():
    with pytest.raises(ValueError, match="real 4, fake 5"):
        frechet_distance(torch.zeros(3, 4), torch.zeros(3, 5))
