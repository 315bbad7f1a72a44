"""`HeadPhantom`: procedural head-like volumes (or axial slices) with tumour blobs and their masks, seeded per item.

Anatomy, in coordinates where each axis of the grid spans [-1, 1] (axes as RAS: left-right, posterior-anterior,
inferior-superior): a head ellipsoid whose outer shell is scalp and skull, the brain inside it, two lateral
ventricles; every item moves, turns and scales the head a little. Tumours sit inside the brain, each a BraTS-like
set of shells around a random centre: necrotic core (label 1), enhancing rim (label 4), oedema (label 2).
Intensities follow a FLAIR-like contrast (bright lesion, dark CSF), times a smooth bias field, with Rician noise.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.data.transforms import SPLITS, split_name

#: Label values of the one-hot `mask` channels, in order, as in BraTS: background, necrotic core, oedema, enhancing.
SEG_LABELS = (0, 1, 2, 4)
MASK_MODES = ("whole_tumour", "onehot", "none")
#: Index order of `Phantom.tissue`.
TISSUES = ("background", "scalp_and_skull", "brain", "ventricle")
DEFAULT_LENGTH = {"train": 512, "validation": 16, "test": 16}

HEAD_RADII = (0.72, 0.86, 0.78)
BRAIN_FRACTION = 0.86                     # brain radii / head radii: the rest is scalp and skull
VENTRICLE_CENTRES = ((-0.09, 0.02, 0.08), (0.09, 0.02, 0.08))
VENTRICLE_RADII = (0.06, 0.26, 0.12)
TUMOUR_PLACEMENT = 0.55                   # tumour centres lie within this fraction of the brain's radii
CORE_FRACTION, OEDEMA_FRACTION = 0.5, 1.5  # shell bounds as fractions of the tumour radius (enhancing rim: to 1)
#: Intensity in [0, 1] of each tissue (in TISSUES order) and of each tumour label, before bias field and noise.
TISSUE_INTENSITY = (0.0, 0.8, 0.45, 0.12)
TUMOUR_INTENSITY = {1: 0.3, 4: 0.95, 2: 0.7}
#: Pose jitter at `pose_jitter: 1`: largest turn per plane, relative scale change per axis, shift per axis.
MAX_TURN_DEG, MAX_SCALE, MAX_SHIFT = 8.0, 0.06, 0.04
MAX_BIAS = 0.1                            # the bias field varies the intensity by up to +-10 % across the volume


class Phantom(NamedTuple):
    """One rendered phantom: `image` (*size) float32 in [-1, 1], `seg` (*size) uint8 in SEG_LABELS, `tissue`
    (*size) uint8 indices into TISSUES (the anatomy without the tumours)."""
    image: np.ndarray
    seg: np.ndarray
    tissue: np.ndarray


def rotation(angles_deg: Sequence[float], dims: int) -> np.ndarray:
    """(dims, dims) rotation: one turn per coordinate plane, in the order of itertools.combinations(range(dims), 2)."""
    matrix = np.eye(dims)
    for (i, j), angle in zip(itertools.combinations(range(dims), 2), angles_deg):
        turn = np.eye(dims)
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        matrix = matrix @ turn
    return matrix


def ellipsoid_radius(points: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised radius of points (dims, *size) in the ellipsoid (centre, radii): < 1 inside, 1 on its surface."""
    offsets = [(points[axis] - centre[axis]) / radii[axis] for axis in range(len(radii))]
    return np.sqrt(sum(offset * offset for offset in offsets))


def random_in_ball(rng: np.random.Generator, dims: int) -> np.ndarray:
    """A point drawn uniformly from the unit ball of `dims` dimensions."""
    direction = rng.standard_normal(dims)
    return direction / np.linalg.norm(direction) * rng.uniform() ** (1 / dims)


