"""The UNet options of sgm's UNetModel: vector conditioning, per-level transformer depth, Linear transformer
projections; the SDXL base architecture against diffusers' UNet2DConditionModel."""
import pytest
import torch

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.modules.helpers import randomize_zero_parameters

TINY = dict(image_size=8, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=1, channel_mult=(1, 2),
            num_head_channels=16)

SDXL_BASE = dict(image_size=128, adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4,
                 model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
                 num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                 transformer_depth=[1, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax-xformers",
                 legacy=False)


@pytest.mark.parametrize("dims", [2, 3])
def test_linear_projections_equal_1x1_convolutions(dims):
    """use_linear: the same maps as the 1x1 convolutions, with the kernel axes dropped from the weights."""
    torch.manual_seed(0)
    conv = SpatialTransformer(32, 2, 4, depth=1, context_dim=6, dims=dims)
    randomize_zero_parameters(conv)
    linear = SpatialTransformer(32, 2, 4, depth=1, context_dim=6, dims=dims, use_linear=True)
    state = {k: (v.flatten(1) if k.startswith(("proj_in.weight", "proj_out.weight")) else v)
             for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    x, context = torch.randn(2, 32, *[4] * dims), torch.randn(2, 3, 6)
    torch.testing.assert_close(linear(x, context), conv(x, context), rtol=1e-5, atol=1e-5)


def test_transformer_depth_per_level_and_middle():
    model = UNetModel(**TINY, attention_resolutions=[1, 2], use_spatial_transformer=True, context_dim=4,
                      transformer_depth=[1, 3], transformer_depth_middle=2)
    depth = lambda block: [len(m.transformer_blocks) for m in block.modules() if isinstance(m, SpatialTransformer)]
    assert [d for b in model.input_blocks for d in depth(b)] == [1, 3]
    assert depth(model.middle_block) == [2]
    assert [d for b in model.output_blocks for d in depth(b)] == [3, 3, 1, 1]
    default_middle = UNetModel(**TINY, attention_resolutions=[2], use_spatial_transformer=True, context_dim=4,
                               transformer_depth=[1, 3])
    assert depth(default_middle.middle_block) == [3]


@pytest.mark.parametrize("dims", [2, 3])
def test_vector_conditioning_enters_the_time_embedding(dims):
    torch.manual_seed(0)
    model = UNetModel(**TINY, attention_resolutions=[], num_classes="sequential", adm_in_channels=5, dims=dims).eval()
    randomize_zero_parameters(model)
    assert "label_emb.0.0.weight" in model.state_dict() and "label_emb.0.2.bias" in model.state_dict()
    x, t = torch.randn(2, 2, *[8] * dims), torch.tensor([3, 500])
    y = torch.randn(2, 5)
    out = model(x, t, y=y)
    # The vector is added to the timestep embedding: replacing label_emb by a constant of the same value gives the same
    emb_y = model.label_emb(y)
    model.label_emb, model.adm_in_channels = torch.nn.Identity(), emb_y.shape[1]
    torch.testing.assert_close(model(x, t, y=emb_y), out)
    assert not torch.allclose(model(x, t, y=emb_y * 0), out)


def test_vector_conditioning_errors():
    with pytest.raises(ValueError, match="num_classes='sequential' and adm_in_channels go together"):
        UNetModel(**TINY, attention_resolutions=[], num_classes="sequential")
    with pytest.raises(ValueError, match="'continuous'"):
        UNetModel(**TINY, attention_resolutions=[], num_classes="continuous", adm_in_channels=3)
    model = UNetModel(**TINY, attention_resolutions=[], num_classes="sequential", adm_in_channels=3)
    with pytest.raises(ValueError, match=r"float vector y of shape \(1, 3\)"):
        model(torch.zeros(1, 2, 8, 8), torch.zeros(1), y=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="transformer_depth must be a positive int or one per level"):
        UNetModel(**TINY, attention_resolutions=[2], use_spatial_transformer=True, context_dim=4,
                  transformer_depth=[1, 2, 3])


def test_sdxl_base_parameter_count_equals_diffusers():
    """sgm's SDXL base UNet (its inference config's network_config) and diffusers' UNet2DConditionModel from the SDXL
    base unet/config.json, both built on the meta device: the same number of parameters (2,567,463,684)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        ours = UNetModel(**SDXL_BASE)
        reference = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=[5, 10, 20], cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    count = lambda model: sum(p.numel() for p in model.parameters())
    assert count(ours) == count(reference) == 2_567_463_684
