import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldm.data.phantom import SEG_LABELS, TISSUES, HeadPhantom

BRAIN, VENTRICLE = TISSUES.index("brain"), TISSUES.index("ventricle")


@pytest.mark.parametrize("dims, size", [(3, 24), (3, [20, 24, 28]), (2, 32)])
def test_shapes_types_and_ranges(dims, size):
    dataset = HeadPhantom(size=size, spatial_dims=dims, length=3, mask="onehot")
    shape = tuple([size] * dims if isinstance(size, int) else size)
    for index in range(3):
        item = dataset[index]
        assert item["image"].shape == (1, *shape) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (4, *shape) and item["mask"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert torch.equal(item["mask"].sum(0), torch.ones(shape))  # one-hot: exactly one label per voxel
        assert item["mask"][1:].sum() > 0  # every item has a tumour with the default num_tumours [1, 2]


@pytest.mark.parametrize("dims", [3, 2])
def test_mask_marks_where_the_blob_is_bright(dims):
    dataset = HeadPhantom(size=32, spatial_dims=dims, length=6)
    pool = F.max_pool3d if dims == 3 else F.max_pool2d

    def contrast(image, mask, tissue):
        """Mean inside `mask` minus mean over the brain in a 2-voxel ring around it."""
        ring = pool(mask[None, None], 5, stride=1, padding=2)[0, 0].bool() & ~mask.bool()
        ring &= torch.from_numpy(tissue == BRAIN)
        assert mask.sum() > 0 and ring.sum() > 0
        return image[mask.bool()].mean() - image[ring].mean()

    for index in range(len(dataset)):
        item, tissue = dataset[index], dataset.render(index).tissue
        own = contrast(item["image"][0], item["mask"][0], tissue)
        assert own > 0.4
        # another item's mask lies elsewhere: on this image it finds at most part of the blob
        other = dataset[(index + 1) % len(dataset)]["mask"][0]
        assert own > contrast(item["image"][0], other, tissue) + 0.1


def test_tumour_labels_are_shells_with_their_own_intensity():
    dataset = HeadPhantom(size=48, length=4, num_tumours=[1, 1], tumour_radius=[0.25, 0.3], noise_std=0.0)
    for index in range(len(dataset)):
        phantom = dataset.render(index)
        means = {label: phantom.image[phantom.seg == label].mean() for label in SEG_LABELS[1:]}
        brain = phantom.image[(phantom.seg == 0) & (phantom.tissue == BRAIN)].mean()
        ventricle = phantom.image[(phantom.seg == 0) & (phantom.tissue == VENTRICLE)].mean()
        assert means[4] > means[2] > brain > means[1] > ventricle
        # tumours lie inside the brain (ventricles included)
        assert np.isin(phantom.tissue[phantom.seg > 0], [BRAIN, VENTRICLE]).all()
        # shells: one voxel around the core is rim, one voxel around core and rim is oedema (inside the brain)
        core_grown = grow(phantom.seg == 1) & (phantom.tissue != 0)
        assert (phantom.seg == 1).any() and np.isin(phantom.seg[core_grown], [1, 4]).all()
        assert np.isin(phantom.seg[grow(np.isin(phantom.seg, [1, 4])) & (phantom.tissue == BRAIN)], [1, 4, 2]).all()


def grow(region: np.ndarray) -> np.ndarray:
    """`region` (D, H, W) bool dilated by one voxel (26-neighbourhood)."""
    region = torch.from_numpy(region).float()[None, None]
    return F.max_pool3d(region, 3, stride=1, padding=1)[0, 0].bool().numpy()


def test_whole_tumour_mask_is_the_union_of_the_onehot_tumour_channels():
    onehot = HeadPhantom(size=24, length=3, mask="onehot", seed=2)
    whole = HeadPhantom(size=24, length=3, mask="whole_tumour", seed=2)
    for index in range(3):
        assert torch.equal(whole[index]["mask"][0], 1 - onehot[index]["mask"][0])
        assert torch.equal(whole[index]["image"], onehot[index]["image"])
    assert set(HeadPhantom(size=24, length=1, mask="none")[0]) == {"image"}


def test_items_are_fixed_by_seed_split_and_index_also_in_loader_workers():
    dataset = HeadPhantom(size=16, length=6, seed=3)
    again = HeadPhantom(size=16, length=6, seed=3)
    direct = [dataset[i] for i in range(6)]
    for index in range(6):
        assert torch.equal(direct[index]["image"], again[index]["image"])
        assert torch.equal(direct[index]["mask"], dataset[index]["mask"])
    torch.manual_seed(123)  # the global generator plays no part
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False))
    assert torch.equal(torch.cat([b["image"] for b in batches]), torch.stack([d["image"] for d in direct]))
    others = [HeadPhantom(size=16, length=6, seed=4)[0], HeadPhantom("validation", size=16, length=6, seed=3)[0]]
    assert not any(torch.equal(direct[0]["image"], other["image"]) for other in others)
    assert not torch.equal(direct[0]["image"], direct[1]["image"])


def test_pose_jitter_moves_the_head_and_zero_keeps_it():
    still = HeadPhantom(size=24, length=3, pose_jitter=0.0)
    moving = HeadPhantom(size=24, length=3)
    assert all(np.array_equal(still.render(0).tissue, still.render(i).tissue) for i in (1, 2))
    assert not np.array_equal(moving.render(0).tissue, moving.render(1).tissue)


def test_noise_has_the_given_spread():
    # in the bright brain, Rician noise is close to Gaussian; [0, 1] -> [-1, 1] doubles its standard deviation
    clean = HeadPhantom(size=32, length=1, noise_std=0.0).render(0)
    noisy = HeadPhantom(size=32, length=1, noise_std=0.05).render(0)
    brain = (clean.tissue == BRAIN) & (clean.seg == 0)
    assert np.array_equal(clean.seg, noisy.seg)
    assert abs((noisy.image - clean.image)[brain].std() - 0.1) < 0.01


def test_num_tumours_zero_gives_an_empty_mask():
    item = HeadPhantom(size=16, length=1, num_tumours=[0, 0])[0]
    assert item["mask"].sum() == 0


@pytest.mark.parametrize("arguments, message", [
    ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
    ({"size": [16, 16]}, "size must be an int >= 4 or 3 of them"),
    ({"size": 2}, "size must be an int >= 4"),
    ({"mask": "binary"}, "mask must be one of whole_tumour, onehot, none"),
    ({"num_tumours": [2, 1]}, r"num_tumours must be \[min, max\]"),
    ({"tumour_radius": [0, 0.1]}, r"tumour_radius must be \[min, max\] with 0 < min"),
    ({"noise_std": -0.1}, "pose_jitter and noise_std must be >= 0"),
    ({"length": 0}, "length must be >= 1"),
    ({"split": "training"}, "split must be one of"),
])
def test_bad_arguments_raise_a_clear_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        HeadPhantom(**arguments)


def test_index_out_of_range():
    with pytest.raises(IndexError, match="index 3 out of range for 3 items"):
        HeadPhantom(size=8, length=3)[3]
