"""Image files: 3D mid-slice panels, grids, NIfTI round trip."""
import nibabel as nib
import numpy as np
import torch

from ldm.engine.images import mid_slices, save_images, save_nifti, to_grid


def test_mid_slices_pick_the_centre_planes():
    volume = torch.arange(2 * 4 * 6 * 8, dtype=torch.float32).reshape(2, 4, 6, 8)
    panel = mid_slices(volume)
    assert panel.shape == (2, 8, 24)
    assert torch.equal(panel[:, :6, :8], volume[:, 2])           # across D
    assert torch.equal(panel[:, :4, 8:16], volume[:, :, 3])      # across H
    assert torch.equal(panel[:, :4, 16:22], volume[:, :, :, 4])  # across W


def test_grid_shapes_and_value_mapping():
    images = torch.full((3, 1, 5, 7), -1.0)
    images[1] = 1.0
    grid = to_grid(images)
    assert grid.shape == (15, 7, 3) and grid.dtype == np.uint8
    assert grid[:5].max() == 0 and grid[5:10].min() == 255
    assert to_grid(torch.zeros(2, 3, 4, 4)).shape == (8, 4, 3)          # RGB stays RGB
    assert to_grid(torch.zeros(2, 4, 4, 4)).shape == (8, 16, 3)         # 4 channels tiled
    assert to_grid(torch.zeros(2, 1, 4, 6, 8)).shape == (16, 24, 3)     # 3D panels


def test_nifti_round_trip_keeps_axes_and_affine(tmp_path):
    volume = torch.randn(1, 4, 5, 6)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_nifti(volume, tmp_path / "v.nii.gz", affine)
    image = nib.load(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(image.get_fdata(), volume[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(image.affine, affine)
    save_nifti(torch.randn(3, 4, 5, 6), tmp_path / "m.nii.gz")
    assert nib.load(tmp_path / "m.nii.gz").shape == (4, 5, 6, 3)


def test_save_images_writes_png_and_one_nifti_per_sample(tmp_path):
    written = save_images({"samples": torch.zeros(2, 1, 4, 4, 4)}, tmp_path, "s", nifti=True)
    assert sorted(p.name for p in written) == ["samples_s.png", "samples_s_00.nii.gz", "samples_s_01.nii.gz"]


def test_save_images_places_volumes_of_the_image_shape_with_the_batch_affines(tmp_path):
    affines = torch.stack([torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))] * 2)
    affines[1, :3, 3] = torch.tensor([10.0, -5.0, 3.0], dtype=torch.float64)
    batch = {"image": torch.zeros(2, 1, 4, 4, 4), "affine": affines}
    from ldm.engine.images import batch_affines
    found, shape = batch_affines(batch)
    images = {"samples": torch.rand(2, 1, 4, 4, 4), "latents": torch.rand(2, 4, 2, 2, 2)}
    save_images(images, tmp_path, "s", nifti=True, affines=found, affine_shape=shape)
    assert np.array_equal(nib.load(str(tmp_path / "samples_s_01.nii.gz")).affine, affines[1].numpy())
    assert np.array_equal(nib.load(str(tmp_path / "latents_s_01.nii.gz")).affine, np.eye(4))  # not image-sized
    assert batch_affines({"image": torch.zeros(1, 1, 2, 2, 2)}) == (None, None)
