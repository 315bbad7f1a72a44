"""UNet weights: diffusers' UNet2DConditionModel (the reference) <-> ours <-> the CompVis / SD single-file layout."""
import pytest
import torch

from ldm.convert import unet
from ldm.convert.diffusers_folder import write_component
from ldm.convert.weights_io import ConversionError, write_state_dict

diffusers = pytest.importorskip("diffusers")

CONFIGS = {  # SD 1.x's block structure, tiny; and three levels, two transformer layers, class embeddings
    "sd1_like": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24, attention_head_dim=4,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "deeper_classes": dict(block_out_channels=(32, 32, 64), layers_per_block=1, cross_attention_dim=16,
                           attention_head_dim=2, transformer_layers_per_block=2, num_class_embeds=5,
                           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), in_channels=3,
                           out_channels=6),
    "sd2_like": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=(2, 4),
                     use_linear_projection=True, upcast_attention=True,
                     down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
    "sdxl_like": dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24,
                      attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2, 3),
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=16 + 6 * 8,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


def reference(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(sample_size=16, norm_num_groups=32, **CONFIGS[name]).eval()
    for p in model.parameters():  # the zero-initialised output layers too, so that every tensor shows
        p.data.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_folder_to_ours_same_outputs_and_back(tmp_path, name):
    ref = reference(name)
    ref.save_pretrained(tmp_path / "unet")
    ours = unet.load_unet(tmp_path).eval()  # the pipeline folder: its unet/ is found
    back = unet.export_state(ours, "diffusers")
    assert sorted(back) == sorted(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    write_component(tmp_path / "out" / "unet", unet.diffusers_config(ours), back)
    config = CONFIGS[name]
    if "addition_time_embed_dim" in config:  # ours writes SDXL's 256 Fourier features per size number
        write_component(tmp_path / "out" / "unet", {**unet.diffusers_config(ours), "addition_time_embed_dim": 8}, back)
    reloaded = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    heads = config["attention_head_dim"]
    heads = list(heads) if isinstance(heads, tuple) else [heads] * len(ref.down_blocks)
    with_attention = [i for i, kind in enumerate(config["down_block_types"]) if kind.startswith("CrossAttn")]
    assert [reloaded.config.attention_head_dim[i] for i in with_attention] == [heads[i] for i in with_attention]

    x = torch.randn(2, config.get("in_channels", 4), 16, 16)
    t = torch.tensor([3, 917])
    context = torch.randn(2, 7, config["cross_attention_dim"])
    labels = torch.tensor([1, 4]) if "num_class_embeds" in config else None
    theirs_extra, y = {"class_labels": labels}, labels
    if "addition_embed_type" in config:  # SDXL: pooled text + Fourier features of the size/crop numbers as y
        text_embeds, time_ids = torch.randn(2, 16), torch.tensor([[16.0, 16, 0, 0, 16, 16], [32, 24, 2, 1, 16, 16]])
        theirs_extra = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
        y = torch.cat([text_embeds, ref.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    with torch.no_grad():
        expected = ref(x, t, context, **theirs_extra).sample
        torch.testing.assert_close(ours(x, t, context, y), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(reloaded(x, t, context, **theirs_extra).sample, expected, rtol=0, atol=0)
        if y is not None and y.is_floating_point():
            y = y.double()
            theirs_extra["added_cond_kwargs"] = {k: v.double() for k, v in theirs_extra["added_cond_kwargs"].items()}
        ref, ours = ref.double(), ours.double()
        torch.testing.assert_close(ours(x.double(), t, context.double(), y),
                                   ref(x.double(), t, context.double(), **theirs_extra).sample, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["sd1_like", "sd2_like", "sdxl_like"])
def test_compvis_single_file_round_trips_through_diffusers_loader(tmp_path, name):
    ref = reference(name)
    ref.save_pretrained(tmp_path / "unet")
    ours = unet.load_unet(tmp_path / "unet")
    single = {**unet.export_state(ours, "compvis", unet.SINGLE_FILE_PREFIX),
              "first_stage_model.quant_conv.bias": torch.zeros(8), "alphas_cumprod": torch.ones(1000)}
    write_state_dict(single, tmp_path / "sd.ckpt")
    theirs = diffusers.UNet2DConditionModel.from_single_file(tmp_path / "sd.ckpt", config=str(tmp_path / "unet"),
                                                             local_files_only=True)
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ref.state_dict().items())
    heads = CONFIGS[name]["attention_head_dim"]
    again = unet.load_unet(tmp_path / "sd.ckpt", **({"num_heads": 4} if name == "sd1_like" else
                                                     {"num_head_channels": 32 // heads[0]}))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_single_file_heads_default_to_stable_diffusions(tmp_path):
    state = unet.export_state(_ours(), "compvis")
    assert unet.infer_config(state, "compvis")["num_head_channels"] == 64  # context 24: not SD 1.x's 768
    assert unet.infer_config(state, "compvis", num_heads=4)["num_heads"] == 4
    write_state_dict(state, tmp_path / "unet.safetensors")
    with pytest.raises(ConversionError, match="num_heads=-1, num_head_channels=64.*heads leave no trace"):
        unet.load_unet(tmp_path / "unet.safetensors")


def _ours():
    return unet.build(unet.infer_config(reference("sd1_like").state_dict(), "diffusers", num_heads=4))


def test_unknown_and_missing_keys_named_at_once(tmp_path):
    state = unet.export_state(_ours(), "compvis", unet.SINGLE_FILE_PREFIX)
    state["model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.bias"] = torch.zeros(64)
    del state["model.diffusion_model.output_blocks.4.1.norm.bias"], state["model.diffusion_model.time_embed.2.weight"]
    write_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as err:
        unet.load_unet(tmp_path / "bad.safetensors", num_heads=4)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "bad.safetensors")) and "\n" not in message
    for key in ("middle_block.1.transformer_blocks.0.attn1.to_q.bias", "output_blocks.4.1.norm.bias",
                "time_embed.2.weight"):
        assert f"model.diffusion_model.{key}" in message


def test_diffusers_options_ours_does_not_compute_are_named(tmp_path):
    reference("sd1_like").save_pretrained(tmp_path / "unet")
    config = (tmp_path / "unet" / "config.json").read_text()
    (tmp_path / "unet" / "config.json").write_text(config.replace('"resnet_time_scale_shift": "default"',
                                                                  '"resnet_time_scale_shift": "scale_shift"'))
    with pytest.raises(ConversionError, match="resnet_time_scale_shift='scale_shift'"):
        unet.load_unet(tmp_path)


def test_full_size_sd15_unet_parameter_count_matches_diffusers():
    """SD 1.5's published UNet config, built on the meta device by diffusers and by ours."""
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        state = {k: torch.empty(v.shape) for k, v in theirs.state_dict().items()}
    params = unet.infer_config(state, "diffusers")
    assert params["num_heads"] == 8 and params["channel_mult"] == [1, 2, 4, 4]
    with torch.device("meta"):
        ours = unet.build(params)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == 859_520_964
