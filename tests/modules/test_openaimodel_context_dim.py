"""UNetModel context_dim as one width per level (sgm's list form, e.g. the SDXL refiner's [1280] * 4)."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config
from tests.modules.helpers import randomize_zero_parameters

THREE_LEVELS = dict(image_size=8, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1,
                    channel_mult=(1, 2, 2), num_head_channels=16, use_spatial_transformer=True)


def context_widths(block: torch.nn.Module) -> list[int]:
    """The input width of every cross-attention key projection in block."""
    return [attention.attn2.to_k.in_features for m in block.modules() if isinstance(m, SpatialTransformer)
            for attention in m.transformer_blocks]


def test_a_list_of_one_width_builds_the_int_model():
    """[6, 6, 6] and 6: the same parameters (names, shapes, values from one seed) and the same output."""
    torch.manual_seed(0)
    per_level = UNetModel(**THREE_LEVELS, attention_resolutions=[1, 4], context_dim=[6, 6, 6]).eval()
    randomize_zero_parameters(per_level)
    single = UNetModel(**THREE_LEVELS, attention_resolutions=[1, 4], context_dim=6).eval()
    single.load_state_dict(per_level.state_dict())
    assert {k: v.shape for k, v in per_level.state_dict().items()} == {k: v.shape for k, v in
                                                                        single.state_dict().items()}
    x, t, context = torch.randn(2, 2, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 6)
    torch.testing.assert_close(per_level(x, t, context), single(x, t, context))
    assert per_level.context_dim == single.context_dim == 6


def test_each_level_takes_its_width_and_the_middle_block_the_last():
    """Level 0 has no transformer here, so its entry may differ; levels 1 and 2 (and the middle block, which takes
    the last entry) get 6, and one context of width 6 goes through."""
    model = UNetModel(**THREE_LEVELS, attention_resolutions=[2, 4], context_dim=[9, 6, 6],
                      transformer_depth=[1, 2, 1])
    assert model.context_dims == [9, 6, 6] and model.context_dim == 6
    assert [w for block in model.input_blocks for w in context_widths(block)] == [6, 6, 6]  # depth 2 at level 1
    assert context_widths(model.middle_block) == [6]
    assert [w for block in model.output_blocks for w in context_widths(block)] == [6] * 2 + [6, 6] * 2
    out = model(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 6))
    assert out.shape == (2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"context must be \(2, L, 6\), got \(2, 3, 9\)"):
        model(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 9))


def test_bad_lists_are_named():
    with pytest.raises(ValueError, match=r"context_dim must be an int or one positive int per level of channel_mult "
                                         r"\(3\), got \[6, 6\]"):
        UNetModel(**THREE_LEVELS, attention_resolutions=[2], context_dim=[6, 6])
    with pytest.raises(ValueError, match=r"context_dim \[6, 8, 6\] gives the levels with transformers \(\[1, 2\]; "
                                         r"the middle block takes the last\) different widths"):
        UNetModel(**THREE_LEVELS, attention_resolutions=[2], context_dim=[6, 8, 6])
    with pytest.raises(ValueError, match=r"context_dim \[6, 6, 8\] gives the levels with transformers \(\[0, 2\]"):
        UNetModel(**THREE_LEVELS, attention_resolutions=[1], context_dim=[6, 6, 8])


def test_the_list_comes_from_a_yaml_config():
    """An sgm network_config with the list (an OmegaConf ListConfig) builds through instantiate_from_config."""
    config = OmegaConf.create({"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                               "params": {**THREE_LEVELS, "channel_mult": [1, 2, 2], "attention_resolutions": [2, 4],
                                          "context_dim": [6, 6, 6], "use_linear_in_transformer": True}})
    model = instantiate_from_config(config)
    assert model.context_dims == [6, 6, 6]
    assert context_widths(model.middle_block) == [6]
