"""LatentDiffusion wired to the real AutoencoderKL and UNetModel."""
import time

import pytest
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from ldm.util import instantiate_from_config

UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
AUTOENCODER_3D = """
target: ldm.models.autoencoder.AutoencoderKL
params:
  embed_dim: 3
  lossconfig: {target: torch.nn.Identity}
  ddconfig: {dims: 3, double_z: true, z_channels: 4, resolution: 16, in_channels: 1, out_ch: 1, ch: 8, ch_mult: [1, 2],
             num_res_blocks: 1, attn_resolutions: [], dropout: 0.0, norm_num_groups: 4}
"""

MASK_LDM_3D = f"""
target: ldm.models.diffusion.ddpm.LatentDiffusion
params:
  first_stage_key: image
  cond_stage_key: mask
  conditioning_key: concat
  cond_stage_config: {{target: torch.nn.Identity}}
  mask_to_latent: area
  image_size: 8
  channels: 3
  timesteps: 1000
  linear_start: 0.0015
  linear_end: 0.0195
  scale_by_std: true
  use_ema: true
  sampler_steps: 4
  monitor: val/loss
  first_stage_config: {OmegaConf.to_container(OmegaConf.create(AUTOENCODER_3D))}
  unet_config:
    target: ldm.modules.diffusionmodules.openaimodel.UNetModel
    params: {{image_size: 8, dims: 3, in_channels: 6, out_channels: 3, model_channels: 32, attention_resolutions: [2],
             num_res_blocks: 1, channel_mult: [1, 2], num_head_channels: 16}}
"""


def phantoms(n: int = 8, size: int = 16, seed: int = 0) -> dict:
    """Volumes whose intensity is set by a 3-class tissue layout (a thresholded smooth random field), plus texture."""
    generator = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.randn(n, 1, 4, 4, 4, generator=generator), size=(size,) * 3, mode="trilinear")
    labels = (field > -0.3).long() + (field > 0.3).long()
    texture = 0.1 * F.interpolate(torch.randn(n, 1, 8, 8, 8, generator=generator), size=(size,) * 3, mode="trilinear")
    image = torch.tensor([-0.8, 0.0, 0.8])[labels] + texture
    return {"image": image.clamp(-1, 1), "mask": F.one_hot(labels[:, 0], 3).movedim(-1, 1).float()}


def mean_validation_loss(model, data) -> float:
    model.eval()
    losses = [model.validation_step({k: v[i:i + 4] for k, v in data.items()}, seed)["val/loss"]
              for seed in range(4) for i in (0, 4)]
    model.train()
    return float(torch.stack(losses).mean())


