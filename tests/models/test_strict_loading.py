"""`ckpt_path` loading of the real models is strict: a checkpoint whose keys or shapes do not fit raises one
CheckpointError naming the file and the model and listing what differs; `ignore_keys` (skipped on both sides) and
`strict: false` are the only ways to load part of a checkpoint, and even they refuse shape mismatches and a
checkpoint of which nothing matches.

(tests/reliability/test_safe_loading.py: the same through the command line, `error: ...` and exit code 2.)
"""
import re

import pytest
import torch
from omegaconf import OmegaConf

from ldm.engine.checkpoint import CheckpointError, atomic_torch_save
from ldm.models.autoencoder import load_weights
from ldm.util import ConfigError, instantiate_from_config

pytestmark = pytest.mark.usefixtures("single_thread")

DDCONFIG = {"dims": 2, "double_z": True, "z_channels": 2, "resolution": 8, "in_channels": 1, "out_ch": 1, "ch": 4,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "norm_num_groups": 2}
GAN_LOSS = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": {"dims": 2, "disc_start": 1, "perceptual_weight": 0, "disc_in_channels": 1,
                       "disc_num_layers": 1, "disc_ndf": 4}}
IDENTITY = {"target": "torch.nn.Identity"}


def autoencoder_config(lossconfig=IDENTITY, ch: int = 4, **params) -> dict:
    """A 2D AutoencoderKL: (B, 1, 8, 8) <-> (B, 2, 4, 4)."""
    return {"target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 2, "ddconfig": DDCONFIG | {"ch": ch}, "lossconfig": lossconfig, **params}}


def build(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return instantiate_from_config(OmegaConf.create(config))


def save_state(model: torch.nn.Module, path) -> str:
    atomic_torch_save({"state_dict": model.state_dict(), "global_step": 3}, path)
    return str(path)


def same_weights(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> bool:
    mine, theirs = a.state_dict(), b.state_dict()
    return all(torch.equal(mine[key], theirs[key]) for key in mine if key.startswith(prefix))


@pytest.fixture
def stage_one_checkpoint(tmp_path):
    """A stage-1 training checkpoint: autoencoder + loss (discriminator, logvar), as train_ae.py writes it."""
    trained = build(autoencoder_config(GAN_LOSS), seed=1)
    return trained, save_state(trained, tmp_path / "ae.ckpt")


def test_a_stage_one_checkpoint_needs_ignore_keys_for_its_loss(stage_one_checkpoint, capsys):
    trained, path = stage_one_checkpoint
    loss_keys = sorted(k for k in trained.state_dict() if k.startswith("loss."))
    with pytest.raises(CheckpointError) as caught:
        build(autoencoder_config(ckpt_path=path))
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} does not fit AutoencoderKL (a different architecture or config?): "
                              f"{len(loss_keys)} unexpected keys (loss.* {len(loss_keys)}): "
                              f"{', '.join(loss_keys[:5])} ... ({len(loss_keys) - 5} more). To load only what "
                              f"matches, skip these keys with ignore_keys (here: [loss.]) or set strict: false next "
                              f"to ckpt_path"), message
    assert "missing" not in message

    restored = build(autoencoder_config(ckpt_path=path, ignore_keys=["loss"]), seed=2)  # as configs/demo/ldm_3d.yaml
    assert same_weights(restored, trained)
    out = capsys.readouterr().out
    assert f"AutoencoderKL: restored {len(restored.state_dict())} tensors from {path}; ignore_keys [loss]: " \
           f"{len(loss_keys)} checkpoint entries skipped, 0 model entries left as initialised" in out
    assert "strict: false" not in out

    lenient = build(autoencoder_config(ckpt_path=path, strict=False), seed=2)
    assert same_weights(lenient, trained)
    assert f"strict: false: {len(loss_keys)} unexpected keys, not loaded (loss.* {len(loss_keys)}): " \
           f"{loss_keys[0]}" in capsys.readouterr().out


def test_ignore_keys_also_excuses_the_models_own_keys(stage_one_checkpoint, tmp_path):
    """An autoencoder checkpoint without its loss into one with a discriminator: `loss` leaves it initialised."""
    trained, _ = stage_one_checkpoint
    bare = build(autoencoder_config(), seed=1)
    path = save_state(bare, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match=r"(\d+) missing keys \(loss\.\* \1\): loss\.discriminator\."):
        build(autoencoder_config(GAN_LOSS, ckpt_path=path))
    restored = build(autoencoder_config(GAN_LOSS, ckpt_path=path, ignore_keys=["loss."]), seed=2)
    assert same_weights(restored, bare, "encoder.") and same_weights(restored, bare, "decoder.")
    assert not same_weights(restored, trained, "loss.")  # seed 2's discriminator, not seed 1's


def test_shape_mismatches_are_refused_even_with_strict_false(stage_one_checkpoint):
    _, path = stage_one_checkpoint
    wider = build(autoencoder_config(ch=8))
    before = {key: value.clone() for key, value in wider.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(CheckpointError) as caught:
            load_weights(wider, path, ignore_keys=["loss"], strict=strict)
        assert re.fullmatch(
            rf"checkpoint {re.escape(path)} does not fit AutoencoderKL: \d+ shape mismatches: decoder\.conv_in\.bias "
            r"\(8,\) \(model: \(16,\)\), .* \(\d+ more\) \(a different architecture or config\? ignore_keys can "
            r"leave them out\)", str(caught.value)), str(caught.value)
        # refused before anything is copied: not even the tensors whose shapes fit (quant_conv.*) were loaded
        assert all(torch.equal(value, before[key]) for key, value in wider.state_dict().items())


def test_a_checkpoint_of_another_model_is_refused_even_with_strict_false(tmp_path):
    """Nothing in common: strict: false would "load" zero tensors, which is never what was meant."""
    path = save_state(torch.nn.Linear(3, 2), tmp_path / "linear.ckpt")
    for strict in (True, False):
        with pytest.raises(CheckpointError) as caught:
            build(autoencoder_config(ckpt_path=path, strict=strict))
        assert re.fullmatch(rf"checkpoint {re.escape(path)} does not fit AutoencoderKL: none of its 2 tensors "
                            r"\(bias 1, weight 1\) is a key of the model \(decoder\.\* \d+, encoder\.\* \d+, "
                            r"post_quant_conv\.\* 2, quant_conv\.\* 2\); not even strict: false would load anything "
                            r"from it", str(caught.value)), str(caught.value)


def test_the_error_lists_both_sides_and_the_ignore_keys_that_would_cover_them(stage_one_checkpoint, tmp_path):
    """A checkpoint that shares the encoder only (a VQ autoencoder's, say): missing and unexpected keys per prefix."""
    _, path = stage_one_checkpoint
    state = {k: v for k, v in torch.load(path, weights_only=True)["state_dict"].items() if k.startswith("encoder.")}
    state |= {"quantize.embedding.weight": torch.zeros(16, 2)}
    atomic_torch_save({"state_dict": state}, tmp_path / "encoder.ckpt")
    with pytest.raises(CheckpointError) as caught:
        build(autoencoder_config(GAN_LOSS, ckpt_path=str(tmp_path / "encoder.ckpt")))
    message = str(caught.value)
    assert re.search(r"does not fit AutoencoderKL \(a different architecture or config\?\): \d+ missing keys "
                     r"\(decoder\.\* \d+, loss\.\* 11, post_quant_conv\.\* 2, quant_conv\.\* 2\): "
                     r"decoder\.conv_in\.bias, .* \(\d+ more\); 1 unexpected keys \(quantize\.\* 1\): "
                     r"quantize\.embedding\.weight\. To load only what matches, skip these keys with ignore_keys "
                     r"\(here: \[decoder\., loss\., post_quant_conv\., quant_conv\., quantize\.\]\) or set strict: false "
                     r"next to ckpt_path$", message), message
    model = build(autoencoder_config(GAN_LOSS, ckpt_path=str(tmp_path / "encoder.ckpt"), strict=False))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items() if key in model.state_dict())


UNET = {"target": "tests.models.diffusion.standins.RecordingUNet", "params": {"in_channels": 2, "out_channels": 2,
                                                                               "dims": 2}}


def latent_diffusion_config(first_stage: dict, **params) -> dict:
    """LatentDiffusion on the 2D autoencoder's (2, 4, 4) latents."""
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {"first_stage_config": first_stage, "cond_stage_config": "__is_unconditional__",
                       "unet_config": UNET, "image_size": 4, "channels": 2, "timesteps": 10, "sampler_steps": 2,
                       "log_sampler_steps": 2, "log_every_t": 5, "use_ema": False,
                       **params}}


