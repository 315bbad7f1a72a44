"""sgm's `DiffusionEngine` (Stability's generative-models) as a model of the training loop (`ldm.engine.interface`):
a network wrapped by a denoiser (`edm.denoiser`), a `GeneralConditioner`, a frozen first stage, a loss
(`edm.loss.StandardDiffusionLoss`) and a sampler (`edm.samplers`), each built from its `*_config` section.

The formulas live in `ldm.models.diffusion.edm`; this class wires data, networks, EMA and the optimizer to them.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.models.autoencoder import load_weights
from ldm.models.diffusion.ddpm import as_strip, batch_entry, freeze, take
from ldm.models.diffusion.edm.guiders import VanillaCFG
from ldm.models.diffusion.latent_scale import LatentScale
from ldm.models.test_metrics import TestMetrics, build_test_metrics, check_test_metrics
from ldm.modules.conditioner import GeneralConditioner
from ldm.modules.ema import LitEma
from ldm.modules.lora import add_lora, lora_file_beside, lora_options, save_lora
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config

Cond = dict[str, torch.Tensor]


class IdentityFirstStage(nn.Module):
    """A first stage for diffusion in pixel space: encode and decode are the identity."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class OpenAIWrapper(nn.Module):
    """The network called as sgm calls it: `(x, c_noise, cond)` with cond's `concat` stacked on x along channels,
    `crossattn` as the context and `vector` as y; inputs cast to the network's dtype. The UNet is `diffusion_model`
    (state-dict keys `model.diffusion_model.*`, as in sgm checkpoints)."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(self.diffusion_model.parameters()).dtype
        if "concat" in cond:
            x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
        cast = {name: cond[name].to(dtype) for name in ("crossattn", "vector") if name in cond}
        return self.diffusion_model(x.to(dtype), t, context=cast.get("crossattn"), y=cast.get("vector"))


class DiffusionEngine(LatentScale, nn.Module):
    """Diffusion in the latent space of a frozen first stage, latents z = scale_factor * encode(batch[input_key]).

    network_config: the UNet; denoiser_config: `Denoiser` / `DiscreteDenoiser` and its scaling; conditioner_config:
    a `GeneralConditioner` (default: unconditional); first_stage_config: the autoencoder (its weights from its own
    `ckpt_path`) or `IdentityFirstStage`; loss_fn_config: `StandardDiffusionLoss` (needed to train); sampler_config:
    an `edm.samplers` class (needed to sample); optimizer_config: `target` (default torch.optim.AdamW) and `params`
    besides the learning rate; scheduler_config: a LambdaLR schedule as in `DDPM`. disable_first_stage_autocast: the
    first stage runs in float32 outside autocast; en_and_decode_n_samples_a_time: chunk size of first-stage calls.
    use_ema / ema_decay_rate: an EMA of the network (`model_ema`). log_keys: batch entries shown by `log_images`
    next to the samples (default: the conditioner's spatial inputs). latent_shape: (C, *spatial) of the latents, for
    `sample.py` (training and the test stage take it from the batch). ckpt_path: initial weights of the whole
    engine (ours, or an SD single file / diffusers folder: its UNet and VAE, ldm/convert/pretrained.py);
    ignore_keys: prefixes left out of it (e.g. [conditioner.] for text encoders that load their own weights).
    monitor / test_metrics: as for `DDPM`. lora_config: LoRA on the network after ckpt_path loads, as for
    `LatentDiffusion` (only the LoRA weights train; the EMA averages them alone; files beside each checkpoint).
    scale_by_std: scale_factor = 1 / std of the first training batch's latents (all ranks), kept as the buffer
    `scale_factor` in checkpoints (`ldm.models.diffusion.latent_scale`); it replaces a given scale_factor, so giving
    both is an error. Without it scale_factor is a plain float, as in sgm (whose checkpoints hold no `scale_factor`).
    """

    def __init__(self, network_config: Mapping[str, Any], denoiser_config: Mapping[str, Any],
                 first_stage_config: Mapping[str, Any], conditioner_config: Mapping[str, Any] | None = None,
                 sampler_config: Mapping[str, Any] | None = None, optimizer_config: Mapping[str, Any] | None = None,
                 scheduler_config: Mapping[str, Any] | None = None, loss_fn_config: Mapping[str, Any] | None = None,
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), use_ema: bool = False,
                 ema_decay_rate: float = 0.9999, scale_factor: float = 1.0, scale_by_std: bool = False,
                 disable_first_stage_autocast: bool = False, input_key: str = "jpg",
                 log_keys: Sequence[str] | None = None, en_and_decode_n_samples_a_time: int | None = None,
                 latent_shape: Sequence[int] | None = None, monitor: str | None = "val/loss",
                 test_metrics: Mapping[str, Any] | None = None, lora_config: Mapping[str, Any] | None = None):
        super().__init__()
        self.lora = lora_options(lora_config)
        network = instantiate_from_config(network_config)
        self.dims = getattr(network, "dims", 2)
        self.model = OpenAIWrapper(network)
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = (instantiate_from_config(conditioner_config) if conditioner_config is not None
                            else GeneralConditioner([]))
        self.first_stage_model = freeze(instantiate_from_config(first_stage_config))
        self.loss_fn = instantiate_from_config(loss_fn_config) if loss_fn_config is not None else None
        self.sampler = instantiate_from_config(sampler_config) if sampler_config is not None else None
        guider = getattr(self.sampler, "guider", None)
        if isinstance(guider, VanillaCFG) and not self.conditioner.dropped_keys:
            raise ValueError(f"sampler_config.params.guider_config: VanillaCFG(scale={guider.scale}) needs "
                             f"an unconditional prediction, but no embedder of the conditioner was trained with a "
                             f"ucg_rate > 0 (use IdentityGuider, or give an embedder a ucg_rate)")
        self.optimizer_config = dict(optimizer_config or {"target": "torch.optim.AdamW"})
        unknown = sorted(set(self.optimizer_config) - {"target", "params"})
        if unknown:
            raise ValueError(f"optimizer_config: unknown keys {', '.join(map(repr, unknown))} (target, params)")
        get_obj_from_str(self.optimizer_config.get("target", ""), "optimizer_config.target")
        self.scheduler_config = scheduler_config
        if not scale_factor > 0:
            raise ValueError(f"scale_factor: must be positive (latents are scale_factor * encode(x)), "
                             f"got {scale_factor}")
        if scale_by_std and scale_factor != 1.0:
            raise ValueError(f"scale_factor: {scale_factor} is given but scale_by_std estimates it from the first "
                             f"training batch; drop one of them")
        self.init_scale_factor(scale_factor, scale_by_std, buffer=False)
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.input_key = input_key
        self.log_keys = None if log_keys is None else list(log_keys)
        if en_and_decode_n_samples_a_time is not None and en_and_decode_n_samples_a_time < 1:
            raise ValueError(f"en_and_decode_n_samples_a_time: must be >= 1, got {en_and_decode_n_samples_a_time}")
        self.chunk = en_and_decode_n_samples_a_time
        if latent_shape is not None and len(latent_shape) != self.dims + 1:
            raise ValueError(f"latent_shape: {list(latent_shape)} is not (channels, *{self.dims} spatial sizes)")
        self.latent_shape = None if latent_shape is None else tuple(int(s) for s in latent_shape)
        self.use_ema = use_ema
        self.model_ema = LitEma(self.model, decay=ema_decay_rate) if use_ema and self.lora is None else None
        self.monitor = monitor
        self.test_metrics = check_test_metrics(test_metrics)
        self.learning_rate = 0.0
        self.global_step = 0
        self._latent_scale_checked = False
        if ckpt_path is not None:
            load_weights(self, ckpt_path, ignore_keys)
        if self.lora is not None:
            if any(spec.is_trainable for spec in self.conditioner.specs):
                raise ValueError("lora_config: only the network's LoRA weights train; set is_trainable: false on "
                                 "every embedder of conditioner_config")
            add_lora(network, self.lora["rank"], self.lora["alpha"], self.lora["target_modules"])
            self.model_ema = LitEma(self.model, decay=ema_decay_rate) if use_ema else None  # of the LoRA alone

    def save_beside_checkpoint(self, checkpoint: Path) -> None:
        """With lora_config: the LoRA weights alone (the EMA's when use_ema) as `lora_file_beside(checkpoint)`."""
        if self.lora is not None:
            with self.ema_scope():
                save_lora(self.model.diffusion_model, lora_file_beside(checkpoint), self.lora["save_layout"])

    def train(self, mode: bool = True) -> "DiffusionEngine":
        """The first stage stays in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        return self

    # ------------------------------------------------------------------------------------------ first stage
    def _first_stage(self, method: str, x: torch.Tensor) -> torch.Tensor:
        dtype = next(iter(self.first_stage_model.parameters()), x).dtype
        autocast = (torch.autocast(x.device.type, enabled=False) if self.disable_first_stage_autocast
                    else contextlib.nullcontext())
        outputs = []
        with torch.no_grad(), autocast:
            for part in x.split(self.chunk or x.shape[0]):
                out = getattr(self.first_stage_model, method)(part.to(dtype))
                outputs.append(out if isinstance(out, torch.Tensor) else out.sample())
        return torch.cat(outputs).float()

    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, *S) -> latents scale_factor * z (a KL posterior's sample): (B, c, *S / f) float32. With
        scale_by_std the first call in training mode sets scale_factor from these z."""
        z = self._first_stage("encode", x)
        if self.scale_by_std and self.training and not self.scale_factor_is_set():
            self.estimate_scale_factor(z)
        return self.checked_scale_factor() * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, c, *s) -> images decode(z / scale_factor): (B, C, *S) float32."""
        return self._first_stage("decode", z / self.checked_scale_factor())

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = batch_entry(batch, self.input_key, "DiffusionEngine (input_key)")
        if x.ndim != self.dims + 2:
            raise ValueError(f"DiffusionEngine: batch[{self.input_key!r}] has shape {tuple(x.shape)}, expected "
                             f"{self.dims} spatial dims")
        return x.float()

    @torch.no_grad()
    def check_against_data(self, item: Mapping[str, Any] | None, where: str = "model.params",
                           data_where: str = "data") -> None:
        """ConfigError naming the keys when one data item (unbatched) cannot go through: its latents and the
        conditioner's outputs against the network's in_channels, adm_in_channels and context_dim, and latent_shape."""
        if item is None:
            return
        batch = {k: torch.as_tensor(v)[None] for k, v in item.items() if isinstance(v, (torch.Tensor, int, float))}
        net, net_where = self.model.diffusion_model, f"{where}.network_config.params"
        if self.input_key not in batch:
            raise ConfigError(f"{where}.input_key={self.input_key!r}: {data_where} items have no such entry "
                              f"(keys: {', '.join(map(str, item))})")
        image_channels = getattr(self.first_stage_model, "in_channels", None)
        image = self.get_input(batch)
        if image_channels is not None and image.shape[1] != image_channels:
            raise ConfigError(f"{data_where} items[{self.input_key!r}] have {image.shape[1]} channels but "
                              f"{where}.first_stage_config.params.ddconfig.in_channels={image_channels}")
        latent = self._latent_shape_of(image, f"{data_where} items[{self.input_key!r}]")
        if self.latent_shape is not None and latent != self.latent_shape:
            raise ConfigError(f"{where}.latent_shape={list(self.latent_shape)} but {data_where} items become latents "
                              f"of shape {list(latent)}")
        try:
            cond = self.conditioner.eval()(batch)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{where}.conditioner_config: {err.args[0]}") from None
        finally:
            self.conditioner.train(self.training)
        concat = cond["concat"].shape[1] if "concat" in cond else 0
        if "concat" in cond and tuple(cond["concat"].shape[2:]) != latent[1:]:
            raise ConfigError(f"{where}.conditioner_config: the concat conditioning has spatial size "
                              f"{list(cond['concat'].shape[2:])}, the latents {list(latent[1:])}")
        in_channels = getattr(net, "in_channels", None)
        if in_channels is not None and in_channels != latent[0] + concat:
            raise ConfigError(f"{net_where}.in_channels={in_channels} but {latent[0]} latent channels"
                              + (f" + {concat} concat channels of the conditioner" if concat else "")
                              + f" = {latent[0] + concat} reach the network")
        vector = cond["vector"].shape[1] if "vector" in cond else None
        if vector != getattr(net, "adm_in_channels", None):
            raise ConfigError(f"{net_where}.adm_in_channels={getattr(net, 'adm_in_channels', None)} but the "
                              f"conditioner's vector outputs have width {vector} (num_classes: sequential takes them)")
        context = cond["crossattn"].shape[2] if "crossattn" in cond else None
        if context != getattr(net, "context_dim", None):
            raise ConfigError(f"{net_where}.context_dim={getattr(net, 'context_dim', None)} but the conditioner's "
                              f"crossattn outputs have width {context}")

    def _latent_shape_of(self, image: torch.Tensor, what: str) -> tuple[int, ...]:
        """(c, *s) of the latents of image: (1, C, *S), from the first stage's embed_dim and downsampling factor
        (encoding a full-size volume on the host would slow every start), else by encoding it."""
        if isinstance(self.first_stage_model, IdentityFirstStage):
            return tuple(image.shape[1:])
        embed_dim = getattr(self.first_stage_model, "embed_dim", None)
        factor = getattr(getattr(self.first_stage_model, "encoder", None), "factor", None)
        if embed_dim is None or factor is None:  # not encode_first_stage: one item must not set scale_by_std's factor
            return tuple(self._first_stage("encode", image).shape[1:])
        if any(size % factor for size in image.shape[2:]):
            raise ConfigError(f"{what} of spatial size {list(image.shape[2:])} are not divisible by the first "
                              f"stage's downsampling factor {factor}")
        return (int(embed_dim), *(int(size) // factor for size in image.shape[2:]))

    # ------------------------------------------------------------------------------------------- diffusion
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """D(x; sigma, cond) with the current network weights."""
        return self.denoiser(self.model, x, sigma, cond)

    def loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        if self.loss_fn is None:
            raise ValueError("DiffusionEngine: loss_fn_config is not set; it is needed to train and validate")
        z = self.encode_first_stage(self.get_input(batch))
        if self.training and not self._latent_scale_checked:
            self._latent_scale_checked = True
            self.warn_if_latents_miss_sigma_data(z)
        return self.loss_fn(self.model, self.denoiser, self.conditioner(batch), z, generator).mean()

    LATENT_STD_TOLERANCE = 1.5  # a factor either way

    def warn_if_latents_miss_sigma_data(self, z: torch.Tensor) -> None:
        """Warns when the latents' std (z: (B, c, *s), scaled) is off the denoiser's sigma_data (1 without one) by
        more than LATENT_STD_TOLERANCE: the preconditioning assumes it, and a mismatch trains far worse (the
        digits demo: class agreement 0.17 with latents of std 2.94, 0.96 with scale_factor 1 / 2.94)."""
        sigma_data = float(getattr(getattr(self.denoiser, "scaling", None), "sigma_data", 1.0))
        std = float(z.detach().float().std())
        if std > 0 and abs(math.log(std / sigma_data)) > math.log(self.LATENT_STD_TOLERANCE):
            scale_factor = f"model.params.scale_factor to about {float(self.scale_factor) * sigma_data / std:.3g}"
            fix = (f"scale_by_std gives the batch it estimates from std 1: set the scaling's sigma_data to 1, or "
                   f"drop scale_by_std and set {scale_factor}" if self.scale_by_std else f"set {scale_factor}")
            warnings.warn(f"DiffusionEngine: the first training batch's latents (scale_factor * encode(x)) have std "
                          f"{std:.3g} where the denoiser expects {sigma_data:g} (sigma_data); {fix}", stacklevel=2)

    def conditionings(self, batch: Mapping[str, Any]) -> tuple[Cond, Cond]:
        """(c, uc): the embedders trained with condition dropout give zeros in uc, as the dropout trained them."""
        return self.conditioner.get_unconditional_conditioning(
            batch, force_uc_zero_embeddings=self.conditioner.dropped_keys)

    @torch.no_grad()
    def sample(self, cond: Cond, uc: Cond | None, batch_size: int, shape: Sequence[int],
               noise: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Latents (batch_size, *shape) from unit noise (given, or drawn) with the configured sampler."""
        if self.sampler is None:
            raise ValueError("DiffusionEngine: sampler_config is not set; it is needed to sample")
        device = next(self.model.parameters()).device
        x = noise if noise is not None else torch.randn(batch_size, *shape, device=device)
        return self.sampler(self.denoise, x.to(device), cond, uc, callback=callback)

    @contextlib.contextmanager
    def ema_scope(self):
        """The block runs with the EMA weights in the network while `use_ema`."""
        if self.model_ema is None or not self.use_ema:
            yield
            return
        with self.model_ema.average_parameters(self.model):
            yield

    # ------------------------------------------------------------------------------------ loop interface
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The network's and the trainable embedders' parameters that require gradients (with LoRA: its weights)."""
        embedders = [p for spec, embedder in zip(self.conditioner.specs, self.conditioner.embedders)
                     if spec.is_trainable for p in embedder.parameters()]
        return [p for p in list(self.model.parameters()) + embedders if p.requires_grad]

    def configure_optimizers(self):
        """optimizer_config's optimizer over `trainable_parameters`; LambdaLR when scheduler_config is set."""
        optimizer_cls = get_obj_from_str(self.optimizer_config["target"], "optimizer_config.target")
        optimizer = optimizer_cls(self.trainable_parameters(), lr=self.learning_rate,
                                  **dict(self.optimizer_config.get("params") or {}))
        if self.scheduler_config is None:
            return [optimizer]
        schedule = instantiate_from_config(self.scheduler_config)
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int, optimizer_idx: int):
        loss = self.loss(batch)
        return loss, {"train/loss": loss.detach()}

    def on_train_batch_end(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.model_ema is not None:
            self.model_ema(self.model)

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"val/loss"} with the EMA weights, noise levels and noise seeded by batch_idx."""
        device = self.get_input(batch).device
        with self.ema_scope():
            return {"val/loss": self.loss(batch, torch.Generator(device=device).manual_seed(batch_idx))}

    def spatial_conditions(self, batch: Mapping[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The batch entries of `keys` that are images of the data's dims (masks), as floats."""
        return {key: batch[key].float() for key in keys
                if isinstance(batch.get(key), torch.Tensor) and batch[key].ndim == self.dims + 2}

    @torch.no_grad()
    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"samples": (B, C, *S) in [-1, 1], "conditioning": the first spatial condition, if any}."""
        z = self.encode_first_stage(self.get_input(batch))
        cond, uc = self.conditionings(batch)
        with self.ema_scope():
            samples = self.decode_first_stage(self.sample(cond, uc, z.shape[0], z.shape[1:]))
        spatial = list(self.spatial_conditions(batch, self.conditioner.input_keys).values())
        return {"samples": samples.clamp(-1, 1), **({"conditioning": spatial[0]} if spatial else {})}

    def test_evaluator(self) -> TestMetrics | None:
        """Scores of the test samples against the batch's images (and its one condition, if the conditioner has one
        input), if `test_metrics` is set."""
        keys = self.conditioner.input_keys
        return build_test_metrics(self.test_metrics, self.input_key, "samples", keys[0] if len(keys) == 1 else None)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str, max_images: int) -> dict[str, torch.Tensor]:
        """{"inputs", "reconstructions", "samples", "denoise_row", and the `log_keys` images}: at most max_images."""
        batch = take(batch, max_images)
        x = self.get_input(batch)
        z = self.encode_first_stage(x)
        cond, uc = self.conditionings(batch)
        denoised = []
        with self.ema_scope():
            samples = self.sample(cond, uc, z.shape[0], z.shape[1:],
                                  callback=lambda step: denoised.append(step["denoised"][:1]))
        keys = self.log_keys if self.log_keys is not None else self.conditioner.input_keys
        return {"inputs": x, "reconstructions": self.decode_first_stage(z), "samples": self.decode_first_stage(samples),
                "denoise_row": as_strip(self.decode_first_stage(torch.cat(denoised))),
                **self.spatial_conditions(batch, keys)}
