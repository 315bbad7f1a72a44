"""evaluate.py: folders of NIfTI / PNG images scored against references computed directly (ldm.metrics functions,
MONAI, closed forms), a stand-in evaluator network, the errors, and a tiny diffusion run's test stage (`-r`)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from PIL import Image
from torch import nn

import ldm.evaluate_cli as evaluate_cli
from ldm.cli import main as train_main
from ldm.engine.images import to_grid
from ldm.evaluate_cli import main
from ldm.util import ConfigError
from ldm.evaluate_files import read_test_batch, to_unit_range
from ldm.metrics import METRICS
from ldm.metrics.distribution import kernel_distance
from ldm.metrics.diversity import mean_pairwise_similarity
from ldm.metrics.reconstruction import ssim
from ldm.util import instantiate_from_config
from tests.engine.helpers import REPO, only_run_dir, subprocess_env

pytestmark = pytest.mark.usefixtures("single_thread")


class ThresholdSegmenter(nn.Module):
    """Stands in for a trained Segmenter / Classifier: K classes by equal intensity bands of [-1, 1] (for K = 2:
    class 1 where the image is > 0); features are moments."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.thresholds = torch.linspace(-1, 1, classes + 1)[1:-1]

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> one-hot (B, K, *S) of the first channel's band."""
        bands = torch.bucketize(images[:, 0].contiguous(), self.thresholds.to(images.device))
        return nn.functional.one_hot(bands, len(self.thresholds) + 1).movedim(-1, 1).float()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B,) class 1 for images brighter than 0 on average."""
        return (images.flatten(1).mean(1) > 0).long()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(1) * self.scale
        return torch.stack([flat.mean(1), flat.std(1), flat.abs().mean(1)], dim=1)


def stand_in_run(monkeypatch, tmp_path: Path, classes: int = 2) -> Path:
    """A --segmenter / --classifier folder whose network loads as a ThresholdSegmenter(classes)."""
    monkeypatch.setattr(evaluate_cli, "load_scorer", lambda path, role: ThresholdSegmenter(classes))
    folder = tmp_path / "evaluator_run"
    folder.mkdir()
    return folder


@pytest.fixture
def stand_in(monkeypatch, tmp_path) -> Path:
    return stand_in_run(monkeypatch, tmp_path)


def volumes(count: int, shape=(12, 12, 12), seed: int = 0) -> list[np.ndarray]:
    """Smooth-ish random volumes in [-1, 1] (float32)."""
    rng = np.random.default_rng(seed)
    return [np.tanh(rng.normal(size=shape)).astype(np.float32) for _ in range(count)]


def write_nifti(folder: Path, arrays: list[np.ndarray], prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, array in enumerate(arrays):
        path = folder / f"{prefix}_{index:02d}.nii.gz"
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
        paths.append(path)
    return paths


def run_ok(argv: list[str], capsys) -> tuple[dict, list[str]]:
    """evaluate.py in-process: exit code 0; (the JSON report, printed lines)."""
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    path = Path(lines[-1].split("report written to ")[1])
    return json.loads(path.read_text()), lines


def assert_error(argv: list[str], pattern: str) -> None:
    """evaluate.py exits with 2 and one `error: ...` line on stderr matching `pattern`."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(argv) == 2
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]


def stacked(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays))[:, None]


# ------------------------------------------------------------------------------------------------ folders
def test_identical_nifti_folders(tmp_path, stand_in, capsys):
    arrays = volumes(6)
    write_nifti(tmp_path / "real", arrays)
    write_nifti(tmp_path / "fake", arrays)
    report, lines = run_ok(["--samples", str(tmp_path / "fake"), "--real", str(tmp_path / "real"), "--intensity",
                            "none", "--metrics", "psnr,ssim,diversity_ssim,fid,kid", "--features", "segmenter",
                            "--segmenter", str(stand_in), "--suite_options", '{"kid_subset_size": 4}',
                            "--batch_size", "4", "--device", "cpu"], capsys)
    metrics = report["metrics"]
    assert "psnr: inf" in lines and metrics["psnr"] is None  # exact copies; JSON has no inf
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-8)
    features = ThresholdSegmenter().features(stacked(arrays)).double()
    kid = kernel_distance(features, features, subsets=100, subset_size=4, seed=0)  # random subsets: not 0
    assert (metrics["kid_mean"], metrics["kid_std"]) == pytest.approx(kid, rel=1e-6)
    expected = mean_pairwise_similarity(stacked(arrays), "ssim", 1000, 0)
    assert metrics["diversity_ssim"] == pytest.approx(expected, rel=1e-6)
    assert metrics["diversity_ssim_real"] == pytest.approx(expected, rel=1e-6)
    assert report["scored"]["samples"] | {"source": None} == {
        "source": None, "kind": "nifti", "count": 6, "shape": [1, 12, 12, 12], "first": "img_00.nii.gz",
        "last": "img_05.nii.gz"}
    assert (tmp_path / "fake" / "metrics.json").is_file()


