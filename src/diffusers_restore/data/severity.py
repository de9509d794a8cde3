# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""How degraded a pair is: GenDeg's severity (CVPR 2025) and one measure per degradation type.

* :func:`severity`: mean and spread of ``|HQ - LQ|`` with their bins, what a learned degradation model is prompted
  with (the bins are :mod:`diffusers_restore.severity_bins`).
* :func:`noise_sigma`, :func:`blockiness`, :func:`blur_sigma`: the parameter a gaussian noise, a JPEG or a gaussian
  blur was applied with, measured back from the images.

Images are PIL images (any mode, compared as 8-bit RGB through :func:`diffusers_restore.image_io.to_rgb`) or
HxWx3 uint8 arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ..image_io import to_rgb
from ..severity_bins import SEVERITY_BINS, SEVERITY_MU_RANGE, SEVERITY_SIGMA_RANGE

__all__ = ["blockiness", "blur_sigma", "noise_sigma", "severity"]


def _rgb(value: Any, argument: str) -> Image.Image:
    """An 8-bit RGB image from a PIL image (any mode) or an HxWx3 uint8 array."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
            raise ValueError(f"{argument} must be an HxWx3 uint8 array or a PIL image, got {value.dtype} {value.shape}.")
        return Image.fromarray(value)
    if not isinstance(value, Image.Image):
        raise TypeError(f"{argument} must be a PIL.Image.Image or an HxWx3 uint8 array, got {type(value).__name__}.")
    return to_rgb(value)


def _pixels(value: Any, argument: str) -> np.ndarray:
    """Float64 HxWx3 RGB on the 0-255 scale."""
    return np.asarray(_rgb(value, argument), dtype=np.float64)


def _same_size(clean: np.ndarray, degraded: np.ndarray) -> None:
    if clean.shape != degraded.shape:
        raise ValueError(f"clean and degraded images differ in size: {clean.shape[1]}x{clean.shape[0]} vs "
                         f"{degraded.shape[1]}x{degraded.shape[0]}.")


def _severity_bin(value: float, value_range: tuple[float, float]) -> int:
    edges = np.linspace(value_range[0], value_range[1], SEVERITY_BINS + 1)
    return int(np.clip(np.digitize(value, edges) - 1, 0, SEVERITY_BINS - 1))


def severity(hq: Image.Image | np.ndarray, lq: Image.Image | np.ndarray) -> dict[str, float | int]:
    """GenDeg's severity of a pair: mean and population std of ``|HQ - LQ|`` over all pixels and channels, on the
    [0, 1] scale, with their indices among 128 equal bins over [0, 0.7] (mu) and [0, 0.4] (sigma); values beyond the
    range fall in bin 127.

    Args:
        hq, lq: PIL images or HxWx3 uint8 arrays. An LQ of another size is resized to the HQ size with the Lanczos
            filter first.

    Returns:
        ``{"mu": float, "sigma": float, "mu_bin": int, "sigma_bin": int}``.
    """
    hq_image, lq_image = _rgb(hq, "hq"), _rgb(lq, "lq")
    if lq_image.size != hq_image.size:
        lq_image = lq_image.resize(hq_image.size, Image.Resampling.LANCZOS)
    difference = np.abs(np.asarray(hq_image, dtype=np.float64) - np.asarray(lq_image, dtype=np.float64)) / 255.0
    mu, sigma = float(difference.mean()), float(difference.std())
    return {
        "mu": mu,
        "sigma": sigma,
        "mu_bin": _severity_bin(mu, SEVERITY_MU_RANGE),
        "sigma_bin": _severity_bin(sigma, SEVERITY_SIGMA_RANGE),
    }


def noise_sigma(clean: Image.Image | np.ndarray, degraded: Image.Image | np.ndarray) -> float:
    """The noise level of a degraded copy: the standard deviation of ``degraded - clean`` over all pixels and
    channels, on the 0-255 scale (what ``gaussian_noise:SIGMA`` asks for; clipping at 0 and 255 lowers it slightly).
    """
    clean_pixels, degraded_pixels = _pixels(clean, "clean"), _pixels(degraded, "degraded")
    _same_size(clean_pixels, degraded_pixels)
    return float((degraded_pixels - clean_pixels).std())


def blockiness(image: Image.Image | np.ndarray, block: int = 8) -> float:
    """JPEG blocking of an image: the mean absolute luma step across the boundaries of the `block` x `block` grid
    (anchored at the top-left corner, as JPEG's is) divided by the mean step elsewhere, horizontally and vertically
    pooled. About 1 for an image without blocking; JPEG at low quality raises it (quality 10 gives about 2 on
    photos).

    Raises:
        ValueError: an image smaller than two blocks in either direction.
    """
    pixels = _pixels(image, "image")
    if min(pixels.shape[:2]) < 2 * block:
        raise ValueError(f"blockiness needs at least {2 * block} px per side, got {pixels.shape[1]}x{pixels.shape[0]}.")
    luma = pixels @ np.array([0.299, 0.587, 0.114])
    across, within = [], []
    for steps in (np.abs(np.diff(luma, axis=1)), np.abs(np.diff(luma, axis=0)).T):
        on_boundary = (np.arange(steps.shape[1]) + 1) % block == 0  # step between column k and k+1
        across.append(steps[:, on_boundary])
        within.append(steps[:, ~on_boundary])
    inside = float(np.mean(np.concatenate([w.ravel() for w in within])))
    return float(np.mean(np.concatenate([a.ravel() for a in across]))) / max(inside, 1e-12)


def blur_sigma(clean: Image.Image | np.ndarray, degraded: Image.Image | np.ndarray, max_sigma: float = 6.0,
               resolution: float = 0.05) -> float:
    """The gaussian blur width of a degraded copy: the sigma (px) whose gaussian blur of `clean` (the filter
    ``gaussian_blur`` uses) is closest to `degraded` in mean squared error, searched on a grid of `resolution` px up
    to `max_sigma`. 0 for an unblurred copy.
    """
    clean_image = _rgb(clean, "clean")
    target = _pixels(degraded, "degraded")
    _same_size(np.asarray(clean_image), target)
    best_sigma, best_error = 0.0, float(np.mean((np.asarray(clean_image, dtype=np.float64) - target) ** 2))
    for step in range(1, int(round(max_sigma / resolution)) + 1):
        sigma = round(step * resolution, 10)
        blurred = np.asarray(clean_image.filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float64)
        error = float(np.mean((blurred - target) ** 2))
        if error < best_error:
            best_sigma, best_error = sigma, error
    return best_sigma
