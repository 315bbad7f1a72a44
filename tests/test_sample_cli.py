"""sample.py end to end: a tiny mask-conditioned 3D LDM trained for two steps, tiny 2D models saved untrained, and the
errors. Sampling runs in-process (`ldm.sample_cli.main`) and once through the script."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.cli import main as train_main
from ldm.data.demo import MNI152Crops
from ldm.sample_cli import main
from ldm.sample_conditions import ConditionError, dataset_mask_labels, labels_to_channels
from ldm.util import instantiate_from_config
from tests.engine.helpers import REPO, only_run_dir, subprocess_env

CONFIGS = REPO / "configs" / "demo"
# The demo LDM at 16^3 (latents 4^3), its autoencoder untrained: sampling only needs the run's layout and weights.
TINY_3D = ["trainer.max_steps=2", "trainer.logger=[csv]", "trainer.callbacks={}", "data.params.num_workers=0",
           "data.params.batch_size=2", "model.params.image_size=4", "model.params.unet_config.params.image_size=4",
           "model.params.first_stage_config.params.ddconfig.resolution=16",
           *[f"data.params.{split}.params.crop_to=[16,16,16]" for split in ("train", "validation", "test")]]
FAST = ["--steps", "2"]
STANDINS = "tests.models.diffusion.standins"
DIGITS_DATA = {"target": "ldm.data.base.DataModuleFromConfig",
               "params": {"batch_size": 2, "test": {"target": "ldm.data.digits.Digits",
                                                     "params": {"split": "test", "size": 8}}}}

pytestmark = pytest.mark.usefixtures("single_thread")


class MNI152CropsWithAffine(MNI152Crops):
    """Demo crops with a made-up `affine` (2 mm voxels shifted by the item index), to see it copied exactly."""

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["affine"] = torch.tensor(self.affine_of(index))
        return item

    @staticmethod
    def affine_of(index: int) -> np.ndarray:
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = [index, -index, 10.0]
        return affine


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory) -> Path:
    """A run folder of the demo 3D LDM (tissue-mask concat conditioning, EMA) after two training steps."""
    logdir = tmp_path_factory.mktemp("ldm")
    assert train_main("ldm", ["-b", str(CONFIGS / "ldm_3d.yaml"), "-t", "--no_test", "-l", str(logdir), *TINY_3D]) == 0
    return only_run_dir(logdir)


def sample(tmp_path: Path, name: str, *args: str) -> tuple[Path, dict]:
    """Run sample.py in-process into tmp_path/name; (output folder, manifest)."""
    outdir = tmp_path / name
    assert main([*args, "--outdir", str(outdir)]) == 0
    return outdir, json.loads((outdir / "manifest.json").read_text())


def volume(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def save_untrained(tmp_path: Path, model_config: dict) -> tuple[Path, Path]:
    """A checkpoint and config of an untrained model outside any run folder: (checkpoint, config)."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.create(model_config))
    checkpoint, config = tmp_path / "weights" / "model.ckpt", tmp_path / "model.yaml"
    checkpoint.parent.mkdir()
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, checkpoint)
    OmegaConf.save(OmegaConf.create({"model": model_config, "data": DIGITS_DATA}), config)
    return checkpoint, config


def unconditional_2d(tmp_path: Path) -> tuple[Path, Path]:
    return save_untrained(tmp_path, {"target": "ldm.models.diffusion.ddpm.DDPM", "params": {
        "image_size": 8, "channels": 1, "timesteps": 100, "use_ema": False,
        "unet_config": {"target": f"{STANDINS}.RecordingUNet", "params": {"in_channels": 1, "out_channels": 1,
                                                                           "dims": 2}}}})


def class_conditional_2d(tmp_path: Path) -> tuple[Path, Path]:
    return save_untrained(tmp_path, {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "image_size": 4, "channels": 2, "timesteps": 100, "use_ema": False, "first_stage_key": "image",
        "cond_stage_key": "class_label", "conditioning_key": "crossattn", "ucg_rate": 0.1,
        "cond_stage_config": {"target": "ldm.modules.encoders.ClassEmbedder",
                              "params": {"embed_dim": 8, "n_classes": 10}},
        "first_stage_config": {"target": f"{STANDINS}.PoolFirstStage",
                               "params": {"in_channels": 1, "embed_dim": 2, "factor": 2, "dims": 2}},
        "unet_config": {"target": f"{STANDINS}.RecordingUNet",
                        "params": {"in_channels": 2, "out_channels": 2, "dims": 2, "context_dim": 8}}}})