def test_paired_ssim_follows_sorted_order_and_intensity_rules(tmp_path, capsys):
    real, fake = volumes(3, seed=1), volumes(3, seed=2)
    raw = [5.0 + 40.0 * array for array in fake]  # raw scanner-like values
    write_nifti(tmp_path / "real", real)
    write_nifti(tmp_path / "fake", raw)
    for rule in ("minmax", "percentile"):
        report, _ = run_ok(["--samples", str(tmp_path / "fake"), "--real", str(tmp_path / "real"), "--metrics",
                            "ssim", "--intensity", rule, "--out", str(tmp_path / f"{rule}.json"), "--device", "cpu"],
                           capsys)
        if rule == "minmax":
            reference = [2 * (a - a.min()) / (a.max() - a.min()) - 1 for a in raw]
            scaled_real = [2 * (a - a.min()) / (a.max() - a.min()) - 1 for a in real]
        else:
            def percentile(a):
                low, high = np.percentile(a, [0.5, 99.5])
                return np.clip(2 * (a - low) / (high - low) - 1, -1, 1)
            reference, scaled_real = [percentile(a) for a in raw], [percentile(a) for a in real]
        np.testing.assert_allclose(to_unit_range(raw[0][None], rule, (0.5, 99.5))[0], reference[0], atol=1e-5)
        expected = float(ssim(stacked(reference).float(), stacked(scaled_real).float()).mean())
        assert report["metrics"]["ssim"] == pytest.approx(expected, rel=1e-5)


