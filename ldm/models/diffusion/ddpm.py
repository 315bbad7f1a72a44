"""Diffusion models implementing the training-loop interface (`ldm.engine.interface`): `DDPM` in pixel space and
`LatentDiffusion` in the latent space of a frozen autoencoder, with the CompVis latent-diffusion config keys.

The formulas live in `gaussian_diffusion` (process, losses), `sampling` (samplers) and `conditioning` (UNet inputs,
guidance); these classes only wire data, networks and the optimizer to them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.data.latent_cache import LATENT_MOMENTS, config_digest, prepare_latent_cache, weights_digest
from ldm.engine.images import mid_slices
from ldm.models.autoencoder import load_weights
from ldm.models.diffusion.conditioning import (CONDITIONING_KEYS, MASK_TO_LATENT, Conditioning, build_conditioning,
                                               classifier_free_guidance, drop_conditions)
from ldm.models.diffusion.gaussian_diffusion import LOSS_TYPES, GaussianDiffusion, sample_noise
from ldm.models.diffusion.latent_scale import LatentScale
from ldm.models.diffusion.schedules import make_beta_schedule, rescale_zero_terminal_snr
from ldm.models.diffusion.sampling import get_sampler, sampler_options, timestep_schedule
from ldm.models.test_metrics import TestMetrics, build_test_metrics, check_test_metrics
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.lora import add_lora, lora_file_beside, lora_options, save_lora
from ldm.util import instantiate_from_config


def take(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The first n items of every tensor or list in a batch."""
    return {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Number of items in a batch (the length of its first tensor)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    raise ValueError(f"batch has no tensor to take its size from (keys: {', '.join(map(str, batch))})")


def batch_entry(batch: Mapping[str, Any], key: str, owner: str) -> Any:
    if key not in batch:
        raise KeyError(f"{owner}: batch has no {key!r} entry (keys: {', '.join(map(str, batch))})")
    return batch[key]


def as_strip(images: torch.Tensor) -> torch.Tensor:
    """A row of images as one 2D image: (N, C, H, W) -> (1, C, H, N * W), side by side; volumes (N, C, D, H, W) ->
    (1, C, N * S, 3 * S), each volume's three orthogonal mid-slices (S = max(D, H, W)), one volume under the other."""
    if images.ndim == 5:
        return torch.cat([mid_slices(volume) for volume in images], dim=-2)[None]
    return torch.cat(list(images), dim=-1)[None]


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients (`train()` of the owner keeps it in eval mode)."""
    module.eval()
    module.requires_grad_(False)
    return module


class DDPM(nn.Module):
    """Denoising diffusion in pixel space: batch[first_stage_key] (B, channels, *image_size) in [-1, 1].

    image_size: an int (every axis) or one size per axis; the spatial dims come from the network's `dims`. A network
    that states its own `image_size` (UNetModel's, as in CompVis configs) must state the same grid.
    sampler (ddpm, ddim, plms, dpmpp_2m) / sampler_steps / sampler_eta (ddim only) / timestep_spacing (uniform,
    leading, linspace, trailing, quad) / steps_offset (leading only) / set_alpha_to_one (ddim, plms: false ends at
    alpha_bar_0, Stable Diffusion's convention) / clip_sample with clip_sample_range (ddim, plms, ddpm: clamp x0):
    how `test_step` samples, named as in diffusers' schedulers (`ldm.convert.scheduler` reads theirs); see
    `sampling.timestep_schedule` and `sampling.sampler_options`. log_sampler_steps: the same for `log_images`;
    log_every_t: timestep spacing of the diffusion and denoising rows in `log_images`. ema_decay: of the LitEma (with
    warm-up) when use_ema.
    snr_gamma: min-SNR-gamma loss weighting (None: off); offset_noise: strength of the per-channel noise offset;
    rescale_betas_zero_snr: rescale the schedule to zero terminal SNR (needs parameterization v or x0).
    ckpt_path / ignore_keys / strict: initial weights, see `ldm.models.autoencoder.load_weights` (strict: a
    checkpoint that does not fit outside `ignore_keys` is an error; false loads what matches).
    test_metrics: what the test stage scores its samples with (`ldm.models.test_metrics`), written to
    metrics/test.json.
    """

    def __init__(self, unet_config: Mapping[str, Any], timesteps: int = 1000, beta_schedule: str = "linear",
                 linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                 rescale_betas_zero_snr: bool = False, parameterization: str = "eps", loss_type: str = "l2",
                 snr_gamma: float | None = None, offset_noise: float = 0.0, image_size: int | Sequence[int] = 256,
                 channels: int = 3, first_stage_key: str = "image", use_ema: bool = True, ema_decay: float = 0.9999,
                 monitor: str | None = "val/loss", ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 strict: bool = True, scheduler_config: Mapping[str, Any] | None = None, sampler: str = "ddim",
                 sampler_steps: int = 50, sampler_eta: float = 0.0, timestep_spacing: str = "uniform",
                 log_sampler_steps: int = 20, log_every_t: int = 100,
                 test_metrics: Mapping[str, Any] | None = None, steps_offset: int = 0, set_alpha_to_one: bool = True,
                 clip_sample: bool = False, clip_sample_range: float = 1.0):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma: must be positive (or null to turn min-SNR weighting off), got {snr_gamma}")
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.diffusion = GaussianDiffusion(betas, parameterization)
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.snr_gamma = snr_gamma
        self.offset_noise = offset_noise
        self.model = instantiate_from_config(unet_config)
        if not hasattr(self.model, "dims"):
            raise ValueError(f"unet_config: {type(self.model).__name__} has no `dims` attribute (2 or 3)")
        sizes = [image_size] * self.model.dims if isinstance(image_size, int) else list(image_size)
        if len(sizes) != self.model.dims:
            raise ValueError(f"image_size: {image_size} does not fit the network's dims={self.model.dims}")
        self.image_size = tuple(int(s) for s in sizes)
        network_size = getattr(self.model, "image_size", None)
        if network_size is not None and tuple(network_size) != self.image_size:
            raise ValueError(f"unet_config.params.image_size: {list(network_size)} differs from the model's image_size "
                             f"{list(self.image_size)} (the grid it trains and samples on); give both the same size")
        self.channels = channels
        self.first_stage_key = first_stage_key
        self.use_ema = use_ema
        self.model_ema = LitEma(self.model, decay=ema_decay) if use_ema else None
        self.monitor = monitor
        self.scheduler_config = scheduler_config
        if sampler != "ddim" and sampler_eta:
            raise ValueError(f"sampler_eta: only the ddim sampler has an eta, got sampler={sampler!r}")
        self.sampler = get_sampler(sampler)
        self.sampler_options = sampler_options(sampler, sampler_eta, set_alpha_to_one, clip_sample, clip_sample_range)
        self.test_timesteps = timestep_schedule(timesteps, sampler_steps, timestep_spacing, steps_offset)
        self.log_timesteps = timestep_schedule(timesteps, log_sampler_steps, timestep_spacing, steps_offset)
        if log_every_t < 1:
            raise ValueError(f"log_every_t: must be >= 1, got {log_every_t}")
        self.log_every_t = log_every_t
        self.test_metrics = check_test_metrics(test_metrics)
        # Classifier-free guidance needs a conditioning: LatentDiffusion sets these from its config.
        self.ucg_rate = 0.0
        self.guidance_scale = 1.0
        self.learning_rate = 0.0
        self.global_step = 0
        if ckpt_path is not None:
            load_weights(self, ckpt_path, ignore_keys, strict)

    # ------------------------------------------------------------------------------- data <-> diffusion space
    def images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """batch[first_stage_key]: (B, C, *spatial) float32, checked for rank."""
        x = batch_entry(batch, self.first_stage_key, type(self).__name__)
        if x.ndim != len(self.image_size) + 2:
            raise ValueError(f"{type(self).__name__}: batch[{self.first_stage_key!r}] has shape {tuple(x.shape)}, "
                             f"expected {len(self.image_size)} spatial dims")
        return x.float()

    def get_input(self, batch: Mapping[str, Any], sample_posterior: bool = True) -> torch.Tensor:
        """x0 in diffusion space: (B, channels, *image_size)."""
        x = self.images(batch)
        self.check_shape(x)
        return x

    def check_shape(self, x0: torch.Tensor) -> None:
        expected = (self.channels, *self.image_size)
        if tuple(x0.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__}: diffusion inputs have shape {tuple(x0.shape[1:])} per item but "
                             f"channels/image_size say {expected}")

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> image space (the identity in pixel space)."""
        return x0

    def get_conditioning(self, batch: Mapping[str, Any]) -> tuple[Conditioning, Conditioning, torch.Tensor | None]:
        """(conditioning, null conditioning, raw conditioning from the batch); unconditional here."""
        return Conditioning(), Conditioning(), None

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model]

    def cuda_graph_modules(self) -> dict[str, nn.Module]:
        """What `trainer.cuda_graph` captures: the denoising network, called once per training step."""
        return {"model": self.model}

    # ------------------------------------------------------------------------------------------- network
    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Network output for x_t: (B, channels, *image_size) at timesteps t: (B,) under `cond`."""
        x_in, kwargs = cond.unet_inputs(x_t)
        dtype = next(self.model.parameters()).dtype
        context = kwargs["context"]
        kwargs["context"] = None if context is None else context.to(dtype)
        return self.model(x_in.to(dtype), t, **kwargs)

    @contextlib.contextmanager
    def ema_scope(self):
        """The block runs with the EMA weights in the network while `use_ema` (set it False to use the raw weights)."""
        if not self.use_ema or self.model_ema is None:
            yield
            return
        with self.model_ema.average_parameters(self.model):
            yield

    def loss(self, x0: torch.Tensor, cond: Conditioning, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean diffusion loss for clean x0: (B, channels, *image_size), at uniformly drawn timesteps."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = sample_noise(x0, self.offset_noise, generator)
        output = self.apply_model(self.diffusion.q_sample(x0, t, noise), t, cond)
        return self.diffusion.training_loss(output, x0, noise, t, self.loss_type, self.snr_gamma).mean()

    @torch.no_grad()
    def sample(self, cond: Conditioning, uncond: Conditioning, batch_size: int, timesteps: torch.Tensor,
               callback=None) -> torch.Tensor:
        """Samples in diffusion space, (batch_size, channels, *image_size), with the configured sampler."""
        device = next(self.model.parameters()).device
        x_T = torch.randn(batch_size, self.channels, *self.image_size, device=device)
        model = classifier_free_guidance(self.apply_model, cond, uncond, self.guidance_scale)
        return self.sampler(model, x_T, timesteps, self.diffusion, callback=callback, **self.sampler_options)

    # ------------------------------------------------------------------------------------ loop interface
    def configure_optimizers(self):
        """AdamW over the parameters of `trainable_modules()` that require gradients (with LoRA: its weights alone),
        fused (one kernel per step for all parameters of a device and dtype, instead of a dozen passes over them);
        LambdaLR when `scheduler_config` is set."""
        params = [p for module in self.trainable_modules() for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, fused=True)
        if self.scheduler_config is None:
            return [optimizer]
        schedule = instantiate_from_config(self.scheduler_config)
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int, optimizer_idx: int):
        """(loss, {"train/loss"}); conditions are dropped at rate ucg_rate for classifier-free guidance."""
        x0 = self.get_input(batch)
        cond, null, _ = self.get_conditioning(batch)
        loss = self.loss(x0, drop_conditions(cond, null, self.ucg_rate))
        return loss, {"train/loss": loss.detach()}

    def on_train_batch_end(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema(self.model)

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"val/loss"} with the EMA weights, timesteps and noise seeded by batch_idx (comparable across runs)."""
        x0 = self.get_input(batch, sample_posterior=False)
        cond, _, _ = self.get_conditioning(batch)
        generator = torch.Generator(device=x0.device).manual_seed(batch_idx)
        with self.ema_scope():
            return {"val/loss": self.loss(x0, cond, generator)}

    @torch.no_grad()
    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"samples": (B, C, *spatial) in [-1, 1], "conditioning": the batch's spatial conditioning, if any}."""
        cond, null, raw = self.get_conditioning(batch)
        with self.ema_scope():
            samples = self.sample(cond, null, batch_size_of(batch), self.test_timesteps)
        return {"samples": self.decode(samples).clamp(-1, 1), **self.conditioning_images(raw)}

    def test_evaluator(self) -> TestMetrics | None:
        """Scores of the test stage's samples against the batch's real images (and its condition), if configured."""
        conditioned = getattr(self, "conditioning_key", None) is not None
        return build_test_metrics(self.test_metrics, self.first_stage_key, "samples",
                                  self.cond_stage_key if conditioned else None)

    def conditioning_images(self, raw: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """{"conditioning": raw} when it is an image-like tensor of the data's dims (masks, images), else {} (class
        labels, captions)."""
        if isinstance(raw, torch.Tensor) and raw.ndim == len(self.image_size) + 2:
            return {"conditioning": raw.float()}
        return {}

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str, max_images: int) -> dict[str, torch.Tensor]:
        """{"inputs", "diffusion_row", "samples", "denoise_row"}: (<=max_images, C, *spatial) in image space.

        The rows show the first item only, as one 2D strip (`as_strip`): noised at every log_every_t timesteps (forward
        process), and the sampler's x0 predictions for the first sample at about the same spacing."""
        batch = take(batch, max_images)
        x0 = self.get_input(batch, sample_posterior=False)
        cond, null, _ = self.get_conditioning(batch)
        row_t = list(range(0, self.diffusion.num_timesteps, self.log_every_t))
        row_t = torch.tensor(row_t + [self.diffusion.num_timesteps - 1], device=x0.device).unique()
        first = x0[:1].expand(len(row_t), *x0.shape[1:])
        generator = torch.Generator(device=x0.device).manual_seed(0)
        diffusion_row = self.diffusion.q_sample(first, row_t, sample_noise(first, 0.0, generator))
        denoised = []
        stride = max(1, len(self.log_timesteps) * self.log_every_t // self.diffusion.num_timesteps)

        def keep_x0(step: dict) -> None:
            if step["i"] % stride == 0 or step["i"] == len(self.log_timesteps) - 1:
                denoised.append(step["x0"][:1])

        with self.ema_scope():
            samples = self.sample(cond, null, x0.shape[0], self.log_timesteps, callback=keep_x0)
        return {"inputs": self.images(batch), "diffusion_row": as_strip(self.decode(diffusion_row)),
                "samples": self.decode(samples), "denoise_row": as_strip(self.decode(torch.cat(denoised)))}


class LatentDiffusion(LatentScale, DDPM):
    """DDPM on `scale_factor * z`, z ~ the frozen first stage's posterior of batch[first_stage_key].

    cond_stage_config: `__is_unconditional__` (with conditioning_key None), `__is_first_stage__` (the conditioning
    image's latent, e.g. for super-resolution), or a module applied to batch[cond_stage_key] (`ClassEmbedder`,
    `MaskEncoder`, `torch.nn.Identity` for a raw mask). How its output enters the UNet: `conditioning_key`; how a
    spatial conditioning reaches the latent grid: `mask_to_latent` (see `conditioning.to_latent_grid`).
    scale_by_std: scale_factor = 1 / std of the first training batch's latents (all ranks), kept as a buffer.
    concat_mode (CompVis): with conditioning_key null, a cond_stage_config module enters by concat (true) or crossattn
    (false); ignored for an unconditional model.
    ucg_rate: probability of training with the null conditioning; guidance_scale: classifier-free guidance at sampling.
    image_size and channels describe the latent grid. num_timesteps_cond: CompVis configs' 1 (the conditioning is not
    noised) is the only value accepted; CompVis' shortened conditioning schedule (> 1) is not implemented.
    ckpt_path / ignore_keys / strict: as for DDPM, for the whole model; the first stage's own weights come from
    `first_stage_config.params.ckpt_path` (with its own ignore_keys, e.g. [loss], and strict).

    cache_latents: {dir, copies (default 1)}: before training, encode the train split once with the frozen first
    stage (a KL autoencoder) and train on its stored posterior moments, still drawing z ~ q(z|x) each step; the
    conditioning batch[cond_stage_key] is stored beside them. Random augmentation meets caching as `copies` encodings
    per item, each of the item read with other augmentation seeds; every training read takes one copy at random, so a
    run sees `copies` augmentations per item in all instead of a fresh one per epoch (copies: 1 suits data without
    random transforms). The cache in `dir` is reused by later runs while the first stage's weights, the train split's
    config and `copies` stay the same, and rebuilt with a notice otherwise or when a file of it fails its hash; see
    `ldm.data.latent_cache`. Encoding runs in the first stage's dtype, outside autocast, spread over the ranks.
    Training batches then hold no images: `images()` gives the first stage's reconstruction of their mean instead.
    Validation and test batches are read and encoded as without the cache.

    lora_config: {rank, alpha, target_modules, save_layout} (`ldm.modules.lora.lora_options`): once the weights of
    ckpt_path are in, the UNet's attention projections get LoRA and only the LoRA weights train; the EMA (use_ema)
    averages them alone, and `save_beside_checkpoint` writes them (the EMA's when use_ema) as
    `lora-<checkpoint name>.safetensors` in the `save_layout` key layout beside each checkpoint file.
    """

    def __init__(self, first_stage_config: Mapping[str, Any], cond_stage_config: Any, unet_config: Mapping[str, Any],
                 first_stage_key: str = "image", cond_stage_key: str = "image", conditioning_key: str | None = None,
                 concat_mode: bool | None = None, cond_stage_trainable: bool = False, scale_factor: float = 1.0,
                 scale_by_std: bool = False,
                 ucg_rate: float = 0.0, guidance_scale: float = 1.0, mask_to_latent: str = "nearest",
                 num_timesteps_cond: int = 1, timesteps: int = 1000, beta_schedule: str = "linear",
                 linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                 rescale_betas_zero_snr: bool = False, parameterization: str = "eps", loss_type: str = "l2",
                 snr_gamma: float | None = None, offset_noise: float = 0.0, image_size: int | Sequence[int] = 256,
                 channels: int = 3, use_ema: bool = True, ema_decay: float = 0.9999, monitor: str | None = "val/loss",
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), strict: bool = True,
                 scheduler_config: Mapping[str, Any] | None = None, sampler: str = "ddim", sampler_steps: int = 50,
                 sampler_eta: float = 0.0, timestep_spacing: str = "uniform", log_sampler_steps: int = 20,
                 log_every_t: int = 100, test_metrics: Mapping[str, Any] | None = None,
                 cache_latents: Mapping[str, Any] | None = None, lora_config: Mapping[str, Any] | None = None,
                 steps_offset: int = 0, set_alpha_to_one: bool = True, clip_sample: bool = False,
                 clip_sample_range: float = 1.0):
        lora = lora_options(lora_config)
        if lora is not None and cond_stage_trainable:
            raise ValueError("lora_config: only the UNet's LoRA weights train; set cond_stage_trainable: false")
        if num_timesteps_cond != 1:
            raise ValueError(f"num_timesteps_cond: shortened conditioning schedules (noised conditioning) are not "
                             f"supported, got {num_timesteps_cond} (use 1, the default, or leave it out)")
        super().__init__(unet_config, timesteps, beta_schedule, linear_start, linear_end, cosine_s,
                         rescale_betas_zero_snr, parameterization, loss_type, snr_gamma, offset_noise, image_size,
                         channels, first_stage_key, use_ema and lora is None, ema_decay, monitor, None, (), True,
                         scheduler_config,
                         sampler, sampler_steps, sampler_eta, timestep_spacing, log_sampler_steps, log_every_t,
                         test_metrics, steps_offset, set_alpha_to_one, clip_sample, clip_sample_range)
        conditioning_key = self._conditioning_key_of(concat_mode, conditioning_key, cond_stage_config)
        self._check_conditioning_options(cond_stage_config, conditioning_key, cond_stage_trainable, ucg_rate,
                                         guidance_scale, mask_to_latent)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        if self.first_stage_model is None:
            raise ValueError("first_stage_config: must be a target/params config of an autoencoder")
        freeze(self.first_stage_model)
        self.cond_stage_key = cond_stage_key
        self.conditioning_key = conditioning_key
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_is_first_stage = cond_stage_config == "__is_first_stage__"
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if self.cond_stage_model is not None and not cond_stage_trainable:
            freeze(self.cond_stage_model)
        self.ucg_rate = ucg_rate
        self.guidance_scale = guidance_scale
        self.mask_to_latent = mask_to_latent
        self.init_scale_factor(scale_factor, scale_by_std)
        self.cache_latents = self._check_cache_latents(cache_latents)
        if ckpt_path is not None:
            load_weights(self, ckpt_path, ignore_keys, strict)
        self.lora = lora
        if lora is not None:  # on the loaded base weights; the EMA (left out above) is of the LoRA weights alone
            add_lora(self.model, lora["rank"], lora["alpha"], lora["target_modules"])
            self.use_ema = use_ema
            self.model_ema = LitEma(self.model, decay=ema_decay) if use_ema else None

    def save_beside_checkpoint(self, checkpoint: Path) -> None:
        """With lora_config: the LoRA weights alone (the EMA's when use_ema) as `lora_file_beside(checkpoint)`."""
        if self.lora is not None:
            with self.ema_scope():
                save_lora(self.model, lora_file_beside(checkpoint), self.lora["save_layout"])

    @staticmethod
    def _check_cache_latents(options: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if options is None:
            return None
        unknown = sorted(set(options) - {"dir", "copies"})
        if unknown or not options.get("dir"):
            raise ValueError(f"cache_latents: takes {{dir, copies}} with dir required"
                             f"{' (unknown: ' + ', '.join(map(str, unknown)) + ')' if unknown else ''}")
        copies = options.get("copies", 1)
        if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
            raise ValueError(f"cache_latents.copies: must be an integer >= 1, got {copies!r}")
        return {"dir": str(options["dir"]), "copies": copies}

    @staticmethod
    def _conditioning_key_of(concat_mode: bool | None, conditioning_key: str | None,
                             cond_stage_config: Any) -> str | None:
        """CompVis' concat_mode: with no conditioning_key, a conditioning module enters by concat (true) or
        crossattn (false); an unconditional model stays unconditional."""
        if concat_mode is None or cond_stage_config == "__is_unconditional__":
            return conditioning_key
        implied = "concat" if concat_mode else "crossattn"
        if conditioning_key is not None and conditioning_key != implied:
            raise ValueError(f"concat_mode: {str(concat_mode).lower()} contradicts conditioning_key "
                             f"{conditioning_key!r}; drop concat_mode (conditioning_key decides)")
        return implied

    @staticmethod
    def _check_conditioning_options(cond_stage_config: Any, conditioning_key: str | None, cond_stage_trainable: bool,
                                    ucg_rate: float, guidance_scale: float, mask_to_latent: str) -> None:
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key: {conditioning_key!r} is not one of "
                             f"{', '.join(map(str, CONDITIONING_KEYS))}")
        unconditional = cond_stage_config == "__is_unconditional__"
        if unconditional != (conditioning_key is None):
            given = repr(cond_stage_config) if isinstance(cond_stage_config, str) else "(a module config)"
            raise ValueError(f"cond_stage_config {given} does not fit conditioning_key={conditioning_key!r}: an "
                             f"unconditional model has conditioning_key null "
                             f"and cond_stage_config '__is_unconditional__'; to feed batch[cond_stage_key] as it is "
                             f"(e.g. a mask), use cond_stage_config {{target: torch.nn.Identity}}")
        if cond_stage_trainable and isinstance(cond_stage_config, str):
            raise ValueError(f"cond_stage_trainable: {cond_stage_config!r} has nothing to train")
        if mask_to_latent not in MASK_TO_LATENT:
            raise ValueError(f"mask_to_latent: {mask_to_latent!r} is not one of {', '.join(MASK_TO_LATENT)}")
        if mask_to_latent == "encoder" and (isinstance(cond_stage_config, str)
                                            or conditioning_key not in ("concat", "hybrid")):
            raise ValueError("mask_to_latent='encoder' needs conditioning_key concat or hybrid and a cond_stage_config "
                             "module that outputs the latent grid, e.g. ldm.modules.encoders.MaskEncoder")
        if not 0.0 <= ucg_rate < 1.0:
            raise ValueError(f"ucg_rate: must be in [0, 1), got {ucg_rate}")
        if conditioning_key in (None, "adm") and (ucg_rate or guidance_scale != 1.0):
            raise ValueError(f"ucg_rate / guidance_scale: classifier-free guidance needs a null condition, which "
                             f"conditioning_key={conditioning_key!r} has not (use crossattn with a ClassEmbedder)")

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """Frozen stages stay in eval mode whatever the mode of the rest."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model, self.cond_stage_model] if self.cond_stage_trainable else [self.model]

    # ------------------------------------------------------------------------------------------ first stage
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, sample_posterior: bool) -> torch.Tensor:
        """x: (B, C, *S) -> unscaled latents (B, embed_dim, *S / f): a KL posterior's sample or mean, or the
        continuous (pre-quantisation) latents of a VQ first stage (`VQModelInterface`), which are deterministic."""
        dtype = next(self.first_stage_model.parameters()).dtype
        encoded = self.first_stage_model.encode(x.to(dtype))
        if isinstance(encoded, torch.Tensor):
            return encoded.float()
        return (encoded.sample() if sample_posterior else encoded.mode()).float()

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *S) -> the first stage's posterior [mean, logvar]: (B, 2 * embed_dim, *S / f), unclamped."""
        parameters = next(self.first_stage_model.parameters())
        encoded = self.first_stage_model.encode(x.to(parameters.device, parameters.dtype))
        if not isinstance(encoded, DiagonalGaussianDistribution):
            raise ValueError(f"cache_latents: needs a first stage with a Gaussian posterior (a KL autoencoder), "
                             f"{type(self.first_stage_model).__name__}.encode gave {type(encoded).__name__}")
        return encoded.parameters

    def prepare_training_data(self, datamodule: Any, fabric: Any) -> None:
        """With cache_latents, the train split becomes its latent cache (built or checked here, on every rank)."""
        if self.cache_latents is None:
            return
        configs = getattr(datamodule, "configs", None)
        if not isinstance(configs, Mapping) or "train" not in getattr(datamodule, "datasets", {}):
            raise ValueError(f"cache_latents: needs a data module with a configured train split "
                             f"(DataModuleFromConfig), got {type(datamodule).__name__}")
        carry = [self.cond_stage_key] if self.conditioning_key is not None else []
        train_config = configs["train"]
        plain = OmegaConf.to_container(train_config, resolve=True) if OmegaConf.is_config(train_config) \
            else train_config
        key = {"first_stage": weights_digest(self.first_stage_model),
               "data": config_digest({"train": plain, "image_key": self.first_stage_key, "carry": carry,
                                      "copies": self.cache_latents["copies"]})}
        datamodule.datasets["train"] = prepare_latent_cache(
            self.cache_latents["dir"], datamodule.datasets["train"], self.encode_moments, key, self.first_stage_key,
            carry, self.cache_latents["copies"], datamodule.batch_size, fabric)

    def images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """batch[first_stage_key]; for a cached batch, which holds none, the reconstruction of its posterior mean."""
        if LATENT_MOMENTS in batch:
            return self.decode(self.get_input(batch, sample_posterior=False))
        return super().images(batch)

    def get_input(self, batch: Mapping[str, Any], sample_posterior: bool = True) -> torch.Tensor:
        """scale_factor * z for z from batch[first_stage_key], or from the posterior moments of a cached batch
        (batch[LATENT_MOMENTS]): (B, channels, *image_size)."""
        if LATENT_MOMENTS in batch:
            posterior = DiagonalGaussianDistribution(batch[LATENT_MOMENTS])
            z = posterior.sample() if sample_posterior else posterior.mode()
        else:
            z = self.encode_first_stage(self.images(batch), sample_posterior)
        self.check_shape(z)
        if self.scale_by_std and self.training and not self.scale_factor_is_set():
            self.estimate_scale_factor(z)
        return z * self.checked_scale_factor()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """scaled latents (B, channels, *image_size) -> images (B, C, *S)."""
        dtype = next(self.first_stage_model.parameters()).dtype
        return self.first_stage_model.decode((z / self.checked_scale_factor()).to(dtype)).float()

    # ------------------------------------------------------------------------------------------ conditioning
    def encode_condition(self, raw: torch.Tensor) -> torch.Tensor:
        """The conditioning stage's output for batch[cond_stage_key]."""
        if self.cond_stage_is_first_stage:
            return self.encode_first_stage(raw.float(), sample_posterior=False) * self.checked_scale_factor()
        with contextlib.nullcontext() if self.cond_stage_trainable else torch.no_grad():
            return self.cond_stage_model(raw)

    def get_conditioning(self, batch: Mapping[str, Any]) -> tuple[Conditioning, Conditioning, torch.Tensor | None]:
        """(conditioning, null conditioning, raw batch[cond_stage_key]); the null is the conditioning stage's
        `null_condition` when it has one, zeros otherwise."""
        if self.conditioning_key is None:
            return Conditioning(), Conditioning(), None
        raw = batch_entry(batch, self.cond_stage_key, "LatentDiffusion (cond_stage_key)")
        c = self.encode_condition(raw)
        null_condition = getattr(self.cond_stage_model, "null_condition", None)
        null = null_condition(c) if null_condition is not None else torch.zeros_like(c)
        def build(value: torch.Tensor) -> Conditioning:
            return build_conditioning(self.conditioning_key, value, self.image_size, self.mask_to_latent)

        return build(c), build(null), raw

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str, max_images: int) -> dict[str, torch.Tensor]:
        """DDPM's images plus "reconstructions" (first stage of the inputs) and the spatial "conditioning"."""
        images = super().log_images(batch, split, max_images)
        batch = take(batch, max_images)
        images["reconstructions"] = self.decode(self.get_input(batch, sample_posterior=False))
        if self.conditioning_key is not None:
            images.update(self.conditioning_images(batch[self.cond_stage_key]))
        return images
