"""LPIPS perceptual distance: offline loading of its backbone, and the 2.5D (three-axis slice) version for 3D."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ldm.modules.nn_dims import spatial_dims

# lpips network name -> torchvision weights enum whose ImageNet file the backbone needs
_BACKBONE_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights"}


class MissingWeightsError(FileNotFoundError):
    """The LPIPS backbone's ImageNet weights are not on this machine."""


def backbone_weights(net: str) -> tuple[str, Path]:
    """(download URL, torch hub cache path) of the torchvision ImageNet weights that LPIPS `net` is built on."""
    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(f"LPIPS: unknown perceptual_net {net!r} (expected one of {sorted(_BACKBONE_WEIGHTS)})")
    import torchvision

    url = getattr(torchvision.models, _BACKBONE_WEIGHTS[net]).IMAGENET1K_V1.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def load_lpips(net: str = "vgg", backbone_path: str | Path | None = None) -> nn.Module:
    """An `lpips.LPIPS` network with its ImageNet backbone read from a local file, never downloaded.

    The file is `backbone_path`, or torchvision's own cache file (`$TORCH_HOME/hub/checkpoints/...`). Its absence
    raises MissingWeightsError saying what to place where. The linear heads ship inside the lpips package.
    """
    import lpips

    url, cached = backbone_weights(net)
    path = Path(backbone_path) if backbone_path is not None else cached
    if not path.is_file():
        raise MissingWeightsError(
            f"LPIPS perceptual loss: the ImageNet weights of its {net!r} backbone are not at {path} and are not "
            f"downloaded automatically. Download {url} to {cached} (or set perceptual_backbone_path to a copy), "
            f"or set `perceptual_weight: 0` in the loss config to train without the perceptual term.")
    with warnings.catch_warnings():  # torchvision's deprecation notice for lpips's `pretrained=` call
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # lpips splits torchvision's `features` Sequential into `sliceK` blocks that keep the original indices.
    wanted = {name: re.sub(r"^slice\d+\.", "features.", name) for name in model.net.state_dict()}
    missing = sorted(source for source in wanted.values() if source not in state)
    if missing:
        raise MissingWeightsError(f"LPIPS: {path} is not torchvision's {net!r} ImageNet state dict "
                                  f"(missing {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    model.net.load_state_dict({name: state[source] for name, source in wanted.items()})
    return model


class SlicedLPIPS(nn.Module):
    """LPIPS distance per batch item; 3D volumes are compared on 2D slices drawn along each of the three axes (2.5D).

    network: an `lpips.LPIPS`-like module mapping two (N, 3, H, W) images in [-1, 1] to (N, 1, 1, 1); it is frozen
    and always kept in eval mode (no dropout in a loss). Inputs with 3 channels are compared as RGB; any other
    channel count compares each channel as a grey image and averages over channels.
    """

    def __init__(self, network: nn.Module, dims: int = 2, slices_per_axis: int = 4):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"SlicedLPIPS: dims must be 2 or 3, got {dims!r}")
        if slices_per_axis < 1:
            raise ValueError(f"SlicedLPIPS: slices_per_axis must be >= 1, got {slices_per_axis}")
        self.network = network.eval().requires_grad_(False)
        self.dims = dims
        self.slices_per_axis = slices_per_axis

    def train(self, mode: bool = True) -> "SlicedLPIPS":
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, C, H, W) or (B, C, D, H, W) in [-1, 1] -> (B,) distances (3D: mean over the drawn slices)."""
        spatial_dims(x, self.dims)
        if x.shape != y.shape:
            raise ValueError(f"SlicedLPIPS: inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if self.dims == 2:
            return self._images(x, y)
        per_axis = []
        for axis in (2, 3, 4):
            count = min(self.slices_per_axis, x.shape[axis])
            index = torch.randperm(x.shape[axis], device=x.device)[:count]
            # (B, C, ..., k, ...) -> (B * k, C, h, w): the same slices of both inputs, item-major
            xs, ys = (v.index_select(axis, index).movedim(axis, 1).flatten(0, 1) for v in (x, y))
            per_axis.append(self._images(xs, ys).view(x.shape[0], count).mean(dim=1))
        return torch.stack(per_axis).mean(dim=0)

    def _images(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (N, C, H, W) -> (N,)."""
        n, c, h, w = x.shape
        if c == 3:
            return self.network(x, y).view(n)
        grey = [v.reshape(n * c, 1, h, w).expand(-1, 3, -1, -1) for v in (x, y)]
        return self.network(*grey).view(n, c).mean(dim=1)