def test_png_folders_grey_rgb_and_16_bit(tmp_path, capsys):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(16, 16), dtype=np.uint8) for _ in range(4)]
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image, "L").save(tmp_path / "real" / f"{index}.png")
        Image.fromarray(np.repeat(image[..., None], 3, axis=2), "RGB").save(tmp_path / "fake" / f"{index}.png")
    report, _ = run_ok(["--samples", str(tmp_path / "fake"), "--real", str(tmp_path / "real"),
                        "--metrics", "ssim,diversity_ssim", "--device", "cpu"], capsys)
    assert report["scored"]["samples"]["shape"] == [1, 16, 16]  # grey RGB read as one channel, like the L files
    assert report["metrics"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    expected = mean_pairwise_similarity(torch.from_numpy(np.stack(images) / 127.5 - 1).float()[:, None], "ssim",
                                        1000, 0)
    assert report["metrics"]["diversity_ssim"] == pytest.approx(expected, rel=1e-5)

    deep = [rng.integers(0, 65536, size=(16, 16), dtype=np.uint16) for _ in range(3)]
    (tmp_path / "deep").mkdir()
    for index, image in enumerate(deep):
        Image.fromarray(image).save(tmp_path / "deep" / f"{index}.png")  # 16-bit grey
    report, _ = run_ok(["--samples", str(tmp_path / "deep"), "--metrics", "diversity_ssim", "--device", "cpu"], capsys)
    expected = mean_pairwise_similarity(torch.from_numpy(np.stack(deep) / 32767.5 - 1).float()[:, None], "ssim",
                                        1000, 0)
    assert report["metrics"]["diversity_ssim"] == pytest.approx(expected, rel=1e-5)


def test_dice_of_masks_equal_to_the_segmentation_is_one(tmp_path, stand_in, capsys):
    arrays = volumes(4, seed=4)
    write_nifti(tmp_path / "fake", arrays, prefix="sample")
    label_maps = [(array > 0).astype(np.float32) for array in arrays]
    write_nifti(tmp_path / "masks", label_maps, prefix="sample")  # same names: paired by name
    report, _ = run_ok(["--samples", str(tmp_path / "fake"), "--masks", str(tmp_path / "masks"), "--metrics", "dice",
                        "--segmenter", str(stand_in), "--intensity", "none", "--device", "cpu"], capsys)
    assert report["metrics"]["dice"] == pytest.approx(1.0)
    assert report["scored"]["masks"]["paired_by"] == "name"

    # One-hot masks of other names (paired by sorted order), background and foreground swapped in the last two.
    swapped = [np.stack([1 - m, m], axis=-1) if i < 2 else np.stack([m, 1 - m], axis=-1)
               for i, m in enumerate(label_maps)]
    write_nifti(tmp_path / "onehot", swapped, prefix="mask")
    report, _ = run_ok(["--samples", str(tmp_path / "fake"), "--masks", str(tmp_path / "onehot"), "--metrics",
                        "dice", "--segmenter", str(stand_in), "--intensity", "none", "--out",
                        str(tmp_path / "swapped.json"), "--device", "cpu"], capsys)
    segmentation = ThresholdSegmenter().segment(stacked(arrays))
    reference = compute_dice(segmentation, torch.from_numpy(np.stack(swapped)).movedim(-1, 1), include_background=False)
    assert report["metrics"]["dice"] == pytest.approx(float(reference.mean()), abs=1e-6)
    assert report["scored"]["masks"]["paired_by"] == "order"


def test_accuracy_from_a_labels_file(tmp_path, stand_in, capsys):
    arrays = [np.full((8, 8, 8), value, dtype=np.float32) for value in (-0.5, 0.5, 0.7, -0.2)]
    write_nifti(tmp_path / "fake", arrays)
    (tmp_path / "labels.csv").write_text("name,class\nimg_00,0\nimg_01,1\nimg_02,0\nimg_03.nii.gz,0\n")
    report, _ = run_ok(["--samples", str(tmp_path / "fake"), "--labels", str(tmp_path / "labels.csv"), "--metrics",
                        "accuracy", "--classifier", str(stand_in), "--intensity", "none", "--device", "cpu"], capsys)
    assert report["metrics"]["accuracy"] == pytest.approx(3 / 4)  # predictions 0, 1, 1, 0


def test_a_sample_py_folder_gives_its_manifest_samples_and_labels(tmp_path, stand_in, capsys):
    """The manifest's NIfTI files (not the PNG previews beside them), and its "label k" conditions for accuracy."""
    arrays = [np.full((8, 8, 8), value, dtype=np.float32) for value in (0.5, -0.5, -0.5)]
    paths = write_nifti(tmp_path / "samples", arrays, prefix="sample")
    entries = []
    for index, path in enumerate(paths):
        Image.fromarray(np.zeros((8, 24), np.uint8)).save(path.with_name(f"sample_{index:04d}.png"))
        entries.append({"index": index, "files": [path.name, f"sample_{index:04d}.png"],
                        "condition": f"label {index % 2}"})
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(tmp_path / "samples" / "samples.png")  # the montage
    (tmp_path / "samples" / "manifest.json").write_text(json.dumps({"samples": entries}))
    report, _ = run_ok(["--samples", str(tmp_path / "samples"), "--metrics", "accuracy", "--classifier",
                        str(stand_in), "--intensity", "none", "--device", "cpu"], capsys)
    assert report["scored"]["samples"]["kind"] == "nifti" and report["scored"]["samples"]["count"] == 3
    assert report["metrics"]["accuracy"] == pytest.approx(1 / 3)  # predicted 1, 0, 0 for labels 0, 1, 0


def test_the_script_reports_bad_input_in_one_line(tmp_path):
    write_nifti(tmp_path / "fake", volumes(2))
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--samples", str(tmp_path / "fake"),
                             "--metrics", "fidd"], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --metrics: unknown metric(s) fidd; known: "
                                                  f"{', '.join(METRICS)}"]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    write_nifti(tmp_path / "fake", volumes(2))
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 12), np.float32), np.eye(4)), str(tmp_path / "fake" / "odd.nii.gz"))
    write_nifti(tmp_path / "good", volumes(3))
    (tmp_path / "empty").mkdir()
    assert_error(["--samples", str(tmp_path / "fake"), "--metrics", "diversity_ssim"],
                 r"img_00\.nii\.gz \[1, 12, 12, 12\], odd\.nii\.gz \[1, 10, 12, 12\]")
    assert_error(["--samples", str(tmp_path / "good"), "--metrics", "diversity_ssim,fidd"], r"unknown metric.*fidd")
    assert_error(["--samples", str(tmp_path / "empty"), "--metrics", "diversity_ssim"], r"empty.*no \.nii")
    assert_error(["--samples", str(tmp_path / "good"), "--metrics", "dice", "--masks", str(tmp_path / "good"),
                  "--segmenter", str(tmp_path / "no_such_run")], r"--segmenter .*no_such_run")
    assert_error(["--samples", str(tmp_path / "good"), "--real", str(tmp_path / "good"), "--metrics", "fid",
                  "--features", "medicalnet", "--feature_options",
                  json.dumps({"weights_path": str(tmp_path / "absent.pth")}), "--device", "cpu"],
                 r"medicalnet.*absent\.pth")


