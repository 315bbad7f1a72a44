"""sgm's sampler classes: a discretization, a guider and one solver of `k_samplers`, called as
`sampler(denoiser, x, cond, uc=None)` with `denoiser(x, sigma, cond)` (see `guiders`) and x: (B, C, *spatial) unit
noise; returns samples of the same shape.

As in sgm, the start is x sqrt(1 + sigma_0^2): unit-variance data plus noise of std sigma_0.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.models.diffusion.edm import k_samplers
from ldm.models.diffusion.edm.guiders import Cond, ConditionalDenoiser
from ldm.util import instantiate_from_config

DEFAULT_DISCRETIZATION = {"target": "ldm.models.diffusion.edm.discretization.EDMDiscretization"}
DEFAULT_GUIDER = {"target": "ldm.models.diffusion.edm.guiders.IdentityGuider"}


class EDMSampler:
    """Base: `num_steps` noise levels of `discretization_config` (then 0), `guider_config` around the denoiser;
    `verbose` shows a progress bar. Subclasses name their solver and put its keyword options in `options`."""

    solver = staticmethod(k_samplers.sample_euler)

    def __init__(self, discretization_config: Mapping[str, Any] | None = None, num_steps: int | None = None,
                 guider_config: Mapping[str, Any] | None = None, verbose: bool = False):
        self.discretization = instantiate_from_config(discretization_config or DEFAULT_DISCRETIZATION)
        self.guider = instantiate_from_config(guider_config or DEFAULT_GUIDER)
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.verbose = verbose
        self.options: dict[str, Any] = {}

    def solver_options(self) -> dict[str, Any]:
        return dict(self.options)

    def sigmas(self, num_steps: int | None, device: torch.device | str) -> torch.Tensor:
        """(n + 1,) float64 levels, the last 0."""
        steps = num_steps or self.num_steps
        if steps is None:
            raise ValueError(f"{type(self).__name__}: num_steps is not set (give it in sampler_config.params)")
        return self.discretization(steps, device=device)

    @torch.no_grad()
    def __call__(self, denoiser: ConditionalDenoiser, x: torch.Tensor, cond: Cond, uc: Cond | None = None,
                 num_steps: int | None = None, callback=None) -> torch.Tensor:
        sigmas = self.sigmas(num_steps, x.device)
        model = self.guider(denoiser, cond, uc)
        x = x * (1.0 + sigmas[0] ** 2).sqrt().to(x.dtype)
        return type(self).solver(model, x, sigmas.to(x.dtype), callback=callback, disable=not self.verbose,
                                 **self.solver_options())


class _ChurnSampler(EDMSampler):
    """Karras et al. 2022, Algorithm 2's stochasticity: s_churn, s_tmin, s_tmax, s_noise."""

    def __init__(self, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 discretization_config: Mapping[str, Any] | None = None, num_steps: int | None = None,
                 guider_config: Mapping[str, Any] | None = None, verbose: bool = False):
        super().__init__(discretization_config, num_steps, guider_config, verbose)
        self.options = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}


class StochasticSampler(EDMSampler):
    """Base of the solvers with fresh noise each step, scaled by eta (0: the ODE) and s_noise: the ancestral ones
    (noise of std eta * the DDPM posterior's) and the SDE ones (eta scales the SDE's noise)."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, discretization_config: Mapping[str, Any] | None = None,
                 num_steps: int | None = None, guider_config: Mapping[str, Any] | None = None, verbose: bool = False):
        super().__init__(discretization_config, num_steps, guider_config, verbose)
        self.options = {"eta": eta, "s_noise": s_noise}


class EulerEDMSampler(_ChurnSampler):
    solver = staticmethod(k_samplers.sample_euler)


class HeunEDMSampler(_ChurnSampler):
    solver = staticmethod(k_samplers.sample_heun)


class EulerAncestralSampler(StochasticSampler):
    solver = staticmethod(k_samplers.sample_euler_ancestral)


class DPMPP2SAncestralSampler(StochasticSampler):
    solver = staticmethod(k_samplers.sample_dpmpp_2s_ancestral)


class DPMPP2MSampler(EDMSampler):
    solver = staticmethod(k_samplers.sample_dpmpp_2m)


class DPM2Sampler(_ChurnSampler):
    solver = staticmethod(k_samplers.sample_dpm_2)


class DPM2AncestralSampler(StochasticSampler):
    solver = staticmethod(k_samplers.sample_dpm_2_ancestral)


class DPMPPSDESampler(StochasticSampler):
    """Stochastic DPM-Solver++; `r`: where its intermediate level lies in t (0.5: the midpoint)."""

    solver = staticmethod(k_samplers.sample_dpmpp_sde)

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                 discretization_config: Mapping[str, Any] | None = None, num_steps: int | None = None,
                 guider_config: Mapping[str, Any] | None = None, verbose: bool = False):
        super().__init__(eta, s_noise, discretization_config, num_steps, guider_config, verbose)
        if not 0 < r <= 1:
            raise ValueError(f"r: must be in (0, 1], got {r}")
        self.options["r"] = r


class DPMPP2MSDESampler(StochasticSampler):
    """DPM-Solver++(2M) SDE; `solver_type`: `midpoint` or `heun` for its second-order term."""

    solver = staticmethod(k_samplers.sample_dpmpp_2m_sde)

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
                 discretization_config: Mapping[str, Any] | None = None, num_steps: int | None = None,
                 guider_config: Mapping[str, Any] | None = None, verbose: bool = False):
        super().__init__(eta, s_noise, discretization_config, num_steps, guider_config, verbose)
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type: must be 'midpoint' or 'heun', got {solver_type!r}")
        self.options["solver_type"] = solver_type


class DPMPP3MSDESampler(StochasticSampler):
    solver = staticmethod(k_samplers.sample_dpmpp_3m_sde)


class LinearMultistepSampler(EDMSampler):
    """Linear multistep of `order` (4 by default)."""

    solver = staticmethod(k_samplers.sample_lms)

    def __init__(self, order: int = 4, discretization_config: Mapping[str, Any] | None = None,
                 num_steps: int | None = None, guider_config: Mapping[str, Any] | None = None, verbose: bool = False):
        super().__init__(discretization_config, num_steps, guider_config, verbose)
        if order < 1:
            raise ValueError(f"order: must be >= 1, got {order}")
        self.options["order"] = order


#: The names `sample.py --sampler` accepts for a DiffusionEngine run.
SAMPLERS = {
    "euler": EulerEDMSampler,
    "heun": HeunEDMSampler,
    "euler_ancestral": EulerAncestralSampler,
    "dpmpp_2s_ancestral": DPMPP2SAncestralSampler,
    "dpmpp_2m": DPMPP2MSampler,
    "lms": LinearMultistepSampler,
    "dpm_2": DPM2Sampler,
    "dpm_2_ancestral": DPM2AncestralSampler,
    "dpmpp_sde": DPMPPSDESampler,
    "dpmpp_2m_sde": DPMPP2MSDESampler,
    "dpmpp_3m_sde": DPMPP3MSDESampler,
}

#: The names of SAMPLERS whose solver takes an eta (`sample.py --eta`).
ETA_SAMPLERS = tuple(name for name, cls in SAMPLERS.items() if issubclass(cls, StochasticSampler))
