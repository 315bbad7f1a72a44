"""Autoencoder weights: diffusers' AutoencoderKL (the reference) <-> ours <-> the CompVis / SD single-file layout."""
import pickle

import pytest
import torch

from ldm.convert import vae
from ldm.convert.weights_io import ConversionError, read_state_dict, write_state_dict

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "sd_like": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=16,
                    layers_per_block=1),
    "attention_levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=3,
                             down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                             up_block_types=("AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                             norm_num_groups=8, in_channels=1, out_channels=2),
}


def reference(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
    for p in model.parameters():  # diffusers zero-inits nothing here, but make every tensor matter anyway
        p.data.add_(0.01 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_folder_to_ours_same_outputs_and_back_exact(tmp_path, name):
    ref = reference(name)
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    ours = vae.load_autoencoder(tmp_path).eval()  # the pipeline folder: its vae/ is found
    back = vae.export_state(ours, "diffusers")
    expected = ref.state_dict()
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    ref, ours = ref.double(), ours.double()  # the same float32 weights, compared in float64
    c = CONFIGS[name].get("in_channels", 3)
    x = torch.randn(2, c, 32, 32, dtype=torch.float64)
    z = torch.randn(2, CONFIGS[name]["latent_channels"], 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.quant_conv(ours.encoder(x)), ref.quant_conv(ref.encoder(x)),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean.float(), rtol=0, atol=1e-6)


def test_compvis_single_file_round_trips_through_diffusers_loader(tmp_path):
    """Our CompVis-layout export, read by diffusers' own single-file converter, gives diffusers' weights back bit for
    bit; our reader gets ours back from the same file, beside a UNet section it leaves alone."""
    ref = reference("sd_like")
    ref.save_pretrained(tmp_path / "vae")
    ours = vae.load_autoencoder(tmp_path / "vae")
    single = {**vae.export_state(ours, "compvis", "first_stage_model."),
              "model.diffusion_model.out.2.bias": torch.zeros(4)}
    write_state_dict(single, tmp_path / "sd.safetensors")
    theirs = diffusers.AutoencoderKL.from_single_file(tmp_path / "sd.safetensors", config=str(tmp_path / "vae"),
                                                      local_files_only=True)
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ref.state_dict().items())
    again = vae.load_autoencoder(tmp_path / "sd.safetensors", norm_num_groups=16)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_bare_compvis_vae_ckpt_with_training_loss_section(tmp_path):
    ours = vae.load_autoencoder(_folder(tmp_path))
    state = {**vae.export_state(ours, "compvis"), "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "vae.ckpt")
    again = vae.load_autoencoder(tmp_path / "vae.ckpt", norm_num_groups=16)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def _folder(tmp_path):
    reference("sd_like").save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_unknown_and_missing_keys_named_at_once(tmp_path):
    ours = vae.load_autoencoder(_folder(tmp_path))
    state = vae.export_state(ours, "compvis", "first_stage_model.")
    state["first_stage_model.encoder.mid.attn_1.extra.weight"] = torch.zeros(1)
    state["first_stage_model.decoder.up.0.block.9.conv1.weight"] = torch.zeros(1)
    del state["first_stage_model.decoder.norm_out.bias"], state["first_stage_model.encoder.mid.block_1.conv1.weight"]
    write_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as err:
        vae.load_autoencoder(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "bad.safetensors" in message and "\n" not in message
    for key in ("encoder.mid.attn_1.extra.weight", "decoder.up.0.block.9.conv1.weight", "decoder.norm_out.bias",
                "encoder.mid.block_1.conv1.weight"):
        assert f"first_stage_model.{key}" in message
    del state["first_stage_model.encoder.conv_out.weight"]  # needed to infer the architecture: named alone
    write_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError, match="bad.safetensors: no tensor first_stage_model.encoder.conv_out.weight"):
        vae.load_autoencoder(tmp_path / "bad.safetensors")


def test_other_architecture_and_bad_files(tmp_path):
    write_state_dict({"model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "unet.safetensors")
    with pytest.raises(ConversionError, match="unet.safetensors: no autoencoder"):
        vae.load_autoencoder(tmp_path / "unet.safetensors")
    blob = (tmp_path / "unet.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConversionError, match="cut.safetensors cannot be read as safetensors"):
        read_state_dict(tmp_path / "cut.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": {"w": Payload()}}, handle)
    with pytest.raises(ConversionError, match="evil.ckpt.*refused"):
        read_state_dict(tmp_path / "evil.ckpt")
    with pytest.raises(ConversionError, match="missing.ckpt does not exist"):
        read_state_dict(tmp_path / "missing.ckpt")


def test_symmetric_padding_autoencoder_is_not_exported(tmp_path):
    params = vae.infer_config(vae.export_state(vae.load_autoencoder(_folder(tmp_path)), "compvis"), "compvis")
    params["ddconfig"]["downsample_pad_end"] = False
    with pytest.raises(ConversionError, match="pad both sides"):
        vae.export_state(vae.build(params), "diffusers")


def test_full_size_sd_autoencoder_parameter_count_matches_diffusers():
    """SD's published autoencoder config (kl-f8), built on the meta device by diffusers and by ours."""
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4)
        state = {k: torch.empty(v.shape) for k, v in theirs.state_dict().items()}
        ours = vae.build(vae.infer_config(state, "diffusers"))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 83_653_863
