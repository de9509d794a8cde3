# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""The single image degradations of restoration training, in PIL and numpy (no torch).

Every degradation takes a PIL image and returns ``(degraded image, record)``; the record says what was applied, as
JSON-serialisable data::

    {"name": "gaussian_noise", "params": {"sigma": 25.0, "gray": False}}

Work happens on 8-bit images: an ``L`` image stays ``L``, ``RGB`` stays ``RGB``, and every other mode is first
converted to RGB with :func:`diffusers_restore.image_io.to_rgb`, the package's one conversion (alpha composited over
white, 16-bit and float grey scaled to 8 bits). The output has the input's size.

Parameters left as ``None`` are drawn from the *drawn* range below (barely visible to severe) with the given
``numpy.random.Generator`` (or integer seed); the same generator state always gives the same output. A parameter
given explicitly must lie in the *accepted* range (:data:`PARAMETER_RANGES`), beyond which the result is no longer
the named artefact (saturated noise, a black frame, a blur or downscale that leaves a flat image):

| name            | parameter      | drawn                  | accepted       | models         |
|-----------------|----------------|------------------------|----------------|----------------|
| gaussian_noise  | sigma (0-255)  | U(5, 50)               | [0, 100]       | camera noise   |
| poisson_noise   | scale          | U(1, 5)                | [0, 10]        | low light      |
| jpeg            | quality        | U{10..40}              | [1, 100], int  | compression    |
| gaussian_blur   | kernel_size    | {3, 5, 7, 9, 11}       | [1, 51], odd   | defocus        |
| gaussian_blur   | sigma (px)     | from kernel_size       | [0, 20]        |                |
| downscale       | factor         | U(2, 4)                | [1, 16]        | low resolution |
| colour_jitter   | brightness     | U(-0.2, 0.2)           | [-0.9, 1]      | colour cast    |
| colour_jitter   | contrast       | U(-0.2, 0.2)           | [-0.9, 1]      |                |

