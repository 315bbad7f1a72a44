import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.image_folder import ImageFolder
from ldm.data.transforms import DataFileError

COLOURS = {"zebra/a.png": (255, 0, 128), "zebra/deep/b.jpg": (10, 200, 30), "ant/c.PNG": (0, 0, 255),
           "ant/d.jpeg": (255, 255, 255), "mole/e.png": (40, 40, 40)}


def save(path, pixels, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(str(path), **kwargs)


@pytest.fixture
def folder(tmp_path):
    """Three class folders of uniformly coloured 12 x 16 (H x W) images, PNG and JPEG, and a file to ignore."""
    for name, colour in COLOURS.items():
        save(tmp_path / name, np.full((12, 16, 3), colour, np.uint8), **({"quality": 100} if "jp" in name else {}))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    return tmp_path


def whole(root, **kwargs):
    """Every image of `root` in one split, centre crops of 8 x 8."""
    return ImageFolder(str(root), **{"size": 8, "split_ratios": None, "crop": "center", **kwargs})


def test_finds_images_recursively_by_extension_sorted_by_path(folder):
    dataset = whole(folder)
    assert [path[len(str(folder)) + 1:] for path in dataset.files] == sorted(COLOURS)


def test_rgb_items_hold_the_colour_scaled_to_minus_one_one(folder):
    dataset = whole(folder)
    for index in range(len(dataset)):
        item = dataset[index]
        colour = COLOURS[item["path"][len(str(folder)) + 1:]]
        assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
        expected = torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 * 2 - 1
        assert (item["image"] - expected).abs().max() < (0.04 if item["path"].endswith(("jpg", "jpeg")) else 1e-6)
        assert "class_label" not in item


def test_grayscale_uses_pillows_luma(folder):
    item = whole(folder, channels=1, image_glob="zebra/*.png")[0]
    luma = (255 * 299 + 0 * 587 + 128 * 114) / 1000
    assert item["image"].shape == (1, 8, 8)
    assert torch.allclose(item["image"], torch.full((1, 8, 8), round(luma) / 255 * 2 - 1), atol=2 / 255)


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    save(tmp_path / "x.png", np.array([[0, 65535], [32768, 16384]], np.uint16))
    image = ImageFolder(str(tmp_path), size=2, channels=1, split_ratios=None)[0]["image"]
    expected = torch.tensor([[0, 65535], [32768, 16384]]) / 65535 * 2 - 1
    assert torch.allclose(image[0], expected.float(), atol=1e-6)
    rgb = ImageFolder(str(tmp_path), size=2, channels=3, split_ratios=None)[0]["image"]
    assert rgb.shape == (3, 2, 2) and torch.equal(rgb[0], rgb[2])


def test_class_index_is_the_sorted_folder_names_unless_given(folder):
    dataset = whole(folder, class_from_folder=True)
    assert dataset.classes == ["ant", "mole", "zebra"]
    labels = {item["path"].split("/")[-2 if "deep" not in item["path"] else -3]: int(item["class_label"])
              for item in (dataset[i] for i in range(len(dataset)))}
    assert labels == {"ant": 0, "mole": 1, "zebra": 2}
    given = whole(folder, class_from_folder=True, classes=["zebra", "ant", "mole", "yak"])
    assert [int(given[i]["class_label"]) for i in range(len(given))] == [1, 1, 2, 0, 0]
    # a split of one image still gets the index of the whole folder
    part = ImageFolder(str(folder), size=8, class_from_folder=True, split="test", split_ratios=[0.6, 0.2, 0.2])
    assert len(part) == 1 and part.classes == ["ant", "mole", "zebra"]


def test_class_folder_problems_are_named(folder):
    with pytest.raises(ValueError, match=r"class folders \['mole'\] are not in classes"):
        whole(folder, class_from_folder=True, classes=["ant", "zebra"])
    save(folder / "loose.png", np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"1 images lie directly in root, not in a class folder \(e.g. loose.png\)"):
        whole(folder, class_from_folder=True)
    with pytest.raises(ValueError, match="set class_from_folder: true"):
        whole(folder, classes=["ant"])


def test_resize_covers_the_size_and_centre_crop_takes_the_middle(tmp_path):
    # 40 x 80, white in the middle 48 columns; covering 20 x 20 halves it to 20 x 40, white in the middle 24
    pixels = np.zeros((40, 80), np.uint8)
    pixels[:, 16:64] = 255
    save(tmp_path / "wide.png", pixels)
    image = ImageFolder(str(tmp_path), size=20, channels=1, split="validation", split_ratios=None)[0]["image"]
    assert image.shape == (1, 20, 20) and torch.allclose(image, torch.ones_like(image))
    full = ImageFolder(str(tmp_path), size=[20, 40], channels=1, split_ratios=None)[0]["image"][0]
    # antialiasing blurs two columns at each edge
    assert torch.allclose(full[:, 10:30], torch.ones(20, 20)) and torch.allclose(full[:, :6], -torch.ones(20, 6))
    assert torch.allclose(full[:, 34:], -torch.ones(20, 6))


def test_random_crops_follow_torch_seed_and_stay_inside(tmp_path):
    pixels = np.arange(30 * 30, dtype=np.uint16).reshape(30, 30) * 70
    save(tmp_path / "ramp.png", pixels)
    dataset = ImageFolder(str(tmp_path), size=10, channels=1, resize=False, split_ratios=None)
    source = torch.from_numpy(pixels.astype(np.float32)) / 65535 * 2 - 1
    windows = source.unfold(0, 10, 1).unfold(1, 10, 1).reshape(-1, 10, 10)
    torch.manual_seed(0)
    first = [dataset[0]["image"][0] for _ in range(6)]
    torch.manual_seed(0)
    again = [dataset[0]["image"][0] for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(crop[0, :1].tolist()) for crop in first}) > 1
    for crop in first:
        assert (windows - crop).abs().amax((1, 2)).min() < 1e-6


