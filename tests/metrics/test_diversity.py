import pytest
import torch
from monai.metrics import SSIMMetric

from ldm.metrics.diversity import mean_pairwise_similarity, pairwise_similarity, sample_pairs


def samples(n=5, shape=(1, 16, 16), seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_all_pairs_or_a_seeded_subset():
    assert sample_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    subset = sample_pairs(30, max_pairs=10, seed=1)
    assert subset.shape == (10, 2) and bool((subset[:, 0] < subset[:, 1]).all())
    assert torch.equal(subset, sample_pairs(30, max_pairs=10, seed=1))
    assert len({tuple(p) for p in subset.tolist()}) == 10


def test_copies_of_one_sample_have_similarity_one():
    copies = samples(1).expand(4, -1, -1, -1)
    assert mean_pairwise_similarity(copies) == pytest.approx(1.0)
    assert mean_pairwise_similarity(copies, "ssim") == pytest.approx(1.0)


def test_pairwise_ssim_is_monai_ssim_of_each_pair():
    x = samples(4, shape=(1, 12, 12, 12))
    reference = SSIMMetric(spatial_dims=3, data_range=2.0, win_size=11, kernel_sigma=1.5, reduction="none")
    expected = torch.stack([reference(x[i:i + 1], x[j:j + 1]).reshape(()) for i, j in sample_pairs(4).tolist()])
    torch.testing.assert_close(pairwise_similarity(x, "ssim", batch_size=4), expected)


def test_independent_noise_is_more_diverse_than_near_copies():
    base = samples(1).expand(6, -1, -1, -1)
    near_copies = (base + 0.05 * samples(6, seed=1)).clamp(-1, 1)
    assert mean_pairwise_similarity(samples(6)) < mean_pairwise_similarity(near_copies)


def test_unknown_similarity_is_named():
    with pytest.raises(ValueError, match="'lpips' is not one of ms_ssim, ssim"):
        pairwise_similarity(samples(), "lpips")
