"""GAN objectives and the adaptive weight that balances the generator's adversarial term (Esser et al., VQGAN)."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2, a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator cross-entropy loss on logits: (mean softplus(-D(x)) + mean softplus(D(x_rec))) / 2, a scalar."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g_loss|| + eps), clamped to [0, max_weight], detached; L = `last_layer`.

    It scales the adversarial term so its gradient at the decoder's output layer matches the reconstruction's.
    `eps` keeps lambda finite when the adversarial gradient vanishes. Both graphs are retained for the backward.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grads.float().norm() / (g_grads.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
