"""Samplers of the reverse process, all with one signature (k-diffusion style):

    sample_<name>(model, x, timesteps, diffusion, extra_args=None, callback=None, generator=None, **options) -> x0

- `model(x_t, t, **extra_args)` returns the raw network output, x_t: (B, C, *spatial), t: (B,) int64;
- `x`: the starting noise x_T, (B, C, *spatial), 2D or 3D;
- `timesteps`: the timesteps to visit, strictly decreasing (see `timestep_schedule`); each step goes to the next
  visited timestep, and after the last one to clean data (index -1, alpha_bar = 1) or, with `set_alpha_to_one=False`
  (Stable Diffusion's convention, diffusers' option of that name), to alpha_bar_0: index 0;
- `clip_sample_range`: where set, every x0 prediction is clamped to [-range, range] before it is used (diffusers'
  `clip_sample`; eps stays the network's, as diffusers' schedulers keep it);
- `diffusion`: the `GaussianDiffusion` that says what the output means (eps, x0 or v);
- `callback({"i", "t", "x", "x0"})` after every step, `generator` for the injected noise (the deterministic samplers
  take it and draw nothing): one generator, or one per item so that each item's noise does not depend on the batch;
- `inpaint`: an optional `Inpainting(mask, x0)`, the known region kept on the forward process of x0.
Adding a solver is adding one function to `SAMPLERS` (and its options to `SAMPLER_OPTIONS`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ldm.models.diffusion.gaussian_diffusion import GaussianDiffusion, working_dtype

ModelFn = Callable[..., torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
SPACINGS = ("uniform", "leading", "linspace", "trailing", "quad")


@dataclass(frozen=True)
class Inpainting:
    """Inpainting in latent space: where `mask` is 1 the state is replaced, at the start and after every step, by
    the forward process of the known `x0` at that step's timestep, sqrt(alpha_bar_s) x0 + sqrt(1 - alpha_bar_s) x_T
    (the starting noise is its noise, so deterministic samplers stay deterministic); it ends as exactly x0 there.

    mask: broadcastable to x (B or 1, 1 or C, *spatial), 1 = known, 0 = generated, values between blend;
    x0: (B, C, *spatial) like x, the known clean data (latents for a latent model).
    """

    mask: torch.Tensor
    x0: torch.Tensor


def _known_region(inpaint: Inpainting | None, x_T: torch.Tensor,
                  diffusion: GaussianDiffusion) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x, t) -> x with the known region on x0's forward process at t; the identity without `inpaint`."""
    if inpaint is None:
        return lambda x, t: x
    mask, x0 = inpaint.mask.to(x_T.device, x_T.dtype), inpaint.x0.to(x_T.device, x_T.dtype)
    if tuple(x0.shape) != tuple(x_T.shape):
        raise ValueError(f"inpaint.x0 has shape {tuple(x0.shape)}, the samples {tuple(x_T.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, x_T.shape)
    except RuntimeError:
        raise ValueError(f"inpaint.mask of shape {tuple(mask.shape)} does not broadcast to the samples' shape "
                         f"{tuple(x_T.shape)}") from None
    return lambda x, t: mask * diffusion.q_sample(x0, t, x_T) + (1 - mask) * x


def _start(x: torch.Tensor, timesteps: torch.Tensor, diffusion: GaussianDiffusion, inpaint: Inpainting | None,
           extra_args: dict[str, Any] | None):
    """What every sampler starts with: x_T in fp32 (fp64 stays fp64) with its known region set, the `keep` map, the
    model's extra args."""
    x = x.to(working_dtype(x))
    keep = _known_region(inpaint, x, diffusion)
    return keep(x, timesteps[:1].to(x.device).expand(x.shape[0])), keep, extra_args or {}


def timestep_schedule(num_timesteps: int, steps: int, spacing: str = "uniform", steps_offset: int = 0) -> torch.Tensor:
    """Up to `steps` distinct timesteps out of 0..num_timesteps-1 (T of them), decreasing: (n,) int64.

    uniform: floor(i T / steps), spread evenly from 0 (it equals leading only when steps divides T: 50 of 1000 give
    0, 20, ..., 980 either way, 30 give 0, 33, 66, 100, ... here and 0, 33, 66, 99, ... there);
    leading: i (T // steps) + steps_offset, the DDIM code's and diffusers' "leading" spacing (Stable Diffusion uses
    steps_offset 1: 981, 961, ..., 1 for 50 steps); steps_offset applies to this spacing only, as in diffusers;
    linspace: round(i (T - 1) / (steps - 1)), from 0 to T - 1 (diffusers' DDIM / PNDM / DDPM "linspace");
    trailing: round(T - i T / steps) - 1, ends at T - 1, which a zero terminal SNR schedule needs (Lin et al. 2024);
    quad: floor((i sqrt(0.8 T) / (steps - 1))^2) as in the DDIM paper's code, whose repeats near 0 (a no-op step
    there) are dropped, so it can give fewer than `steps` timesteps.
    Products are formed as numpy forms them in the reference code (linspace, arange), so that the values that land
    on .5 round the same way.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampler steps must be in [1, {num_timesteps}], got {steps}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset {steps_offset}: applies to the leading timestep spacing only, not {spacing!r}")
    index = torch.arange(steps, dtype=torch.float64)
    if spacing == "uniform":
        timesteps = torch.floor(index * num_timesteps / steps)
    elif spacing == "leading":
        timesteps = index * (num_timesteps // steps) + steps_offset
        if steps_offset < 0 or timesteps[-1] > num_timesteps - 1:
            raise ValueError(f"steps_offset {steps_offset}: leading spacing of {steps} steps then reaches timestep "
                             f"{int(timesteps[-1])}, outside 0..{num_timesteps - 1}")
    elif spacing == "linspace":
        timesteps = torch.round(index * ((num_timesteps - 1) / max(steps - 1, 1)))
        timesteps[-1] = num_timesteps - 1 if steps > 1 else 0
    elif spacing == "trailing":
        # np.arange(T, 0, -T / steps) computes T + i * ((T - T / steps) - T)
        timesteps = torch.round(num_timesteps + index * ((num_timesteps - num_timesteps / steps) - num_timesteps)) - 1
    elif spacing == "quad":
        timesteps = torch.floor(torch.linspace(0, math.sqrt(num_timesteps * 0.8), steps, dtype=torch.float64) ** 2)
    else:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
    return timesteps.long().unique().flip(0)


# The keyword options each sampler takes beyond the shared ones, as its diffusers counterpart has them
# (DDIMScheduler, PNDMScheduler with skip_prk_steps, DDPMScheduler; DPMSolverMultistepScheduler has neither a final
# alpha nor clip_sample).
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {
    "ddpm": ("clip_sample_range",), "ddim": ("eta", "set_alpha_to_one", "clip_sample_range"),
    "plms": ("set_alpha_to_one", "clip_sample_range"), "dpmpp_2m": ()}
# Each model setting: the sampler keyword it becomes, and its neutral value (what every sampler does without it).
_SETTINGS = {"eta": ("eta", 0.0), "set_alpha_to_one": ("set_alpha_to_one", True),
             "clip_sample": ("clip_sample_range", False)}


def sampler_options(name: str, eta: float = 0.0, set_alpha_to_one: bool = True, clip_sample: bool = False,
                    clip_sample_range: float = 1.0) -> dict[str, Any]:
    """The keyword options of sampler `name` from the model's settings (diffusers' names), checked: a setting off its
    neutral value that the sampler cannot honour is an error naming it."""
    get_sampler(name)
    if clip_sample_range <= 0:
        raise ValueError(f"clip_sample_range: must be positive, got {clip_sample_range}")
    if not clip_sample and clip_sample_range != 1.0:
        raise ValueError(f"clip_sample_range {clip_sample_range}: is read only with clip_sample: true")
    for setting, value in {"eta": eta, "set_alpha_to_one": set_alpha_to_one, "clip_sample": clip_sample}.items():
        keyword, neutral = _SETTINGS[setting]
        if value != neutral and keyword not in SAMPLER_OPTIONS[name]:
            having = [sampler for sampler, keywords in SAMPLER_OPTIONS.items() if keyword in keywords]
            raise ValueError(f"sampler {name}: cannot honour {setting}={value} (samplers with it: {', '.join(having)})")
    keywords = {"eta": eta, "set_alpha_to_one": set_alpha_to_one,
                "clip_sample_range": clip_sample_range if clip_sample else None}
    return {keyword: keywords[keyword] for keyword in SAMPLER_OPTIONS[name]}


def _denoise(model: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, t: torch.Tensor,
             extra_args: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return diffusion.predict(x, t, model(x, t, **extra_args))


def _steps(x: torch.Tensor, timesteps: torch.Tensor, set_alpha_to_one: bool = True):
    """(i, t, s) per step as (B,) int64 tensors: from t to the next timestep s; after the last, s = -1 (clean data)
    or, without `set_alpha_to_one`, s = 0 (alpha_bar_0: a no-op step when the last timestep is 0 itself)."""
    timesteps = timesteps.to(x.device, torch.long)
    if len(timesteps) > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError("sampler timesteps must be strictly decreasing")
    following = torch.cat([timesteps[1:], timesteps.new_tensor([-1 if set_alpha_to_one else 0])])
    for i, (t, s) in enumerate(zip(timesteps, following)):
        yield i, t.expand(x.shape[0]), s.expand(x.shape[0])


def _clip(x0: torch.Tensor, clip_sample_range: float | None) -> torch.Tensor:
    """x0 clamped to [-clip_sample_range, clip_sample_range]; unchanged for None."""
    return x0 if clip_sample_range is None else x0.clamp(-clip_sample_range, clip_sample_range)


def _noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) like x, drawn on the generator's device; a sequence of generators draws item i from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        device = x.device if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: pass one per item")
    return torch.cat([_noise_like(x[i:i + 1], g) for i, g in enumerate(generator)])


@torch.no_grad()
def sample_ddpm(model: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, diffusion: GaussianDiffusion,
                extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                generator: Generators = None, inpaint: Inpainting | None = None,
                clip_sample_range: float | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020): x_s ~ q(x_s | x_t, x0_hat). Over all T timesteps this is DDPM; over a
    subset, the same posterior between the visited timesteps."""
    x, keep, extra_args = _start(x, timesteps, diffusion, inpaint, extra_args)
    for i, t, s in _steps(x, timesteps):
        x0 = _clip(_denoise(model, diffusion, x, t, extra_args)[0], clip_sample_range)
        mean, variance = diffusion.posterior(x0, x, t, s)
        x = mean + variance.sqrt() * _noise_like(x, generator)
        x = keep(x, s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def _ddim_step(diffusion: GaussianDiffusion, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor,
               sigma_sq: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Mean of DDIM's x_s (Song et al. 2021, eq. 12): sqrt(alpha_bar_s) x0 + sqrt(1 - alpha_bar_s - sigma^2) eps."""
    alpha_bar_s = diffusion.alpha_bar(s, x0.ndim)
    return alpha_bar_s.sqrt().to(x0.dtype) * x0 + (1 - alpha_bar_s - sigma_sq).clamp(min=0).sqrt().to(x0.dtype) * eps


@torch.no_grad()
def sample_ddim(model: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, diffusion: GaussianDiffusion,
                extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                generator: Generators = None, inpaint: Inpainting | None = None, eta: float = 0.0,
                set_alpha_to_one: bool = True, clip_sample_range: float | None = None) -> torch.Tensor:
    """DDIM: x_s = `_ddim_step` + sigma z, with sigma^2 = eta^2 times the posterior variance. eta = 0 is
    deterministic (Euler on the probability-flow ODE), eta = 1 is ancestral sampling."""
    x, keep, extra_args = _start(x, timesteps, diffusion, inpaint, extra_args)
    for i, t, s in _steps(x, timesteps, set_alpha_to_one):
        x0, eps = _denoise(model, diffusion, x, t, extra_args)
        x0 = _clip(x0, clip_sample_range)
        sigma_sq = eta ** 2 * diffusion.posterior_variance(t, s, x.ndim)
        x = _ddim_step(diffusion, x0, eps, s, sigma_sq)
        if eta:
            x = x + sigma_sq.sqrt().to(x.dtype) * _noise_like(x, generator)
        x = keep(x, s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


# Adams-Bashforth weights for the newest eps first, by the number of earlier eps available (PNDM's table).
_ADAMS_BASHFORTH = {1: (1.5, -0.5), 2: (23 / 12, -16 / 12, 5 / 12), 3: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(model: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, diffusion: GaussianDiffusion,
                extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                generator: Generators = None, inpaint: Inpainting | None = None, set_alpha_to_one: bool = True,
                clip_sample_range: float | None = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022, PNDM): deterministic DDIM steps driven by a linear multistep (Adams-Bashforth, up to
    4th order) combination of the latest eps predictions; the first step averages eps at both ends (Heun), which
    costs one extra network call. `clip_sample_range` clamps the x0 of each step (the Heun probe's too)."""
    x, keep, extra_args = _start(x, timesteps, diffusion, inpaint, extra_args)
    if diffusion.alpha_bar(timesteps[:1].to(x.device), 1).item() == 0:
        raise ValueError("plms cannot start at alpha_bar = 0 (zero terminal SNR): x0 is not defined by eps there; "
                         "use ddim or dpmpp_2m")
    history: list[torch.Tensor] = []
    for i, t, s in _steps(x, timesteps, set_alpha_to_one):
        _, eps = _denoise(model, diffusion, x, t, extra_args)
        if history:
            weights = _ADAMS_BASHFORTH[min(len(history), 3)]
            eps_prime = sum(w * e for w, e in zip(weights, [eps, *reversed(history[-3:])]))
        elif i < len(timesteps) - 1:
            x0 = _clip(diffusion.predict_x0_from_eps(x, t, eps), clip_sample_range)
            x_next = _ddim_step(diffusion, x0, eps, s)
            eps_prime = (eps + _denoise(model, diffusion, x_next, s, extra_args)[1]) / 2
        else:
            eps_prime = eps
        history.append(eps)
        x0 = _clip(diffusion.predict_x0_from_eps(x, t, eps_prime), clip_sample_range)
        x = _ddim_step(diffusion, x0, eps_prime, s)
        x = keep(x, s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def _half_log_snr(diffusion: GaussianDiffusion, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """lambda = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)), float64 (-inf where alpha_bar = 0)."""
    alpha_bar = diffusion.alpha_bar(t, ndim)
    return 0.5 * (alpha_bar.log() - torch.log1p(-alpha_bar))


@torch.no_grad()
def sample_dpmpp_2m(model: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, diffusion: GaussianDiffusion,
                    extra_args: dict[str, Any] | None = None, callback: Callable[[dict], None] | None = None,
                    generator: Generators = None, inpaint: Inpainting | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): exponential integrator in lambda on x0 predictions,
    x_s = sigma_s / sigma_t x_t - sqrt(alpha_bar_s) (e^{-h} - 1) D with h = lambda_s - lambda_t and D the
    second-order extrapolation (1 + 1/2r) x0 - 1/2r x0_prev, r = h_prev / h; the first step and the step into clean
    data are first order (D = x0)."""
    x, keep, extra_args = _start(x, timesteps, diffusion, inpaint, extra_args)
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x0, h) of the last step
    for i, t, s in _steps(x, timesteps):
        x0, _ = _denoise(model, diffusion, x, t, extra_args)
        if s[0] < 0:
            x = x0
        else:
            h = _half_log_snr(diffusion, s, x.ndim) - _half_log_snr(diffusion, t, x.ndim)
            extrapolated = x0
            if previous is not None:
                half_inverse_ratio = (h / (2 * previous[1])).to(x.dtype)
                extrapolated = (1 + half_inverse_ratio) * x0 - half_inverse_ratio * previous[0]
            alpha_bar_t, alpha_bar_s = diffusion.alpha_bar(t, x.ndim), diffusion.alpha_bar(s, x.ndim)
            sigma_ratio = ((1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt().to(x.dtype)
            x = sigma_ratio * x - (alpha_bar_s.sqrt() * torch.expm1(-h)).to(x.dtype) * extrapolated
            previous = (x0, h)
        x = keep(x, s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": sample_ddpm, "ddim": sample_ddim, "plms": sample_plms,
                                                    "dpmpp_2m": sample_dpmpp_2m}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function called `name` (a key of `SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {name!r} (available: {', '.join(SAMPLERS)})")
    return SAMPLERS[name]
