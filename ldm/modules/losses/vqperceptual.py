"""The VQ autoencoder's training objective: reconstruction (+LPIPS), codebook loss, and a patch GAN."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.modules.losses.base import ReconstructionGANLoss, Scalars


class VQLPIPSWithDiscriminator(ReconstructionGANLoss):
    """L = mean(rec) + codebook_weight * codebook_loss + lambda * disc_factor * G; the discriminator's loss for 1.

    rec is the per-element pixel (`pixel_loss` l1 or l2) + per-item LPIPS error, averaged over all elements (the
    VQGAN scaling); the GAN terms are those of `LPIPSWithDiscriminator`.
    """

    def __init__(self, disc_start: int, codebook_weight: float = 1.0, pixelloss_weight: float = 1.0,
                 disc_num_layers: int = 3, disc_in_channels: int = 3, disc_factor: float = 1.0,
                 disc_weight: float = 1.0, perceptual_weight: float = 1.0, use_actnorm: bool = False,
                 disc_conditional: bool = False, disc_ndf: int = 64, disc_loss: str = "hinge", pixel_loss: str = "l1",
                 dims: int = 2, perceptual_net: str = "vgg", perceptual_backbone_path: str | Path | None = None,
                 perceptual_slices: int = 4, perceptual_network: nn.Module | None = None):
        """`perceptual_network` replaces the LPIPS network that `perceptual_net` / `perceptual_backbone_path` load."""
        super().__init__(disc_start, pixelloss_weight, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                         perceptual_weight, use_actnorm, disc_conditional, disc_loss, dims, pixel_loss, disc_ndf,
                         perceptual_net, perceptual_backbone_path, perceptual_slices, perceptual_network)
        self.codebook_weight = codebook_weight

    def forward(self, codebook_loss: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, split: str = "train") -> tuple[torch.Tensor, Scalars]:
        """codebook_loss: scalar from the quantizer; inputs, reconstructions: (B, C, *spatial) -> (loss, scalars)."""
        if optimizer_idx == 1:
            return self._discriminator_loss(inputs, reconstructions, global_step, cond, split)
        if optimizer_idx != 0:
            raise ValueError(f"VQLPIPSWithDiscriminator: optimizer_idx must be 0 or 1, got {optimizer_idx}")
        log: Scalars = {}
        nll_loss = self._reconstruction(inputs, reconstructions, split, log).mean()
        codebook_loss = codebook_loss.float().mean()
        loss = nll_loss + self.codebook_weight * codebook_loss
        loss = loss + self._generator_term(nll_loss, reconstructions, global_step, last_layer, cond, split, log)
        log.update({f"{split}/total_loss": loss.detach(), f"{split}/quant_loss": codebook_loss.detach(),
                    f"{split}/nll_loss": nll_loss.detach()})
        return loss, log
