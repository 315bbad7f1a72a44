import pytest
import torch
from torch.nn import functional as F

from ldm.models.diffusion.conditioning import (Conditioning, as_tokens, build_conditioning, drop_conditions,
                                               to_latent_grid)


def _one_hot_mask(spatial, classes=3, seed=0) -> torch.Tensor:
    labels = torch.randint(0, classes, (2, *spatial), generator=torch.Generator().manual_seed(seed))
    return F.one_hot(labels, classes).movedim(-1, 1).float()


@pytest.mark.parametrize("spatial", [(16, 16), (8, 16, 16)])
def test_mask_to_latent_grid_nearest_and_area(spatial):
    mask = _one_hot_mask(spatial)
    size = [s // 4 for s in spatial]
    centre = (slice(None), slice(None), *[slice(2, None, 4)] * len(spatial))
    torch.testing.assert_close(to_latent_grid(mask, size, "nearest"), mask[centre])
    pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
    area = to_latent_grid(mask, size, "area")
    torch.testing.assert_close(area, pool(mask, 4))
    torch.testing.assert_close(area.sum(dim=1), torch.ones_like(area[:, 0]))  # class occupancy per latent voxel


def test_mask_to_latent_grid_errors_and_pass_through():
    mask = _one_hot_mask((8, 8, 8))
    assert to_latent_grid(mask, (8, 8, 8), "encoder") is mask
    with pytest.raises(ValueError, match=r"'encoder'.*spatial size \(8, 8, 8\), the latent grid is \(4, 4, 4\)"):
        to_latent_grid(mask, (4, 4, 4), "encoder")
    with pytest.raises(ValueError, match=r"must be \(B, C, H, W\) like the latents"):
        to_latent_grid(mask, (4, 4), "nearest")
    with pytest.raises(ValueError, match="mask_to_latent: 'bilinear'"):
        to_latent_grid(mask, (4, 4, 4), "bilinear")


def test_tokens_and_unet_inputs():
    assert as_tokens(torch.zeros(2, 5)).shape == (2, 1, 5)
    assert as_tokens(torch.zeros(2, 7, 5)).shape == (2, 7, 5)
    assert as_tokens(torch.zeros(2, 5, 2, 3, 4)).shape == (2, 24, 5)
    x = torch.randn(2, 4, 2, 3, 4)
    cond = build_conditioning("hybrid", torch.randn(2, 3, 4, 6, 8), (2, 3, 4), "area")
    x_in, kwargs = cond.unet_inputs(x)
    assert x_in.shape == (2, 7, 2, 3, 4) and torch.equal(x_in[:, :4], x)
    assert kwargs["context"].shape == (2, 24, 3) and kwargs["y"] is None
    cond = build_conditioning("adm", torch.tensor([3, 1]), (2, 3, 4))
    assert cond.unet_inputs(x) == (x, {"context": None, "y": cond.y}) and cond.y.dtype == torch.int64
    with pytest.raises(ValueError, match="'adm' needs class labels"):
        build_conditioning("adm", torch.randn(2, 4), (2, 3, 4))
    with pytest.raises(ValueError, match="conditioning_key: 'cross'"):
        build_conditioning("cross", torch.randn(2, 4), (2, 3, 4))
    assert build_conditioning(None, None, (2, 3)) == Conditioning()


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_condition_dropout_rate_and_items(rate):
    n = 20_000
    cond = Conditioning(concat=torch.ones(n, 1, 2, 2), context=torch.ones(n, 1, 4))
    null = Conditioning(concat=torch.zeros(n, 1, 2, 2), context=torch.zeros(n, 1, 4))
    dropped = drop_conditions(cond, null, rate, torch.Generator().manual_seed(0))
    concat_dropped = dropped.concat.flatten(1).eq(0).all(dim=1)
    context_dropped = dropped.context.flatten(1).eq(0).all(dim=1)
    assert concat_dropped.float().mean().item() == pytest.approx(rate, abs=0.015)
    assert torch.equal(concat_dropped, context_dropped)  # one decision per item, for every input
    assert dropped.concat.flatten(1).eq(1).all(dim=1).logical_or(concat_dropped).all()
    assert drop_conditions(cond, null, 0.0) is cond
