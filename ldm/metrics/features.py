"""Feature networks for FID / KID, by name: each is a callable images -> (N, F) float64 on CPU.

- "inception": 2D Inception-v3 pool features (2048), the network and preprocessing of torchmetrics' FID
  (torch-fidelity's port of the TensorFlow FID Inception), from a local weights file only.
- "medicalnet": 3D ResNet-10/18/50 (MONAI's, as MedicalNet / Med3D trained it) global-pool features, from a local
  weights file only.
- "2.5d": a 2D network run on the axial, coronal and sagittal slices of each volume, averaged per volume and plane.
- an nn.Module with a `features(x) -> (N, F)` method (a classifier or segmenter trained on the real data): wrapped.

Pretrained weights are never downloaded: without the file, building the extractor raises `MissingWeights`, whose
message names the file and where to get it; the caller reports that and skips the metric.
Images are float in [-1, 1]: (B, C, H, W) for 2D networks, (B, C, X, Y, Z) in RAS order (as `ldm.data` loads NIfTI)
for 3D ones.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import nn

FeatureNetwork = Callable[[torch.Tensor], torch.Tensor]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
MEDICALNET_DEPTHS = (10, 18, 50)
# Slice axis of each plane in a (B, C, X, Y, Z) RAS volume: a sagittal slice fixes X, coronal Y, axial Z.
PLANE_AXES = {"axial": 4, "coronal": 3, "sagittal": 2}


class MissingWeights(FileNotFoundError):
    """A feature network's pretrained weights file is not on this machine; the message says which and how to get it."""


def _in_batches(network: FeatureNetwork, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """network over images (N, ...) in chunks of batch_size -> (N, F) float64 on CPU."""
    with torch.no_grad():
        chunks = [network(chunk).detach().to("cpu", torch.float64) for chunk in images.split(batch_size)]
    return torch.cat(chunks)


def _check_rank(images: torch.Tensor, rank: int, who: str) -> None:
    layout = "(B, C, H, W)" if rank == 4 else "(B, C, X, Y, Z)"
    if images.ndim != rank:
        raise ValueError(f"{who}: expected images {layout}, got shape {tuple(images.shape)}")


class InceptionFeatures:
    """Inception-v3 pool features as torchmetrics' FrechetInceptionDistance(normalize=True) computes them:
    images (B, 1 or 3, H, W) in [-1, 1] -> (B, 2048) float64.

    Images are mapped to [0, 1], quantised to uint8, grey ones repeated to 3 channels; the network resizes to
    299 x 299 itself (bilinear, antialiased). `weights_path` defaults to torch-fidelity's file in the torch hub
    cache (`torch.hub.get_dir()/checkpoints`)."""

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        default_path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        path = Path(weights_path) if weights_path else default_path
        if not path.is_file():
            raise MissingWeights(f"inception: weights file {path} not found; download {INCEPTION_WEIGHTS_URL} "
                                 f"there (or pass weights_path)")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(path)).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_rank(images, 4, "inception")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"inception: expected 1 or 3 channels, got shape {tuple(images.shape)}")
        # The same quantisation as torchmetrics' normalize=True: (x01 * 255).byte() truncates.
        quantised = (((images.float().clamp(-1, 1) + 1) / 2) * 255).byte().expand(-1, 3, -1, -1)
        return _in_batches(lambda x: self.network(x.to(self.device)), quantised, self.batch_size)


def _medicalnet_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A MedicalNet checkpoint's backbone weights: its `state_dict` entry (or the file itself), without the
    DataParallel `module.` prefix and without the segmentation head."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return {key: value for key, value in state.items() if not key.startswith("conv_seg.")}


class MedicalNetFeatures:
    """Global-pool features of a MedicalNet (Med3D, Chen et al. 2019) 3D ResNet: volumes (B, C, X, Y, Z) in
    [-1, 1] -> (B, C * F) float64, F = 512 (depth 10, 18) or 2048 (depth 50).

    Each channel is one single-channel input, z-scored per volume as MedicalNet was trained; the channels' features
    are concatenated. Weights (`resnet_{depth}.pth` or `resnet_{depth}_23dataset.pth` of MedicalNet) come from
    `weights_path` only."""

    def __init__(self, weights_path: str | Path | None = None, depth: int = 10, device: str | torch.device = "cpu",
                 batch_size: int = 4):
        from monai.networks.nets import resnet
        from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

        if depth not in MEDICALNET_DEPTHS:
            raise ValueError(f"medicalnet: depth must be one of {MEDICALNET_DEPTHS}, got {depth}")
        if weights_path is None or not Path(weights_path).is_file():
            raise MissingWeights(f"medicalnet: weights file {weights_path or f'resnet_{depth}_23dataset.pth'} not "
                                 f"found; download resnet_{depth}_23dataset.pth of Tencent MedicalNet (Hugging Face "
                                 f"TencentMedicalNet/MedicalNet-Resnet{depth}) and pass weights_path")
        bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
        network = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                                     shortcut_type=shortcut_type, bias_downsample=bias_downsample)
        network.load_state_dict(_medicalnet_state_dict(Path(weights_path)))
        self.network = network.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        _check_rank(volumes, 5, "medicalnet")
        batch, channels = volumes.shape[:2]
        singles = volumes.float().reshape(batch * channels, 1, *volumes.shape[2:])
        mean = singles.mean(dim=(2, 3, 4), keepdim=True)
        std = singles.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
        features = _in_batches(lambda x: self.network(x.to(self.device)), (singles - mean) / std, self.batch_size)
        return features.reshape(batch, -1)


