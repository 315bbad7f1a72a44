"""`ckpt_path` naming a Stable Diffusion single file or a diffusers folder: converted into the configured model."""
import pytest
import torch

from ldm.convert import unet, vae
from ldm.convert.weights_io import write_state_dict
from ldm.util import instantiate_from_config
from tests.convert.test_unet import reference as reference_unet
from tests.convert.test_vae import reference as reference_vae

diffusers = pytest.importorskip("diffusers")

FIRST_STAGE = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
    "embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "norm_num_groups": 16,
                 "downsample_pad_end": True}}}
UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
    "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
    "num_res_blocks": 2, "channel_mult": [1, 2], "num_heads": 4, "use_spatial_transformer": True,
    "context_dim": 24, "legacy": False}}


def ldm_config(ckpt_path, **overrides):
    params = {"first_stage_config": FIRST_STAGE, "unet_config": UNET, "image_size": 16, "channels": 4,
              "cond_stage_config": {"target": "ldm.modules.encoders.ClassEmbedder",
                                    "params": {"embed_dim": 24, "n_classes": 3}},
              "cond_stage_key": "class_label", "conditioning_key": "crossattn", "scale_factor": 0.5,
              "ckpt_path": str(ckpt_path), "ignore_keys": ["cond_stage_model"], **overrides}
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


@pytest.fixture
def pipeline(tmp_path):
    """A diffusers pipeline folder (unet/, vae/) and the same weights as a CompVis single file."""
    ref_unet, ref_vae = reference_unet("sd1_like"), reference_vae("sd_like")
    ref_unet.save_pretrained(tmp_path / "pipe" / "unet")
    ref_vae.save_pretrained(tmp_path / "pipe" / "vae")
    single = {**unet.export_state(unet.load_unet(tmp_path / "pipe"), "compvis", unet.SINGLE_FILE_PREFIX),
              **vae.export_state(vae.load_autoencoder(tmp_path / "pipe"), "compvis", "first_stage_model.")}
    write_state_dict(single, tmp_path / "sd.safetensors")
    return tmp_path, ref_unet, ref_vae


@pytest.mark.parametrize("source", ["pipe", "sd.safetensors"])
def test_latent_diffusion_ckpt_path_takes_pretrained_files(pipeline, source):
    tmp_path, ref_unet, ref_vae = pipeline
    model = instantiate_from_config(ldm_config(tmp_path / source)).eval()
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([400])
    context = torch.randn(1, 5, 24)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.model(x, t, context), ref_unet(x, t, context).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.first_stage_model.decode(z), ref_vae.decode(z).sample, rtol=0, atol=1e-5)
    ema = model.model_ema
    assert all(torch.equal(getattr(ema, ema.shadow_names[name]), p) for name, p in model.model.named_parameters())
    # the folder's vae config states diffusers' scaling_factor; the single file none: the config's stays
    assert float(model.scale_factor) == pytest.approx(0.18215 if source == "pipe" else 0.5)


def test_autoencoder_ckpt_path_takes_the_first_stage_of_a_single_file(pipeline):
    tmp_path, _, ref_vae = pipeline
    model = instantiate_from_config({**FIRST_STAGE, "params": {**FIRST_STAGE["params"],
                                                                "ckpt_path": str(tmp_path / "sd.safetensors")}})
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), ref_vae.decode(z).sample, rtol=0, atol=1e-5)


def test_config_of_another_architecture_names_the_keys(pipeline):
    tmp_path, _, _ = pipeline
    wrong = {**UNET, "params": {**UNET["params"], "num_res_blocks": 1}}
    with pytest.raises(Exception, match=r"sd\.safetensors: does not fit UNetModel \(.*unknown keys?: .*"
                                        r"model\.diffusion_model\.input_blocks\.2\.0"):
        instantiate_from_config(ldm_config(tmp_path / "sd.safetensors", unet_config=wrong))
    without_pad = {**FIRST_STAGE, "params": {**FIRST_STAGE["params"], "ddconfig": {
        **FIRST_STAGE["params"]["ddconfig"], "downsample_pad_end": False}}}
    with pytest.raises(Exception, match="downsample_pad_end: true"):
        instantiate_from_config(ldm_config(tmp_path / "sd.safetensors", first_stage_config=without_pad))


def test_missing_cond_stage_is_named_without_ignore_keys(pipeline):
    tmp_path, _, _ = pipeline
    with pytest.raises(Exception, match=r"missing keys \(cond_stage_model\.\* 1\)"):
        instantiate_from_config(ldm_config(tmp_path / "sd.safetensors", ignore_keys=[]))
