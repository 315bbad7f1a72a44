"""Sample-quality metrics for 2D and 3D images in [-1, 1]: (B, C, H, W) or (B, C, X, Y, Z).

One object does the bookkeeping; everything else is a plain function of tensors.

    from ldm.metrics import MetricSuite

    suite = MetricSuite(["fid", "kid", "diversity_ms_ssim", "dice"],
                        feature_extractor="2.5d", feature_options={"network": "inception", "num_slices": 16},
                        segmenter=segmenter)          # any callable images -> (B, K, *spatial) scores
    for batch in loader:                               # real, fake, condition, labels: each may be None
        suite.update(real=batch["image"], fake=samples, condition=batch["mask"])
    scores = suite.compute()                           # {"fid": ..., "fid_axial": ..., "kid_mean": ..., ...}

Metric names (`METRICS`) and the keys they give:
  psnr, ssim, ms_ssim             paired real / fake (reconstructions), mean over items
  fid                             "fid" (+ "fid_<plane>" with a "2.5d" extractor)
  kid                             "kid_mean", "kid_std"
  diversity_ms_ssim, _ssim        mean similarity over pairs of fakes; "<name>_real" over pairs of reals
  dice                            segmenter(fake) vs the conditioning mask: "dice", "dice_class_<k>", "dice_real"
  accuracy                        classifier(fake) vs labels: "accuracy", "accuracy_real"
A metric whose pretrained weights are absent (no download is ever tried) is skipped with a one-line notice and its
keys are missing from the result; unknown names and mixed sample shapes are one-line ValueErrors.

Modules, each usable alone:
  reconstruction  psnr, ssim, ms_ssim(x, y) -> (B,)          MONAI's; MS-SSIM scales / window fitted to small images
  distribution    frechet_distance(real, fake), kernel_distance(real, fake) on features (N, F), float64
  features        feature_extractor(name, **options): "inception", "medicalnet", "2.5d", or an nn.Module with
                  features(x); MissingWeights when a weights file is absent
  diversity       pairwise_similarity(samples), mean_pairwise_similarity(samples)
  adherence       dice_per_class(prediction, condition, num_classes), correct_predictions(predicted, labels)
"""
from ldm.metrics.features import MissingWeights, feature_extractor
from ldm.metrics.suite import METRICS, MetricSuite

__all__ = ["METRICS", "MetricSuite", "MissingWeights", "feature_extractor"]
