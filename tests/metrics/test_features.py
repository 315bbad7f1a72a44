import pytest
import torch
from monai.networks.nets import resnet10
from torch import nn

from ldm.metrics.features import (INCEPTION_WEIGHTS_FILE, InceptionFeatures, MedicalNetFeatures, MissingWeights,
                                  ModuleFeatures, PlaneFeatures, feature_extractor)


def volumes(shape=(2, 1, 8, 10, 12), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class ChannelMeans(nn.Module):
    """A stand-in 2D network whose features are the per-channel means and maxima."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def features(self, x):
        return self.linear(x.flatten(1)[:, :4])


def test_missing_weights_name_the_file_and_how_to_get_it(tmp_path):
    with pytest.raises(MissingWeights, match=rf"{tmp_path}.*{INCEPTION_WEIGHTS_FILE}.*download") as error:
        InceptionFeatures(weights_path=tmp_path / INCEPTION_WEIGHTS_FILE)
    assert "\n" not in str(error.value)
    with pytest.raises(MissingWeights, match="resnet_18_23dataset.pth.*MedicalNet"):
        MedicalNetFeatures(weights_path=None, depth=18)


def random_inception_weights(path, monkeypatch):
    """torch-fidelity's Inception with its random initialisation, saved as its weights file would be."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save(network.state_dict(), path)


def test_inception_features_are_torchmetrics_fid_features(tmp_path, monkeypatch):
    from torchmetrics.image.fid import FrechetInceptionDistance

    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    random_inception_weights(weights, monkeypatch)
    grey = volumes((1, 1, 16, 16))
    features = InceptionFeatures(weights_path=weights)(grey)
    assert features.shape == (1, 2048) and features.dtype == torch.float64
    reference = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
    reference.update(((grey + 1) / 2).expand(-1, 3, -1, -1), real=True)
    torch.testing.assert_close(features.sum(dim=0), reference.real_features_sum, rtol=1e-4, atol=1e-3)


def test_medicalnet_loads_a_medicalnet_checkpoint_and_pools_features(tmp_path):
    torch.manual_seed(0)
    network = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B",
                       bias_downsample=False).eval()
    state = {f"module.{key}": value for key, value in network.state_dict().items()}
    state["module.conv_seg.weight"] = torch.zeros(2, 512, 1, 1, 1)  # MedicalNet's segmentation head, not used
    torch.save({"state_dict": state}, tmp_path / "resnet_10.pth")
    extractor = MedicalNetFeatures(weights_path=tmp_path / "resnet_10.pth", depth=10)
    x = volumes((2, 2, 16, 16, 16))
    features = extractor(x)
    assert features.shape == (2, 2 * 512) and features.dtype == torch.float64
    first_channel = x[:, :1]
    z_scored = (first_channel - first_channel.mean(dim=(2, 3, 4), keepdim=True)) / first_channel.std(
        dim=(2, 3, 4), keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(features[:, :512], network(z_scored).double(), rtol=1e-4, atol=1e-5)


def test_plane_features_average_each_planes_slices():
    x = volumes()
    extractor = PlaneFeatures(ChannelMeans())
    per_plane = extractor.per_plane(x)
    # The mean over slices of each slice's mean is the volume mean, whatever the plane.
    for plane in ("axial", "coronal", "sagittal"):
        torch.testing.assert_close(per_plane[plane][:, 0], x.mean(dim=(1, 2, 3, 4)).double())
    axial_maxima = x.amax(dim=(2, 3)).mean(dim=-1)  # axial slices fix the last (Z) axis
    torch.testing.assert_close(per_plane["axial"][:, 1], axial_maxima[:, 0].double())
    assert extractor(x).shape == (2, 6)


def test_plane_features_keep_the_central_slices():
    x = volumes()
    central = PlaneFeatures(ChannelMeans(), num_slices=2, planes=("sagittal",)).per_plane(x)["sagittal"]
    torch.testing.assert_close(central[:, 0], x[:, :, 3:5].mean(dim=(1, 2, 3, 4)).double())


def test_modules_with_features_are_wrapped():
    model = Classifier()
    images = torch.randn(5, 1, 2, 2)
    features = feature_extractor(model, batch_size=2)(images)
    assert isinstance(feature_extractor(model), ModuleFeatures)
    torch.testing.assert_close(features, model.features(images).detach().double())
    with pytest.raises(TypeError, match="ChannelMeans has no features"):
        feature_extractor(ChannelMeans())


def test_registry_errors_are_one_line_and_name_the_culprit():
    with pytest.raises(ValueError, match="'resnet'; known: inception, medicalnet, 2.5d"):
        feature_extractor("resnet")
    with pytest.raises(ValueError, match="unknown option.*slices"):
        feature_extractor("2.5d", network=ChannelMeans(), slices=3)
    nested = feature_extractor("2.5d", network=Classifier(), num_slices=1)
    assert nested(volumes((2, 1, 2, 2, 2))).shape == (2, 9)
