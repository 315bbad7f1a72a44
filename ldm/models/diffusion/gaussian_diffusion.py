"""The discrete-time Gaussian (variance-preserving) diffusion process: every formula derived from the schedule.

Notation of Ho et al. 2020: alpha_bar_t = prod_{i<=t} (1 - beta_i),
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
Timesteps are integers 0..T-1; the index -1 stands for clean data (alpha_bar = 1), the end point of every sampler.
The network is not here: functions take its output and say what it means under `parameterization`.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2")


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype results take for data x: float64 for float64 data, float32 for anything narrower (bf16, fp16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sample_noise(x: torch.Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) noise like x: (B, C, *spatial), plus `offset_noise` times a per-(item, channel) constant.

    The offset (Guttenberg 2023) lets the model change an image's mean brightness, which plain noise hides at high t.
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if offset_noise:
        offset_shape = (*x.shape[:2], *([1] * (x.ndim - 2)))
        noise = noise + offset_noise * torch.randn(offset_shape, generator=generator, device=x.device, dtype=x.dtype)
    return noise


class GaussianDiffusion:
    """Forward process, posterior, parameterization conversions and the training loss for one beta schedule.

    betas: (T,) float. Tables stay float64 and are moved to a tensor's device on first use (not module buffers, so
    that casting the model to bf16 does not round alpha_bar); results are float32, or float64 for float64 data (what
    the comparisons with reference schedulers run in).
    """

    def __init__(self, betas: torch.Tensor, parameterization: str = "eps"):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization: {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}")
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("GaussianDiffusion: betas must be a 1D tensor with values in (0, 1]")
        self.parameterization = parameterization
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        if parameterization == "eps" and self.alphas_cumprod[-1] == 0:
            raise ValueError("parameterization 'eps' cannot be used with a zero terminal SNR schedule (x_0 cannot be "
                             "recovered from eps at alpha_bar = 0); use 'v' or 'x0'")
        # Index t + 1 holds alpha_bar_t, index 0 the clean end point t = -1.
        self._alpha_bar_padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """alpha_bar at timesteps t: (B,) int in [-1, T-1] -> (B, 1, ..., 1) float64 with `ndim` dims.

        Coefficients are formed in float64 and cast just before they meet data: 1 - alpha_bar near t = 0 and
        1 - alpha_bar_t / alpha_bar_s between close steps lose digits to cancellation in float32.
        """
        table = self._on_device.get(t.device)
        if table is None:
            table = self._on_device[t.device] = self._alpha_bar_padded.to(t.device)
        return table[t.long() + 1].view(-1, *([1] * (ndim - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar): (B,) -> (B,) float32."""
        alpha_bar = self.alpha_bar(t, 1)
        return (alpha_bar / (1 - alpha_bar)).float()

    def _signal_noise(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) as (B, 1, ..., 1) in `like`'s `working_dtype`."""
        alpha_bar = self.alpha_bar(t, like.ndim)
        dtype = working_dtype(like)
        return alpha_bar.sqrt().to(dtype), (1 - alpha_bar).sqrt().to(dtype)

    # ------------------------------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise: x0, noise (B, C, *spatial), t (B,)."""
        signal, sigma = self._signal_noise(t, x0)
        return signal * x0 + sigma * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_s | x_t, x_0) for s < t (default s = t - 1; s = -1 is clean data).

        With alpha_{t|s} = alpha_bar_t / alpha_bar_s: mean = sqrt(alpha_bar_s) (1 - alpha_{t|s}) / (1 - alpha_bar_t) x0
        + sqrt(alpha_{t|s}) (1 - alpha_bar_s) / (1 - alpha_bar_t) x_t; the variance is `posterior_variance`.
        Returns mean (B, C, *spatial) and variance (B, 1, ..., 1), float32.
        """
        s = t - 1 if s is None else s
        alpha_bar_t, alpha_bar_s = self.alpha_bar(t, x_t.ndim), self.alpha_bar(s, x_t.ndim)
        alpha_ts = alpha_bar_t / alpha_bar_s
        coef_x0 = alpha_bar_s.sqrt() * (1 - alpha_ts) / (1 - alpha_bar_t)
        coef_xt = alpha_ts.sqrt() * (1 - alpha_bar_s) / (1 - alpha_bar_t)
        dtype = working_dtype(x_t)
        return (coef_x0.to(dtype) * x0 + coef_xt.to(dtype) * x_t,
                self.posterior_variance(t, s, x_t.ndim).to(dtype))

    def posterior_variance(self, t: torch.Tensor, s: torch.Tensor, ndim: int) -> torch.Tensor:
        """Variance of q(x_s | x_t, x_0): (1 - alpha_bar_s) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_s),
        as (B, 1, ..., 1) float64 with `ndim` dims."""
        alpha_bar_t, alpha_bar_s = self.alpha_bar(t, ndim), self.alpha_bar(s, ndim)
        return (1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)

    # -------------------------------------------------------------------------------- parameterizations
    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        signal, sigma = self._signal_noise(t, x_t)
        return (x_t - sigma * eps) / signal

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
        signal, sigma = self._signal_noise(t, x_t)
        return (x_t - signal * x0) / sigma

    def get_v(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)."""
        signal, sigma = self._signal_noise(t, x0)
        return signal * noise - sigma * x0

    def predict_x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
        signal, sigma = self._signal_noise(t, x_t)
        return signal * x_t - sigma * v

    def predict_eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
        signal, sigma = self._signal_noise(t, x_t)
        return sigma * x_t + signal * v

    def predict(self, x_t: torch.Tensor, t: torch.Tensor,
                model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) that the network output means under this parameterization; all (B, C, *spatial)."""
        model_output = model_output.to(working_dtype(model_output))
        if self.parameterization == "eps":
            return self.predict_x0_from_eps(x_t, t, model_output), model_output
        if self.parameterization == "x0":
            return model_output, self.predict_eps_from_x0(x_t, t, model_output)
        return self.predict_x0_from_v(x_t, t, model_output), self.predict_eps_from_v(x_t, t, model_output)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise)."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x0
        return self.get_v(x0, noise, t)

    # ------------------------------------------------------------------------------------------------ loss
    def min_snr_weight(self, t: torch.Tensor, snr_gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023) for this parameterization: (B,) -> (B,).

        The x0-loss weight min(SNR, gamma) expressed for the target the network predicts: eps-loss = SNR * x0-loss,
        v-loss = (SNR + 1) * x0-loss.
        """
        snr = self.snr(t)
        weight = snr.clamp(max=snr_gamma)
        if self.parameterization == "eps":
            return weight / snr
        if self.parameterization == "v":
            return weight / (snr + 1)
        return weight

    def training_loss(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      loss_type: str = "l2", snr_gamma: float | None = None) -> torch.Tensor:
        """Per-item loss of the network output against `target(x0, noise, t)`: (B, C, *spatial) -> (B,) float32.

        Mean over all non-batch elements, times the min-SNR-gamma weight when `snr_gamma` is set.
        """
        target = self.target(x0, noise, t).float()
        if loss_type == "l2":
            loss = F.mse_loss(model_output.float(), target, reduction="none")
        elif loss_type == "l1":
            loss = (model_output.float() - target).abs()
        else:
            raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        loss = loss.flatten(1).mean(dim=1)
        if snr_gamma is not None:
            loss = loss * self.min_snr_weight(t, snr_gamma)
        return loss
