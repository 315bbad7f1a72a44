import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.captions import CaptionedImages
from ldm.data.transforms import DataFileError


def coordinate_image(path, height, width):
    """An RGB PNG whose red channel is 10 * column and green 10 * row: a crop's pixels say where it came from."""
    rows, cols = np.mgrid[0:height, 0:width]
    pixels = np.stack([cols * 10, rows * 10, np.full_like(rows, 77)], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(str(path))


def origin(item):
    """(row, column) of the source pixel at the item's top-left, decoded from the coordinate image."""
    pixel = (item["image"][:, 0, 0] + 1) / 2 * 255
    return round(float(pixel[1]) / 10), round(float(pixel[0]) / 10)


@pytest.fixture
def txt_folder(tmp_path):
    coordinate_image(tmp_path / "a.png", 8, 12)
    (tmp_path / "a.txt").write_text("a red square\n", encoding="utf-8")
    coordinate_image(tmp_path / "sub" / "b.png", 10, 8)
    (tmp_path / "sub" / "b.txt").write_text("une île", encoding="utf-8")
    return tmp_path


def test_txt_captions_beside_images(txt_folder):
    dataset = CaptionedImages(str(txt_folder), size=8, crop="center")
    assert [p[len(str(txt_folder)) + 1:] for p in dataset.files] == ["a.png", "sub/b.png"]
    assert [dataset[i]["txt"] for i in range(2)] == ["a red square", "une île"]
    item = dataset[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    torch.testing.assert_close(item["image"][2], torch.full((8, 8), 77 / 255 * 2 - 1))


def test_metadata_jsonl_with_its_caption_column(tmp_path):
    coordinate_image(tmp_path / "img" / "x.png", 8, 8)
    coordinate_image(tmp_path / "img" / "y.png", 8, 8)
    lines = [{"file_name": "img/y.png", "caption": "why"}, {"file_name": "img/x.png", "caption": "ex", "n": 1}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    dataset = CaptionedImages(str(tmp_path), size=8, caption_column="caption")
    assert [(p.rsplit("/", 1)[1], dataset[i]["txt"]) for i, p in enumerate(dataset.files)] == [("x.png", "ex"),
                                                                                             ("y.png", "why")]
    with pytest.raises(DataFileError, match=r"metadata.jsonl:1: needs string entries file_name and text"):
        CaptionedImages(str(tmp_path), size=8)


def test_centre_crop_and_size_conditioning_follow_the_crop(txt_folder):
    item = CaptionedImages(str(txt_folder), size=8, crop="center")[0]  # 8 x 12: no resize, 2 columns cut each side
    assert origin(item) == (0, 2)
    assert item["original_size_as_tuple"].tolist() == [8, 12]
    assert item["crop_coords_top_left"].tolist() == [0, 2]
    assert item["target_size_as_tuple"].tolist() == [8, 8]
    assert item["crop_coords_top_left"].dtype == torch.int64


def test_random_crops_and_flips_report_the_crop_of_what_was_returned(txt_folder):
    dataset = CaptionedImages(str(txt_folder), size=(8, 6), crop="random", flip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        item = dataset[0]  # 8 x 12 source, (8, 6) crop: left in 0..6
        top, left = item["crop_coords_top_left"].tolist()
        row, column = origin(item)
        flipped = column != left
        if flipped:  # the mirrored image's column `left` is the source's column 11 - left
            assert column == 11 - left
            assert origin({"image": item["image"].flip(-1)}) == (0, 11 - (left + 5))
        assert top == row == 0 and 0 <= left <= 6
        seen.add((left, flipped))
    assert len({left for left, _ in seen}) > 3 and {f for _, f in seen} == {True, False}


def test_resize_covers_the_size_and_original_size_is_the_files(tmp_path):
    coordinate_image(tmp_path / "big.png", 16, 24)
    (tmp_path / "big.txt").write_text("big")
    item = CaptionedImages(str(tmp_path), size=8, crop="center")[0]
    assert item["original_size_as_tuple"].tolist() == [16, 24]
    assert item["crop_coords_top_left"].tolist() == [0, 2]  # resized to 8 x 12
    assert item["image"].shape == (3, 8, 8)


def test_missing_caption_and_corrupt_image_follow_on_bad_file(txt_folder):
    (txt_folder / "sub" / "b.txt").unlink()
    (txt_folder / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (txt_folder / "c.txt").write_text("broken")
    with pytest.raises(DataFileError, match=r"c\.png"):
        CaptionedImages(str(txt_folder), size=8)
    (txt_folder / "c.png").unlink()
    with pytest.raises(DataFileError, match=r"cannot read caption file .*b\.txt.*on_bad_file: skip"):
        CaptionedImages(str(txt_folder), size=8)
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 image-caption pairs"):
        dataset = CaptionedImages(str(txt_folder), size=8, on_bad_file="skip")
    assert [dataset[i]["txt"] for i in range(len(dataset))] == ["a red square"]


def test_metadata_naming_a_missing_image_and_malformed_lines(tmp_path):
    coordinate_image(tmp_path / "x.png", 8, 8)
    lines = [json.dumps({"file_name": "x.png", "text": "ex"}), json.dumps({"file_name": "gone.png", "text": "g"})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataFileError, match=r"gone\.png"):
        CaptionedImages(str(tmp_path), size=8)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert len(CaptionedImages(str(tmp_path), size=8, on_bad_file="skip")) == 1
    (tmp_path / "metadata.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataFileError, match=r"metadata.jsonl:2: not a JSON object"):
        CaptionedImages(str(tmp_path), size=8)
    (tmp_path / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="captions: metadata needs .*metadata.jsonl"):
        CaptionedImages(str(tmp_path), size=8, captions="metadata")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionedImages(str(tmp_path / "nowhere"), size=8)


def test_bad_options_are_named(txt_folder):
    for kwargs, message in [({"crop": "edge"}, "crop must be one of"), ({"captions": "csv"}, "captions must be"),
                            ({"on_bad_file": "ignore"}, "on_bad_file must be"), ({"size": [8]}, "size must be")]:
        with pytest.raises(ValueError, match=message):
            CaptionedImages(str(txt_folder), **{"size": 8, **kwargs})


def test_batches_collate_captions_as_lists(txt_folder):
    batch = next(iter(DataLoader(CaptionedImages(str(txt_folder), size=8), batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["txt"] == ["a red square", "une île"]
    assert batch["original_size_as_tuple"].tolist() == [[8, 12], [10, 8]]


def test_from_config_through_the_data_module(txt_folder):
    from ldm.data.base import DataModuleFromConfig
    from ldm.util import ConfigError

    train = {"target": "ldm.data.captions.CaptionedImages", "params": {"root": str(txt_folder), "size": 8,
                                                                      "flip": True}}
    data = DataModuleFromConfig(batch_size=2, train=train, num_workers=0, pin_memory=False)
    batch = next(iter(data.dataloader("train")))
    assert sorted(batch["txt"]) == ["a red square", "une île"] and batch["image"].shape == (2, 3, 8, 8)
    with pytest.raises(ConfigError, match="unknown argument .caption_dropout. for CaptionedImages"):
        DataModuleFromConfig(batch_size=2, num_workers=0, train={**train, "params": {**train["params"],
                                                                                     "caption_dropout": 0.1}})
