"""What the KL and VQ autoencoder losses share: pixel + LPIPS reconstruction and the patch-GAN game."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.modules.losses.adversarial import DISC_LOSSES, adaptive_weight
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.perceptual import SlicedLPIPS, load_lpips

Scalars = dict[str, torch.Tensor]


class ReconstructionGANLoss(nn.Module):
    """Per-element reconstruction error (pixel + per-item LPIPS) and a PatchGAN with its adaptive weight.

    Subclasses combine these with their regulariser (KL, codebook) in `forward`. The discriminator counts from
    step `disc_start` on, scaled by `disc_factor`; `perceptual_weight: 0` builds no LPIPS network (see `load_lpips`).
    """

    #: The config key that chooses the pixel loss, named in error messages.
    pixel_loss_key = "pixel_loss"

    def __init__(self, disc_start: int, pixelloss_weight: float, disc_num_layers: int, disc_in_channels: int,
                 disc_factor: float, disc_weight: float, perceptual_weight: float, use_actnorm: bool,
                 disc_conditional: bool, disc_loss: str, dims: int, pixel_loss: str, disc_ndf: int,
                 perceptual_net: str, perceptual_backbone_path: str | Path | None, perceptual_slices: int,
                 perceptual_network: nn.Module | None):
        super().__init__()
        name = type(self).__name__
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"{name}: disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"{name}: {self.pixel_loss_key} must be 'l1' or 'l2', got {pixel_loss!r}")
        self.dims = dims
        self.disc_start = disc_start
        self.pixel_weight = pixelloss_weight
        self.pixel_loss = pixel_loss
        self.perceptual_weight = perceptual_weight
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional
        self.perceptual_loss = None
        if perceptual_weight > 0:
            network = perceptual_network if perceptual_network is not None else load_lpips(perceptual_net,
                                                                                           perceptual_backbone_path)
            self.perceptual_loss = SlicedLPIPS(network, dims, perceptual_slices)
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm, dims)
        self.disc_loss = DISC_LOSSES[disc_loss]

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the adversarial terms count at this step (`disc_start` reached and `disc_factor` > 0)."""
        return self.disc_factor > 0 and global_step >= self.disc_start

    def idle_discriminator_loss(self) -> torch.Tensor:
        """A zero loss that still reaches every discriminator parameter, so a backward and a step stay defined."""
        return sum(p.sum() for p in self.discriminator.parameters()) * 0.0

    def _discriminate(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.disc_conditional != (cond is not None):
            raise ValueError(f"{type(self).__name__}: disc_conditional={self.disc_conditional} but cond is "
                             f"{'missing' if cond is None else 'given'}")
        return self.discriminator(x if cond is None else torch.cat([x, cond], dim=1))

    def _reconstruction(self, inputs: torch.Tensor, reconstructions: torch.Tensor, split: str,
                        log: Scalars) -> torch.Tensor:
        """Per-element pixelloss_weight * |x - x_rec| (or squared) + perceptual_weight * LPIPS (per item), fp32."""
        # fp32: callers sum this over every voxel, which bf16 cannot accumulate.
        diff = inputs.float() - reconstructions.float()
        rec = self.pixel_weight * (diff.abs() if self.pixel_loss == "l1" else diff.pow(2))
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions).float()  # (B,)
            rec = rec + self.perceptual_weight * p_loss.view(-1, *([1] * (rec.ndim - 1)))
            log[f"{split}/p_loss"] = p_loss.detach().mean()
        log[f"{split}/rec_loss"] = rec.detach().mean()
        return rec

    def _generator_term(self, nll_loss: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                        last_layer: torch.Tensor | None, cond: torch.Tensor | None, split: str,
                        log: Scalars) -> torch.Tensor:
        """lambda * disc_factor * G with G = -mean D(x_rec); zero before disc_start. Logs g_loss and d_weight."""
        disc_factor = self.disc_factor if self.discriminator_active(global_step) else 0.0
        g_loss = d_weight = torch.zeros((), device=reconstructions.device)
        term = g_loss
        if disc_factor > 0:
            g_loss = -self._discriminate(reconstructions, cond).float().mean()
            if reconstructions.requires_grad:  # no adaptive weight without gradients (validation)
                if last_layer is None:
                    raise ValueError(f"{type(self).__name__}: last_layer (the decoder's output weight) is needed "
                                     f"for the adaptive weight once the discriminator is active")
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.discriminator_weight
            term = d_weight * disc_factor * g_loss
        log.update({f"{split}/d_weight": d_weight.detach(), f"{split}/disc_factor": torch.tensor(disc_factor),
                    f"{split}/g_loss": g_loss.detach()})
        return term

    def _discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                            cond: torch.Tensor | None, split: str) -> tuple[torch.Tensor, Scalars]:
        disc_factor = self.disc_factor if self.discriminator_active(global_step) else 0.0
        logits_real = self._discriminate(inputs.detach(), cond).float()
        logits_fake = self._discriminate(reconstructions.detach(), cond).float()
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {f"{split}/disc_loss": d_loss.detach(), f"{split}/logits_real": logits_real.detach().mean(),
                        f"{split}/logits_fake": logits_fake.detach().mean()}
