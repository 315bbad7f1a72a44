import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.base import ShardedResumableSampler
from ldm.data.brats2021 import BraTS2021_3D
from ldm.data.transforms import DataFileError
from tests.data.brats_tree import MODALITIES, head_and_tumour, write_subject, write_tree

CROP = [16, 16, 16]
HEAD_BOX = 20  # the head ellipsoid of a 24^3 tree spans voxels 2..21 on every axis


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    write_tree(root, 5)
    return root


def only(root, tmp_path, name, **kwargs):
    """The dataset of one subject, as the validation split of a split file."""
    split_file = tmp_path / f"split_{name}.json"
    split_file.write_text(json.dumps({"train": [name], "validation": [name]}))
    return BraTS2021_3D(str(root), split_file=str(split_file), **{"split": "validation", "crop_to": CROP, **kwargs})


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_items_have_the_contract_shapes_and_ranges(tree, split):
    dataset = BraTS2021_3D(str(tree), split, crop_to=CROP, split_ratios=[0.6, 0.2, 0.2])
    assert len(dataset) == {"train": 3, "val": 1, "test": 1}[split]
    item = dataset[0]
    assert set(item) == {"image", "mask", "path", "affine"}
    assert item["affine"].shape == (4, 4) and item["affine"].dtype == torch.float64
    assert type(item["image"]) is torch.Tensor and item["image"].dtype == torch.float32
    assert item["image"].shape == (4, *CROP) and item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (4, *CROP) and torch.equal(item["mask"].sum(0), torch.ones(CROP))
    assert item["path"].endswith(dataset.subject_names[0])


def test_scaling_is_per_channel_percentiles_of_the_foreground_box(tree, tmp_path):
    item = only(tree, tmp_path, "BraTS2021_00003", crop_to=[HEAD_BOX] * 3)[0]
    for channel, modality in enumerate(MODALITIES):
        volume = np.asarray(nib.load(str(tree / "BraTS2021_00003" / f"BraTS2021_00003_{modality}.nii.gz")).dataobj)
        box = volume[2:22, 2:22, 2:22]
        assert (volume > 0).sum() == (box > 0).sum()  # the box holds the whole head
        low, high = np.percentile(box, [0.5, 99.5])
        expected = np.clip((box - low) / (high - low) * 2 - 1, -1, 1)
        np.testing.assert_allclose(item["image"][channel].numpy(), expected, atol=1e-5)
    seg = np.asarray(nib.load(str(tree / "BraTS2021_00003" / "BraTS2021_00003_seg.nii.gz")).dataobj)[2:22, 2:22, 2:22]
    for channel, label in enumerate([0, 1, 2, 4]):
        np.testing.assert_array_equal(item["mask"][channel].numpy(), seg == label)


def test_validation_takes_the_centre_crop(tree, tmp_path):
    full = only(tree, tmp_path, "BraTS2021_00002", crop_to=[HEAD_BOX] * 3)[0]
    centre = only(tree, tmp_path, "BraTS2021_00002")[0]
    assert torch.equal(centre["image"], full["image"][:, 2:18, 2:18, 2:18])
    assert torch.equal(centre["mask"], full["mask"][:, 2:18, 2:18, 2:18])


def test_train_crops_are_random_windows_with_their_mask(tree, tmp_path):
    full = only(tree, tmp_path, "BraTS2021_00001", crop_to=[HEAD_BOX] * 3)[0]
    train = only(tree, tmp_path, "BraTS2021_00001", split="train", seed=3)
    offsets = set()
    for _ in range(6):
        item = train[0]
        found = [(x, y, z) for x in range(5) for y in range(5) for z in range(5)
                 if torch.equal(item["image"], full["image"][:, x:x + 16, y:y + 16, z:z + 16])]
        assert len(found) == 1
        x, y, z = found[0]
        assert torch.equal(item["mask"], full["mask"][:, x:x + 16, y:y + 16, z:z + 16])
        offsets.add(found[0])
    assert len(offsets) > 1
    again = only(tree, tmp_path, "BraTS2021_00001", split="train", seed=3)
    replay = only(tree, tmp_path, "BraTS2021_00001", split="train", seed=3)
    assert all(torch.equal(again[0]["image"], replay[0]["image"]) for _ in range(3))


