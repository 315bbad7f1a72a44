"""`python -m ldm.convert`: CompVis single file <-> diffusers folder, the implied config, one-line errors."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.convert.__main__ import main
from ldm.convert.weights_io import read_state_dict
from ldm.util import instantiate_from_config
from tests.convert.test_pretrained import pipeline  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")


def test_single_file_to_folder_and_back(pipeline, capsys):  # noqa: F811
    tmp_path, ref_unet, ref_vae = pipeline
    single = tmp_path / "sd.safetensors"
    assert main([str(single), str(tmp_path / "out"), "--num_heads", "4", "--norm_num_groups", "16"]) == 0
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    autoencoder = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")
    for ours, ref in ((unet, ref_unet), (autoencoder, ref_vae)):
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert main([str(tmp_path / "out"), str(tmp_path / "again.safetensors")]) == 0
    first, again = read_state_dict(single), read_state_dict(tmp_path / "again.safetensors")
    assert sorted(first) == sorted(again) and all(torch.equal(first[k], again[k]) for k in first)


def test_printed_config_builds_the_model_that_loads_the_file(pipeline, capsys):  # noqa: F811
    tmp_path, ref_unet, _ = pipeline
    assert main([str(tmp_path / "pipe"), "--config"]) == 0
    config = OmegaConf.create(capsys.readouterr().out)
    assert config.unet_config.params.num_heads == 4 and config.first_stage_config.params.ddconfig.norm_num_groups == 16
    first_stage = OmegaConf.to_container(config.first_stage_config)
    first_stage["params"]["ckpt_path"] = str(tmp_path / "sd.safetensors")
    instantiate_from_config(first_stage)  # the file fits the config printed for the folder
    unet = instantiate_from_config(OmegaConf.to_container(config.unet_config))
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in ref_unet.parameters())


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "nothing.safetensors"), "--config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing.safetensors does not exist" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--config"]) == 2
    assert "neither a UNet nor an autoencoder" in capsys.readouterr().err


def test_run_checkpoint_of_ours_to_single_file(pipeline):  # noqa: F811
    from tests.convert.test_pretrained import ldm_config

    tmp_path, _, _ = pipeline
    config = ldm_config(tmp_path / "sd.safetensors")
    model = instantiate_from_config(config)
    with torch.no_grad():
        for p in model.model_ema.buffers():
            if p.is_floating_point() and p.ndim:
                p.add_(1.0)  # EMA weights that differ from the network's
    torch.save({"state_dict": model.state_dict(), "config": {"model": config}, "global_step": 7},
               tmp_path / "last.ckpt")
    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "raw.safetensors")]) == 0
    assert main([str(tmp_path / "last.ckpt"), str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    source, raw, ema = (read_state_dict(tmp_path / name) for name in ("sd.safetensors", "raw.safetensors",
                                                                      "ema.safetensors"))
    assert sorted(raw) == sorted(source) and all(torch.equal(raw[k], source[k]) for k in source)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(ema[key], source[key] + 1)
    vae_key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(ema[vae_key], source[vae_key])