def assert_error(argv: list[str], pattern: str) -> None:
    """sample.py exits with 2 and one `error: ...` line on stderr matching `pattern`."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(argv) == 2
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), lines[0]


def test_samples_from_a_split_write_nifti_png_and_manifest(ldm_run, tmp_path):
    outdir, manifest = sample(tmp_path, "split", "-r", str(ldm_run), "--cond", "split:test", "--n_samples", "3",
                              "--batch_size", "2", "--seed", "7", "--sampler", "ddim", "--eta", "0", *FAST)
    for index in range(3):
        image = nib.load(str(outdir / f"sample_{index:04d}.nii.gz"))
        assert image.shape == (16, 16, 16)
        expected = MNI152Crops("test", crop_to=(16, 16, 16), spacing_mm=2, length=4)[index]["affine"].numpy()
        np.testing.assert_allclose(image.affine, expected)  # the test split's crop in MNI space
        assert np.abs(image.get_fdata()).max() <= 1.0
        assert Image.open(outdir / f"sample_{index:04d}.png").size == (48, 16)  # three mid-slices side by side
    assert Image.open(outdir / "samples.png").size == (48, 48)
    checkpoint = ldm_run / "checkpoints" / "last.ckpt"
    assert manifest["checkpoint"] == {"path": str(checkpoint), "global_step": 2,
                                      "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
    assert manifest["sampler"] == {"name": "ddim", "steps": 2, "eta": 0.0, "spacing": "trailing", "scale": 1.0,
                                   "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False,
                                   "clip_sample_range": 1.0, "timesteps": [999, 499]}  # the demo config's trailing
    assert [s["seed"] for s in manifest["samples"]] == [7, 8, 9]
    assert [s["condition"] for s in manifest["samples"]] == ["split:test[0]", "split:test[1]", "split:test[2]"]
    assert all(s["seconds"] > 0 for s in manifest["samples"])
    assert manifest["samples"][0]["files"] == ["sample_0000.nii.gz", "sample_0000.png"]
    assert (manifest["device"], manifest["precision"], manifest["model"]["ema_weights"]) == ("cpu", "32", True)
    assert manifest["config"]["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert manifest["conditioning"] == {"cond": "split:test", "kind": "mask", "key": "mask"}
    assert [s["mask"] for s in manifest["samples"]] == [f"sample_{i:04d}_mask.nii.gz" for i in range(3)]


def test_a_sample_folder_is_a_dataset_of_samples_and_their_masks(ldm_run, tmp_path):
    """Each mask-conditioned sample is saved beside the mask it was drawn for; GeneratedPairs reads the pairs back
    exactly (the split's masks, the samples' voxels), and `--cond` takes the saved masks again."""
    from ldm.data.generated import GeneratedPairs

    outdir, _ = sample(tmp_path, "pairs", "-r", str(ldm_run), "--cond", "split:test", "--n_samples", "2", *FAST)
    pairs = GeneratedPairs(str(outdir))
    real = MNI152Crops("test", crop_to=(16, 16, 16), spacing_mm=2, length=4)
    assert len(pairs) == 2
    for index in range(2):
        item = pairs[index]
        assert item["mask"].shape == (3, 16, 16, 16) and item["image"].shape == (1, 16, 16, 16)
        torch.testing.assert_close(item["mask"], real[index]["mask"], rtol=0, atol=0)
        saved = nib.load(str(outdir / f"sample_{index:04d}.nii.gz"))
        torch.testing.assert_close(item["image"][0], torch.from_numpy(saved.get_fdata(dtype=np.float32)))
        np.testing.assert_allclose(item["affine"].numpy(), saved.affine)
    flipped = GeneratedPairs(str(outdir), flip_axes=[0, 1, 2], length=8)
    torch.manual_seed(0)
    items = [flipped[i] for i in range(8)]
    assert any(not torch.equal(item["mask"], pairs[i % 2]["mask"]) for i, item in enumerate(items))
    subsets = [[d for d in (1, 2, 3) if keep >> (d - 1) & 1] for keep in range(8)]
    for i, item in enumerate(items):  # image and mask flipped along the same axes: the pair still corresponds
        original = pairs[i % 2]
        assert any(torch.equal(item["image"], original["image"].flip(dims)) and
                   torch.equal(item["mask"], original["mask"].flip(dims)) for dims in subsets)
    again, manifest = sample(tmp_path, "again", "-r", str(ldm_run), "--cond", str(outdir), "--n_samples", "2", *FAST)
    assert [s["condition"].endswith("_mask.nii.gz") for s in manifest["samples"]] == [True, True]


def test_generated_pairs_errors_name_the_folder(tmp_path):
    from ldm.data.generated import GeneratedPairs
    from ldm.data.transforms import DataFileError

    with pytest.raises(DataFileError, match="manifest.json not found"):
        GeneratedPairs(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"samples": [{"files": ["sample_0000.png"], "mask": None}]}))
    with pytest.raises(DataFileError, match="no samples with a mask"):
        GeneratedPairs(str(tmp_path))


def test_split_items_with_an_affine_place_their_samples(ldm_run, tmp_path):
    outdir, manifest = sample(tmp_path, "affine", "-r", str(ldm_run), "--cond", "split:val", "--n_samples", "2",
                              *FAST, f"data.params.validation.target={__name__}.MNI152CropsWithAffine")
    for index in range(2):
        np.testing.assert_array_equal(nib.load(str(outdir / f"sample_{index:04d}.nii.gz")).affine,
                                      MNI152CropsWithAffine.affine_of(index))
    assert manifest["samples"][1]["affine"] == "from split:validation[1]"


def test_each_sample_is_reproducible_from_its_seed(ldm_run, tmp_path):
    """Stochastic DDIM (eta 1): the same seed gives the same sample, alone or in a batch; another seed does not."""
    args = ["-r", str(ldm_run), "--cond", "split:test", "--eta", "1", *FAST]
    batch, _ = sample(tmp_path, "batch", *args, "--n_samples", "2", "--batch_size", "2", "--seed", "3")
    again, _ = sample(tmp_path, "again", *args, "--n_samples", "2", "--batch_size", "2", "--seed", "3")
    np.testing.assert_array_equal(volume(batch / "sample_0001.nii.gz"), volume(again / "sample_0001.nii.gz"))
    # sample 1 alone: seed 3 + 1, and the condition of index 1 (the second test item)
    alone, manifest = sample(tmp_path, "alone", "-r", str(ldm_run), "--cond", "split:test", "--eta", "1", *FAST,
                             "--n_samples", "2", "--batch_size", "1", "--seed", "3")
    np.testing.assert_allclose(volume(alone / "sample_0001.nii.gz"), volume(batch / "sample_0001.nii.gz"), atol=1e-5)
    assert not np.allclose(volume(batch / "sample_0000.nii.gz"), volume(batch / "sample_0001.nii.gz"))
    assert manifest["model"]["ema_weights"] is True
    raw, manifest = sample(tmp_path, "raw", *args, "--n_samples", "1", "--seed", "3", "--no-ema")
    assert manifest["model"]["ema_weights"] is False
    assert not np.allclose(volume(raw / "sample_0000.nii.gz"), volume(batch / "sample_0000.nii.gz"))


def test_decoding_in_slabs_gives_the_same_samples(ldm_run, tmp_path):
    args = ["-r", str(ldm_run), "--cond", "split:test", "--n_samples", "1", "--seed", "5", *FAST]
    plain, _ = sample(tmp_path, "plain", *args)
    slabs, _ = sample(tmp_path, "slabs", *args, "--decode_slab", "3")  # 16 rows in slabs of 3
    np.testing.assert_allclose(volume(slabs / "sample_0000.nii.gz"), volume(plain / "sample_0000.nii.gz"), atol=1e-5)
    assert_error(["-r", str(ldm_run), "--cond", "split:test", "--decode_slab", "0"], "--decode_slab must be >= 1")


def test_cuda_graph_on_a_cpu_says_so_and_samples_eagerly(ldm_run, tmp_path, capsys):
    args = ["-r", str(ldm_run), "--cond", "split:test", "--n_samples", "1", "--seed", "5", *FAST]
    plain, _ = sample(tmp_path, "plain", *args)
    flagged, manifest = sample(tmp_path, "flagged", *args, "--cuda_graph")
    assert "--cuda_graph: cpu is not a CUDA device, sampling eagerly" in capsys.readouterr().out
    assert manifest["cuda_graph"] is False
    np.testing.assert_array_equal(volume(flagged / "sample_0000.nii.gz"), volume(plain / "sample_0000.nii.gz"))


class _Network(torch.nn.Module):
    """apply_model(x, t, cond) = x * (1 + concat mean) + t: a stand-in whose guided output is easy to check."""

    def apply_model(self, x, t, cond):
        return x * (1 + cond.concat.mean(dim=(1, 2, 3), keepdim=True)) + t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_guided_denoiser_takes_the_conditioning_as_tensors(scale):
    from ldm.models.diffusion.conditioning import Conditioning, classifier_free_guidance
    from ldm.sample_cli import GuidedDenoiser

    network = _Network()
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([3.0, 5.0])
    cond, null = Conditioning(concat=torch.rand(2, 1, 4, 4)), Conditioning(concat=torch.zeros(2, 1, 4, 4))
    denoiser = GuidedDenoiser(network, scale)
    arguments = denoiser.arguments(cond, null)
    assert len(arguments) == (1 if scale == 1.0 else 2)
    expected = classifier_free_guidance(network.apply_model, cond, null, scale)(x, t)
    torch.testing.assert_close(denoiser(x, t, *arguments), expected)
    with pytest.raises(ValueError, match="conditioning fields"):
        denoiser.arguments(Conditioning(y=torch.tensor([1, 2])), Conditioning(y=torch.tensor([0, 0])))


def test_mask_files_as_label_maps_or_one_hot_condition_alike(ldm_run, tmp_path):
    """A test-split mask saved as a one-hot (D, H, W, 3) file, and as a label map stored left-right flipped with a
    matching affine: read in RAS they are the same mask, so the same seed gives the same sample, which takes the
    file's (RAS) affine."""
    from ldm.data.demo import MNI152Crops

    mask = MNI152Crops("test", crop_to=(16, 16, 16), mask="tissue", length=1)[0]["mask"].numpy()
    onehot_dir, labels_dir = tmp_path / "onehot", tmp_path / "labels"
    onehot_dir.mkdir(), labels_dir.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 4.0, 6.0]
    nib.save(nib.Nifti1Image(np.moveaxis(mask, 0, -1), affine), str(onehot_dir / "a.nii.gz"))
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, affine[0, 3] + 2.0 * 15  # voxel 0 is now the old voxel 15
    labels = mask.argmax(0)[::-1].astype(np.int16)
    nib.save(nib.Nifti1Image(labels, flipped), str(labels_dir / "a.nii.gz"))
    from_onehot, manifest = sample(tmp_path, "from_onehot", "-r", str(ldm_run), "--cond", str(onehot_dir), *FAST)
    from_labels, _ = sample(tmp_path, "from_labels", "-r", str(ldm_run), "--cond", str(labels_dir), *FAST)
    np.testing.assert_array_equal(volume(from_onehot / "sample_0000.nii.gz"),
                                  volume(from_labels / "sample_0000.nii.gz"))
    for outdir in (from_onehot, from_labels):
        np.testing.assert_allclose(nib.load(str(outdir / "sample_0000.nii.gz")).affine, affine)
    assert manifest["n_samples"] == 1 and manifest["samples"][0]["condition"] == str(onehot_dir / "a.nii.gz")
    # a mask that does not fit the model's 16^3 images
    small = tmp_path / "small"
    small.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(small / "m.nii.gz"))
    assert_error(["-r", str(ldm_run), "--cond", str(small)],
                 rf"mask {small / 'm.nii.gz'}: spatial shape \[8, 8, 8\] .* does not match the \[16, 16, 16\]")
    bad_labels = tmp_path / "bad_labels"
    bad_labels.mkdir()
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 7, np.int16), np.eye(4)), str(bad_labels / "m.nii.gz"))
    assert_error(["-r", str(ldm_run), "--cond", str(bad_labels)],
                 r"unexpected label values \[7\] \(expected \[0, 1, 2\]")
    two_channels = tmp_path / "two_channels"
    two_channels.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), np.eye(4)), str(two_channels / "m.nii"))
    assert_error(["-r", str(ldm_run), "--cond", str(two_channels)], "2 channels along its last axis, the model takes 3")


