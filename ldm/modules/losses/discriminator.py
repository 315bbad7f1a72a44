"""PatchGAN discriminator (pix2pix's NLayerDiscriminator) for 2D and 3D images, and the ActNorm it may use."""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.nn_dims import batch_norm_nd, check_dims, conv_nd, spatial_dims


class ActNorm(nn.Module):
    """Per-channel affine `scale * (x + loc)` initialised from the first training batch to zero mean, unit variance.

    x: (B, C, *spatial) -> same shape. A batch-size-independent alternative to BatchNorm (Glow).
    """

    def __init__(self, num_channels: int, dims: int):
        super().__init__()
        shape = (1, num_channels) + (1,) * dims
        self.loc = nn.Parameter(torch.zeros(shape))
        self.scale = nn.Parameter(torch.ones(shape))
        self.register_buffer("initialized", torch.tensor(False))
        # A host copy of the flag, so that a forward does not wait for the GPU to read it; a load refreshes it.
        self._initialized = False
        self.register_load_state_dict_post_hook(ActNorm._read_loaded_flag)

    @staticmethod
    def _read_loaded_flag(module: "ActNorm", incompatible_keys) -> None:
        module._initialized = bool(module.initialized)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        per_channel = x.detach().float().transpose(0, 1).flatten(1)  # (C, B * prod(spatial))
        self.loc.copy_(-per_channel.mean(dim=1).view_as(self.loc))
        self.scale.copy_(1.0 / (per_channel.std(dim=1) + 1e-6).view_as(self.scale))
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._initialized:
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """Patch discriminator: x (B, input_nc, *spatial) -> logits (B, 1, *patches), one per overlapping patch.

    `n_layers` stride-2 4x4 convolutions, then two stride-1 ones, so each spatial size must be at least
    3 * 2**n_layers. Normalisation is BatchNorm, or ActNorm when `use_actnorm`.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False, dims: int = 2):
        super().__init__()
        self.dims = check_dims(dims, "NLayerDiscriminator: dims")
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers

        def norm(channels: int) -> nn.Module:
            return ActNorm(channels, dims) if use_actnorm else batch_norm_nd(dims, channels)

        # BatchNorm has its own shift, so the convolutions it follows need no bias.
        bias = use_actnorm
        layers: list[nn.Module] = [conv_nd(dims, input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = ndf
        for n in range(1, n_layers + 1):
            out_channels = ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [conv_nd(dims, channels, out_channels, 4, stride=stride, padding=1, bias=bias),
                       norm(out_channels), nn.LeakyReLU(0.2, True)]
            channels = out_channels
        layers.append(conv_nd(dims, channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    @property
    def min_size(self) -> int:
        return 3 * 2 ** self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = spatial_dims(x, self.dims)
        if min(size) < self.min_size:
            raise ValueError(f"NLayerDiscriminator: input spatial size {list(size)} is too small for n_layers="
                             f"{self.n_layers} (each side needs >= {self.min_size}); lower disc_num_layers")
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
