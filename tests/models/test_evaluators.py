import shutil
from pathlib import Path

import pytest
import torch
from monai.metrics import DiceMetric
from omegaconf import OmegaConf
from torch.nn import functional as F

from ldm.cli import main
from ldm.engine.interface import TrainableModel
from ldm.models.evaluators import Classifier, Segmenter, as_onehot, load_evaluator
from ldm.util import instantiate_from_config

pytestmark = pytest.mark.usefixtures("single_thread")


def segresnet(spatial_dims: int = 3, out_channels: int = 3) -> dict:
    return {"target": "monai.networks.nets.SegResNet",
            "params": {"spatial_dims": spatial_dims, "in_channels": 1, "out_channels": out_channels,
                       "init_filters": 4, "norm": ["GROUP", {"num_groups": 2}], "blocks_down": [1, 1],
                       "blocks_up": [1]}}


def unet(out_channels: int = 3) -> dict:
    return {"target": "monai.networks.nets.UNet",
            "params": {"spatial_dims": 3, "in_channels": 1, "out_channels": out_channels, "channels": [4, 8, 16],
                       "strides": [2, 2], "num_res_units": 0}}


def cnn(size: int = 16, classes: int = 10) -> dict:
    return {"target": "monai.networks.nets.Classifier",
            "params": {"in_shape": [1, size, size], "classes": classes, "channels": [4, 8], "strides": [2, 2],
                       "num_res_units": 0}}


def label_maps(shape, classes: int, seed: int) -> torch.Tensor:
    """(B, 1, *spatial) random class indices as float, the way a dataset's label map arrives."""
    return torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed)).float()


def onehot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(labels[:, 0].long(), classes).movedim(-1, 1).float()