def test_label_maps_become_the_channels_of_the_run_data():
    def data(target: str, **params) -> DictConfig:
        return OmegaConf.create({"params": {"test": {"target": target, "params": params}}})
    assert dataset_mask_labels(data("ldm.data.brats2021.BraTS2021_3D", root="x")) == [0, 1, 2, 4]
    assert dataset_mask_labels(data("ldm.data.nifti_folder.NiftiFolder", labels=[0, 3])) == [0, 3]
    assert dataset_mask_labels(data("ldm.data.demo.MNI152Crops")) is None
    label_map = np.array([[[0, 4], [2, 1]], [[4, 4], [0, 0]]], dtype=np.float32)
    onehot = labels_to_channels(label_map, [0, 1, 2, 4], 4, Path("m.nii"))
    assert onehot.shape == (4, 2, 2, 2) and onehot.dtype == np.float32
    np.testing.assert_array_equal(onehot[3], label_map == 4)
    np.testing.assert_array_equal(onehot.sum(0), 1)
    np.testing.assert_array_equal(labels_to_channels(label_map, [0, 1, 2, 4], 1, Path("m.nii"))[0], label_map > 0)
    with pytest.raises(ConditionError, match="takes 3 mask channels but there are 4 labels"):
        labels_to_channels(label_map, [0, 1, 2, 4], 3, Path("m.nii"))
    with pytest.raises(ConditionError, match="mask m.nii: a label map must hold integer labels"):
        labels_to_channels(label_map + 0.5, [0, 1, 2, 4], 4, Path("m.nii"))