def test_ras_orientation_undoes_a_flipped_affine(tmp_path):
    shape = (24, 24, 24)
    write_subject(tmp_path, "BraTS2021_00000", shape, seed=7, tumour_centre=(6, 12, 12))
    flipped = tmp_path / "BraTS2021_00001"
    flipped.mkdir()
    channels, seg = head_and_tumour(shape, seed=7, tumour_centre=(6, 12, 12))
    x_to_left = np.diag([-1.0, 1.0, 1.0, 1.0])  # voxel x runs right -> left: same head, stored mirrored
    for modality, volume in channels.items():
        nib.save(nib.Nifti1Image(np.flip(volume, 0).astype(np.float32), x_to_left),
                 str(flipped / f"BraTS2021_00001_{modality}.nii.gz"))
    nib.save(nib.Nifti1Image(np.flip(seg, 0).copy(), x_to_left), str(flipped / "BraTS2021_00001_seg.nii.gz"))
    plain, mirrored = (only(tmp_path, tmp_path, name, crop_to=[HEAD_BOX] * 3)[0]
                       for name in ("BraTS2021_00000", "BraTS2021_00001"))
    assert torch.equal(plain["image"], mirrored["image"]) and torch.equal(plain["mask"], mirrored["mask"])


def test_affine_places_each_cropped_voxel_on_its_source_voxel(tmp_path):
    """Stored mirrored (x runs right -> left) and offset: after RAS orientation and the crop, the item's affine maps
    each voxel to the world point of the source voxel its mask label came from."""
    shape = (24, 24, 24)
    channels, seg = head_and_tumour(shape, seed=5, tumour_centre=(8, 12, 14))
    source_affine = np.array([[-1.0, 0, 0, 30], [0, 1.0, 0, -7], [0, 0, 1.0, 4], [0, 0, 0, 1]])
    folder = tmp_path / "BraTS2021_00000"
    folder.mkdir()
    for modality, volume in channels.items():
        nib.save(nib.Nifti1Image(volume.astype(np.float32), source_affine),
                 str(folder / f"BraTS2021_00000_{modality}.nii.gz"))
    nib.save(nib.Nifti1Image(seg, source_affine), str(folder / "BraTS2021_00000_seg.nii.gz"))
    item = only(tmp_path, tmp_path, "BraTS2021_00000")[0]
    voxels = np.stack(np.meshgrid(*[np.arange(c) for c in CROP], indexing="ij"), -1).reshape(-1, 3)
    source = np.linalg.inv(source_affine) @ item["affine"].numpy() @ np.c_[voxels, np.ones(len(voxels))].T
    source = np.rint(source[:3].T).astype(int)
    labels = np.array([0, 1, 2, 4])[item["mask"].argmax(0).numpy().reshape(-1)]
    assert np.array_equal(labels, seg[tuple(source.T)])
    assert (labels > 0).any()


def test_whole_tumour_mask_merges_the_tumour_labels(tree, tmp_path):
    onehot = only(tree, tmp_path, "BraTS2021_00004")[0]["mask"]
    whole = only(tree, tmp_path, "BraTS2021_00004", mask="whole_tumour")[0]["mask"]
    assert whole.shape == (1, *CROP) and whole.sum() > 0
    assert torch.equal(whole[0], 1 - onehot[0])
    assert "mask" not in only(tree, tmp_path, "BraTS2021_00004", mask="none")[0]


def test_modalities_choose_the_channels(tree, tmp_path):
    all_four = only(tree, tmp_path, "BraTS2021_00004")[0]["image"]
    flair_t1 = only(tree, tmp_path, "BraTS2021_00004", modalities=["flair", "t1"])[0]["image"]
    assert torch.equal(flair_t1, all_four[[3, 0]])


