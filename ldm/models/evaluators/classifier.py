"""`Classifier`: an image classifier trained on real labelled images, to score class-conditional samples by the
accuracy of its predictions against the labels they were drawn for."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ldm.models.evaluators.common import MeanOverTestSet, augment_intensity, batch_entry, inputs_of, last_linear
from ldm.util import instantiate_from_config


class Classifier(nn.Module):
    """A network trained with cross-entropy on batch[image_key] (B, C, *spatial) in [-1, 1] and batch[label_key]
    (B,) int64 class indices.

    network_config: target/params of a network mapping images to (B, num_classes) logits whose last layer is an
    `nn.Linear` (e.g. `monai.networks.nets.Classifier` or `DenseNet121`); the input of that layer is the penultimate
    feature vector `features` returns. weight_decay: AdamW's. intensity_jitter / noise_std: training-time
    augmentation (`ldm.models.evaluators.common.augment_intensity`).
    """

    def __init__(self, network_config: Mapping[str, Any], num_classes: int, image_key: str = "image",
                 label_key: str = "class_label", monitor: str = "val/accuracy", weight_decay: float = 1e-4,
                 intensity_jitter: float = 0.0, noise_std: float = 0.0):
        super().__init__()
        self.network = instantiate_from_config(network_config)
        self.output_layer = last_linear(self.network, type(self).__name__)
        if self.output_layer.out_features != num_classes:
            raise ValueError(f"Classifier: the network's output layer gives {self.output_layer.out_features} logits, "
                             f"num_classes is {num_classes}")
        self.num_classes = num_classes
        self.image_key, self.label_key = image_key, label_key
        self.monitor = monitor
        self.weight_decay = weight_decay
        self.intensity_jitter, self.noise_std = intensity_jitter, noise_std
        self.learning_rate = 0.0
        self.global_step = 0

    def get_inputs(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C, *spatial) in the network's dtype, labels (B,) int64)."""
        images = batch_entry(batch, self.image_key, type(self).__name__)
        labels = batch_entry(batch, self.label_key, type(self).__name__).reshape(-1).long()
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"Classifier: {labels.shape[0]} labels for {images.shape[0]} images")
        return images.to(self.output_layer.weight.dtype), labels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, *spatial) -> logits (B, num_classes)."""
        return self.network(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, C, *spatial) in [-1, 1] -> (B,) int64 most likely class."""
        return self(images.to(self.output_layer.weight.dtype)).argmax(dim=1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, *spatial) -> (N, F): the input of the output layer (for FID-style metrics)."""
        return inputs_of(self.output_layer, self.network, images.to(self.output_layer.weight.dtype))

    def scalars(self, logits: torch.Tensor, labels: torch.Tensor, split: str) -> tuple[torch.Tensor, dict]:
        """(cross-entropy, {"<split>/loss", "<split>/accuracy"}) for logits (B, num_classes) and labels (B,)."""
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {f"{split}/loss": loss.detach(), f"{split}/accuracy": accuracy}

    # --------------------------------------------------------------------------------------- loop interface
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int, optimizer_idx: int = 0):
        """Cross-entropy on the augmented images: (loss, {"train/loss", "train/accuracy"})."""
        images, labels = self.get_inputs(batch)
        logits = self(augment_intensity(images, self.intensity_jitter, self.noise_std))
        return self.scalars(logits, labels, "train")

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"val/loss", "val/accuracy"} of the batch."""
        images, labels = self.get_inputs(batch)
        return self.scalars(self(images), labels, "val")[1]

    @torch.no_grad()
    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """{"inputs"}: the test images (B, C, *spatial); the test stage saves them as a grid."""
        return {"inputs": self.get_inputs(batch)[0]}

    def test_evaluator(self) -> MeanOverTestSet:
        """The test stage's `accuracy`: the share of test items whose prediction is their label."""
        return MeanOverTestSet("accuracy", lambda batch, outputs: (self.predict(outputs["inputs"])
                                                            == self.get_inputs(batch)[1]).float())

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], split: str, max_images: int) -> dict[str, torch.Tensor]:
        """{"inputs"}: the first max_images images."""
        return {"inputs": self.get_inputs(batch)[0][:max_images]}