def test_tiny_3d_mask_conditioned_ldm_learns():
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.create(MASK_LDM_3D))
    model.learning_rate = 2e-3
    (optimizer,) = model.configure_optimizers()
    data = phantoms()
    model.train()
    model.training_step({k: v[:4] for k, v in data.items()}, 0, 0)  # scale_by_std on the first batch
    start = mean_validation_loss(model, data)
    started = time.perf_counter()
    for step in range(100):
        batch = {k: v[(step % 2) * 4:(step % 2) * 4 + 4] for k, v in data.items()}
        model.global_step = step
        loss, _ = model.training_step(batch, step, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.on_train_batch_end(batch, step)
    elapsed = time.perf_counter() - started
    end = mean_validation_loss(model, data)
    print(f"validation loss {start:.3f} -> {end:.3f} in {elapsed:.1f} s")
    assert end < 0.5 * start
    assert not any(p.grad is not None for p in model.first_stage_model.parameters())
    model.eval()
    out = model.test_step({k: v[:2] for k, v in data.items()}, 0)
    assert out["samples"].shape == (2, 1, 16, 16, 16) and torch.isfinite(out["samples"]).all()
    assert torch.equal(out["conditioning"], data["mask"][:2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_training_step_and_its_ema_update_do_not_wait_for_the_gpu():
    """After the first step (which estimates scale_by_std's factor), the encoder, the mask conditioning, the UNet's
    forward and backward, a fused AdamW step and the EMA update only queue GPU work: the host can run ahead."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.create(MASK_LDM_3D)).cuda()
    model.learning_rate = 1e-3
    (optimizer,) = model.configure_optimizers()
    batch = {k: v[:4].cuda() for k, v in phantoms().items()}
    model.train()

    def step(index: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.training_step(batch, index, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_train_batch_end(batch, index)

    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(model.model_ema.num_updates) == 2


@pytest.mark.parametrize("conditioning_key", ["crossattn", "adm"])
def test_class_conditional_2d_with_the_real_unet(conditioning_key):
    unet = {"image_size": 8, "dims": 2, "in_channels": 2, "out_channels": 2, "model_channels": 32,
            "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2}
    if conditioning_key == "crossattn":
        unet.update(use_spatial_transformer=True, context_dim=16)
        cond_stage = {"target": "ldm.modules.encoders.ClassEmbedder", "params": {"embed_dim": 16, "n_classes": 10}}
    else:
        unet.update(num_classes=10)
        cond_stage = {"target": "torch.nn.Identity"}
    autoencoder = OmegaConf.create(AUTOENCODER_3D)
    autoencoder.params.embed_dim = 2
    autoencoder.params.ddconfig.dims = 2
    config = {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
              "params": {"first_stage_config": autoencoder, "cond_stage_config": cond_stage,
                         "unet_config": {"target": UNET, "params": unet},
                         "conditioning_key": conditioning_key, "cond_stage_key": "class_label", "image_size": 8,
                         "channels": 2, "parameterization": "v", "sampler_steps": 2, "log_sampler_steps": 2,
                         "cond_stage_trainable": conditioning_key == "crossattn",
                         "ucg_rate": 0.2 if conditioning_key == "crossattn" else 0.0}}
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.create(config))
    model.learning_rate = 1e-3
    batch = {"image": torch.rand(3, 1, 16, 16) * 2 - 1, "class_label": torch.tensor([1, 5, 9])}
    model.train()
    loss, _ = model.training_step(batch, 0, 0)
    loss.backward()
    assert model.model.input_blocks[0][0].weight.grad is not None
    model.eval()
    images = model.log_images(batch, "train", 2)
    assert images["samples"].shape == (2, 1, 16, 16) and "conditioning" not in images


def test_vq_first_stage_encodes_continuous_latents_and_decodes_through_the_codebook():
    """A VQModelInterface first stage (CompVis' VQ LDMs): its encoder output (no posterior) is the latent, and
    decoding quantises to the codebook first."""
    config = OmegaConf.create(MASK_LDM_3D)
    config.params.first_stage_config = OmegaConf.create({
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {"n_embed": 16, "embed_dim": 3, "lossconfig": {"target": "torch.nn.Identity"},
                   "ddconfig": {**config.params.first_stage_config.params.ddconfig, "double_z": False}}})
    torch.manual_seed(0)
    model = instantiate_from_config(config)
    data = phantoms(n=2)
    x = data["image"]
    expected = model.first_stage_model.quant_conv(model.first_stage_model.encoder(x))
    for sample_posterior in (True, False):  # deterministic either way
        torch.testing.assert_close(model.encode_first_stage(x, sample_posterior), expected)
    loss, _ = model.training_step(data, 0, 0)  # scale_by_std estimated from these latents
    assert torch.isfinite(loss) and torch.isfinite(model.scale_factor)
    z = model.encode_first_stage(x, False) * model.scale_factor
    codes = model.first_stage_model.quantize(expected)[0]
    torch.testing.assert_close(model.decode(z), model.first_stage_model.decoder(
        model.first_stage_model.post_quant_conv(codes)), atol=1e-5, rtol=1e-4)