def train(model, batch, steps: int, lr: float) -> list[float]:
    model.learning_rate = lr
    (optimizer,) = model.configure_optimizers()
    losses = []
    for step in range(steps):
        model.global_step = step
        loss, scalars = model.training_step(batch, step, 0)
        assert set(scalars) >= {"train/loss"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------------------------- Segmenter
@pytest.mark.parametrize("mask_form", ["onehot", "label_map"])
def test_segmenter_training_reduces_the_loss(mask_form):
    torch.manual_seed(0)
    model = Segmenter(segresnet())
    assert isinstance(model, TrainableModel)
    labels = label_maps((2, 1, 8, 8, 8), 3, seed=1)
    images = labels - 1 + 0.1 * torch.randn(labels.shape)  # the class is readable from the intensity
    batch = {"image": images, "mask": onehot(labels, 3) if mask_form == "onehot" else labels}
    losses = train(model, batch, steps=12, lr=1e-2)
    assert losses[-1] < 0.85 * losses[0]


def test_segmenter_takes_its_dims_and_classes_from_the_network():
    for config, expected in ((segresnet(2, 4), (2, 1, 4)), (unet(out_channels=2), (3, 1, 2))):
        model = Segmenter(config)
        assert (model.dims, model.in_channels, model.num_classes) == expected
    with pytest.raises(ValueError, match="needs >= 2"):
        Segmenter(segresnet(out_channels=1))


@pytest.mark.parametrize("include_background", [False, True])
def test_val_dice_matches_monai_dice_metric(include_background, monkeypatch):
    model = Segmenter(segresnet(), include_background=include_background).eval()
    masks = onehot(label_maps((3, 1, 8, 8, 8), 3, seed=2), 3)
    batch = {"image": torch.zeros(3, 1, 8, 8, 8), "mask": masks}

    monkeypatch.setattr(model.network, "forward", lambda x: 10 * masks)  # perfect logits
    assert float(model.validation_step(batch, 0)["val/dice"]) == pytest.approx(1.0)
    assert torch.equal(model.segment(batch["image"]), masks)

    guessed_labels = label_maps((3, 1, 8, 8, 8), 3, seed=3)
    guessed_labels[0][guessed_labels[0] == 2] = 0  # item 0: class 2 never predicted
    guess = onehot(guessed_labels, 3)
    monkeypatch.setattr(model.network, "forward", lambda x: 10 * guess + torch.rand(guess.shape))
    reference = DiceMetric(include_background=include_background, reduction="mean", ignore_empty=False)
    reference(y_pred=guess, y=masks)
    expected = float(reference.aggregate())
    assert 0.1 < expected < 0.9
    assert float(model.validation_step(batch, 0)["val/dice"]) == pytest.approx(expected, abs=1e-6)
    per_class = model.dice(batch["image"], masks)
    assert per_class.shape == (3, 3 if include_background else 2)
    assert float(per_class.mean()) == pytest.approx(expected, abs=1e-6)


def test_as_onehot_reads_label_maps_and_rejects_other_shapes():
    labels = label_maps((2, 1, 4, 4), 4, seed=4)
    assert torch.equal(as_onehot(labels, 4), onehot(labels, 4))
    assert torch.equal(as_onehot(onehot(labels, 4), 4), onehot(labels, 4))
    with pytest.raises(ValueError, match=r"neither one-hot \(B, 4"):
        as_onehot(torch.zeros(2, 3, 4, 4), 4)
    with pytest.raises(ValueError, match=r"class indices 0 \.\. 1"):
        as_onehot(labels, 2)


def test_segmenter_test_step_and_input_checks():
    model = Segmenter(segresnet(out_channels=2)).eval()
    labels = label_maps((2, 1, 8, 8, 8), 2, seed=5)
    images = model.test_step({"image": torch.randn(2, 1, 8, 8, 8), "mask": labels}, 0)
    assert set(images) == {"inputs", "segmentation", "mask"}
    assert images["segmentation"].shape == images["mask"].shape == (2, 2, 8, 8, 8)
    assert torch.equal(images["segmentation"].sum(1), torch.ones(2, 8, 8, 8))
    assert torch.equal(images["mask"], onehot(labels, 2))
    assert model.segment(torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"expected \(B, 1, D, H, W\)"):
        model.segment(torch.zeros(2, 1, 8, 8))
    with pytest.raises(KeyError, match="no 'mask' entry"):
        model.validation_step({"image": torch.zeros(1, 1, 8, 8, 8)}, 0)


def test_segmenter_test_evaluator_is_the_mean_item_dice():
    model = Segmenter(segresnet(out_channels=2)).eval()
    evaluator = model.test_evaluator()
    reference = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    for seed in range(2):
        batch = {"image": torch.randn(2, 1, 8, 8, 8), "mask": label_maps((2, 1, 8, 8, 8), 2, seed=seed)}
        outputs = model.test_step(batch, seed)
        evaluator.update(batch, outputs)
        reference(y_pred=outputs["segmentation"], y=outputs["mask"])
    assert evaluator.compute()["dice"] == pytest.approx(float(reference.aggregate()), abs=1e-6)


@pytest.mark.parametrize("config", [segresnet(), unet()], ids=["segresnet", "unet"])
def test_segmenter_features_are_the_pooled_deepest_encoder_map(config):
    model = Segmenter(config).eval()
    images = torch.randn(3, 1, 8, 8, 8)
    features = model.features(images)
    if hasattr(model.network, "encode"):
        expected = model.network.encode(images)[0].mean(dim=(2, 3, 4))
        torch.testing.assert_close(features, expected)
    else:
        assert features.shape == (3, 16)  # the UNet's bottom channels
    torch.testing.assert_close(model.features(images[:1]), features[:1])  # per item: no batch statistics


# ------------------------------------------------------------------------------------------------ Classifier
def digits_like(n: int = 16, size: int = 16, seed: int = 0) -> dict:
    """Items whose class is written in their mean intensity: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = (labels.float() / 9 * 2 - 1).view(n, 1, 1, 1) + 0.05 * torch.randn(n, 1, size, size, generator=generator)
    return {"image": images, "class_label": labels}


def test_classifier_training_reduces_the_loss():
    torch.manual_seed(0)
    model = Classifier(cnn(), num_classes=10, intensity_jitter=0.02, noise_std=0.02)
    assert isinstance(model, TrainableModel)
    losses = train(model, digits_like(), steps=10, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0]


def test_classifier_accuracy_of_perfect_and_half_right_predictors(monkeypatch):
    model = Classifier(cnn(), num_classes=10).eval()
    batch = digits_like(n=10)
    labels = batch["class_label"]
    monkeypatch.setattr(model.network, "forward", lambda x: F.one_hot(labels, 10).float())
    assert float(model.validation_step(batch, 0)["val/accuracy"]) == 1.0
    assert torch.equal(model.predict(batch["image"]), labels)
    wrong = labels.clone()
    wrong[:5] = (wrong[:5] + 1) % 10
    monkeypatch.setattr(model.network, "forward", lambda x: F.one_hot(wrong, 10).float())
    scalars = model.validation_step(batch, 0)
    assert float(scalars["val/accuracy"]) == 0.5
    expected_loss = F.cross_entropy(F.one_hot(wrong, 10).float(), labels)
    assert float(scalars["val/loss"]) == pytest.approx(float(expected_loss))
    evaluator = model.test_evaluator()
    evaluator.update(batch, model.test_step(batch, 0))
    assert evaluator.compute() == {"accuracy": 0.5}


def test_classifier_features_are_the_output_layer_input():
    model = Classifier(cnn(), num_classes=10).eval()
    images = digits_like(n=4)["image"]
    features = model.features(images)
    assert features.shape == (4, 8 * 4 * 4)
    torch.testing.assert_close(model.output_layer(features), model(images))
    assert model.predict(images).dtype == torch.int64


def test_classifier_checks_num_classes_against_the_network():
    with pytest.raises(ValueError, match="gives 10 logits, num_classes is 3"):
        Classifier(cnn(), num_classes=3)


# ------------------------------------------------------------------------------------------- load_evaluator
RUNS = {
    "classifier": {
        "model": {"base_learning_rate": 1e-3, "target": "ldm.models.evaluators.Classifier",
                  "params": {"num_classes": 10, "network_config": cnn()}},
        "data": {"target": "ldm.data.base.DataModuleFromConfig",
                 "params": {"batch_size": 4, "num_workers": 0,
                            "train": {"target": "ldm.data.digits.Digits", "params": {"split": "train", "size": 16}},
                            "validation": {"target": "ldm.data.digits.Digits",
                                           "params": {"split": "validation", "size": 16}}}},
        "images": torch.linspace(-1, 1, 2 * 16 * 16).view(2, 1, 16, 16),
    },
    "segmenter": {
        "model": {"base_learning_rate": 1e-3, "target": "ldm.models.evaluators.Segmenter",
                  "params": {"network_config": segresnet(out_channels=2)}},
        "data": {"target": "ldm.data.base.DataModuleFromConfig",
                 "params": {"batch_size": 2, "num_workers": 0,
                            "train": {"target": "ldm.data.phantom.HeadPhantom",
                                      "params": {"split": "train", "size": 8, "length": 4}},
                            "validation": {"target": "ldm.data.phantom.HeadPhantom",
                                           "params": {"split": "validation", "size": 8, "length": 2}}}},
        "images": torch.linspace(-1, 1, 2 * 8 ** 3).view(2, 1, 8, 8, 8),
    },
}


def trained_run(tmp_path, kind: str):
    """A run folder of the CLI: 2 steps of the `kind` evaluator, validated at step 2."""
    config = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.create({"model": RUNS[kind]["model"], "data": RUNS[kind]["data"]}), config)
    logdir = tmp_path / "logs"
    assert main("test", ["-b", str(config), "-t", "--no_test", "-l", str(logdir), "-n", kind,
                         "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
                         "trainer.logger=[csv]"]) == 0
    (run,) = [p for p in logdir.iterdir() if p.is_dir()]
    return run, config


@pytest.mark.parametrize("kind", list(RUNS))
def test_load_evaluator_round_trips_a_trained_run(tmp_path, kind):
    run, config = trained_run(tmp_path, kind)
    checkpoint = run / "checkpoints" / "last.ckpt"
    model_config = OmegaConf.load(config).model
    reference = instantiate_from_config({"target": model_config.target, "params": model_config.params})
    reference.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    reference.eval()
    images = RUNS[kind]["images"]

    for source in (run, checkpoint, str(checkpoint)):
        loaded = load_evaluator(source)
        assert type(loaded) is type(reference) and not loaded.training
        torch.testing.assert_close(loaded.features(images), reference.features(images))
        torch.testing.assert_close(loaded(images), reference(images))

    # best.ckpt, where there is one, wins over last.ckpt
    state = torch.load(checkpoint, weights_only=True)
    first = next(iter(state["state_dict"]))
    state["state_dict"][first] = state["state_dict"][first] + 1
    torch.save(state, run / "checkpoints" / "best.ckpt")
    assert torch.equal(load_evaluator(run).state_dict()[first], state["state_dict"][first])


def test_load_evaluator_errors_name_what_is_missing(tmp_path):
    def one_line_error(source, *words):
        with pytest.raises(FileNotFoundError) as caught:
            load_evaluator(source)
        message = str(caught.value)
        assert "\n" not in message and all(word in message for word in words), message

    one_line_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "does not exist")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    one_line_error(run, str(run), "checkpoints/last.ckpt")
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    one_line_error(run, str(run), "configs/*.yaml")
    one_line_error(run / "checkpoints" / "last.ckpt", str(run), "configs/*.yaml")

    (run / "configs").mkdir()
    shutil.copy(Path(__file__).parents[1] / "engine" / "toy.yaml", run / "configs" / "project.yaml")
    with pytest.raises(TypeError, match="tests.engine.toy.ToyRegressor, not of an evaluator"):
        load_evaluator(run)
