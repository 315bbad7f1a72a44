import copy

import pytest
import torch
from omegaconf import OmegaConf

from ldm.engine.checkpoint import atomic_torch_save
from ldm.engine.interface import TrainableModel
from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.util import ConfigError, instantiate_from_config

STANDINS = "tests.models.diffusion.standins"
B = 3


def ldm_config(dims: int = 3, extra_in: int = 0, context_dim: int | None = None, num_classes: int | None = None,
               **params) -> dict:
    """A LatentDiffusion over PoolFirstStage latents (2 channels, 8^dims images -> 4^dims latents) and RecordingUNet."""
    unet = {"in_channels": 2 + extra_in, "out_channels": 2, "dims": dims, "context_dim": context_dim,
            "num_classes": num_classes}
    config = {
        "first_stage_config": {"target": f"{STANDINS}.PoolFirstStage", "params": {"embed_dim": 2, "dims": dims}},
        "cond_stage_config": "__is_unconditional__",
        "unet_config": {"target": f"{STANDINS}.RecordingUNet", "params": unet},
        "image_size": 4, "channels": 2, "timesteps": 100, "use_ema": False, "sampler_steps": 3,
        "log_sampler_steps": 2, "log_every_t": 40,
    }
    config.update(params)
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": config}


def build(config: dict, seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(config))
    model.learning_rate = 1e-3
    return model


def batch(dims: int = 3, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    spatial = (8,) * dims
    labels = torch.randint(0, 3, (B, *spatial), generator=generator)
    return {"image": torch.rand(B, 1, *spatial, generator=generator) * 2 - 1,
            "mask": torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float(),
            "class_label": torch.tensor([0, 2, 4]),
            "path": ["a", "b", "c"]}


MASK_ENCODER = {"target": "ldm.modules.encoders.MaskEncoder",
                "params": {"in_channels": 3, "out_channels": 4, "n_stages": 1, "hidden_channels": 8}}
CLASS_EMBEDDER = {"target": "ldm.modules.encoders.ClassEmbedder", "params": {"embed_dim": 8, "n_classes": 5}}
IDENTITY = {"target": "torch.nn.Identity"}
CASES = {  # name: (config overrides, expected UNet inputs given latents (B, 2, *4^dims): x channels, context, y)
    "unconditional": ({}, 2, None, None),
    "concat_mask": ({"conditioning_key": "concat", "cond_stage_key": "mask", "cond_stage_config": IDENTITY,
                     "extra_in": 3}, 5, None, None),
    "concat_first_stage": ({"conditioning_key": "concat", "cond_stage_key": "image",
                            "cond_stage_config": "__is_first_stage__", "extra_in": 2}, 4, None, None),
    "concat_encoder": ({"conditioning_key": "concat", "cond_stage_key": "mask", "cond_stage_config": MASK_ENCODER,
                        "mask_to_latent": "encoder", "cond_stage_trainable": True, "extra_in": 4}, 6, None, None),
    "crossattn_class": ({"conditioning_key": "crossattn", "cond_stage_key": "class_label",
                         "cond_stage_config": CLASS_EMBEDDER, "context_dim": 8}, 2, (1, 8), None),
    "hybrid_mask": ({"conditioning_key": "hybrid", "cond_stage_key": "mask", "cond_stage_config": IDENTITY,
                     "mask_to_latent": "area", "extra_in": 3, "context_dim": 3}, 5, ("grid", 3), None),
    "adm_class": ({"conditioning_key": "adm", "cond_stage_key": "class_label", "cond_stage_config": IDENTITY,
                   "num_classes": 5}, 2, None, ((B,), torch.int64)),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_every_conditioning_key_gives_the_unet_inputs(case, dims):
    overrides, x_channels, context, y = copy.deepcopy(CASES[case])
    if overrides.get("cond_stage_config") == MASK_ENCODER:
        overrides["cond_stage_config"]["params"]["dims"] = dims
    model = build(ldm_config(dims, **overrides))
    data = batch(dims)
    model.train()
    loss, scalars = model.training_step(data, 0, 0)
    loss.backward()
    latent = (4,) * dims
    expected_context = None if context is None else (B, 4 ** dims if context[0] == "grid" else context[0], context[1])
    assert model.model.calls[-1] == {"x": (B, x_channels, *latent), "t": (B,), "context": expected_context, "y": y}
    assert scalars["train/loss"].ndim == 0 and torch.isfinite(loss)
    model.model.calls.clear()
    model.eval()
    out = model.test_step(data, 0)
    assert len(model.model.calls) == 3  # sampler_steps, one batched call each
    assert model.model.calls[-1]["x"] == (B, x_channels, *latent)
    assert out["samples"].shape == (B, 1, *(8,) * dims) and out["samples"].abs().max() <= 1
    spatial_condition = case in ("concat_mask", "concat_first_stage", "concat_encoder", "hybrid_mask")
    assert ("conditioning" in out) == spatial_condition
    if spatial_condition:
        assert torch.equal(out["conditioning"], data[model.cond_stage_key])


def test_first_stage_gets_no_gradient_and_stays_in_eval_mode():
    model = build(ldm_config(**CASES["concat_encoder"][0]))
    first_stage_before = copy.deepcopy(model.first_stage_model.state_dict())
    (optimizer,) = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in [*model.model.parameters(), *model.cond_stage_model.parameters()]}
    model.train()
    assert not model.first_stage_model.training and model.cond_stage_model.training
    for step in range(3):
        loss, _ = model.training_step(batch(seed=step), step, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.first_stage_model.parameters())
    assert all(p.grad is not None for p in model.cond_stage_model.parameters())
    for key, value in model.first_stage_model.state_dict().items():
        assert torch.equal(value, first_stage_before[key]), key


def test_the_fused_adamw_steps_as_the_per_parameter_reference():
    model = build(ldm_config(**CASES["concat_encoder"][0]))
    (optimizer,) = model.configure_optimizers()
    assert optimizer.defaults["fused"]
    reference_model = copy.deepcopy(model)
    (reference,) = reference_model.configure_optimizers()
    reference = torch.optim.AdamW(reference.param_groups[0]["params"], lr=reference.defaults["lr"], foreach=False)
    model.train(), reference_model.train()
    for step in range(3):
        for net, opt in ((model, optimizer), (reference_model, reference)):
            torch.manual_seed(step)  # the same t and noise on both sides
            loss, _ = net.training_step(batch(seed=step), step, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_frozen_conditioning_stage_is_not_trained():
    model = build(ldm_config(**{**CASES["concat_encoder"][0], "cond_stage_trainable": False}))
    (optimizer,) = model.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.model.parameters()}
    model.train()
    assert not model.cond_stage_model.training
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())


