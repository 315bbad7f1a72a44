"""Stage-1 autoencoders (CompVis `ldm.models.autoencoder` config keys) implementing the training-loop interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.engine.checkpoint import ignored, key_summary, load_checkpoint, load_selected_state
from ldm.models.test_metrics import TestMetrics, build_test_metrics, check_test_metrics
from ldm.modules.diffusionmodules.model import build_encoder_decoder
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.nn_dims import conv_nd
from ldm.modules.quantize import VectorQuantizer
from ldm.util import instantiate_from_config

# Loss scalars that mean nothing in validation (no gradients there, so no adaptive weight).
_TRAINING_ONLY_SCALARS = ("d_weight", "disc_factor")


def load_weights(model: nn.Module, ckpt_path: str | Path, ignore_keys: Sequence[str] = (),
                 strict: bool = True) -> tuple[list[str], list[str]]:
    """Load the `state_dict` of checkpoint `ckpt_path` (one of ours, read with weights_only) into `model`, or the
    weights of a pretrained file or folder in another layout (a CompVis / Stable Diffusion `.ckpt` / `.safetensors`,
    a diffusers folder: ldm/convert/pretrained.py), converted to `model`'s names first.

    Keys starting with any of `ignore_keys` are skipped in the checkpoint and in the model. Everything else must
    fit: a missing or unexpected key or a shape mismatch raises CheckpointError naming the file and the model, with
    the keys listed, unless `strict` is False, which loads the matching tensors and prints what was left out
    (see `ldm.engine.checkpoint.load_selected_state`). Returns (missing, unexpected) keys.
    """
    from ldm.convert.pretrained import converted_state  # imported here: ldm.convert builds this module's models

    state = converted_state(model, ckpt_path, ignore_keys)
    if state is None:
        state = load_checkpoint(ckpt_path)["state_dict"]
    missing, unexpected = load_selected_state(model, state, ckpt_path, ignore_keys, strict)
    skipped = sum(ignored(key, ignore_keys) for key in state)
    initialised = sum(ignored(key, ignore_keys) for key in model.state_dict())
    print(f"{type(model).__name__}: restored {len(state) - skipped - len(unexpected)} tensors from {ckpt_path}"
          + (f"; ignore_keys [{', '.join(ignore_keys)}]: {skipped} checkpoint entries skipped, {initialised} model "
             f"entries left as initialised" if ignore_keys else ""))
    for keys, what in ((missing, "missing keys, left as initialised"), (unexpected, "unexpected keys, not loaded")):
        if keys:
            print(f"  strict: false: {key_summary(keys, what, limit=10)}")
    return missing, unexpected


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per item, for images in [-1, 1] (range 2): x, y (B, ...) -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity per item (MONAI's SSIMMetric: Gaussian window 11, sigma 1.5, over channels and space) for
    images in [-1, 1]: x, y (B, C, *spatial) -> (B,). The window shrinks (odd) to fit spatial sides below 11."""
    from monai.metrics import SSIMMetric

    window = min(11, *x.shape[2:])
    window -= 1 - window % 2
    metric = SSIMMetric(spatial_dims=x.dim() - 2, data_range=data_range, win_size=window,
                        kernel_sigma=1.5 * window / 11, reduction="none")
    return metric(x.float(), y.float()).reshape(x.shape[0], -1).mean(dim=1)