Speed (the hot paths of on-the-fly training data): the noises are drawn by inverse-CDF lookup on a uniform integer
grid instead of per-pixel transcendental sampling. Gaussian noise uses a 16-bit grid (the 65536 quantiles of N(0, 1),
tails clipped at 4.3 sigma); because the image values are integers, ``round(x + sigma * z) = x + round(sigma * z)``
and the whole operation stays in int16. Poisson noise uses a 12-bit grid of the exact Poisson quantiles of every
grey level (probabilities exact to 1/4096, tails below 1/8192 clipped). Both are exact discretisations of the named
distributions; ``benchmarks/bench_data.py`` reports the throughput.
"""

from __future__ import annotations

import functools
import io
import math
import statistics
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from ..image_io import to_rgb

__all__ = [
    "DEGRADATIONS",
    "PARAMETER_RANGES",
    "area_downsample_pair",
    "colour_jitter",
    "downscale",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "kernel_size_to_sigma",
    "poisson_noise",
    "random_degradation",
]

Record = dict[str, Any]
RngLike = np.random.Generator | int | None

PARAMETER_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "gaussian_noise": {"sigma": (0.0, 100.0)},
    "poisson_noise": {"scale": (0.0, 10.0)},
    "jpeg": {"quality": (1, 100)},
    "gaussian_blur": {"kernel_size": (1, 51), "sigma": (0.0, 20.0)},
    "downscale": {"factor": (1.0, 16.0)},
    "colour_jitter": {"brightness": (-0.9, 1.0), "contrast": (-0.9, 1.0)},
}
"""The accepted range ``(low, high)``, both ends included, of every numeric parameter (the module docstring's table)."""

# Ranges from which unspecified parameters are drawn.
GAUSSIAN_SIGMA_RANGE = (5.0, 50.0)
POISSON_SCALE_RANGE = (1.0, 5.0)
JPEG_QUALITY_RANGE = (10, 40)
BLUR_KERNEL_SIZES = (3, 5, 7, 9, 11)
DOWNSCALE_FACTOR_RANGE = (2.0, 4.0)
COLOUR_JITTER_RANGE = 0.2

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# ----------------------------------------------------------------------------------------------------- helpers


def as_rng(rng: RngLike) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a generator, an integer seed, or ``None`` (fresh OS entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}.")


def as_8bit(image: Any, argument: str = "image") -> Image.Image:
    """`image` as the 8-bit working image of the degradations: ``L`` and ``RGB`` as they are, any other mode through
    :func:`~diffusers_restore.image_io.to_rgb`."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{argument} must be a PIL.Image.Image, got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{argument} is empty ({image.width}x{image.height}).")
    return image if image.mode in ("L", "RGB") else to_rgb(image)


def make_record(name: str, **params: Any) -> Record:
    """A JSON-serialisable record (numpy scalars become Python numbers, floats are rounded to 6 decimals)."""
    clean = {}
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, float):
            value = float(round(value, 6))
        clean[key] = value
    return {"name": name, "params": clean}


def _parameter(degradation: str, key: str, value: Any, draw: Callable[[], Any]) -> Any:
    """`value` checked against its accepted range, or a draw when it is ``None``."""
    if value is None:
        return draw()
    low, high = PARAMETER_RANGES[degradation][key]
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not low <= value <= high:
        raise ValueError(f"{degradation}: {key} must be a number in [{low:g}, {high:g}], got {value!r}.")
    return value


# ------------------------------------------------------------------------------------------- noise sampling


@functools.lru_cache(maxsize=1)
def normal_quantiles() -> np.ndarray:
    """The 65536 quantiles of N(0, 1) at the midpoints of a uniform 16-bit grid (float32)."""
    normal = statistics.NormalDist()
    grid = (np.arange(65536, dtype=np.float64) + 0.5) / 65536.0
    return np.array([normal.inv_cdf(p) for p in grid], dtype=np.float32)


_POISSON_GRID_BITS = 12


@functools.lru_cache(maxsize=16)
def poisson_noise_table(levels: int) -> np.ndarray:
    """``table[v, j]``: the j-th of 4096 grid quantiles of ``Poisson(lam) / levels - v / 255`` with
    ``lam = v / 255 * levels`` for every 8-bit value v (float32, shape [256, 4096])."""
    grid_size = 1 << _POISSON_GRID_BITS
    grid = (np.arange(grid_size, dtype=np.float64) + 0.5) / grid_size
    lam = np.arange(256, dtype=np.float64) / 255.0 * levels
    k_max = int(levels + 12 * math.sqrt(levels) + 30)
    k = np.arange(k_max + 1, dtype=np.float64)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(k[1:]))])
    table = np.empty((256, grid_size), dtype=np.float32)
    for v in range(256):
        if lam[v] == 0.0:
            counts = np.zeros(grid_size)
        else:
            log_pmf = k * math.log(lam[v]) - lam[v] - log_factorial
            cdf = np.cumsum(np.exp(log_pmf))
            cdf /= cdf[-1]
            counts = np.minimum(np.searchsorted(cdf, grid, side="left"), k_max)
        table[v] = counts / levels - v / 255.0
    return table


def _poisson_levels(values: np.ndarray) -> int:
    """Real-ESRGAN's number of Poisson intensity levels: 2 ** ceil(log2(number of distinct 8-bit values))."""
    distinct = int(np.count_nonzero(np.bincount(values.ravel(), minlength=256)))
    return int(2 ** math.ceil(math.log2(max(distinct, 2))))


def grey_uint8(values: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an HxWx3 uint8 array, as PIL's "L" conversion computes it."""
    return np.asarray(Image.fromarray(values).convert("L"))


def _poisson_table_index(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat indices ``value * 4096 + uniform grid cell`` into a [256, 4096] table, one per element of `values`."""
    index = rng.integers(0, 1 << _POISSON_GRID_BITS, size=values.shape, dtype=np.uint32)
    index |= values.astype(np.uint32) << _POISSON_GRID_BITS
    return index


def poisson_noise_float(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Real-ESRGAN Poisson noise (before scaling) for a uint8 array: ``Poisson(x * L) / L - x`` in [0, 1] units."""
    table = poisson_noise_table(_poisson_levels(values))
    return np.take(table, _poisson_table_index(values, rng))


# ------------------------------------------------------------------------------------------ the degradations


def gaussian_noise(
    image: Image.Image, sigma: float | None = None, *, rng: RngLike = None, gray: bool = False
) -> tuple[Image.Image, Record]:
    """Add white gaussian noise N(0, sigma^2) on the 0-255 scale, then round and clip to 8 bits.

    Args:
        image: a PIL image (see the module docstring for modes).
        sigma: standard deviation on the 0-255 scale, in [0, 100]; drawn from U(5, 50) when ``None``.
        rng: generator or seed.
        gray: the same noise in every channel (luminance noise) instead of independent colour noise.

    Returns:
        ``(image, {"name": "gaussian_noise", "params": {"sigma", "gray"}})``.
    """
    image, rng = as_8bit(image), as_rng(rng)
    sigma = float(_parameter("gaussian_noise", "sigma", sigma, lambda: rng.uniform(*GAUSSIAN_SIGMA_RANGE)))
    values = np.asarray(image)
    shape = values.shape[:2] + (1,) if (gray and values.ndim == 3) else values.shape
    steps = np.rint(normal_quantiles() * sigma).astype(np.int16)
    noise = np.take(steps, rng.integers(0, 65536, size=shape, dtype=np.uint16))
    out = values.astype(np.int16)
    out += noise
    np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8)), make_record("gaussian_noise", sigma=sigma, gray=gray)


def poisson_noise(
    image: Image.Image, scale: float | None = None, *, rng: RngLike = None, gray: bool = False
) -> tuple[Image.Image, Record]:
    """Add Poisson (shot) noise, Real-ESRGAN's way: with x in [0, 1] and L = 2 ** ceil(log2(#distinct values)),
    ``noise = Poisson(x * L) / L - x`` and ``out = x + scale * noise`` (then 8-bit rounding and clipping).

    Args:
        image: a PIL image (see the module docstring for modes).
        scale: noise amplification in [0, 10]; drawn from U(1, 5) when ``None``.
        rng: generator or seed.
        gray: noise computed on the luma and added to every channel.

    Returns:
        ``(image, {"name": "poisson_noise", "params": {"scale", "gray"}})``.
    """
    image, rng = as_8bit(image), as_rng(rng)
    scale = float(_parameter("poisson_noise", "scale", scale, lambda: rng.uniform(*POISSON_SCALE_RANGE)))
    values = np.asarray(image)
    if gray and values.ndim == 3:
        noise = poisson_noise_float(grey_uint8(values), rng)[..., None] * np.float32(255.0 * scale)
        out = values.astype(np.float32) + noise
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    else:
        # Bake the scaled noise into an 8-bit output table per (value, grid cell), then one gather per pixel.
        table = poisson_noise_table(_poisson_levels(values))
        levels = np.arange(256, dtype=np.float32)[:, None]
        output_table = np.clip(np.rint(levels + table * np.float32(255.0 * scale)), 0, 255).astype(np.uint8)
        out = np.take(output_table, _poisson_table_index(values, rng))
    return Image.fromarray(out), make_record("poisson_noise", scale=scale, gray=gray)


def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    """`image` JPEG-encoded at `quality` and decoded again, in its own mode."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert(image.mode)


def jpeg(image: Image.Image, quality: int | None = None, *, rng: RngLike = None) -> tuple[Image.Image, Record]:
    """JPEG-compress and decode (libjpeg through PIL, 4:2:0 chroma subsampling for colour images).

    Args:
        image: a PIL image (see the module docstring for modes).
        quality: an integer in [1, 100]; drawn from U{10..40} when ``None``.

    Returns:
        ``(image, {"name": "jpeg", "params": {"quality"}})``.
    """
    image, rng = as_8bit(image), as_rng(rng)
    draw = lambda: int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))  # noqa: E731
    quality = _parameter("jpeg", "quality", quality, draw)
    if int(quality) != quality:
        raise ValueError(f"jpeg: quality must be an integer, got {quality}.")
    return jpeg_roundtrip(image, int(quality)), make_record("jpeg", quality=int(quality))


def kernel_size_to_sigma(kernel_size: int) -> float:
    """The gaussian sigma that fills a kernel of this size (OpenCV's rule: 0.3 * ((k - 1) / 2 - 1) + 0.8)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8


def gaussian_blur(
    image: Image.Image, kernel_size: int | None = None, *, rng: RngLike = None, sigma: float | None = None
) -> tuple[Image.Image, Record]:
    """Gaussian blur (defocus).

    The kernel size sets sigma by OpenCV's rule (k = 3 -> 0.8, k = 11 -> 2.0) unless `sigma` is given; the blur is
    PIL's C Gaussian filter (three extended box passes, edges replicated), which approximates the gaussian closely
    at a fraction of a direct convolution's cost.

    Args:
        image: a PIL image (see the module docstring for modes).
        kernel_size: odd, in [1, 51]; drawn from {3, 5, 7, 9, 11} when ``None``.
        sigma: in [0, 20] px; overrides the sigma derived from the kernel size.

    Returns:
        ``(image, {"name": "gaussian_blur", "params": {"kernel_size", "sigma"}})``.
    """
    image, rng = as_8bit(image), as_rng(rng)
    kernel_size = _parameter("gaussian_blur", "kernel_size", kernel_size, lambda: int(rng.choice(BLUR_KERNEL_SIZES)))
    if int(kernel_size) != kernel_size or int(kernel_size) % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size must be an odd integer, got {kernel_size}.")
    kernel_size = int(kernel_size)
    sigma = float(_parameter("gaussian_blur", "sigma", sigma, lambda: kernel_size_to_sigma(kernel_size)))
    blurred = image.filter(ImageFilter.GaussianBlur(radius=sigma)) if sigma > 0 else image.copy()
    return blurred, make_record("gaussian_blur", kernel_size=kernel_size, sigma=sigma)


def downscale(
    image: Image.Image,
    factor: float | None = None,
    *,
    rng: RngLike = None,
    down_interpolation: str = "bicubic",
    up_interpolation: str = "bicubic",
) -> tuple[Image.Image, Record]:
    """Downscale by `factor` (antialiased) and upscale back to the original size: loss of resolution.

    Args:
        image: a PIL image (see the module docstring for modes).
        factor: in [1, 16]; drawn from U(2, 4) when ``None``.
        down_interpolation, up_interpolation: "nearest", "area", "bilinear", "bicubic" or "lanczos".

    Returns:
        ``(image, {"name": "downscale", "params": {"factor", "down_interpolation", "up_interpolation"}})``.
    """
    image, rng = as_8bit(image), as_rng(rng)
    factor = float(_parameter("downscale", "factor", factor, lambda: rng.uniform(*DOWNSCALE_FACTOR_RANGE)))
    for argument, value in (("down_interpolation", down_interpolation), ("up_interpolation", up_interpolation)):
        if value not in RESAMPLING:
            raise ValueError(f"downscale: {argument} must be one of {', '.join(RESAMPLING)}, got {value!r}.")
    width, height = image.size
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    out = image.resize(small, RESAMPLING[down_interpolation]).resize(image.size, RESAMPLING[up_interpolation])
    record = make_record(
        "downscale", factor=factor, down_interpolation=down_interpolation, up_interpolation=up_interpolation
    )
    return out, record


def colour_jitter(
    image: Image.Image,
    brightness: float | None = None,
    contrast: float | None = None,
    *,
    rng: RngLike = None,
) -> tuple[Image.Image, Record]:
    """Change brightness then contrast (torchvision's definitions, as offsets from 1).

    ``x <- clip(x * (1 + brightness))``, then ``x <- clip(mean + (x - mean) * (1 + contrast))`` with ``mean`` the
    average luma after the brightness step. Both are per-value maps, applied as one 256-entry lookup table.

    Args:
        image: a PIL image (see the module docstring for modes).
        brightness, contrast: offsets in [-0.9, 1]; each drawn from U(-0.2, 0.2) when ``None``.

    Returns:
        ``(image, {"name": "colour_jitter", "params": {"brightness", "contrast"}})``.
    """
    image, rng = as_8bit(image), as_rng(rng)
    draw = lambda: rng.uniform(-COLOUR_JITTER_RANGE, COLOUR_JITTER_RANGE)  # noqa: E731
    brightness = float(_parameter("colour_jitter", "brightness", brightness, draw))
    contrast = float(_parameter("colour_jitter", "contrast", contrast, draw))
    levels = np.arange(256, dtype=np.float64)
    after_brightness = np.clip(np.rint(levels * (1.0 + brightness)), 0, 255)
    luma = image if image.mode == "L" else image.convert("L")
    histogram = np.asarray(luma.histogram(), dtype=np.float64)
    mean = float((histogram * after_brightness).sum() / max(histogram.sum(), 1.0))
    lut = np.clip(np.rint(mean + (after_brightness - mean) * (1.0 + contrast)), 0, 255).astype(np.uint8)
    out = image.point(lut.tolist() * len(image.getbands()))
    return out, make_record("colour_jitter", brightness=brightness, contrast=contrast)


DEGRADATIONS: dict[str, Callable[..., tuple[Image.Image, Record]]] = {
    "gaussian_noise": gaussian_noise,
    "poisson_noise": poisson_noise,
    "jpeg": jpeg,
    "gaussian_blur": gaussian_blur,
    "downscale": downscale,
    "colour_jitter": colour_jitter,
}
"""The single degradations, by name. Each is ``fn(image, *parameters, rng=...) -> (image, record)``."""

ALIASES = {
    "color_jitter": "colour_jitter",
    "blur": "gaussian_blur",
    "jpeg_compression": "jpeg",
    "noise": "gaussian_noise",
}
"""Other names accepted for the single degradations."""


def random_degradation(
    image: Image.Image,
    num_degradations: int | tuple[int, int] = (1, 3),
    rng: RngLike = None,
    names: Sequence[str] | None = None,
) -> tuple[Image.Image, list[Record]]:
    """Apply several distinct degradations, each with random parameters, in random order.

    Args:
        image: a PIL image (see the module docstring for modes).
        num_degradations: how many: an int, or an inclusive range ``(low, high)`` drawn uniformly (default 1-3).
        rng: generator or seed.
        names: the degradations to choose from (default: all of :data:`DEGRADATIONS`).

    Returns:
        ``(image, records)``: one record per applied degradation, in the order applied.
    """
    rng = as_rng(rng)
    names = list(DEGRADATIONS) if names is None else [ALIASES.get(name, name) for name in names]
    unknown = [name for name in names if name not in DEGRADATIONS]
    if unknown:
        raise ValueError(f"unknown degradation(s) {unknown}; choose from {', '.join(DEGRADATIONS)}.")
    if isinstance(num_degradations, (tuple, list)):
        if len(num_degradations) != 2:
            raise ValueError(f"num_degradations must be an int or a (low, high) pair, got {num_degradations!r}.")
        low, high = (int(v) for v in num_degradations)
    else:
        low = high = int(num_degradations)
    if not 1 <= low <= high <= len(names):
        raise ValueError(f"num_degradations must lie in [1, {len(names)}] with low <= high, got {num_degradations!r}.")
    count = int(rng.integers(low, high + 1))
    chosen = [names[i] for i in rng.choice(len(names), size=count, replace=False)]
    records = []
    for name in chosen:
        image, record = DEGRADATIONS[name](image, rng=rng)
        records.append(record)
    return image, records


def area_downsample_pair(
    image: Image.Image, crop: int = 512, rng: RngLike = None
) -> tuple[Image.Image, Image.Image, list[Record]]:
    """A super-resolution training pair from a large photo (a practitioner's recipe).

    The photo is downsampled 0.5x with an area filter (which also averages away sensor noise), a random
    `crop` x `crop` square of it is the HQ image, and the HQ image downsampled 0.5x with the area filter is the LQ
    image (`crop` / 2 pixels square).

    Args:
        image: RGB-convertible photo whose short side is at least 2 * `crop`.
        crop: HQ size; even.
        rng: generator or seed (crop position).

    Returns:
        ``(hq, lq, [{"name": "area_downsample", "params": {"factor": 2, "crop_box": [left, top, right, bottom]}}])``,
        with the crop box in the coordinates of the 0.5x photo.
    """
    rng = as_rng(rng)
    image = to_rgb(as_8bit(image))
    if crop < 2 or crop % 2:
        raise ValueError(f"crop must be an even number >= 2, got {crop}.")
    half_size = (image.width // 2, image.height // 2)
    if min(half_size) < crop:
        raise ValueError(
            f"image is {image.width}x{image.height}: area_downsample_pair needs a short side of at least 2 * crop "
            f"= {2 * crop} pixels."
        )
    half = image.resize(half_size, Image.Resampling.BOX, box=(0, 0, half_size[0] * 2, half_size[1] * 2))
    left = int(rng.integers(0, half_size[0] - crop + 1))
    top = int(rng.integers(0, half_size[1] - crop + 1))
    hq = half.crop((left, top, left + crop, top + crop))
    lq = hq.resize((crop // 2, crop // 2), Image.Resampling.BOX)
    return hq, lq, [make_record("area_downsample", factor=2, crop_box=[left, top, left + crop, top + crop])]
