import nibabel as nib
import numpy as np
import pytest
import torch

from ldm.data.nifti_folder import NiftiFolder, wildcard_parts
from ldm.data.transforms import DataFileError
from tests.data.brats_tree import head_and_tumour

CROP = [16, 16, 16]
CENTRES = {"case_a": (7, 8, 9), "case_b": (16, 15, 14), "case_c": (9, 16, 8)}


@pytest.fixture
def folder(tmp_path):
    """images/<case>.nii.gz (T1 with a bright tumour) and labels/<case>.nii.gz (its label map, labels 0, 1, 2, 4)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for seed, (case, centre) in enumerate(CENTRES.items()):
        channels, seg = head_and_tumour((24, 24, 24), seed, centre)
        image = nib.Nifti1Image(channels["t1"].astype(np.float32), np.eye(4))
        nib.save(image, str(tmp_path / "images" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(tmp_path / "labels" / f"{case}.nii.gz"))
    return tmp_path


def all_cases(root, **kwargs):
    return NiftiFolder(str(root), **{"split": "train", "crop_to": CROP, "image_glob": "images/*.nii.gz",
                                     "split_ratios": [1, 0, 0], **kwargs})


@pytest.mark.parametrize("pattern, path, parts", [
    ("images/*.nii.gz", "images/case_a.nii.gz", ("case_a",)),
    ("labels/*.nii.gz", "labels/case_a.nii.gz", ("case_a",)),
    ("*/*_seg.nii.gz", "BraTS_1/BraTS_1_seg.nii.gz", ("BraTS_1", "BraTS_1")),
    ("**/scan_?.nii", "a/b/scan_3.nii", ("a/b/", "3")),
    ("**/scan_[!x].nii", "scan_3.nii", ("", "3")),
    ("images/*.nii.gz", "labels/case_a.nii.gz", None),
])
def test_wildcard_parts_are_what_the_wildcards_match(pattern, path, parts):
    assert wildcard_parts(pattern, path) == parts


def test_masks_pair_with_their_images(folder):
    dataset = all_cases(folder, mask_glob="labels/*.nii.gz", labels=[0, 1, 2, 4], crop_to=[20, 20, 20],
                        split="validation", split_ratios=[0, 1, 0])
    assert dataset.subject_names == [f"images/{case}.nii.gz" for case in sorted(CENTRES)]
    for item in (dataset[i] for i in range(len(dataset))):
        assert item["image"].shape == (1, 20, 20, 20) and item["mask"].shape == (1, 20, 20, 20)
        tumour = item["mask"][0].bool()
        assert item["path"].endswith(".nii.gz") and tumour.any()
        # the tumour is 80 brighter than the head around it: only the image's own mask finds it
        assert item["image"][0][tumour].mean() > item["image"][0][~tumour & (item["image"][0] > -1)].mean() + 0.3


def test_onehot_encoding_follows_labels(folder):
    item = all_cases(folder, mask_glob="labels/*.nii.gz", mask_encoding="onehot", labels=[0, 1, 2, 4])[0]
    assert item["mask"].shape == (4, *CROP) and torch.equal(item["mask"].sum(0), torch.ones(CROP))
    with pytest.raises(DataFileError, match=r"labels/case_a.nii.gz: unexpected label values \[4.0\]"):
        all_cases(folder, mask_glob="labels/*.nii.gz", labels=[0, 1, 2], cache_rate=1.0)


def test_without_mask_glob_items_have_no_mask(folder):
    item = all_cases(folder)[0]
    assert set(item) == {"image", "path", "affine"} and item["image"].shape == (1, *CROP)


def test_a_4d_file_gives_channels(tmp_path):
    channels, _ = head_and_tumour((24, 24, 24), 0)
    stacked = np.stack([channels["t1"], channels["flair"]], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(stacked, np.eye(4)), str(tmp_path / "two.nii.gz"))
    item = NiftiFolder(str(tmp_path), "train", CROP, split_ratios=[1, 0, 0])[0]
    assert item["image"].shape == (2, *CROP)


def test_an_image_without_mask_is_named_or_skipped(folder):
    (folder / "labels" / "case_b.nii.gz").unlink()
    with pytest.raises(DataFileError, match="subject images/case_b.nii.gz: no label map file found"):
        all_cases(folder, mask_glob="labels/*.nii.gz")
    with pytest.warns(UserWarning, match="skipped 1 of 3 subjects"):
        dataset = all_cases(folder, mask_glob="labels/*.nii.gz", on_bad_file="skip")
    assert len(dataset) == 2


def test_mask_with_another_shape_is_named(folder):
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 23), np.uint8), np.eye(4)), str(folder / "labels" / "case_c.nii.gz"))
    with pytest.raises(DataFileError, match=r"labels/case_c.nii.gz has shape \[24, 24, 23\] but .*images/case_c"):
        all_cases(folder, mask_glob="labels/*.nii.gz")


def test_missing_root_and_no_match_are_named(folder):
    with pytest.raises(FileNotFoundError, match="NIfTI folder root .*nowhere does not exist"):
        NiftiFolder(str(folder / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"no subjects found: root .*, pattern scans/\*.nii"):
        NiftiFolder(str(folder), image_glob="scans/*.nii")


def test_bad_mask_encoding(folder):
    with pytest.raises(ValueError, match="mask_encoding must be binary or onehot"):
        all_cases(folder, mask_glob="labels/*.nii.gz", mask_encoding="multi")
