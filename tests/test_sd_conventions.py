"""Stable Diffusion's sampling conventions against diffusers' schedulers: timesteps, and whole trajectories in float64
on a fixed nonlinear model function; and a diffusers folder's scheduler config reaching the model's options."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.convert.__main__ import main as convert_main
from ldm.convert.scheduler import (STABLE_DIFFUSION_SCHEDULER, sampler_options_from_scheduler,
                                   stable_diffusion_release)
from ldm.convert.weights_io import ConversionError
from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion
from ldm.models.diffusion.sampling import get_sampler, sampler_options, timestep_schedule
from ldm.models.diffusion.schedules import make_beta_schedule
from ldm.util import instantiate_from_config
from tests.convert.test_pretrained import ldm_config, pipeline  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
          clip_sample=False)
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


def network(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, nonlinear stand-in for a denoiser: x (B, C, H, W) float64, t an int tensor of shape () or (B,)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return torch.tanh(0.8 * x + t / 700) + 0.05 * torch.sin(3 * x) * torch.cos(t / 90)


def x_T() -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def sd_diffusion(parameterization: str = "eps") -> GaussianDiffusion:
    """Our model of SD's scaled_linear schedule (our `linear`)."""
    return GaussianDiffusion(make_beta_schedule("linear", T, SD["beta_start"], SD["beta_end"]), parameterization)


def in_float64(scheduler, diffusion: GaussianDiffusion):
    """The scheduler with its alpha_bar table in float64 (diffusers builds it in float32), checked against ours."""
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), diffusion.alphas_cumprod, rtol=2e-6, atol=0)
    scheduler.alphas_cumprod = diffusion.alphas_cumprod.clone()
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if scheduler.config.set_alpha_to_one
                                         else diffusion.alphas_cumprod[0])
    return scheduler


def their_trajectory(scheduler, steps: int, seed: int | None = None, **step_options) -> list[torch.Tensor]:
    scheduler.set_timesteps(steps)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    x, states = x_T(), []
    for t in scheduler.timesteps:
        extra = {} if generator is None else {"generator": generator}
        x = scheduler.step(network(x, t), t, x, **step_options, **extra).prev_sample
        states.append(x)
    return states


def our_trajectory(name: str, diffusion: GaussianDiffusion, timesteps: torch.Tensor, seed: int | None = None,
                   **options) -> list[torch.Tensor]:
    states: list[torch.Tensor] = []
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    get_sampler(name)(network, x_T(), timesteps, diffusion, generator=generator,
                      callback=lambda step: states.append(step["x"]), **options)
    return states


def assert_same_trajectory(ours: list[torch.Tensor], theirs: list[torch.Tensor], atol: float = 1e-12):
    assert len(ours) == len(theirs) and ours[0].dtype == torch.float64
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=atol, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)])
def test_timesteps_equal_diffusers_for_every_step_count(spacing, offset):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    for steps in range(1, T + (offset == 0)):
        scheduler.set_timesteps(steps)
        theirs = scheduler.timesteps.tolist()
        if spacing == "trailing" and len(theirs) != steps:
            # np.arange(T, 0, -T / steps) gives one value too many for some counts (61, 103, ...): a -1 at the end
            assert len(theirs) == steps + 1 and theirs[-1] == -1
            theirs = theirs[:-1]
        assert timestep_schedule(T, steps, spacing, offset).tolist() == theirs, steps


def test_uniform_spacing_is_leading_only_when_steps_divide_T():
    assert timestep_schedule(T, 50, "uniform").tolist() == timestep_schedule(T, 50, "leading").tolist()
    assert timestep_schedule(T, 30, "uniform")[-4:].tolist() == [100, 66, 33, 0]
    assert timestep_schedule(T, 30, "leading")[-4:].tolist() == [99, 66, 33, 0]
    assert timestep_schedule(T, 50, "leading", 1)[[0, 1, -1]].tolist() == [981, 961, 1]  # SD's 50 steps