class StageOneModel(nn.Module):
    """What the KL and VQ autoencoders share: encoder/decoder from `ddconfig`, the loss, batch handling, the two
    optimizers, the training / validation / test steps and image logging.

    Subclasses define `reconstruct(x, sample) -> (x_rec, regulariser)` and `loss_terms(x, x_rec, regulariser,
    optimizer_idx, split) -> (loss, scalars)`. Batches hold (B, in_channels, *spatial) images in [-1, 1] under
    `image_key`. `lossconfig` may be `torch.nn.Identity` for a model that only encodes and decodes (inside a latent
    diffusion model); training then needs a loss with a `discriminator`.

    `discriminator_reuses_reconstruction` (default true): once the discriminator is active, its step scores the
    (detached) reconstruction of the autoencoder step just before it, on the same batch, instead of running the
    autoencoder a second time as CompVis does (which reconstructs again after the autoencoder's optimizer step). It
    saves one full encoder + decoder forward per step; the discriminator then sees a reconstruction one update
    older, as in most GAN training loops. False restores the CompVis recomputation.

    test_metrics: what the test stage scores its reconstructions with against the inputs, e.g.
    `{metrics: [psnr, ssim, ms_ssim]}` (`ldm.models.test_metrics`), written to metrics/test.json.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Any, image_key: str, colorize_nlabels: int | None,
                 monitor: str | None, discriminator_reuses_reconstruction: bool = True,
                 test_metrics: Mapping[str, Any] | None = None):
        super().__init__()
        self.discriminator_reuses_reconstruction = discriminator_reuses_reconstruction
        self._for_discriminator: tuple | None = None  # (batch_idx, reconstruction, regulariser) of the last AE step
        ddconfig = dict(ddconfig)
        self.encoder, self.decoder = build_encoder_decoder(ddconfig)
        self.dims = self.encoder.dims
        self.in_channels = int(ddconfig["in_channels"])
        self.z_channels = int(ddconfig["z_channels"])
        self.loss = instantiate_from_config(lossconfig)
        loss_dims = getattr(self.loss, "dims", self.dims)
        if loss_dims != self.dims:
            raise ValueError(f"{type(self).__name__}: lossconfig has dims={loss_dims} but ddconfig has "
                             f"dims={self.dims}")
        self.image_key = image_key
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels))
        self.monitor = monitor
        self.test_metrics = check_test_metrics(test_metrics)
        self.learning_rate = 0.0
        self.global_step = 0

    def reconstruct(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, Any]:
        """x: (B, C, *spatial) -> (reconstruction, what the loss regularises); `sample=False` is deterministic."""
        raise NotImplementedError

    def loss_terms(self, x: torch.Tensor, reconstructions: torch.Tensor, regulariser: Any, optimizer_idx: int,
                   split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss for `optimizer_idx` and its scalars named `<split>/<term>`."""
        raise NotImplementedError

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The images `batch[image_key]`: (B, in_channels, *spatial) in the model's floating dtype."""
        if self.image_key not in batch:
            raise KeyError(f"{type(self).__name__}: batch has no {self.image_key!r} entry "
                           f"(keys: {', '.join(map(str, batch))}); set image_key")
        x = batch[self.image_key]
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: batch[{self.image_key!r}] has shape {tuple(x.shape)}, expected "
                             f"(B, {self.in_channels}, {', '.join('DHW'[3 - self.dims:])}) for dims={self.dims}")
        return x.to(self.encoder.conv_in.weight.dtype)  # e.g. float64 volumes from NIfTI files

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where the loss balances reconstruction and adversarial gradients."""
        return self.decoder.conv_out.weight

    # --------------------------------------------------------------------------------------- loop interface
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[autoencoder (everything trainable outside the discriminator, e.g. loss.logvar), discriminator], both
        Adam with betas (0.5, 0.9) at `learning_rate`, fused (one kernel per step for all parameters of a device and
        dtype)."""
        if not hasattr(self.loss, "discriminator"):
            raise ValueError(f"{type(self).__name__}: cannot train with lossconfig {type(self.loss).__name__} "
                             f"(it has no discriminator; use a loss from ldm.modules.losses)")
        discriminator = list(self.loss.discriminator.parameters())
        chosen = {id(p) for p in discriminator}
        autoencoder = [p for p in self.parameters() if p.requires_grad and id(p) not in chosen]
        return [torch.optim.Adam(autoencoder, lr=self.learning_rate, betas=(0.5, 0.9), fused=True),
                torch.optim.Adam(discriminator, lr=self.learning_rate, betas=(0.5, 0.9), fused=True)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int, optimizer_idx: int):
        """optimizer 0: autoencoder loss; 1: discriminator loss. Returns (loss, scalars named train/<term>)."""
        x = self.get_input(batch)
        if optimizer_idx == 0:
            reconstructions, regulariser = self.reconstruct(x, sample=True)
            if self.discriminator_reuses_reconstruction and self.loss.discriminator_active(self.global_step):
                self._for_discriminator = (batch_idx, reconstructions.detach(), regulariser)
            return self.loss_terms(x, reconstructions, regulariser, 0, "train")
        stashed, self._for_discriminator = self._for_discriminator, None
        if not self.loss.discriminator_active(self.global_step):
            # Idle before disc_start: skip the autoencoder forward that would only be multiplied by zero.
            return self.loss.idle_discriminator_loss(), {"train/disc_loss": torch.zeros(())}
        if stashed is not None and stashed[0] == batch_idx:
            _, reconstructions, regulariser = stashed
        else:
            with torch.no_grad():  # the discriminator sees detached reconstructions
                reconstructions, regulariser = self.reconstruct(x, sample=True)
        return self.loss_terms(x, reconstructions, regulariser, 1, "train")

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """The loss terms of the deterministic reconstruction (rec, regulariser, total, ...), and the image metrics
        of the clamped reconstruction: L1 (mean absolute error), PSNR in dB and SSIM (batch means)."""
        x = self.get_input(batch)
        reconstructions, regulariser = self.reconstruct(x, sample=False)
        _, scalars = self.loss_terms(x, reconstructions, regulariser, 0, "val")
        scalars = {k: v for k, v in scalars.items() if k.split("/")[-1] not in _TRAINING_ONLY_SCALARS}
        clamped = reconstructions.clamp(-1, 1)
        return {**scalars, "val/l1": (clamped.float() - x.float()).abs().mean(), "val/psnr": psnr(clamped, x).mean(),
                "val/ssim": ssim(clamped, x).mean()}

    @torch.no_grad()
    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"inputs", "reconstructions"}: (B, C, *spatial) in [-1, 1], deterministic reconstructions."""
        x = self.get_input(batch)
        reconstructions, _ = self.reconstruct(x, sample=False)
        return {"inputs": x, "reconstructions": reconstructions.clamp(-1, 1)}

    def test_evaluator(self) -> TestMetrics | None:
        """Scores of the test stage's reconstructions against their inputs, if `test_metrics` is configured."""
        return build_test_metrics(self.test_metrics, self.image_key, "reconstructions")

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str, max_images: int) -> dict[str, torch.Tensor]:
        """{"inputs", "reconstructions"}: (<= max_images, C, *spatial); label maps are shown as RGB."""
        x = self.get_input(batch)[:max_images]
        images = {"inputs": x, "reconstructions": self.reconstruct(x, sample=True)[0]}
        return self._colorized(images)

    def _colorized(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.to_rgb(v) for k, v in images.items()} if hasattr(self, "colorize") else images

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Label maps (B, colorize_nlabels, *spatial) -> RGB (B, 3, *spatial) in [-1, 1], a fixed random projection."""
        x = torch.einsum("oc,bc...->bo...", self.colorize, x.float())
        low = x.flatten(1).amin(dim=1).view(-1, *([1] * (x.ndim - 1)))
        high = x.flatten(1).amax(dim=1).view(-1, *([1] * (x.ndim - 1)))
        return 2.0 * (x - low) / (high - low).clamp_min(1e-8) - 1.0


class AutoencoderKL(StageOneModel):
    """KL-regularised autoencoder: x (B, C, *spatial) in [-1, 1] <-> z (B, embed_dim, *spatial / f), f = 2**(L-1).

    ddconfig: the Encoder/Decoder keys (with `dims: 3` for volumes; `double_z` must be true); lossconfig: e.g.
    `ldm.modules.losses.LPIPSWithDiscriminator`. Logged images add "samples": decoded N(0, I) latents.
    ckpt_path / ignore_keys / strict: initial weights, see `load_weights` (strict: a checkpoint that does not fit
    outside `ignore_keys` is an error; false loads what matches).
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Any, embed_dim: int, ckpt_path: str | None = None,
                 ignore_keys: Sequence[str] = (), strict: bool = True, image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None,
                 discriminator_reuses_reconstruction: bool = True, test_metrics: Mapping[str, Any] | None = None):
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL: ddconfig.double_z must be true "
                             "(the encoder predicts mean and log-variance)")
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor,
                         discriminator_reuses_reconstruction, test_metrics)
        self.embed_dim = embed_dim
        self.quant_conv = conv_nd(self.dims, 2 * self.z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = conv_nd(self.dims, embed_dim, self.z_channels, 1)
        if ckpt_path is not None:
            load_weights(self, ckpt_path, ignore_keys, strict)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x: (B, in_channels, *spatial) -> posterior over z: (B, embed_dim, *spatial / f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, *latent) -> x: (B, out_ch, *latent * f)."""
        # Posterior samples are fp32 (see DiagonalGaussianDistribution); a bf16/fp16 model needs its own dtype.
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(self, x: torch.Tensor,
                sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """x: (B, C, *spatial) -> (reconstruction (B, out_ch, *spatial), posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def reconstruct(self, x, sample):
        return self(x, sample_posterior=sample)

    def loss_terms(self, x, reconstructions, posterior, optimizer_idx, split):
        last_layer = self.get_last_layer() if optimizer_idx == 0 else None
        return self.loss(x, reconstructions, posterior, optimizer_idx, self.global_step, last_layer=last_layer,
                         split=split)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str, max_images: int) -> dict[str, torch.Tensor]:
        """{"inputs", "reconstructions", "samples" (decoded random latents)}: (<= max_images, C, *spatial)."""
        x = self.get_input(batch)[:max_images]
        reconstructions, posterior = self(x)
        samples = self.decode(torch.randn_like(posterior.mean))
        return self._colorized({"inputs": x, "reconstructions": reconstructions, "samples": samples})


class VQModel(StageOneModel):
    """Vector-quantised autoencoder: x (B, C, *spatial) <-> codes (B, *spatial / f) of an n_embed-entry codebook.

    ddconfig as for AutoencoderKL (usually `double_z: false`); lossconfig: e.g.
    `ldm.modules.losses.VQLPIPSWithDiscriminator`. beta, ema_decay, dead_code_threshold: see VectorQuantizer.
    Training logs the codebook's batch perplexity and usage. ckpt_path / ignore_keys / strict: as for AutoencoderKL.
    """

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Any, n_embed: int, embed_dim: int,
                 beta: float = 0.25, ema_decay: float | None = None, dead_code_threshold: float = 0.0,
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), strict: bool = True,
                 image_key: str = "image", colorize_nlabels: int | None = None, monitor: str | None = None,
                 discriminator_reuses_reconstruction: bool = True, test_metrics: Mapping[str, Any] | None = None):
        super().__init__(ddconfig, lossconfig, image_key, colorize_nlabels, monitor,
                         discriminator_reuses_reconstruction, test_metrics)
        encoder_channels = self.encoder.conv_out.out_channels
        self.embed_dim = embed_dim
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta, ema_decay, dead_code_threshold)
        self.quant_conv = conv_nd(self.dims, encoder_channels, embed_dim, 1)
        self.post_quant_conv = conv_nd(self.dims, embed_dim, self.z_channels, 1)
        if ckpt_path is not None:
            load_weights(self, ckpt_path, ignore_keys, strict)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x: (B, in_channels, *spatial) -> (quantised latents (B, embed_dim, *latent), codebook loss, info)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """quant: (B, embed_dim, *latent) -> x: (B, out_ch, *latent * f)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, *latent) int64 -> x: (B, out_ch, *latent * f)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x: (B, C, *spatial) -> (reconstruction, codebook loss, info with indices / perplexity / usage)."""
        quant, codebook_loss, info = self.encode(x)
        return self.decode(quant), codebook_loss, info

    def reconstruct(self, x, sample):
        reconstructions, codebook_loss, info = self(x)
        return reconstructions, (codebook_loss, info)

    def loss_terms(self, x, reconstructions, regulariser, optimizer_idx, split):
        codebook_loss, info = regulariser
        last_layer = self.get_last_layer() if optimizer_idx == 0 else None
        loss, scalars = self.loss(codebook_loss, x, reconstructions, optimizer_idx, self.global_step,
                                  last_layer=last_layer, split=split)
        return loss, {**scalars, f"{split}/perplexity": info["perplexity"], f"{split}/codebook_usage": info["usage"]}


class VQModelInterface(VQModel):
    """A VQModel as a latent diffusion model's first stage: `encode` stops before quantisation, `decode` quantises."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, *spatial) -> continuous latents (B, embed_dim, *latent)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """h: (B, embed_dim, *latent) -> x, snapping h to the codebook first unless `force_not_quantize`."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        quant, codebook_loss, info = self.quantize(self.encode(x))
        return self.decode(quant, force_not_quantize=True), codebook_loss, info
