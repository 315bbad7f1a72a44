"""Vector quantisation of latents (VQ-VAE) with a straight-through gradient, optional EMA codebook and restarts."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

# Decay of the per-code usage counts that dead-code restarts read, when the codebook itself is not an EMA.
USAGE_DECAY = 0.99


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum over ranks in place when running distributed, so every rank keeps the same codebook."""
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


class VectorQuantizer(nn.Module):
    """Replace each latent vector by its nearest codebook entry.

    z: (B, embed_dim, *spatial) -> (z_q, loss, info): z_q has z's shape, the codes' values in the forward pass and
    the identity's gradient to z (straight-through); loss = beta * mean ||z - sg[e]||^2 (commitment) +
    mean ||sg[z] - e||^2 (codebook term; absent with EMA updates); info holds "indices" (B, *spatial) int64 and
    batch statistics "perplexity" (exp of the code distribution's entropy) and "usage" (fraction of codes used).

    ema_decay: None learns the codebook by gradient; a float in (0, 1) makes it an exponential moving average of the
    encoder outputs assigned to each code (van den Oord et al. 2017, appendix), with Laplace-smoothed counts.
    dead_code_threshold > 0 restarts codes whose decayed usage count falls below it at random encoder outputs of
    the batch. Codebook statistics change only in training mode with gradients enabled (a training forward).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, ema_decay: float | None = None,
                 dead_code_threshold: float = 0.0, eps: float = 1e-5):
        super().__init__()
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer: ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.ema_decay, self.dead_code_threshold, self.eps = ema_decay, dead_code_threshold, eps
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)
        self.register_buffer("cluster_size", torch.ones(n_embed))
        if ema_decay is not None:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if z.ndim < 3 or z.shape[1] != self.embed_dim:
            raise ValueError(f"VectorQuantizer: expected z of shape (B, {self.embed_dim}, *spatial), "
                             f"got {tuple(z.shape)}")
        flat = z.movedim(1, -1).reshape(-1, self.embed_dim).float()  # (N, embed_dim), N = B * prod(spatial)
        indices = self.nearest(flat)
        counts = torch.bincount(indices, minlength=self.n_embed).float()
        z_q = self.embedding(indices).view(*z.shape[:1], *z.shape[2:], self.embed_dim).movedim(-1, 1)
        if self.training and torch.is_grad_enabled():  # after the lookup: this batch uses the codes it was assigned
            self._update_codebook(flat.detach(), indices, counts.clone())
        loss = self.beta * F.mse_loss(z.float(), z_q.detach())
        if self.ema_decay is None:
            loss = loss + F.mse_loss(z_q, z.detach().float())
        z_q = z + (z_q.to(z.dtype) - z).detach()
        probabilities = counts / counts.sum()
        info = {"indices": indices.view(*z.shape[:1], *z.shape[2:]),
                "perplexity": torch.exp(-(probabilities * torch.log(probabilities + 1e-10)).sum()),
                "usage": (counts > 0).float().mean()}
        return z_q, loss, info

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """flat: (N, embed_dim) fp32 -> index of the nearest code for each row: (N,) int64."""
        codes = self.embedding.weight.float()
        with torch.autocast(flat.device.type, enabled=False):  # bf16 distances would pick wrong neighbours
            distances = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codes.t() + codes.pow(2).sum(1)[None]
        return distances.argmin(dim=1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices: (B, *spatial) int64 -> (B, embed_dim, *spatial)."""
        return self.embedding(indices).movedim(-1, 1)

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        decay = self.ema_decay if self.ema_decay is not None else USAGE_DECAY
        sums = torch.zeros(self.n_embed, self.embed_dim, device=flat.device).index_add_(0, indices, flat)
        _all_reduce_sum(counts, sums)
        self.cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
        if self.ema_decay is not None:
            self.embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.n_embed * self.eps) * total
            self.embedding.weight.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        new_codes = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new_codes, src=0)  # every rank restarts with rank 0's picks
        self.embedding.weight[dead] = new_codes.to(self.embedding.weight.dtype)
        self.cluster_size[dead] = self.dead_code_threshold
        if self.ema_decay is not None:
            self.embed_sum[dead] = new_codes * self.dead_code_threshold
