"""Per-item reconstruction metrics (PSNR, SSIM, MS-SSIM) for 2D and 3D images, through MONAI's implementations.

Inputs x, y: (B, C, H, W) or (B, C, D, H, W) float, in [-1, 1] by default (data_range 2); the number of spatial
dims follows from the rank. Every function returns (B,) float32, one value per item (mean over channels and space).
"""
from __future__ import annotations

import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

DATA_RANGE = 2.0  # images in [-1, 1]

# Wang, Simoncelli & Bovik 2003: the five per-scale exponents, finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# Wang et al. 2004: an 11-wide Gaussian window of sigma 1.5. Smaller windows keep sigma / width.
STANDARD_KERNEL_SIZE = 11
STANDARD_KERNEL_SIGMA = 1.5
MIN_MS_SSIM_KERNEL_SIZE = 7  # below this the window sees too few pixels for local statistics to mean much
MIN_MS_SSIM_SCALES = 2


def spatial_dims_of(x: torch.Tensor) -> int:
    """2 for (B, C, H, W), 3 for (B, C, D, H, W); anything else is an error naming the shape."""
    if x.ndim not in (4, 5):
        raise ValueError(f"expected images (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    return x.ndim - 2


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> int:
    if x.shape != y.shape:
        raise ValueError(f"images to compare differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return spatial_dims_of(x)


def kernel_sigma(kernel_size: int) -> float:
    """Gaussian sigma for a window of `kernel_size`: the standard 1.5 at 11, the same sigma / width below."""
    return STANDARD_KERNEL_SIGMA * kernel_size / STANDARD_KERNEL_SIZE


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / mse), per item: x, y (B, C, *spatial) -> (B,).

    Identical items give +inf."""
    _check_pair(x, y)
    metric = PSNRMetric(max_val=data_range, reduction="none")
    return metric(x.float(), y.float()).reshape(x.shape[0])


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Structural similarity per item: x, y (B, C, *spatial) -> (B,).

    Gaussian window 11, sigma 1.5 (MONAI's defaults); for a spatial side below 11 the window shrinks to the largest
    odd size that fits, with sigma scaled alike."""
    spatial_dims = _check_pair(x, y)
    window = min(STANDARD_KERNEL_SIZE, *x.shape[2:])
    window -= 1 - window % 2
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=window,
                        kernel_sigma=kernel_sigma(window), reduction="none")
    return metric(x.float(), y.float()).reshape(x.shape[0])


def _ms_ssim_fits(side: int, kernel_size: int, num_scales: int) -> bool:
    # The coarsest scale (side halved num_scales - 1 times) must hold one window; MONAI checks the stricter-or-equal
    # side // (num_scales - 1)^2 >= kernel_size for three or more scales, and its check must pass too.
    divisor = max(2 ** (num_scales - 1), (num_scales - 1) ** 2)
    return side // divisor >= kernel_size


def ms_ssim_settings(spatial_shape: tuple[int, ...], kernel_size: int | None = None,
                     num_scales: int | None = None) -> tuple[int, int]:
    """(kernel_size, num_scales) for MS-SSIM on images of `spatial_shape`: the most scales (at most 5) at which a
    window of at least 7 still fits the coarsest scale, then the largest odd window (at most 11) for that many
    scales. Either may be fixed by the caller. Raises ValueError naming the shape when none fits."""
    side = min(spatial_shape)
    scale_options = [num_scales] if num_scales else range(len(MS_SSIM_WEIGHTS), MIN_MS_SSIM_SCALES - 1, -1)
    kernel_options = [kernel_size] if kernel_size else range(STANDARD_KERNEL_SIZE, MIN_MS_SSIM_KERNEL_SIZE - 1, -2)
    for scales in scale_options:
        if not 1 <= scales <= len(MS_SSIM_WEIGHTS):
            raise ValueError(f"MS-SSIM num_scales must be 1..{len(MS_SSIM_WEIGHTS)}, got {scales}")
        for window in kernel_options:
            if _ms_ssim_fits(side, window, scales):
                return window, scales
    wanted = (f"{num_scales or MIN_MS_SSIM_SCALES} scales with a window of "
              f"{kernel_size or MIN_MS_SSIM_KERNEL_SIZE}")
    raise ValueError(f"MS-SSIM: images of spatial shape {tuple(spatial_shape)} are too small for {wanted}")


def ms_ssim_weights(num_scales: int) -> tuple[float, ...]:
    """The first `num_scales` standard MS-SSIM exponents (finest first), renormalised to sum to 1."""
    kept = MS_SSIM_WEIGHTS[:num_scales]
    return tuple(w / sum(kept) for w in kept)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE, kernel_size: int | None = None,
            num_scales: int | None = None) -> torch.Tensor:
    """Multi-scale structural similarity per item (MONAI's MultiScaleSSIMMetric): x, y (B, C, *spatial) -> (B,).

    Images of side >= 176 get MONAI's defaults exactly (5 scales, window 11, sigma 1.5, the standard weights).
    Smaller images get fewer scales and / or a smaller window as `ms_ssim_settings` picks (32: 3 scales, window 7;
    64: 4 scales, window 7), the standard weights of the kept scales renormalised to sum to 1 and sigma scaled with
    the window; below side 14 (2 scales of a 7-wide window) it is an error."""
    spatial_dims = _check_pair(x, y)
    window, scales = ms_ssim_settings(tuple(x.shape[2:]), kernel_size, num_scales)
    metric = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=data_range, kernel_size=window,
                                  kernel_sigma=kernel_sigma(window), weights=ms_ssim_weights(scales),
                                  reduction="none")
    return metric(x.float(), y.float()).reshape(x.shape[0])


RECONSTRUCTION_METRICS = {"psnr": psnr, "ssim": ssim, "ms_ssim": ms_ssim}