# ------------------------------------------------------------------------------------------------ a run
def test_png_grid_of_the_test_stage_reads_back(tmp_path):
    """2D test samples come back from the grid save_images wrote (8-bit), for 1, 3 and 2 channels."""
    for channels in (1, 3, 2):
        images = torch.rand(3, channels, 6, 5) * 2 - 1
        path = tmp_path / f"samples_b-0000_r-0_{channels}.png"
        Image.fromarray(to_grid(images)).save(path)
        read, files = read_test_batch({"png": path, "nifti": {}}, images)
        assert files == [path] and read.shape == images.shape
        assert (read - images).abs().max() <= 1 / 127.5 + 1e-6


TINY_3D = ["trainer.max_steps=2", "trainer.logger=[csv]", "trainer.callbacks={}", "data.params.num_workers=0",
           "data.params.batch_size=2", "model.params.image_size=4", "model.params.unet_config.params.image_size=4",
           "model.params.first_stage_config.params.ddconfig.resolution=16",
           *[f"data.params.{split}.params.crop_to=[16,16,16]" for split in ("train", "validation", "test")]]


def test_run_mode_generates_and_pairs_the_test_split(tmp_path, monkeypatch, capsys):
    stand_in = stand_in_run(monkeypatch, tmp_path, classes=3)  # background, grey and white matter
    logdir = tmp_path / "ldm"
    assert train_main("ldm", ["-b", str(REPO / "configs" / "demo" / "ldm_3d.yaml"), "-t", "--no_test",
                              "-l", str(logdir), *TINY_3D]) == 0
    run = only_run_dir(logdir)
    assert_error(["-r", str(run), "--metrics", "diversity_ssim"], r"no test-stage samples .*--sample N")
    capsys.readouterr()
    report, lines = run_ok(["-r", str(run), "--sample", "3", "--metrics", "ssim,diversity_ssim,dice",
                            "--segmenter", str(stand_in), "--device", "cpu", "model.params.sampler_steps=2"], capsys)
    assert report["scored"]["count"] == 3 and report["scored"]["shape"] == [1, 16, 16, 16]
    assert (run / "metrics" / "evaluate.json").is_file()
    files = sorted((run / "images" / "test").glob("samples_b-*_r-0_*.nii.gz"))
    assert [f.name for f in files] == ["samples_b-0000_r-0_00.nii.gz", "samples_b-0000_r-0_01.nii.gz",
                                       "samples_b-0001_r-0_00.nii.gz", "samples_b-0001_r-0_01.nii.gz"]
    fake = torch.stack([torch.from_numpy(np.asarray(nib.load(str(f)).dataobj, np.float32))[None] for f in files])[:3]
    from omegaconf import OmegaConf
    config = OmegaConf.load(sorted((run / "configs").glob("*-project.yaml"))[-1])
    test_set = instantiate_from_config(config.data.params.test)
    real = torch.stack([torch.as_tensor(test_set[i]["image"]).float() for i in range(3)])
    masks = torch.stack([torch.as_tensor(test_set[i]["mask"]).float() for i in range(3)])
    metrics = report["metrics"]
    assert metrics["ssim"] == pytest.approx(float(ssim(fake, real).mean()), rel=1e-5)  # item i with sample i
    assert metrics["diversity_ssim"] == pytest.approx(mean_pairwise_similarity(fake, "ssim", 1000, 0), rel=1e-5)
    assert metrics["diversity_ssim_real"] == pytest.approx(mean_pairwise_similarity(real, "ssim", 1000, 0), rel=1e-5)
    reference = compute_dice(ThresholdSegmenter(3).segment(fake), masks, include_background=False)
    assert metrics["dice"] == pytest.approx(float(reference.nanmean()), abs=1e-6)
    assert math.isfinite(metrics["dice_real"])

    # Scoring the saved samples again, without generating: all four of the test split's first two batches.
    report, _ = run_ok(["-r", str(run), "--metrics", "diversity_ssim", "--out", str(tmp_path / "again.json"),
                        "--device", "cpu"], capsys)
    assert report["scored"]["count"] == 4


def test_trust_config_lifts_the_target_allow_list_as_in_the_other_scripts(tmp_path, monkeypatch):
    """evaluate.py -r builds the run's model from its configs: `--trust-config` lets them name any target, as
    train_*.py and sample.py do (the flag sets LDM_TRUST_CONFIG for this process)."""
    from ldm.util import TRUST_VARIABLE, instantiate_from_config

    monkeypatch.setenv(TRUST_VARIABLE, "0")
    outside = {"target": "collections.OrderedDict"}
    with pytest.raises(ConfigError, match="outside the modules a config may name"):
        instantiate_from_config(outside)
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["--trust-config", "--samples", str(tmp_path / "none"), "--metrics", "diversity_ms_ssim"]) == 2
    assert instantiate_from_config(outside) == {}