def test_spacing_resamples_and_a_too_large_crop_names_both_shapes(tree, tmp_path):
    item = only(tree, tmp_path, "BraTS2021_00000", spacing=[2, 2, 2], crop_to=[12, 12, 12])[0]
    assert item["image"].shape == (4, 12, 12, 12) and torch.equal(item["mask"].sum(0), torch.ones(12, 12, 12))
    dataset = only(tree, tmp_path, "BraTS2021_00000", spacing=[2, 2, 2], crop_to=[14, 12, 12])
    with pytest.raises(DataFileError, match=r"t1.nii.gz: crop_to \[14, 12, 12\] is larger than the volume of shape "
                                            r"\[12, 12, 12\]"):
        dataset[0]


def test_small_volume_pad_pads_with_background(tree, tmp_path):
    item = only(tree, tmp_path, "BraTS2021_00000", crop_to=[32, 32, 32], small_volume="pad")[0]
    assert item["image"].shape == (4, 32, 32, 32)
    assert (item["image"][:, :2] == -1).all() and (item["mask"][0, :2] == 1).all()


def test_split_is_deterministic_disjoint_and_covers_all_subjects(tree):
    def names(split, seed):
        return BraTS2021_3D(str(tree), split, crop_to=CROP, seed=seed, split_ratios=[0.6, 0.2, 0.2]).subject_names

    parts = [names(split, 0) for split in ("train", "validation", "test")]
    assert sorted(sum(parts, [])) == [f"BraTS2021_{i:05d}" for i in range(5)]
    assert [names(split, 0) for split in ("train", "validation", "test")] == parts
    assert any(names("train", seed) != parts[0] for seed in range(1, 6))


def test_split_file_lists_the_subjects_and_rejects_unknown_ones(tree, tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["BraTS2021_00004", "BraTS2021_00001"], "val": ["BraTS2021_00000"]}))
    assert BraTS2021_3D(str(tree), "train", CROP, split_file=str(split_file)).subject_names == [
        "BraTS2021_00004", "BraTS2021_00001"]
    with pytest.raises(ValueError, match="test split of .* is empty"):
        BraTS2021_3D(str(tree), "test", CROP, split_file=str(split_file))
    split_file.write_text(json.dumps({"train": ["BraTS2021_00009"]}))
    with pytest.raises(ValueError, match=r"1 train subjects not found, e.g. \['BraTS2021_00009'\]"):
        BraTS2021_3D(str(tree), "train", CROP, split_file=str(split_file))


def test_ranks_see_distinct_subjects(tmp_path):
    write_tree(tmp_path, 4)
    dataset = BraTS2021_3D(str(tmp_path), "train", CROP, split_ratios=[1, 0, 0])
    seen = []
    for rank in range(2):
        sampler = ShardedResumableSampler(len(dataset), shuffle=True, seed=0, rank=rank, world_size=2)
        seen.append({path for batch in DataLoader(dataset, batch_size=2, sampler=sampler) for path in batch["path"]})
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]


def test_loader_workers_collate_batches(tree):
    dataset = BraTS2021_3D(str(tree), "train", CROP, split_ratios=[0.6, 0.2, 0.2])
    batch = next(iter(DataLoader(dataset, batch_size=3, num_workers=2)))
    assert batch["image"].shape == (3, 4, *CROP) and batch["mask"].shape == (3, 4, *CROP)
    assert len(batch["path"]) == 3


def test_missing_root_and_empty_root_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="BraTS 2021 root .*nowhere does not exist"):
        BraTS2021_3D(str(tmp_path / "nowhere"), "train", CROP)
    with pytest.raises(FileNotFoundError, match=f"no subjects found: root {tmp_path}, pattern BraTS2021_\\*/"):
        BraTS2021_3D(str(tmp_path), "train", CROP)


def test_an_empty_split_is_an_error(tree):
    with pytest.raises(ValueError, match="the validation split of root .* is empty \\(5 subjects in all\\)"):
        BraTS2021_3D(str(tree), "validation", CROP, split_ratios=[1, 0, 0])