class PlaneFeatures:
    """2.5D features: a 2D network on the axial, coronal and sagittal slices of volumes (B, C, X, Y, Z), the slice
    features averaged per volume and plane (as MAISI reports FID per plane).

    `num_slices`: the central k slices of each plane, or all when None. `per_plane(volumes)` gives
    {plane: (B, F)}; calling gives their concatenation (B, 3 F) in the order of `planes`."""

    def __init__(self, network: FeatureNetwork, num_slices: int | None = None,
                 planes: tuple[str, ...] = tuple(PLANE_AXES), batch_size: int = 64):
        unknown = [plane for plane in planes if plane not in PLANE_AXES]
        if unknown:
            raise ValueError(f"2.5d: unknown plane(s) {', '.join(unknown)}; known: {', '.join(PLANE_AXES)}")
        self.network = network
        self.num_slices = num_slices
        self.planes = tuple(planes)
        self.batch_size = batch_size

    def _slices(self, volumes: torch.Tensor, axis: int) -> torch.Tensor:
        """The (central) slices across `axis`: (B, C, X, Y, Z) -> (B, S, C, h, w)."""
        count = volumes.shape[axis]
        keep = count if self.num_slices is None else min(self.num_slices, count)
        start = (count - keep) // 2
        return volumes.narrow(axis, start, keep).movedim(axis, 1)

    def per_plane(self, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_rank(volumes, 5, "2.5d")
        result = {}
        for plane in self.planes:
            slices = self._slices(volumes, PLANE_AXES[plane])
            batch, count = slices.shape[:2]
            features = _in_batches(self.network, slices.flatten(0, 1), self.batch_size)
            result[plane] = features.reshape(batch, count, -1).mean(dim=1)
        return result

    def __call__(self, volumes: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self.per_plane(volumes).values()), dim=1)


class ModuleFeatures:
    """Wraps a network with a `features(x) -> (N, F)` method (e.g. a classifier trained on the real data):
    images -> (N, F) float64, run in eval mode without gradients."""

    def __init__(self, module: nn.Module, device: str | torch.device | None = None, batch_size: int = 16):
        if not callable(getattr(module, "features", None)):
            raise TypeError(f"{type(module).__name__} has no features(x) method to take features from")
        self.module = module.eval() if device is None else module.eval().to(device)
        self.device = device
        self.batch_size = batch_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = self.device or next(self.module.parameters(), torch.empty(0)).device
        return _in_batches(lambda x: self.module.features(x.to(device)).flatten(1), images, self.batch_size)


FEATURE_EXTRACTORS = {"inception": InceptionFeatures, "medicalnet": MedicalNetFeatures, "2.5d": PlaneFeatures}


def feature_extractor(name: str | nn.Module, **options) -> FeatureNetwork:
    """The feature network called `name` (one of FEATURE_EXTRACTORS), built with `options`; an nn.Module with a
    `features` method is wrapped as it is. For "2.5d", `network` may itself be a name (or module) and
    `network_options` its options, e.g. feature_extractor("2.5d", network="inception", num_slices=16)."""
    if isinstance(name, nn.Module):
        return ModuleFeatures(name, **options)
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; known: {', '.join(FEATURE_EXTRACTORS)} "
                         f"(or an nn.Module with a features(x) method)")
    cls = FEATURE_EXTRACTORS[name]
    if name == "2.5d":
        inner = options.pop("network", None)
        if inner is None:
            raise ValueError("feature extractor '2.5d' needs network= (a name, a module or a callable)")
        inner_options = options.pop("network_options", {}) or {}
        if isinstance(inner, str) or callable(getattr(inner, "features", None)):
            inner = feature_extractor(inner, **inner_options)
        options["network"] = inner
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"feature extractor {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    return cls(**options)