class HeadPhantom(Dataset):
    """`length` phantoms, item `index` drawn from a generator seeded by (`seed`, split, index) alone: the same in
    every call and every loader worker, different across indices, splits and seeds.

    `size`: the grid, one int per spatial axis (or one int for all); `spatial_dims: 2` renders an axial slice
    (the anatomy's first two axes). `num_tumours`: inclusive [min, max] per item. `tumour_radius`: [min, max] of the
    enhancing rim's radius in grid coordinates (each axis spans [-1, 1], so 0.25 is an eighth of the edge); the core
    fills half of it and the oedema reaches 1.5 times it, all clipped to the brain. `pose_jitter` scales the random
    turn (8 degrees per plane), scale (6 %) and shift (0.04) of the head; 0 gives the same head every item.
    `noise_std`: standard deviation of the Rician noise on the [0, 1] intensity scale.

    Items: `image` (1, *size) float32 in [-1, 1] and `mask` (K, *size) float32 in {0, 1}: K = 1 for
    `mask: whole_tumour` (any tumour label), K = 4 for `mask: onehot` (labels 0, 1, 2, 4, as BraTS2021_3D);
    no `mask` for `mask: none`.
    """

    def __init__(self, split: str = "train", size: int | Sequence[int] = 64, spatial_dims: int = 3,
                 length: int | None = None, seed: int = 0, mask: str = "whole_tumour",
                 num_tumours: Sequence[int] = (1, 2), tumour_radius: Sequence[float] = (0.1, 0.25),
                 pose_jitter: float = 1.0, noise_std: float = 0.03):
        self.split = split_name(split)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        sizes = [size] * spatial_dims if isinstance(size, int) else list(size)
        if len(sizes) != spatial_dims or any(int(s) != s or s < 4 for s in sizes):
            raise ValueError(f"size must be an int >= 4 or {spatial_dims} of them (spatial_dims: {spatial_dims}), "
                             f"got {size!r}")
        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
        if len(num_tumours) != 2 or not 0 <= num_tumours[0] <= num_tumours[1]:
            raise ValueError(f"num_tumours must be [min, max] with 0 <= min <= max, got {list(num_tumours)}")
        if len(tumour_radius) != 2 or not 0 < tumour_radius[0] <= tumour_radius[1]:
            raise ValueError(f"tumour_radius must be [min, max] with 0 < min <= max, got {list(tumour_radius)}")
        if pose_jitter < 0 or noise_std < 0:
            raise ValueError(f"pose_jitter and noise_std must be >= 0, got {pose_jitter} and {noise_std}")
        self.length = DEFAULT_LENGTH[self.split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.size, self.dims, self.seed, self.mask = tuple(int(s) for s in sizes), spatial_dims, seed, mask
        self.num_tumours, self.tumour_radius = (int(num_tumours[0]), int(num_tumours[1])), tuple(tumour_radius)
        self.pose_jitter, self.noise_std = float(pose_jitter), float(noise_std)
        # voxel centres; in 2D the anatomy keeps its first two axes (an axial view)
        axes = [(np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1 for n in self.size]
        self.grid = np.stack(np.meshgrid(*axes, indexing="ij"))

    def __len__(self) -> int:
        return self.length

    def render(self, index: int) -> Phantom:
        """Phantom number `index`, drawn from its own generator."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        dims = self.dims
        jitter = self.pose_jitter
        turn = rotation(rng.uniform(-MAX_TURN_DEG, MAX_TURN_DEG, dims * (dims - 1) // 2) * jitter, dims)
        head_radii = np.array(HEAD_RADII[:dims]) * (1 + rng.uniform(-MAX_SCALE, MAX_SCALE, dims) * jitter)
        shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, dims) * jitter
        # grid points in the head's own frame: undo the shift, then the turn
        offsets = self.grid - shift.astype(np.float32).reshape(-1, *[1] * dims)
        points = np.einsum("ji,j...->i...", turn.astype(np.float32), offsets)

        brain_radii = head_radii * BRAIN_FRACTION
        in_head = ellipsoid_radius(points, [0] * dims, head_radii) < 1
        in_brain = ellipsoid_radius(points, [0] * dims, brain_radii) < 1
        in_ventricle = np.zeros(self.size, bool)
        for centre in VENTRICLE_CENTRES:
            in_ventricle |= ellipsoid_radius(points, centre[:dims], VENTRICLE_RADII[:dims]) < 1
        tissue = np.select([in_ventricle & in_brain, in_brain, in_head], [3, 2, 1], 0).astype(np.uint8)

        nearest = np.full(self.size, np.inf, np.float32)  # smallest normalised radius over the tumours
        for _ in range(rng.integers(self.num_tumours[0], self.num_tumours[1] + 1)):
            centre = random_in_ball(rng, dims) * brain_radii * TUMOUR_PLACEMENT
            radii = rng.uniform(*self.tumour_radius) * rng.uniform(0.85, 1.15, dims)
            nearest = np.minimum(nearest, ellipsoid_radius(points, centre, radii))
        seg = np.select([nearest < CORE_FRACTION, nearest < 1, nearest < OEDEMA_FRACTION], [1, 4, 2], 0)
        seg = np.where(in_brain, seg, 0).astype(np.uint8)

        intensity = np.array(TISSUE_INTENSITY, np.float32)[tissue]
        for label, value in TUMOUR_INTENSITY.items():
            intensity[seg == label] = value
        direction = rng.standard_normal(dims)
        bias = 1 + MAX_BIAS * rng.uniform() * np.einsum("i,i...->...", direction / np.linalg.norm(direction),
                                                         self.grid) / math.sqrt(dims)
        intensity = intensity * bias.astype(np.float32)
        if self.noise_std > 0:  # magnitude of a complex signal with Gaussian noise on both parts: Rician
            real = intensity + rng.standard_normal(self.size, np.float32) * self.noise_std
            imaginary = rng.standard_normal(self.size, np.float32) * self.noise_std
            intensity = np.sqrt(real * real + imaginary * imaginary)
        image = np.clip(intensity, 0, 1) * 2 - 1
        return Phantom(image.astype(np.float32), seg, tissue)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        phantom = self.render(index)
        item = {"image": torch.from_numpy(phantom.image)[None]}
        seg = torch.from_numpy(phantom.seg)
        if self.mask == "whole_tumour":
            item["mask"] = (seg > 0)[None].float()
        elif self.mask == "onehot":
            item["mask"] = (seg[None] == torch.tensor(SEG_LABELS, dtype=torch.uint8).view(-1, *[1] * self.dims))
            item["mask"] = item["mask"].float()
        return item