def test_scale_by_std_gives_unit_variance_latents_and_is_saved():
    model = build(ldm_config(scale_by_std=True, scale_factor=0.18215))
    first = batch(seed=0)
    model.eval()
    with pytest.raises(RuntimeError, match="scale_factor has not been estimated yet"):
        model.get_input(first)
    model.train()
    model.training_step(first, 0, 0)
    assert model.scale_factor.item() != pytest.approx(0.18215)
    assert model.get_input(first).std().item() == pytest.approx(1.0, abs=0.01)
    estimate = model.scale_factor.clone()
    model.training_step(batch(seed=1), 1, 0)  # later batches leave it alone
    assert torch.equal(model.scale_factor, estimate)
    state = model.state_dict()
    assert torch.equal(state["scale_factor"], estimate)
    restored = build(ldm_config(scale_by_std=True), seed=1)
    restored.load_state_dict(state)
    restored.eval()
    torch.testing.assert_close(restored.get_input(first, False), model.get_input(first, False))


def test_the_scale_factor_check_is_kept_on_the_host_until_a_load(monkeypatch):
    """Once scale_factor is known to be set, a step does not read it again (on a GPU that read waits for the
    encoder); loading a state whose factor was never estimated brings the check and its error back."""
    model = build(ldm_config(scale_by_std=True))
    unestimated = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.training_step(batch(seed=0), 0, 0)
    reads = []
    real_isnan = torch.isnan
    monkeypatch.setattr(torch, "isnan", lambda x: reads.append(x) or real_isnan(x))
    model.training_step(batch(seed=1), 1, 0)
    model.decode(model.get_input(batch(seed=1)))
    assert reads == []
    model.load_state_dict(unestimated)
    model.eval()
    with pytest.raises(RuntimeError, match="scale_factor has not been estimated yet"):
        model.get_input(batch(seed=0))
    assert len(reads) == 1