def test_sample_script_runs_as_a_subprocess(ldm_run, tmp_path):
    outdir = tmp_path / "script"
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), "-r", str(ldm_run), "--cond", "split:test",
                             "--n_samples", "1", "--outdir", str(outdir), "--precision", "bf16", *FAST],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert nib.load(str(outdir / "sample_0000.nii.gz")).shape == (16, 16, 16)
    assert json.loads((outdir / "manifest.json").read_text())["precision"] == "bf16"
    assert "steps" in result.stderr and "samples" in result.stderr  # the progress bars


def test_unconditional_2d_model_writes_pngs_only(tmp_path):
    checkpoint, config = unconditional_2d(tmp_path)
    assert main(["-r", str(checkpoint), "--config", str(config), "--n_samples", "2", "--sampler", "dpmpp_2m",
                 "--quadratic", *FAST]) == 0
    (outdir,) = (checkpoint.parent / "samples").iterdir()  # default: next to a checkpoint outside a run folder
    assert sorted(p.name for p in outdir.iterdir()) == ["manifest.json", "sample_0000.png", "sample_0001.png",
                                                        "samples.png"]
    assert Image.open(outdir / "sample_0000.png").size == (8, 8)
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["sampler"]["spacing"] == "quad" and manifest["conditioning"]["kind"] == "none"
    assert manifest["samples"][1]["condition"] is None and manifest["samples"][1]["affine"] is None


