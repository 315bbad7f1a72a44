"""`MetricSuite`: the metrics named in a config, accumulated over batches of samples and computed once at the end."""
from __future__ import annotations

import sys
from typing import Callable, Mapping, Sequence

import torch

from ldm.metrics.adherence import correct_predictions, dice_per_class
from ldm.metrics.distribution import frechet_distance, kernel_distance
from ldm.metrics.diversity import mean_pairwise_similarity
from ldm.metrics.features import MissingWeights, feature_extractor as build_feature_extractor
from ldm.metrics.reconstruction import RECONSTRUCTION_METRICS

# What each metric needs from `update`, and the constructor argument it depends on.
METRICS = ("psnr", "ssim", "ms_ssim", "fid", "kid", "diversity_ms_ssim", "diversity_ssim", "dice", "accuracy")
FEATURE_METRICS = ("fid", "kid")

Images = torch.Tensor


class MetricSuite:
    """Accumulates, over batches, what the named `metrics` need and computes them at the end.

    metrics: any of METRICS.
      - "psnr", "ssim", "ms_ssim": paired real and fake (e.g. inputs and reconstructions), mean over items (PSNR is
        +inf once any item is reproduced exactly).
      - "fid" (+ "fid_<plane>" for a "2.5d" extractor), "kid" (-> "kid_mean", "kid_std"): real vs fake features of
        `feature_extractor` (a name of `ldm.metrics.features` with `feature_options`, an nn.Module with a
        `features` method, or a callable images -> (N, F)).
      - "diversity_ms_ssim", "diversity_ssim": mean similarity over pairs of fakes, and "<name>_real" over reals.
      - "dice": `segmenter(fake)` against the conditioning mask (mean over items and foreground classes, and
        "dice_class_<k>" per class), "dice_real" for `segmenter(real)`.
      - "accuracy": `classifier(fake)` against `labels`, "accuracy_real" for `classifier(real)`.
    segmenter(images) -> (B, K, *spatial) scores (argmax taken) or a label map (B, 1, *spatial); `num_classes` is
    needed only when both it and the condition are label maps. classifier(images) -> (B, K) logits or (B,) labels.

    A metric whose feature network has no weights file on this machine is dropped with a one-line notice on stderr,
    and its keys are absent from `compute()`. State is kept on CPU: per-item values, features, and the samples
    themselves only for the diversity metrics.
    """

    def __init__(self, metrics: Sequence[str], feature_extractor: str | Callable[[Images], torch.Tensor] | None = None,
                 feature_options: Mapping | None = None, segmenter: Callable[[Images], torch.Tensor] | None = None,
                 classifier: Callable[[Images], torch.Tensor] | None = None, num_classes: int | None = None,
                 include_background: bool = False, ignore_empty: bool = False, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, diversity_max_pairs: int | None = 1000, seed: int = 0):
        unknown = [name for name in metrics if name not in METRICS]
        if unknown:
            raise ValueError(f"MetricSuite: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        self.metrics = list(dict.fromkeys(metrics))
        self._require("dice", segmenter, "segmenter")
        self._require("accuracy", classifier, "classifier")
        self.features = None
        wants_features = [name for name in self.metrics if name in FEATURE_METRICS]
        if wants_features:
            self._require(wants_features[0], feature_extractor, "feature_extractor")
            try:
                self.features = (build_feature_extractor(feature_extractor, **(feature_options or {}))
                                 if isinstance(feature_extractor, str) or hasattr(feature_extractor, "features")
                                 else feature_extractor)
            except MissingWeights as error:
                print(f"MetricSuite: {', '.join(wants_features)} skipped: {error}", file=sys.stderr)
                self.metrics = [name for name in self.metrics if name not in FEATURE_METRICS]
        self.segmenter, self.classifier, self.num_classes = segmenter, classifier, num_classes
        self.include_background, self.ignore_empty = include_background, ignore_empty
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.diversity_max_pairs, self.seed = diversity_max_pairs, seed
        self.reset()

    def _require(self, metric: str, value, argument: str) -> None:
        if metric in self.metrics and value is None:
            raise ValueError(f"MetricSuite: metric {metric!r} needs {argument}=")

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.sample_shape: tuple[int, ...] | None = None
        self.state: dict[str, list[torch.Tensor]] = {}

    def _keep(self, key: str, value: torch.Tensor) -> None:
        self.state.setdefault(key, []).append(value.detach().cpu())

    def _check_shape(self, images: Images, role: str) -> None:
        shape = tuple(images.shape[1:])
        if self.sample_shape is None:
            self.sample_shape = shape
        elif shape != self.sample_shape:
            raise ValueError(f"MetricSuite: {role} samples of shape {shape} after samples of shape {self.sample_shape}")

    @torch.no_grad()
    def update(self, real: Images | None = None, fake: Images | None = None, condition: torch.Tensor | None = None,
               labels: torch.Tensor | None = None) -> None:
        """Add one batch. real, fake: (B, C, *spatial) in [-1, 1], either may be None; condition: the conditioning
        mask (B, K, *spatial) one-hot or (B, 1, *spatial) labels; labels: (B,) conditioning classes."""
        for images, role in ((real, "real"), (fake, "fake")):
            if images is not None:
                self._check_shape(images, role)
        sets = {suffix: images for suffix, images in (("", fake), ("_real", real)) if images is not None}
        for name in self.metrics:
            if name in RECONSTRUCTION_METRICS and real is not None and fake is not None:
                self._keep(name, RECONSTRUCTION_METRICS[name](fake, real))
            elif name.startswith("diversity_"):
                for suffix, images in sets.items():
                    self._keep(f"samples{suffix}", images)
            elif name == "dice" and condition is not None:
                for suffix, images in sets.items():
                    self._keep(f"dice{suffix}", self._dice(images, condition))
            elif name == "accuracy" and labels is not None:
                for suffix, images in sets.items():
                    self._keep(f"accuracy{suffix}", correct_predictions(self.classifier(images).cpu(), labels.cpu()))
        if self.features is not None and any(name in FEATURE_METRICS for name in self.metrics):
            for suffix, images in sets.items():
                for plane, features in self._features(images).items():
                    self._keep(f"features{plane}{suffix}", features)

    def _features(self, images: Images) -> dict[str, torch.Tensor]:
        """{"": (B, F)} and, for a per-plane extractor, {"_<plane>": (B, F_plane)} too."""
        if hasattr(self.features, "per_plane"):
            per_plane = self.features.per_plane(images)
            return {"": torch.cat(list(per_plane.values()), dim=1),
                    **{f"_{plane}": features for plane, features in per_plane.items()}}
        return {"": self.features(images)}

    def _dice(self, images: Images, condition: torch.Tensor) -> torch.Tensor:
        segmentation = self.segmenter(images).cpu()
        condition = condition.cpu()
        if segmentation.shape[1] > 1:
            num_classes = segmentation.shape[1]
            segmentation = segmentation.argmax(dim=1, keepdim=True)
        elif condition.shape[1] > 1:
            num_classes = condition.shape[1]
        elif self.num_classes is None:
            raise ValueError("MetricSuite: dice on label maps needs num_classes=")
        else:
            num_classes = self.num_classes
        return dice_per_class(segmentation, condition, num_classes, self.include_background, self.ignore_empty)

    def _gathered(self, key: str) -> torch.Tensor | None:
        return torch.cat(self.state[key]) if key in self.state else None

    def compute(self) -> dict[str, float]:
        """The metrics over everything added since construction or `reset()`, as plain floats."""
        result: dict[str, float] = {}
        for name in self.metrics:
            if name in RECONSTRUCTION_METRICS:
                result[name] = float(self._needed(name, name, "paired real and fake samples").double().mean())
            elif name == "fid":
                self._needed("features", name, "fake samples")
                for key in [key for key in self.state if key.startswith("features") and not key.endswith("_real")]:
                    real = self._needed(f"{key}_real", name, "real samples")
                    result[f"fid{key.removeprefix('features')}"] = frechet_distance(real, self._gathered(key))
            elif name == "kid":
                real = self._needed("features_real", name, "real samples")
                fake = self._needed("features", name, "fake samples")
                result["kid_mean"], result["kid_std"] = kernel_distance(real, fake, self.kid_subsets,
                                                                        self.kid_subset_size, self.seed)
            elif name.startswith("diversity_"):
                self._needed("samples", name, "fake samples")
                for suffix in ("", "_real"):
                    if f"samples{suffix}" in self.state:
                        result[f"{name}{suffix}"] = mean_pairwise_similarity(
                            self._gathered(f"samples{suffix}"), name.removeprefix("diversity_"),
                            self.diversity_max_pairs, self.seed)
            elif name == "dice":
                per_class = self._needed("dice", name, "fake samples with a condition")
                result["dice"] = float(per_class.nanmean())
                first_class = 0 if self.include_background else 1
                for index, values in enumerate(per_class.T):
                    result[f"dice_class_{first_class + index}"] = float(values.nanmean())
                if "dice_real" in self.state:
                    result["dice_real"] = float(self._gathered("dice_real").nanmean())
            elif name == "accuracy":
                result["accuracy"] = float(self._needed("accuracy", name, "fake samples with labels").double().mean())
                if "accuracy_real" in self.state:
                    result["accuracy_real"] = float(self._gathered("accuracy_real").double().mean())
        return result

    def _needed(self, key: str, metric: str, what: str) -> torch.Tensor:
        gathered = self._gathered(key)
        if gathered is None:
            raise ValueError(f"MetricSuite: {metric} needs {what}, and update() was given none")
        return gathered