def bad_tree(tmp_path, damage):
    """A 2-subject tree, all in train, whose second subject is damaged by `damage(folder)`."""
    write_tree(tmp_path, 2)
    damage(tmp_path / "BraTS2021_00001")
    return str(tmp_path)


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "BraTS2021_00001_t2.nii.gz").unlink(), r"missing file .*BraTS2021_00001_t2.nii.gz"),
    (lambda f: (f / "BraTS2021_00001_flair.nii.gz").write_bytes(b"not a nifti"),
     r"cannot read NIfTI file .*BraTS2021_00001_flair.nii.gz"),
    (lambda f: nib.save(nib.Nifti1Image(np.zeros((24, 24, 20), np.float32), np.eye(4)),
                        str(f / "BraTS2021_00001_t1ce.nii.gz")),
     r".*BraTS2021_00001_t1ce.nii.gz has shape \[24, 24, 20\] but .*BraTS2021_00001_t1.nii.gz has \[24, 24, 24\]"),
    (lambda f: nib.save(nib.Nifti1Image(np.zeros((24, 24, 24), np.uint8), np.diag([2.0, 1, 1, 1])),
                        str(f / "BraTS2021_00001_seg.nii.gz")),
     r".*BraTS2021_00001_seg.nii.gz and .*BraTS2021_00001_t1.nii.gz have different affines"),
])
def test_bad_files_are_named_at_construction_or_skipped_with_a_count(tmp_path, damage, message):
    root = bad_tree(tmp_path, damage)
    with pytest.raises(DataFileError, match="subject BraTS2021_00001: " + message):
        BraTS2021_3D(root, "train", CROP, split_ratios=[1, 0, 0])
    with pytest.warns(UserWarning, match="skipped 1 of 2 subjects for bad files"):
        dataset = BraTS2021_3D(root, "train", CROP, split_ratios=[1, 0, 0], on_bad_file="skip")
    assert dataset.subject_names == ["BraTS2021_00000"]


def test_truncated_file_is_named_when_read(tmp_path):
    root = bad_tree(tmp_path, lambda f: truncate(f / "BraTS2021_00001_t2.nii.gz"))
    dataset = BraTS2021_3D(root, "train", CROP, split_ratios=[1, 0, 0])
    index = dataset.subject_names.index("BraTS2021_00001")
    with pytest.raises(DataFileError, match=r"cannot read NIfTI file .*BraTS2021_00001_t2.nii.gz: EOFError"):
        dataset[index]
    with pytest.raises(DataFileError, match="BraTS2021_00001_t2.nii.gz"):
        BraTS2021_3D(root, "train", CROP, split_ratios=[1, 0, 0], cache_rate=1.0)


def test_unexpected_label_values_are_named(tmp_path):
    def label_three(folder):
        seg_file = folder / "BraTS2021_00001_seg.nii.gz"
        seg = np.asarray(nib.load(str(seg_file)).dataobj).copy()
        seg[seg == 2] = 3
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(seg_file))

    dataset = BraTS2021_3D(bad_tree(tmp_path, label_three), "train", CROP, split_ratios=[1, 0, 0])
    index = dataset.subject_names.index("BraTS2021_00001")
    with pytest.raises(DataFileError, match=r"BraTS2021_00001_seg.nii.gz: unexpected label values \[3.0\] "
                                            r"\(expected \[0, 1, 2, 4\]\)"):
        dataset[index]


@pytest.mark.parametrize("arguments, message", [
    ({"split": "training"}, "split must be one of"),
    ({"crop_to": [16, 16]}, "crop_to must be 3 positive ints"),
    ({"modalities": ["t1", "dwi"]}, "modalities must be distinct entries"),
    ({"mask": "tumour"}, "mask must be one of"),
    ({"small_volume": "crop"}, "small_volume must be one of"),
    ({"on_bad_file": "ignore"}, "on_bad_file must be one of"),
    ({"spacing": [1, 1]}, "spacing must be 3 positive numbers"),
    ({"split_ratios": [1, 1]}, "split ratios must be 3"),
    ({"cache_rate": 2.0}, r"cache_rate must be in \[0, 1\]"),
    ({"percentiles": [99, 1]}, "percentiles must be \\[lower, upper\\]"),
])
def test_bad_arguments_raise_a_clear_error(tree, arguments, message):
    with pytest.raises(ValueError, match=message):
        BraTS2021_3D(str(tree), **{"crop_to": CROP, **arguments})