def test_fixed_scale_factor_scales_the_latents():
    model = build(ldm_config(scale_factor=0.5))
    z = model.encode_first_stage(batch()["image"], sample_posterior=False)
    torch.testing.assert_close(model.get_input(batch(), sample_posterior=False), 0.5 * z)
    torch.testing.assert_close(model.decode(0.5 * z), model.first_stage_model.decode(z))


def test_ema_is_updated_and_used_for_validation():
    model = build(ldm_config(use_ema=True))
    (optimizer,) = model.configure_optimizers()
    model.train()
    for step in range(3):
        loss, _ = model.training_step(batch(seed=step), step, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.on_train_batch_end(batch(seed=step), step)
    assert int(model.model_ema.num_updates) == 3
    with torch.no_grad():  # averages of zero: the network outputs 0, so the eps loss is E[noise^2] = 1
        for name in model.model_ema.shadow_names.values():
            model.model_ema.get_buffer(name).zero_()
        model.model.conv.weight.mul_(100.0)
    weights = copy.deepcopy(model.model.state_dict())
    model.eval()
    val = model.validation_step(batch(), 0)["val/loss"]
    assert val.item() == pytest.approx(1.0, abs=0.1)
    assert model.validation_step(batch(), 0)["val/loss"] == val  # seeded by batch_idx
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, weights[key])
    model.use_ema = False
    assert model.validation_step(batch(), 0)["val/loss"].item() > 10


def test_classifier_free_guidance_training_and_sampling():
    config = ldm_config(**CASES["crossattn_class"][0], ucg_rate=0.5, guidance_scale=3.0)
    model = build(config)
    null = model.cond_stage_model.embedding.weight[5]
    model.train()
    contexts = []
    model.model.register_forward_hook(lambda module, args, kwargs, out: contexts.append(kwargs["context"]),
                                      with_kwargs=True)
    for step in range(40):
        model.training_step(batch(seed=step), step, 0)
    dropped = torch.cat([torch.all(c[:, 0] == null, dim=1) for c in contexts]).float().mean()
    assert dropped.item() == pytest.approx(0.5, abs=0.15)
    contexts.clear()
    model.eval()
    model.test_step(batch(), 0)
    assert contexts[0].shape == (2 * B, 1, 8)
    assert torch.all(contexts[0][B:, 0] == null) and not torch.all(contexts[0][:B, 0] == null, dim=1).any()


CONFIG_ERRORS = [
    ({"conditioning_keys": "concat"}, ConfigError, "unknown argument 'conditioning_keys'"),
    ({"conditioning_key": "concat"}, ValueError, "'__is_unconditional__' does not fit conditioning_key='concat'"),
    ({"cond_stage_config": IDENTITY}, ValueError, r"\(a module config\) does not fit conditioning_key=None"),
    ({"conditioning_key": "concat", "cond_stage_config": "__is_first_stage__", "mask_to_latent": "encoder"},
     ValueError, "mask_to_latent='encoder' needs"),
    ({"conditioning_key": "concat", "cond_stage_config": IDENTITY, "mask_to_latent": "linear"}, ValueError,
     "mask_to_latent: 'linear'"),
    ({"conditioning_key": "adm", "cond_stage_config": IDENTITY, "ucg_rate": 0.1}, ValueError, "needs a null condition"),
    ({"guidance_scale": 2.0}, ValueError, "needs a null condition"),
    ({"conditioning_key": "concat", "cond_stage_config": "__is_first_stage__", "cond_stage_trainable": True},
     ValueError, "has nothing to train"),
    ({"num_timesteps_cond": 2}, ValueError, "num_timesteps_cond"),
    ({"sampler": "euler"}, ValueError, "unknown sampler 'euler'"),
    ({"sampler": "ddpm", "sampler_eta": 1.0}, ValueError, "only the ddim sampler has an eta"),
    ({"rescale_betas_zero_snr": True}, ValueError, "'eps' cannot be used with a zero terminal SNR"),
    ({"image_size": [4, 4]}, ValueError, "image_size: \\[4, 4\\] does not fit the network's dims=3"),
    ({"beta_schedule": "scaled_linear"}, ValueError, "unknown schedule 'scaled_linear'"),
    ({"loss_type": "huber"}, ValueError, "loss_type: 'huber'"),
]


