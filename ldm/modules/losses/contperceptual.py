"""The KL autoencoder's training objective: reconstruction (+LPIPS) as a Gaussian NLL, KL, and a patch GAN."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.base import ReconstructionGANLoss, Scalars


class LPIPSWithDiscriminator(ReconstructionGANLoss):
    """L = NLL(rec) + kl_weight * KL + lambda * disc_factor * G, and the discriminator's own loss (optimizer 1).

    Per element, rec = pixelloss_weight * |x - x_rec| (or squared, `rec_loss: l2`) + perceptual_weight * LPIPS(x,
    x_rec) (one value per item, broadcast); NLL = rec / exp(logvar) + logvar with a learnable scalar `logvar`; NLL
    and KL are summed over elements and averaged over the batch (CompVis scaling, so their kl_weight values port).
    G = -mean D(x_rec); lambda is the adaptive weight times `disc_weight`; `disc_factor` is 0 before step
    `disc_start`. For dims=3 LPIPS runs on `perceptual_slices` slices per axis (2.5D); `perceptual_weight: 0`
    builds no LPIPS network at all (it needs local ImageNet backbone weights, see `load_lpips`).
    """

    pixel_loss_key = "rec_loss"

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge", dims: int = 2,
                 rec_loss: str = "l1", disc_ndf: int = 64, perceptual_net: str = "vgg",
                 perceptual_backbone_path: str | Path | None = None, perceptual_slices: int = 4,
                 perceptual_network: nn.Module | None = None):
        """`perceptual_network` replaces the LPIPS network that `perceptual_net` / `perceptual_backbone_path` load."""
        super().__init__(disc_start, pixelloss_weight, disc_num_layers, disc_in_channels, disc_factor, disc_weight,
                         perceptual_weight, use_actnorm, disc_conditional, disc_loss, dims, rec_loss, disc_ndf,
                         perceptual_net, perceptual_backbone_path, perceptual_slices, perceptual_network)
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: DiagonalGaussianDistribution,
                optimizer_idx: int, global_step: int, last_layer: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, split: str = "train") -> tuple[torch.Tensor, Scalars]:
        """inputs, reconstructions: (B, C, *spatial) -> (scalar loss, detached scalars named `<split>/<term>`).

        optimizer_idx 0: the autoencoder's loss (`last_layer`, the decoder's output weight, is needed for the
        adaptive weight when the discriminator is active and gradients are on); 1: the discriminator's loss.
        """
        if optimizer_idx == 1:
            return self._discriminator_loss(inputs, reconstructions, global_step, cond, split)
        if optimizer_idx != 0:
            raise ValueError(f"LPIPSWithDiscriminator: optimizer_idx must be 0 or 1, got {optimizer_idx}")
        log: Scalars = {}
        rec = self._reconstruction(inputs, reconstructions, split, log)
        batch = inputs.shape[0]
        nll_loss = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl_loss = posteriors.kl().sum() / batch
        loss = nll_loss + self.kl_weight * kl_loss
        loss = loss + self._generator_term(nll_loss, reconstructions, global_step, last_layer, cond, split, log)
        log.update({f"{split}/total_loss": loss.detach(), f"{split}/logvar": self.logvar.detach(),
                    f"{split}/kl_loss": kl_loss.detach(), f"{split}/nll_loss": nll_loss.detach()})
        return loss, log