def test_class_labels_with_guidance(tmp_path):
    checkpoint, config = class_conditional_2d(tmp_path)
    args = ["-r", str(checkpoint), "--config", str(config), "--cond", "labels:0,3", "--scale", "2.5", *FAST]
    outdir, manifest = sample(tmp_path, "labels", *args, "--n_samples", "3", "--seed", "0")
    assert [s["condition"] for s in manifest["samples"]] == ["label 0", "label 3", "label 0"]  # cycled
    assert manifest["sampler"]["scale"] == 2.5 and manifest["conditioning"]["kind"] == "labels"
    assert Image.open(outdir / "samples.png").size == (8, 24)
    # the label matters: sample 0 (label 0, seed 0) differs from the same seed under label 3
    other, _ = sample(tmp_path, "other", "-r", str(checkpoint), "--config", str(config), "--cond", "labels:3",
                      "--scale", "2.5", *FAST, "--seed", "0")
    assert not np.array_equal(np.asarray(Image.open(outdir / "sample_0000.png")),
                              np.asarray(Image.open(other / "sample_0000.png")))
    _, manifest = sample(tmp_path, "split", "-r", str(checkpoint), "--config", str(config), "--cond", "split:test",
                         "--n_samples", "2", *FAST)
    assert manifest["samples"][1]["condition"] == "split:test[1]"
    assert_error(["-r", str(checkpoint), "--config", str(config), "--cond", "labels:1,10"],
                 r"--cond labels:1,10: label\(s\) \[10\] out of range \[0, 10\)")
    assert_error(["-r", str(checkpoint), "--config", str(config), "--cond", str(tmp_path)],
                 "a mask folder, but the model is conditioned on class labels")