@pytest.mark.parametrize("overrides, error, match", CONFIG_ERRORS)
def test_bad_configs_name_the_culprit(overrides, error, match):
    with pytest.raises(error, match=match):
        build(ldm_config(**overrides))


def test_unet_image_size_must_be_the_models():
    """UNetModel's image_size (kept from CompVis configs) is the grid the diffusion model trains and samples on."""
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 8, "in_channels": 2, "model_channels": 32, "out_channels": 2, "num_res_blocks": 1,
                       "attention_resolutions": [], "channel_mult": [1, 2], "num_heads": 1, "dims": 2,
                       "kernels": "torch"}}
    config = {"target": "ldm.models.diffusion.ddpm.DDPM",
              "params": {"unet_config": unet, "image_size": [8, 8], "channels": 2, "use_ema": False}}
    assert build(config).image_size == (8, 8)
    config["params"]["image_size"] = 16
    with pytest.raises(ValueError, match=r"unet_config.params.image_size: \[8, 8\] differs from the model's "
                                         r"image_size \[16, 16\]"):
        build(config)


def test_latent_shape_must_match_channels_and_image_size():
    model = build(ldm_config(image_size=[4, 4, 8]))
    model.train()
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4, 4\) per item but channels/image_size say \(2, 4, 4, 8\)"):
        model.training_step(batch(), 0, 0)


def test_scheduler_config_gives_a_lambda_lr_with_warm_up():
    schedule = {"target": "ldm.models.diffusion.lr_schedules.LambdaLinearScheduler",
                "params": {"warm_up_steps": [4], "cycle_lengths": [10 ** 13], "f_start": [1e-6], "f_max": [1.0],
                           "f_min": [1.0]}}
    model = build(ldm_config(scheduler_config=schedule))
    (optimizer,), (scheduler,) = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1e-9, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3], rel=1e-3, abs=1e-12)


def test_ckpt_path_restores_everything_but_ignore_keys(tmp_path):
    model = build(ldm_config(use_ema=True, scale_by_std=True))
    model.train()
    model.training_step(batch(), 0, 0)
    with torch.no_grad():
        model.model.conv.weight.add_(1.0)
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": model.state_dict()}, path)
    restored = build(ldm_config(use_ema=True, scale_by_std=True, ckpt_path=str(path), ignore_keys=["model_ema."]),
                     seed=1)
    assert torch.equal(restored.model.conv.weight, model.model.conv.weight)
    assert torch.equal(restored.scale_factor, model.scale_factor)
    assert not torch.equal(restored.model_ema.get_buffer("convweight"), model.model_ema.get_buffer("convweight"))


def test_log_images_entries():
    model = build(ldm_config(**CASES["concat_mask"][0]))
    model.eval()
    images = model.log_images(batch(), "train", max_images=2)
    image_shape = (1, 8, 8, 8)
    assert images["inputs"].shape == images["samples"].shape == images["reconstructions"].shape == (2, *image_shape)
    assert images["conditioning"].shape == (2, 3, 8, 8, 8)
    # 3D rows: the mid-slices (8 x 3*8) of each volume, stacked; t = 0, 40, 80, 99, and one per log sampler step
    assert images["diffusion_row"].shape == (1, 1, 4 * 8, 3 * 8)
    assert images["denoise_row"].shape == (1, 1, 2 * 8, 3 * 8)
    first_row_axial = images["diffusion_row"][0, :, :8, :8]  # t = 0: the first item's axial mid-slice
    torch.testing.assert_close(first_row_axial, images["reconstructions"][0, :, 4], atol=0.05, rtol=0)
    assert isinstance(model, TrainableModel)


def test_pixel_space_ddpm():
    torch.manual_seed(0)
    model = DDPM({"target": f"{STANDINS}.RecordingUNet", "params": {"in_channels": 1, "out_channels": 1, "dims": 2}},
                 timesteps=50, image_size=[8, 6], channels=1, use_ema=False, sampler="ddpm", sampler_steps=50)
    model.learning_rate = 1e-3
    data = {"image": torch.rand(B, 1, 8, 6) * 2 - 1}
    model.train()
    loss, _ = model.training_step(data, 0, 0)
    loss.backward()
    assert model.model.calls[-1]["x"] == (B, 1, 8, 6)
    model.eval()
    assert model.test_step(data, 0)["samples"].shape == (B, 1, 8, 6)
    assert len(model.model.calls) == 1 + 50
