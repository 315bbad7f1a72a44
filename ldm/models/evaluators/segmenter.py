"""`Segmenter`: a segmentation network trained on real images and masks, to score mask-conditioned samples by the
Dice between their conditioning mask and its prediction."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ldm.models.evaluators.common import MeanOverTestSet, augment_intensity, batch_entry, check_images
from ldm.util import instantiate_from_config


def as_onehot(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A mask as one-hot float: (B, num_classes, *spatial) is taken as one-hot already; (B, 1, *spatial) is a label
    map of class indices 0 .. num_classes - 1 (e.g. a binary whole-tumour mask for num_classes 2)."""
    if mask.ndim >= 3 and mask.shape[1] == num_classes:
        return mask.float()
    if mask.ndim < 3 or mask.shape[1] != 1:
        raise ValueError(f"mask of shape {tuple(mask.shape)} is neither one-hot (B, {num_classes}, *spatial) nor a "
                         f"label map (B, 1, *spatial)")
    labels = mask[:, 0].round().long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"label map holds values in [{int(labels.min())}, {int(labels.max())}], expected class "
                         f"indices 0 .. {num_classes - 1}")
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def network_dims(network: nn.Module) -> tuple[int, int, int]:
    """(spatial dims, in_channels, out_channels) of a MONAI segmentation network: dims from `spatial_dims`
    (SegResNet) or `dimensions` (UNet), out_channels from `out_channels` or else the last convolution registered
    (SegResNet's `conv_final`)."""
    dims = getattr(network, "spatial_dims", getattr(network, "dimensions", None))
    convolutions = [m for m in network.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    out_channels = getattr(network, "out_channels", convolutions[-1].out_channels if convolutions else None)
    in_channels = getattr(network, "in_channels", None)
    if dims is None or in_channels is None or out_channels is None:
        raise TypeError(f"Segmenter: network {type(network).__name__} does not say its spatial dims, in_channels and "
                        f"out_channels (use monai.networks.nets.SegResNet or UNet)")
    return int(dims), int(in_channels), int(out_channels)


def unet_bottom(network: nn.Module) -> nn.Module:
    """The innermost block of a MONAI UNet: each level is Sequential(down, SkipConnection(next level), up)."""
    from monai.networks.layers import SkipConnection

    block = network.model
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        block = block[1].submodule
    return block


def deepest_features(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's deepest feature map for images (B, C, *spatial): SegResNet's `encode` output, or the output of
    a MONAI UNet's bottom block."""
    from monai.networks.nets import UNet

    if hasattr(network, "encode"):
        return network.encode(images)[0]
    if isinstance(network, UNet):
        captured: list[torch.Tensor] = []
        handle = unet_bottom(network).register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            network(images)
        finally:
            handle.remove()
        return captured[-1]
    raise TypeError(f"Segmenter: cannot find the deepest encoder features of {type(network).__name__} "
                    f"(supported: monai.networks.nets.SegResNet, UNet)")


class Segmenter(nn.Module):
    """A segmentation network trained with Dice + cross-entropy on batch[image_key] (B, C, *spatial) in [-1, 1] and
    batch[mask_key]: one-hot (B, K, *spatial) or a label map (B, 1, *spatial), K = the network's out_channels.

    network_config: target/params of e.g. `monai.networks.nets.SegResNet` or `UNet`; its spatial dims, input
    channels and K come from the network. include_background: whether Dice (`val/dice`, `dice`) counts channel 0.
    weight_decay: AdamW's. intensity_jitter / noise_std: training-time augmentation (`augment_intensity`).

    Dice follows `monai.metrics.DiceMetric` with `ignore_empty=False`: a class absent from both the mask and the
    prediction scores 1, one absent from the mask only scores 0.
    """

    def __init__(self, network_config: Mapping[str, Any], image_key: str = "image", mask_key: str = "mask",
                 include_background: bool = False, monitor: str = "val/dice", weight_decay: float = 1e-5,
                 intensity_jitter: float = 0.0, noise_std: float = 0.0):
        super().__init__()
        from monai.losses import DiceCELoss

        self.network = instantiate_from_config(network_config)
        self.dims, self.in_channels, self.num_classes = network_dims(self.network)
        if self.num_classes < 2:
            raise ValueError(f"Segmenter: the network has {self.num_classes} output channel(s); a softmax over "
                             f"classes needs >= 2 (background and foreground for a binary mask)")
        self.loss = DiceCELoss(softmax=True, to_onehot_y=False)
        self.image_key, self.mask_key = image_key, mask_key
        self.include_background = include_background
        self.monitor = monitor
        self.weight_decay = weight_decay
        self.intensity_jitter, self.noise_std = intensity_jitter, noise_std
        self.learning_rate = 0.0
        self.global_step = 0

    def get_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C, *spatial), one-hot masks (B, K, *spatial)), both in the network's dtype."""
        images = self.checked(batch_entry(batch, self.image_key, type(self).__name__))
        masks = as_onehot(batch_entry(batch, self.mask_key, type(self).__name__), self.num_classes)
        if masks.shape[2:] != images.shape[2:]:
            raise ValueError(f"Segmenter: batch[{self.mask_key!r}] has spatial shape {tuple(masks.shape[2:])}, the "
                             f"images {tuple(images.shape[2:])}")
        return images, masks.to(images.dtype)

    def checked(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, in_channels, *spatial) in the network's dtype; another shape is a ValueError."""
        check_images(images, self.in_channels, self.dims, type(self).__name__)
        return images.to(next(self.network.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, *spatial) -> logits (B, K, *spatial)."""
        return self.network(images)

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, *spatial) in [-1, 1] -> one-hot float (B, K, *spatial) of the most likely class."""
        return F.one_hot(self(self.checked(images)).argmax(1), self.num_classes).movedim(-1, 1).float()

    @torch.no_grad()
    def dice(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Dice of the segmentation of images (B, C, *spatial) against masks (one-hot or label map): (B, K') per
        class, K' = K without channel 0 unless include_background."""
        return self.dice_of(self.segment(images), as_onehot(masks, self.num_classes))

    def dice_of(self, segmentation: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Dice of one-hot segmentation vs one-hot masks, both (B, K, *spatial): (B, K') per class."""
        from monai.metrics import compute_dice

        return compute_dice(segmentation, masks, include_background=self.include_background, ignore_empty=False)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, *spatial) -> (N, F): the global average of the deepest encoder features (for FID-style
        metrics)."""
        return deepest_features(self.network, self.checked(images)).flatten(2).mean(dim=2)

    # --------------------------------------------------------------------------------------- loop interface
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int, optimizer_idx: int = 0):
        """Dice + cross-entropy on the augmented images: (loss, {"train/loss"})."""
        images, masks = self.get_inputs(batch)
        loss = self.loss(self(augment_intensity(images, self.intensity_jitter, self.noise_std)), masks)
        return loss, {"train/loss": loss.detach()}

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"val/loss", "val/dice"}: the loss and the mean Dice (over items and the classes counted) of the argmax
        prediction."""
        images, masks = self.get_inputs(batch)
        logits = self(images)
        segmentation = F.one_hot(logits.argmax(1), self.num_classes).movedim(-1, 1).to(masks.dtype)
        return {"val/loss": self.loss(logits, masks), "val/dice": self.dice_of(segmentation, masks).mean()}

    @torch.no_grad()
    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"inputs" (B, C, *spatial), "segmentation" and "mask" (B, K, *spatial) one-hot float}."""
        images, masks = self.get_inputs(batch)
        return {"inputs": images, "segmentation": self.segment(images), "mask": masks}

    def test_evaluator(self) -> MeanOverTestSet:
        """The test stage's `dice`: mean over test items of each item's Dice of `segmentation` vs `mask`."""
        return MeanOverTestSet("dice", lambda batch, outputs: self.dice_of(outputs["segmentation"],
                                                                           outputs["mask"]).mean(1))

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str, max_images: int) -> dict[str, torch.Tensor]:
        """As test_step, for the first max_images items."""
        images, masks = self.get_inputs(batch)
        images, masks = images[:max_images], masks[:max_images]
        return {"inputs": images, "segmentation": self.segment(images), "mask": masks}
