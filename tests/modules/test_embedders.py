import pytest
import torch
from torch.nn import functional as F

from ldm.modules.embedders import ClassEmbedder, ConcatTimestepEmbedderND, ScalarEmbedder, SpatialMaskEmbedder


def test_concat_timestep_embedder_equals_diffusers_sdxl_time_ids():
    """SDXL's add_time_proj in diffusers: Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) per value,
    flattened (UNet2DConditionModel.get_aug_embed)."""
    from diffusers.models.embeddings import Timesteps
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 16.0, 8.0, 1024.0, 1024.0]])
    reference = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(time_ids.flatten()).reshape(2, -1)
    torch.testing.assert_close(ConcatTimestepEmbedderND(256)(time_ids), reference, rtol=1e-5, atol=1e-5)


def test_class_embedder_shapes_and_errors():
    embedder = ClassEmbedder(4, n_classes=3)
    labels = torch.tensor([0, 2])
    assert embedder(labels).shape == (2, 4)
    torch.testing.assert_close(embedder(labels), embedder.embedding.weight[labels])
    assert ClassEmbedder(4, 3, add_sequence_dim=True)(labels).shape == (2, 1, 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        embedder(torch.tensor([3]))


def test_scalar_embedder_is_the_timestep_embedding_of_the_normalised_value():
    from diffusers.models.embeddings import get_timestep_embedding
    age = torch.tensor([20.0, 45.5, 80.0])
    out = ScalarEmbedder(16, offset=20.0, scale=0.06)(age[:, None])
    reference = get_timestep_embedding((age - 20.0) / 0.06, 16, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="NaN or infinity"):
        ScalarEmbedder(16)(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_mask_embedder(dims):
    mask = torch.randint(0, 3, (2, 1, *[8] * dims))
    out = SpatialMaskEmbedder(4, mode="area", n_classes=3)(mask)
    assert out.shape == (2, 3, *[2] * dims)
    one_hot = F.one_hot(mask[:, 0], 3).movedim(-1, 1).float()
    pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
    torch.testing.assert_close(out, pool(one_hot, 4))
    torch.testing.assert_close(out.sum(1), torch.ones(2, *[2] * dims))  # per-class occupancy
    nearest = SpatialMaskEmbedder(2)(mask.float())
    # nearest-exact: output voxel i reads input voxel floor((i + 0.5) * 2) = 2i + 1, the block's centre rounded up
    torch.testing.assert_close(nearest, mask.float()[(slice(None), slice(None)) + (slice(1, None, 2),) * dims])
    with pytest.raises(ValueError, match="not divisible"):
        SpatialMaskEmbedder(3)(mask.float())