@pytest.mark.parametrize("steps", [50, 30])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_sd_conventions_equals_diffusers(steps, parameterization, eta):
    diffusion = sd_diffusion(parameterization)
    scheduler = in_float64(diffusers.DDIMScheduler(**SD, prediction_type=PREDICTIONS[parameterization]), diffusion)
    theirs = their_trajectory(scheduler, steps, seed=5 if eta else None, eta=eta)
    timesteps = timestep_schedule(T, steps, "leading", steps_offset=1)
    assert timesteps.tolist() == scheduler.timesteps.tolist()
    options = sampler_options("ddim", eta, set_alpha_to_one=False)
    assert_same_trajectory(our_trajectory("ddim", diffusion, timesteps, seed=5 if eta else None, **options), theirs)
    # the final alpha is what the last step lands on: alpha_bar_0, not 1
    assert (our_trajectory("ddim", diffusion, timesteps, seed=5, eta=eta)[-1] - theirs[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("clip_range", [1.0, 1.5])
def test_ddim_clip_sample_equals_diffusers(clip_range):
    diffusion = sd_diffusion()
    config = {**SD, "clip_sample": True, "clip_sample_range": clip_range}
    scheduler = in_float64(diffusers.DDIMScheduler(**config), diffusion)
    theirs = their_trajectory(scheduler, 30)
    timesteps = timestep_schedule(T, 30, "leading", 1)
    options = sampler_options("ddim", set_alpha_to_one=False, clip_sample=True, clip_sample_range=clip_range)
    assert_same_trajectory(our_trajectory("ddim", diffusion, timesteps, **options), theirs)
    unclipped = our_trajectory("ddim", diffusion, timesteps, set_alpha_to_one=False)
    assert (unclipped[0] - theirs[0]).abs().max() > 1e-3  # clipping acted on this trajectory


def test_ddim_trailing_equals_diffusers_where_its_step_rule_agrees():
    """diffusers' DDIMScheduler steps to t - T // steps, not to the next timestep of its own schedule; for trailing
    spacing the two agree when steps divides T (50 here), for linspace never (see the DDPM test below)."""
    diffusion = sd_diffusion()
    scheduler = in_float64(diffusers.DDIMScheduler(**{**SD, "timestep_spacing": "trailing"}), diffusion)
    theirs = their_trajectory(scheduler, 50)
    timesteps = timestep_schedule(T, 50, "trailing")
    assert_same_trajectory(our_trajectory("ddim", diffusion, timesteps, set_alpha_to_one=False), theirs)


@pytest.mark.parametrize("spacing", ["linspace", "trailing", "leading"])
def test_ddpm_with_linspace_and_trailing_equals_diffusers(spacing):
    """DDPMScheduler steps to the next timestep of its schedule, for any spacing and step count; clip_sample on.
    It adds sqrt(1e-20) z on a last step from t > 0 (its variance floor), hence atol 1e-9 there."""
    diffusion = sd_diffusion()
    config = {**SD, "timestep_spacing": spacing, "clip_sample": True, "clip_sample_range": 1.2}
    del config["set_alpha_to_one"]
    if spacing != "leading":
        config["steps_offset"] = 0
    scheduler = in_float64(diffusers.DDPMScheduler(**config), diffusion)
    theirs = their_trajectory(scheduler, 30, seed=3)
    timesteps = timestep_schedule(T, 30, spacing, config["steps_offset"])
    assert timesteps.tolist() == scheduler.timesteps.tolist()
    ours = our_trajectory("ddpm", diffusion, timesteps, seed=3,
                          **sampler_options("ddpm", clip_sample=True, clip_sample_range=1.2))
    assert_same_trajectory(ours[:-1], theirs[:-1])
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps", [50, 30])
def test_plms_with_sd_conventions_equals_pndm_without_prk_steps(steps):
    """SD 1.x's own scheduler: PNDMScheduler(skip_prk_steps=True), steps_offset 1, set_alpha_to_one false. Its
    network calls (one extra at the start for the Heun step) are ours, timestep for timestep. eps only: for
    v_prediction PNDMScheduler combines the raw v outputs and turns the combination into eps with the current x_t,
    where ours (as the PLMS paper) combines eps predictions; the two differ by ~1e-4 on this trajectory."""
    diffusion = sd_diffusion()
    config = {k: v for k, v in SD.items() if k != "clip_sample"}
    scheduler = in_float64(diffusers.PNDMScheduler(**config, skip_prk_steps=True), diffusion)
    theirs = their_trajectory(scheduler, steps)
    calls: list[int] = []

    def recorded(x, t):
        calls.append(int(t[0]))
        return network(x, t)
    timesteps = timestep_schedule(T, steps, "leading", 1)
    ours: list[torch.Tensor] = []
    get_sampler("plms")(recorded, x_T(), timesteps, diffusion, callback=lambda step: ours.append(step["x"]),
                        **sampler_options("plms", set_alpha_to_one=False))
    assert calls == scheduler.timesteps.tolist()
    # diffusers' first step is two calls of step() (probe, then the Heun average): compare from its second state
    assert_same_trajectory(ours, theirs[1:])


def test_plms_clip_sample_bounds_every_x0():
    diffusion, timesteps = sd_diffusion(), timestep_schedule(T, 20, "leading", 1)
    x0s: list[torch.Tensor] = []
    get_sampler("plms")(network, x_T(), timesteps, diffusion, callback=lambda step: x0s.append(step["x0"]),
                        **sampler_options("plms", clip_sample=True, clip_sample_range=0.5))
    assert max(float(x0.abs().max()) for x0 in x0s) == 0.5
    free = our_trajectory("plms", diffusion, timesteps)
    huge = our_trajectory("plms", diffusion, timesteps, clip_sample_range=1e6)
    assert_same_trajectory(huge, free)


def test_options_a_sampler_cannot_honour_are_errors_naming_them():
    with pytest.raises(ValueError, match="sampler ddpm: cannot honour set_alpha_to_one=False"):
        sampler_options("ddpm", set_alpha_to_one=False)
    with pytest.raises(ValueError, match="sampler dpmpp_2m: cannot honour clip_sample=True"):
        sampler_options("dpmpp_2m", clip_sample=True)
    with pytest.raises(ValueError, match="clip_sample_range 2.0: is read only with clip_sample: true"):
        sampler_options("ddim", clip_sample_range=2.0)
    with pytest.raises(ValueError, match="steps_offset 1: applies to the leading timestep spacing only"):
        timestep_schedule(T, 10, "trailing", 1)
    with pytest.raises(ValueError, match="reaches timestep 1000, outside 0..999"):
        timestep_schedule(T, T, "leading", 1)
    assert sampler_options("ddim") == {"eta": 0.0, "set_alpha_to_one": True, "clip_sample_range": None}


# --------------------------------------------------------------------------------- scheduler config -> model

def saved(scheduler) -> dict:
    """The scheduler's config as `save_config` writes it (with `_class_name`)."""
    return {"_class_name": type(scheduler).__name__, **scheduler.config}



def test_scheduler_config_maps_to_our_schedule():
    params = sampler_options_from_scheduler(saved(diffusers.DDIMScheduler(**SD)))
    assert params == {"timesteps": 1000, "beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012,
                      "parameterization": "eps", "rescale_betas_zero_snr": False, "sampler": "ddim",
                      "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                      "clip_sample": False}
    for theirs, ours in (("linear", "sqrt_linear"), ("squaredcos_cap_v2", "cosine")):
        scheduler = diffusers.DDPMScheduler(beta_schedule=theirs)
        params = sampler_options_from_scheduler(saved(scheduler))
        assert params["beta_schedule"] == ours
        betas = make_beta_schedule(params["beta_schedule"], params["timesteps"], params.get("linear_start", 1e-4),
                                   params.get("linear_end", 2e-2))
        torch.testing.assert_close(betas.float(), scheduler.betas, rtol=1e-5, atol=1e-7)
    pndm = sampler_options_from_scheduler(saved(diffusers.PNDMScheduler(skip_prk_steps=True)))
    assert pndm["sampler"] == "plms" and pndm["set_alpha_to_one"] is False and "clip_sample" not in pndm


def test_unsupported_schedulers_and_values_are_named():
    with pytest.raises(ConversionError, match="scheduler class 'EulerDiscreteScheduler' has no sampler here"):
        sampler_options_from_scheduler(saved(diffusers.EulerDiscreteScheduler()))
    with pytest.raises(ConversionError, match=r"DDIMScheduler thresholding=true .*; timestep_spacing=\"karras\""):
        sampler_options_from_scheduler({"_class_name": "DDIMScheduler", "thresholding": True,
                                        "timestep_spacing": "karras"})
    with pytest.raises(ConversionError, match="skip_prk_steps=false"):
        sampler_options_from_scheduler({"_class_name": "PNDMScheduler"})
    # a key the class does not take is ignored, as diffusers ignores it (SD 2.x's DDIM config has skip_prk_steps)
    assert sampler_options_from_scheduler({"_class_name": "DDIMScheduler", "skip_prk_steps": True})["sampler"] == "ddim"


def test_sd_single_files_get_sds_scheduler():
    sd1 = {"model_channels": 320, "context_dim": 768}
    assert stable_diffusion_release(sd1) == "1.x"
    assert stable_diffusion_release({"model_channels": 320, "context_dim": 1024}) == "2.x"
    assert stable_diffusion_release({"model_channels": 320, "context_dim": 2048, "num_classes": "sequential"}) is None
    scheduler = diffusers.DDIMScheduler.from_config(STABLE_DIFFUSION_SCHEDULER)
    scheduler.set_timesteps(50)
    params = sampler_options_from_scheduler(STABLE_DIFFUSION_SCHEDULER)
    assert timestep_schedule(T, 50, params["timestep_spacing"], params["steps_offset"]).tolist() == \
        scheduler.timesteps.tolist()


def test_a_folders_scheduler_config_reaches_the_model(pipeline, capsys):  # noqa: F811
    tmp_path, _, _ = pipeline
    scheduler = diffusers.DDIMScheduler(**SD, prediction_type="v_prediction")
    scheduler.save_config(tmp_path / "pipe" / "scheduler")
    assert convert_main([str(tmp_path / "pipe"), "--config"]) == 0
    printed = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
    sampling = {k: v for k, v in printed.items() if k not in ("unet_config", "first_stage_config")}
    model = instantiate_from_config(ldm_config(tmp_path / "pipe", **sampling, sampler_steps=30))
    scheduler.set_timesteps(30)
    assert model.test_timesteps.tolist() == scheduler.timesteps.tolist()
    assert model.sampler_options == {"eta": 0.0, "set_alpha_to_one": False, "clip_sample_range": None}
    assert model.parameterization == "v"
    np.testing.assert_allclose(model.diffusion.alphas_cumprod.numpy(), scheduler.alphas_cumprod.numpy(), rtol=2e-6)

    diffusers.EulerDiscreteScheduler().save_config(tmp_path / "pipe" / "scheduler")
    assert convert_main([str(tmp_path / "pipe"), "--config"]) == 2
    assert "EulerDiscreteScheduler" in capsys.readouterr().err


def test_sample_py_takes_the_models_conventions():
    from types import SimpleNamespace

    from ldm.sample_cli import build_parser, sampler_settings
    from ldm.util import ConfigError

    params = OmegaConf.create({"sampler": "ddim", "timestep_spacing": "leading", "steps_offset": 1,
                               "set_alpha_to_one": False})
    model = SimpleNamespace(guidance_scale=1.0)

    def settings(*flags):
        return sampler_settings(build_parser().parse_args(["-r", "run", *flags]), params, model)
    configured = settings()
    assert (configured.spacing, configured.steps_offset) == ("leading", 1)
    assert configured.options() == {"eta": 0.0, "set_alpha_to_one": False, "clip_sample_range": None}
    assert settings("--spacing", "linspace").steps_offset == 0  # the offset belongs to the configured leading spacing
    with pytest.raises(ConfigError, match=r"sampler dpmpp_2m: cannot honour set_alpha_to_one=False .*the model's "
                                          r"config sets it"):
        settings("--sampler", "dpmpp_2m")