def test_errors_name_the_culprit(ldm_run, tmp_path):
    missing = tmp_path / "nowhere"
    assert_error(["-r", str(missing)], f"-r {missing}: no such run folder or checkpoint file")
    empty_run = tmp_path / "empty_run"
    (empty_run / "configs").mkdir(parents=True)
    assert_error(["-r", str(empty_run)], r"the run folder has no checkpoints/last.ckpt")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(["-r", str(ldm_run), "--cond", str(empty)], "the folder holds no .nii or .nii.gz files")
    assert_error(["-r", str(ldm_run)], r"conditioned on batch\['mask'\] .*: pass --cond")
    assert_error(["-r", str(ldm_run), "--cond", "split:holdout"], "split must be one of train, validation, test")
    assert_error(["-r", str(ldm_run), "--cond", "labels:1"], "conditioned on a mask .*not on class labels")
    assert_error(["-r", str(ldm_run), "--cond", "split:test", "--sampler", "plms", "--eta", "0.5"],
                 "only the ddim sampler has an eta")
    assert_error(["-r", str(ldm_run), "--cond", "split:test", "--steps", "5000"], r"--steps 5000 .*steps must be in")
    assert_error(["-r", str(ldm_run), "--batch_size", "0"], "--batch_size must be >= 1")
    assert_error(["-r", str(ldm_run), "model.params.use_ema=false"],
                 r"does not fit the config's LatentDiffusion: 0 missing keys \[\], \d+ unexpected keys \['model_ema")
    assert_error(["-r", str(ldm_run), "model.params.unet_config.params.attention_qkv_bias=false"],
                 r"unexpected keys .*only the UNet attention blocks' q/k/v biases differ: set attention_qkv_bias: true")
    assert_error(["-r", str(ldm_run), "model.params.unet_config.params.model_channels=64"],
                 r"does not fit the config's LatentDiffusion: size mismatch for model\.")
    checkpoint, config = unconditional_2d(tmp_path)
    assert_error(["-r", str(checkpoint)], rf"no configs/\*.yaml in {checkpoint.parent}; pass the model's config")
    assert_error(["-r", str(checkpoint), "--config", str(config), "--ema"], "--ema: the model has no EMA weights")
    assert_error(["-r", str(checkpoint), "--config", str(config), "--cond", "split:test"],
                 "the model is unconditional")
    assert_error(["-r", str(checkpoint), "--config", str(config), "--scale", "3"],
                 "classifier-free guidance needs a null condition")


def test_a_run_whose_config_names_code_outside_the_allow_list_is_refused_before_importing_it(tmp_path, monkeypatch):
    """A downloaded run is a config, and a config names code: `os.system` must not run from it."""
    monkeypatch.setenv("LDM_TRUST_CONFIG", "0")
    checkpoint, config = unconditional_2d(tmp_path)
    hostile = OmegaConf.load(config)
    marker = tmp_path / "ran"
    hostile.model.params.unet_config = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    OmegaConf.save(hostile, config)
    assert_error(["-r", str(checkpoint), "--config", str(config)],
                 r"model.params.unet_config.target: 'os.system' is outside the modules a config may name "
                 r"\(ldm.\*, kernels.\*, tests.\*, torch.nn.\*, torch.optim.\*, monai.\* and the aliases of "
                 r"ldm.util\): configs run the code they name, so other targets need --trust-config \(or "
                 r"LDM_TRUST_CONFIG=1\) for a config you trust")
    assert not marker.exists()


@pytest.mark.parametrize("flag, value", [("--eta", "nan"), ("--scale", "nan"), ("--scale", "inf")])
def test_non_finite_eta_or_scale_is_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["-r", "anything", flag, value])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: argument {flag}: expected a finite number, got {value!r}")