def test_an_image_smaller_than_size_is_refused_or_padded(tmp_path):
    save(tmp_path / "small.png", np.full((6, 4), 255, np.uint8))
    with pytest.raises(DataFileError, match=r"small.png: image of 6 x 4 pixels is smaller than size \[8, 8\]"):
        ImageFolder(str(tmp_path), size=8, channels=1, resize=False, split_ratios=None)
    padded = ImageFolder(str(tmp_path), size=8, channels=1, resize=False, small_image="pad", split_ratios=None)
    image = padded[0]["image"][0]
    assert image.shape == (8, 8) and torch.equal(image[1:7, 2:6], torch.ones(6, 4))
    assert image.sum() == 24 - (64 - 24)


def test_exif_orientation_is_applied_before_the_size_check(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 wide x 10 high, shown turned: 10 wide x 20 high
    save(tmp_path / "turned.jpg", np.zeros((10, 20, 3), np.uint8), exif=exif)
    item = ImageFolder(str(tmp_path), size=[20, 10], resize=False, split_ratios=None)[0]
    assert item["image"].shape == (3, 20, 10)


def test_no_files_and_missing_root_are_named(folder):
    with pytest.raises(FileNotFoundError, match=r"no image files found: root .*, pattern scans/\*\*/\*, extensions "
                                                 r"\.png, \.jpg, \.jpeg"):
        whole(folder, image_glob="scans/**/*")
    with pytest.raises(FileNotFoundError, match="image folder root .*nowhere does not exist"):
        whole(folder / "nowhere")


def test_a_corrupt_file_is_named_or_skipped_with_a_count(folder):
    (folder / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = (folder / "ant" / "c.PNG").read_bytes()
    (folder / "ant" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFileError, match=r"cannot read image file .*ant/cut.png: .*on_bad_file: skip"):
        whole(folder)
    with pytest.warns(UserWarning, match=r"skipped 2 of 7 images for bad files \(.*cut.png.*broken.png"):
        dataset = whole(folder, on_bad_file="skip")
    assert len(dataset) == 5 and not any("cut" in p or "broken" in p for p in dataset.files)


def test_a_truncated_jpeg_is_named_when_read(tmp_path):
    rng = np.random.default_rng(0)
    save(tmp_path / "noise.jpg", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = (tmp_path / "noise.jpg").read_bytes()
    (tmp_path / "noise.jpg").write_bytes(data[: len(data) // 2])
    dataset = ImageFolder(str(tmp_path), size=8, split_ratios=None)  # a JPEG's data are not checked up front
    with pytest.raises(DataFileError, match=r"cannot decode image file .*noise.jpg: OSError: image file is truncated"):
        dataset[0]


def test_splits_are_disjoint_and_cover_the_folder(folder):
    parts = [ImageFolder(str(folder), size=8, split=split, split_ratios=[0.6, 0.2, 0.2], seed=3).files
             for split in ("train", "validation", "test")]
    assert sorted(sum(parts, [])) == sorted(whole(folder).files)
    assert [len(p) for p in parts] == [3, 1, 1]


def test_batches_collate(folder):
    batch = next(iter(DataLoader(whole(folder, class_from_folder=True), batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["class_label"].tolist() == [0, 0, 1]
    assert len(batch["path"]) == 3


@pytest.mark.parametrize("arguments, message", [
    ({"channels": 2}, "channels must be 1 .* or 3"),
    ({"size": [8, 8, 8]}, r"size must be a positive int or \[height, width\]"),
    ({"size": 0}, "size must be a positive int"),
    ({"crop": "middle"}, "crop must be one of random, center"),
    ({"small_image": "stretch"}, "small_image must be one of error, pad"),
    ({"on_bad_file": "ignore"}, "on_bad_file must be one of error, skip"),
    ({"split": "training"}, "split must be one of"),
    ({"split": "test", "split_ratios": [1, 0, 0]}, "the test split of root .* is empty"),
])
def test_bad_arguments_raise_a_clear_error(folder, arguments, message):
    with pytest.raises(ValueError, match=message):
        ImageFolder(str(folder), **{"size": 8, **arguments})


def test_a_truncated_jpeg_meets_on_bad_file_in_the_loader(tmp_path):
    """skip: the loader reads the next image in its place (the same one every time) and counts the skipped read;
    error: the read error names the file and the option."""
    from ldm.data.base import SKIPPED_READS, DataModuleFromConfig
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        save(tmp_path / f"{name}.jpg", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) - 64])  # its header and most of its data: passes the check

    def batches(on_bad_file: str) -> list:
        train = {"target": "ldm.data.image_folder.ImageFolder", "params": {
            "root": str(tmp_path), "size": 8, "split_ratios": None, "crop": "center", "on_bad_file": on_bad_file}}
        module = DataModuleFromConfig(batch_size=3, train=train, num_workers=0)
        loader = module.dataloader("train", seed=0)
        loader.sampler.shuffle = False
        return list(loader)

    (batch,) = batches("skip")
    assert [p.rsplit("/", 1)[-1] for p in batch["path"]] == ["a.jpg", "c.jpg", "c.jpg"]
    assert batch[SKIPPED_READS].tolist() == [0, 1, 0]
    assert torch.equal(batch["image"][1], batch["image"][2])
    with pytest.raises(DataFileError, match=r"cannot decode image file .*b\.jpg: OSError: image file is truncated.*"
                                            r" \(on_bad_file: skip would skip it\)$"):
        batches("error")