def test_latent_diffusion_checks_its_first_stage_checkpoint(stage_one_checkpoint):
    trained, path = stage_one_checkpoint
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(path)} does not fit AutoencoderKL .* "
                                              r"unexpected keys \(loss\.\* \d+\)"):
        build(latent_diffusion_config(autoencoder_config(ckpt_path=path)))  # not a ConfigError: the CLI says error:
    model = build(latent_diffusion_config(autoencoder_config(ckpt_path=path, ignore_keys=["loss"])), seed=2)
    assert all(torch.equal(value, trained.state_dict()[key])
               for key, value in model.first_stage_model.state_dict().items())


def test_diffusion_ckpt_path_is_strict_about_ema(tmp_path):
    """A checkpoint trained with use_ema into a model without: its model_ema.* entries are unexpected."""
    with_ema = build(latent_diffusion_config(autoencoder_config(), use_ema=True), seed=1)
    path = save_state(with_ema, tmp_path / "ldm.ckpt")
    ema_keys = [k for k in with_ema.state_dict() if k.startswith("model_ema.")]
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(path)} does not fit LatentDiffusion .*: "
                                              rf"{len(ema_keys)} unexpected keys \(model_ema\.\* {len(ema_keys)}\)"):
        build(latent_diffusion_config(autoencoder_config(), ckpt_path=path))
    for escape in ({"ignore_keys": ["model_ema."]}, {"strict": False}):
        restored = build(latent_diffusion_config(autoencoder_config(), ckpt_path=path, **escape), seed=2)
        assert same_weights(restored, with_ema)


def test_ignore_keys_as_a_single_string_is_a_config_error(stage_one_checkpoint):
    """`ignore_keys: loss` would otherwise skip every key starting with "l", "o" or "s"."""
    _, path = stage_one_checkpoint
    with pytest.raises(ConfigError, match=r"^params: AutoencoderKL: ignore_keys: expected a list of key prefixes, "
                                          r"e\.g\. \[loss\], got the string 'loss'$"):
        build(autoencoder_config(ckpt_path=path, ignore_keys="loss"))
