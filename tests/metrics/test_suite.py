import pytest
import torch
from torch import nn

from ldm.metrics import reconstruction
from ldm.metrics.adherence import dice_per_class
from ldm.metrics.distribution import frechet_distance, kernel_distance
from ldm.metrics.diversity import mean_pairwise_similarity
from ldm.metrics.features import PlaneFeatures
from ldm.metrics.suite import MetricSuite


def images(n, shape=(1, 16, 16, 16), seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def moments(x):
    """A stand-in feature network: per-item mean, std and mean square over channels and space."""
    flat = x.flatten(1)
    return torch.stack([flat.mean(1), flat.std(1), flat.square().mean(1)], dim=1).double()


def threshold_segmenter(x):
    """Label 1 where the first channel is positive, 2 below -0.5, else 0: (B, 1, *spatial)."""
    return (x[:, :1] > 0).long() + 2 * (x[:, :1] < -0.5).long()


class SignClassifier(nn.Module):
    def forward(self, x):
        return torch.stack([-x.flatten(1).mean(1), x.flatten(1).mean(1)], dim=1)


def test_batches_accumulate_to_the_whole_set_figures():
    real, fake = images(6), images(6, seed=1).mul(0.5)
    condition = threshold_segmenter(real)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    suite = MetricSuite(["psnr", "ssim", "ms_ssim", "fid", "kid", "diversity_ssim", "dice", "accuracy"],
                        feature_extractor=moments, segmenter=threshold_segmenter, classifier=SignClassifier(),
                        num_classes=3, kid_subsets=4, kid_subset_size=3)
    for part in (slice(0, 4), slice(4, 6)):
        suite.update(real[part], fake[part], condition[part], labels[part])
    result = suite.compute()
    for name in ("psnr", "ssim", "ms_ssim"):
        expected = reconstruction.RECONSTRUCTION_METRICS[name](fake, real).double().mean()
        assert result[name] == pytest.approx(float(expected), rel=1e-5)
    assert result["fid"] == pytest.approx(frechet_distance(moments(real), moments(fake)))
    kid = kernel_distance(moments(real), moments(fake), subsets=4, subset_size=3)
    assert (result["kid_mean"], result["kid_std"]) == pytest.approx(kid)
    assert result["diversity_ssim"] == pytest.approx(mean_pairwise_similarity(fake, "ssim"), rel=1e-6)
    assert result["diversity_ssim_real"] == pytest.approx(mean_pairwise_similarity(real, "ssim"), rel=1e-6)
    per_class = dice_per_class(threshold_segmenter(fake), condition, 3)
    assert result["dice"] == pytest.approx(float(per_class.nanmean()))
    assert result["dice_class_2"] == pytest.approx(float(per_class[:, 1].mean()))
    assert result["dice_real"] == 1.0
    expected_accuracy = (SignClassifier()(fake).argmax(1) == labels).double().mean()
    assert result["accuracy"] == pytest.approx(float(expected_accuracy))
    assert result["accuracy_real"] == pytest.approx(float((SignClassifier()(real).argmax(1) == labels).double().mean()))


def test_per_plane_features_give_a_fid_per_plane():
    real, fake = images(4, (1, 6, 6, 6)), images(4, (1, 6, 6, 6), seed=1)
    planes = PlaneFeatures(moments, num_slices=2)
    suite = MetricSuite(["fid"], feature_extractor=planes)
    suite.update(real=real)
    suite.update(fake=fake)
    result = suite.compute()
    assert set(result) == {"fid", "fid_axial", "fid_coronal", "fid_sagittal"}
    real_axial, fake_axial = planes.per_plane(real)["axial"], planes.per_plane(fake)["axial"]
    assert result["fid_axial"] == pytest.approx(frechet_distance(real_axial, fake_axial))


def test_missing_weights_drop_the_metric_with_one_notice(tmp_path, capsys):
    suite = MetricSuite(["fid", "kid", "psnr"], feature_extractor="medicalnet",
                        feature_options={"weights_path": tmp_path / "resnet_10.pth"})
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "fid, kid skipped" in notice and "resnet_10.pth" in notice
    suite.update(images(2), images(2, seed=1))
    assert set(suite.compute()) == {"psnr"}


def test_bad_names_and_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown metric.*lpips; known: psnr, ssim"):
        MetricSuite(["psnr", "lpips"])
    with pytest.raises(ValueError, match="'dice' needs segmenter="):
        MetricSuite(["dice"])
    suite = MetricSuite(["psnr"])
    suite.update(images(2), images(2))
    with pytest.raises(ValueError, match=r"\(1, 8, 8, 8\) after samples of shape \(1, 16, 16, 16\)"):
        suite.update(fake=images(2, (1, 8, 8, 8)))
    with pytest.raises(ValueError, match="fid needs real samples"):
        empty = MetricSuite(["fid"], feature_extractor=moments)
        empty.update(fake=images(2))
        empty.compute()
