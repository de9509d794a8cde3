"""Image degradations for restoration training: PIL and numpy only (no torch).

Every degradation takes a PIL image and returns ``(degraded image, record)``: the image has the input's size and
mode, and the record says what was applied, as JSON-serialisable data::

    {"name": "gaussian_noise", "params": {"sigma": 25.0, "gray": False}}

Parameters left as ``None`` are drawn from the ranges in the table below (from barely visible to severe versions
of each artefact) with the given ``numpy.random.Generator`` (or integer seed); the same generator state always gives
the same output. Compositions (:func:`random_degradation`, the Real-ESRGAN presets, :func:`apply_degradation_spec`)
return a *list* of such records, which :func:`degradation_prompt` turns into a training prompt.

| name            | drawn parameter(s)                      | models        |
|-----------------|-----------------------------------------|---------------|
| gaussian_noise  | sigma ~ U(5, 50) on the 0-255 scale     | camera noise  |
| poisson_noise   | scale ~ U(1, 5)                         | low light     |
| jpeg            | quality ~ U{10..40}                     | compression   |
| gaussian_blur   | kernel_size ~ U{3, 5, 7, 9, 11}         | defocus       |
| downscale       | factor ~ U(2, 4)                        | low resolution|
| colour_jitter   | brightness, contrast ~ U(-0.2, 0.2)     | colour cast   |

Work happens in 8-bit RGB or L. Other modes keep their mode: an alpha channel is carried over untouched, palette
images are re-quantised to their own palette, 16-bit and float greyscale images are degraded at 8-bit precision
and scaled back to their range. :func:`to_rgb` and :func:`load_rgb` (defined in :mod:`diffusers_restore.image_io`,
the package's one image loader, and importable from here too) give the 8-bit RGB images the training data uses.

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
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from ..image_io import high_bit_to_uint8, load_rgb, to_rgb
from ..severity_bins import SEVERITY_BINS, SEVERITY_MU_RANGE, SEVERITY_SIGMA_RANGE

__all__ = [
    "DEGRADATIONS",
    "GENERIC_PROMPT",
    "PRESETS",
    "REALESRGAN",
    "REALESRGAN_LIGHT",
    "DegradationSpec",
    "RealESRGANConfig",
    "apply_degradation_spec",
    "area_downsample_pair",
    "circular_lowpass_kernel",
    "colour_jitter",
    "degradation_prompt",
    "downscale",
    "gaussian_blur",
    "gaussian_noise",
    "get_degradation_fn",
    "jpeg",
    "load_rgb",
    "parse_degradation_spec",
    "poisson_noise",
    "random_degradation",
    "random_realesrgan_kernel",
    "realesrgan_degradation",
    "records_to_json",
    "MODEL_PREFIX",
    "blockiness",
    "blur_sigma",
    "noise_sigma",
    "parse_model_degradation",
    "severity",
    "to_rgb",
]

Record = dict[str, Any]
RngLike = np.random.Generator | int | None

GENERIC_PROMPT = "Restore this image to high quality"

# Ranges from which unspecified parameters are drawn (the table in the module docstring).
GAUSSIAN_SIGMA_RANGE = (5.0, 50.0)
POISSON_SCALE_RANGE = (1.0, 5.0)
JPEG_QUALITY_RANGE = (10, 40)
BLUR_KERNEL_SIZES = (3, 5, 7, 9, 11)
DOWNSCALE_FACTOR_RANGE = (2.0, 4.0)
COLOUR_JITTER_RANGE = 0.2

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# ----------------------------------------------------------------------------------------------------- helpers


def _as_rng(rng: RngLike) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a generator, an integer seed, or ``None`` (fresh OS entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, got {type(rng).__name__}.")


def _check_image(image: Any, argument: str = "image") -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"{argument} must be a PIL.Image.Image, got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{argument} is empty ({image.width}x{image.height}).")
    return image


def _record(name: str, **params: Any) -> Record:
    """A JSON-serialisable record (numpy scalars become Python numbers)."""
    clean = {}
    for key, value in params.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, float):
            value = float(round(value, 6))
        clean[key] = value
    return {"name": name, "params": clean}


@dataclass
class _ModeContext:
    """How to turn a working (RGB or L) image back into the caller's mode."""

    mode: str
    alpha: Image.Image | None = None
    palette_source: Image.Image | None = None
    high_bit_scale: float = 1.0


def _to_working(image: Image.Image) -> tuple[Image.Image, _ModeContext]:
    """Split `image` into an 8-bit RGB or L working image and what is needed to restore its mode."""
    mode = image.mode
    if mode in ("RGB", "L"):
        return image, _ModeContext(mode)
    if mode in ("RGBA", "LA", "PA"):
        alpha = image.getchannel("A")
        if mode == "LA":
            return image.convert("L"), _ModeContext(mode, alpha=alpha)
        colour = image.convert("RGBA").convert("RGB") if mode == "PA" else image.convert("RGB")
        return colour, _ModeContext(mode, alpha=alpha)
    if mode == "P":
        return image.convert("RGB"), _ModeContext(mode, palette_source=image)
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image)
        if mode == "F":
            scale = 1.0 / 255.0 if array.size and np.nanmax(array) <= 1.0 else 1.0
        elif mode == "I" and array.size and array.min() >= 0 and array.max() <= 255:
            scale = 1.0
        else:
            scale = 257.0
        return Image.fromarray(high_bit_to_uint8(image)), _ModeContext(mode, high_bit_scale=scale)
    if mode == "1":
        return image.convert("L"), _ModeContext(mode)
    # CMYK, YCbCr, LAB, HSV, RGBX, ...: PIL converts these to and from RGB
    return image.convert("RGB"), _ModeContext(mode)


def _from_working(work: Image.Image, context: _ModeContext) -> Image.Image:
    mode = context.mode
    if mode == work.mode:
        return work
    if context.alpha is not None:
        if mode == "PA":
            return Image.merge("RGBA", (*work.split(), context.alpha)).convert("PA")
        return Image.merge(mode, (*work.split(), context.alpha))
    if context.palette_source is not None:
        restored = work.quantize(palette=context.palette_source, dither=Image.Dither.NONE)
        if "transparency" in context.palette_source.info:
            restored.info["transparency"] = context.palette_source.info["transparency"]
        return restored
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(work).astype(np.float64) * context.high_bit_scale
        if mode == "F":
            return Image.fromarray(values.astype(np.float32))
        if mode == "I":
            return Image.fromarray(np.rint(values).astype(np.int32))
        return Image.fromarray(np.rint(values).astype(np.uint16)).convert(mode)
    return work.convert(mode)


def _keep_mode(function: Callable[..., tuple[Image.Image, Record]]):
    """Run a degradation on the 8-bit working image and return it in the caller's mode."""

    @functools.wraps(function)
    def wrapper(image: Image.Image, *args: Any, **kwargs: Any) -> tuple[Image.Image, Record]:
        work, context = _to_working(_check_image(image))
        degraded, record = function(work, *args, **kwargs)
        return _from_working(degraded, context), record

    return wrapper


# ------------------------------------------------------------------------------------------- noise sampling


@functools.lru_cache(maxsize=1)
def _normal_quantiles() -> np.ndarray:
    """The 65536 quantiles of N(0, 1) at the midpoints of a uniform 16-bit grid (float32)."""
    normal = statistics.NormalDist()
    grid = (np.arange(65536, dtype=np.float64) + 0.5) / 65536.0
    return np.array([normal.inv_cdf(p) for p in grid], dtype=np.float32)


_POISSON_GRID_BITS = 12


@functools.lru_cache(maxsize=16)
def _poisson_noise_table(levels: int) -> np.ndarray:
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


def _grey_uint8(values: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an HxWx3 uint8 array, as PIL's "L" conversion computes it."""
    return np.asarray(Image.fromarray(values).convert("L"))


def _poisson_table_index(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat indices ``value * 4096 + uniform grid cell`` into a [256, 4096] table, one per element of `values`."""
    index = rng.integers(0, 1 << _POISSON_GRID_BITS, size=values.shape, dtype=np.uint32)
    index |= values.astype(np.uint32) << _POISSON_GRID_BITS
    return index


def _poisson_noise_float(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Real-ESRGAN Poisson noise (before scaling) for a uint8 array: ``Poisson(x * L) / L - x`` in [0, 1] units."""
    table = _poisson_noise_table(_poisson_levels(values))
    return np.take(table, _poisson_table_index(values, rng))


# ------------------------------------------------------------------------------------------ the degradations


def _draw_or_check(value, draw: Callable[[], Any], name: str, minimum: float, exclusive: bool = False):
    if value is None:
        return draw()
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if value < minimum or (exclusive and value == minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value}.")
    return value


@_keep_mode
def gaussian_noise(
    image: Image.Image, sigma: float | None = None, *, rng: RngLike = None, gray: bool = False
) -> tuple[Image.Image, Record]:
    """Add white gaussian noise N(0, sigma^2) on the 0-255 scale, then round and clip to 8 bits.

    Args:
        image: any PIL image (mode kept).
        sigma: standard deviation on the 0-255 scale; drawn from U(5, 50) when ``None``.
        rng: generator or seed.
        gray: the same noise in every channel (luminance noise) instead of independent colour noise.

    Returns:
        ``(image, {"name": "gaussian_noise", "params": {"sigma", "gray"}})``.
    """
    rng = _as_rng(rng)
    sigma = float(_draw_or_check(sigma, lambda: rng.uniform(*GAUSSIAN_SIGMA_RANGE), "sigma", 0.0))
    values = np.asarray(image)
    shape = values.shape[:2] + (1,) if (gray and values.ndim == 3) else values.shape
    steps = np.rint(_normal_quantiles() * sigma).clip(-32000, 32000).astype(np.int16)
    noise = np.take(steps, rng.integers(0, 65536, size=shape, dtype=np.uint16))
    out = values.astype(np.int16)
    out += noise
    np.clip(out, 0, 255, out=out)
    return Image.fromarray(out.astype(np.uint8)), _record("gaussian_noise", sigma=sigma, gray=gray)


@_keep_mode
def poisson_noise(
    image: Image.Image, scale: float | None = None, *, rng: RngLike = None, gray: bool = False
) -> tuple[Image.Image, Record]:
    """Add Poisson (shot) noise, Real-ESRGAN's way: with x in [0, 1] and L = 2 ** ceil(log2(#distinct values)),
    ``noise = Poisson(x * L) / L - x`` and ``out = x + scale * noise`` (then 8-bit rounding and clipping).

    Args:
        image: any PIL image (mode kept).
        scale: noise amplification; drawn from U(1, 5) when ``None``.
        rng: generator or seed.
        gray: noise computed on the luma and added to every channel.

    Returns:
        ``(image, {"name": "poisson_noise", "params": {"scale", "gray"}})``.
    """
    rng = _as_rng(rng)
    scale = float(_draw_or_check(scale, lambda: rng.uniform(*POISSON_SCALE_RANGE), "scale", 0.0))
    values = np.asarray(image)
    if gray and values.ndim == 3:
        noise = _poisson_noise_float(_grey_uint8(values), rng)[..., None] * np.float32(255.0 * scale)
        out = values.astype(np.float32) + noise
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    else:
        # Bake the scaled noise into an 8-bit output table per (value, grid cell), then one gather per pixel.
        table = _poisson_noise_table(_poisson_levels(values))
        levels = np.arange(256, dtype=np.float32)[:, None]
        output_table = np.clip(np.rint(levels + table * np.float32(255.0 * scale)), 0, 255).astype(np.uint8)
        out = np.take(output_table, _poisson_table_index(values, rng))
    return Image.fromarray(out), _record("poisson_noise", scale=scale, gray=gray)


def _jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert(image.mode)


@_keep_mode
def jpeg(image: Image.Image, quality: int | None = None, *, rng: RngLike = None) -> tuple[Image.Image, Record]:
    """JPEG-compress and decode (libjpeg through PIL, 4:2:0 chroma subsampling for colour images).

    Args:
        image: any PIL image (mode kept).
        quality: 1-100; drawn from U{10..40} when ``None``.

    Returns:
        ``(image, {"name": "jpeg", "params": {"quality"}})``.
    """
    rng = _as_rng(rng)
    quality = _draw_or_check(
        quality, lambda: int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1)), "quality", 1
    )
    if quality > 100 or int(quality) != quality:
        raise ValueError(f"quality must be an integer in [1, 100], got {quality}.")
    return _jpeg_roundtrip(image, int(quality)), _record("jpeg", quality=int(quality))


def kernel_size_to_sigma(kernel_size: int) -> float:
    """The gaussian sigma that fills a kernel of this size (OpenCV's rule: 0.3 * ((k - 1) / 2 - 1) + 0.8)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1.0) + 0.8


@_keep_mode
def gaussian_blur(
    image: Image.Image, kernel_size: int | None = None, *, rng: RngLike = None, sigma: float | None = None
) -> tuple[Image.Image, Record]:
    """Gaussian blur (defocus).

    The kernel size sets sigma by OpenCV's rule (k = 3 -> 0.8, k = 11 -> 2.0) unless `sigma` is given; the blur is
    PIL's C Gaussian filter (three extended box passes, edges replicated), which approximates the gaussian closely
    at a fraction of a direct convolution's cost.

    Args:
        image: any PIL image (mode kept).
        kernel_size: odd, >= 3; drawn from {3, 5, 7, 9, 11} when ``None``.
        sigma: overrides the sigma derived from the kernel size.

    Returns:
        ``(image, {"name": "gaussian_blur", "params": {"kernel_size", "sigma"}})``.
    """
    rng = _as_rng(rng)
    kernel_size = _draw_or_check(kernel_size, lambda: int(rng.choice(BLUR_KERNEL_SIZES)), "kernel_size", 1)
    if int(kernel_size) != kernel_size or int(kernel_size) % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer, got {kernel_size}.")
    kernel_size = int(kernel_size)
    sigma = float(_draw_or_check(sigma, lambda: kernel_size_to_sigma(kernel_size), "sigma", 0.0))
    blurred = image.filter(ImageFilter.GaussianBlur(radius=sigma)) if sigma > 0 else image.copy()
    return blurred, _record("gaussian_blur", kernel_size=kernel_size, sigma=sigma)


@_keep_mode
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
        image: any PIL image (mode kept).
        factor: >= 1; drawn from U(2, 4) when ``None``.
        down_interpolation, up_interpolation: "nearest", "area", "bilinear", "bicubic" or "lanczos".

    Returns:
        ``(image, {"name": "downscale", "params": {"factor", "down_interpolation", "up_interpolation"}})``.
    """
    rng = _as_rng(rng)
    factor = float(_draw_or_check(factor, lambda: rng.uniform(*DOWNSCALE_FACTOR_RANGE), "factor", 1.0))
    for argument, value in (("down_interpolation", down_interpolation), ("up_interpolation", up_interpolation)):
        if value not in _RESAMPLING:
            raise ValueError(f"{argument} must be one of {', '.join(_RESAMPLING)}, got {value!r}.")
    width, height = image.size
    small = (max(1, round(width / factor)), max(1, round(height / factor)))
    out = image.resize(small, _RESAMPLING[down_interpolation]).resize(image.size, _RESAMPLING[up_interpolation])
    record = _record(
        "downscale", factor=factor, down_interpolation=down_interpolation, up_interpolation=up_interpolation
    )
    return out, record


@_keep_mode
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
        image: any PIL image (mode kept).
        brightness, contrast: offsets > -1; each drawn from U(-0.2, 0.2) when ``None``.

    Returns:
        ``(image, {"name": "colour_jitter", "params": {"brightness", "contrast"}})``.
    """
    rng = _as_rng(rng)
    draw = lambda: rng.uniform(-COLOUR_JITTER_RANGE, COLOUR_JITTER_RANGE)  # noqa: E731
    brightness = float(_draw_or_check(brightness, draw, "brightness", -1.0, exclusive=True))
    contrast = float(_draw_or_check(contrast, draw, "contrast", -1.0, exclusive=True))
    levels = np.arange(256, dtype=np.float64)
    after_brightness = np.clip(np.rint(levels * (1.0 + brightness)), 0, 255)
    luma = image if image.mode == "L" else image.convert("L")
    histogram = np.asarray(luma.histogram(), dtype=np.float64)
    mean = float((histogram * after_brightness).sum() / max(histogram.sum(), 1.0))
    lut = np.clip(np.rint(mean + (after_brightness - mean) * (1.0 + contrast)), 0, 255).astype(np.uint8)
    out = image.point(lut.tolist() * len(image.getbands()))
    return out, _record("colour_jitter", brightness=brightness, contrast=contrast)


DEGRADATIONS: dict[str, Callable[..., tuple[Image.Image, Record]]] = {
    "gaussian_noise": gaussian_noise,
    "poisson_noise": poisson_noise,
    "jpeg": jpeg,
    "gaussian_blur": gaussian_blur,
    "downscale": downscale,
    "colour_jitter": colour_jitter,
}
"""The single degradations, by name. Each is ``fn(image, *parameters, rng=...) -> (image, record)``."""

_ALIASES = {
    "color_jitter": "colour_jitter",
    "blur": "gaussian_blur",
    "jpeg_compression": "jpeg",
    "noise": "gaussian_noise",
}


def random_degradation(
    image: Image.Image,
    num_degradations: int | tuple[int, int] = (1, 3),
    rng: RngLike = None,
    names: Sequence[str] | None = None,
) -> tuple[Image.Image, list[Record]]:
    """Apply several distinct degradations, each with random parameters, in random order.

    Args:
        image: any PIL image (mode kept).
        num_degradations: how many: an int, or an inclusive range ``(low, high)`` drawn uniformly (default 1-3).
        rng: generator or seed.
        names: the degradations to choose from (default: all of :data:`DEGRADATIONS`).

    Returns:
        ``(image, records)``: one record per applied degradation, in the order applied.
    """
    rng = _as_rng(rng)
    names = list(DEGRADATIONS) if names is None else [_canonical_name(n) for n in names]
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


# ------------------------------------------------------------------------------------- Real-ESRGAN preset


@dataclass(frozen=True)
class RealESRGANConfig:
    """Parameters of Real-ESRGAN's second-order degradation (Wang et al., ICCV-W 2021,
    ``options/train_realesrnet_x4plus.yml``). Ranges are ``(low, high)``; noise sigmas are on the 0-255 scale."""

    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = (
        "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"
    )
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    final_sinc_prob: float = 0.8
    # first degradation
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    scale: int = 4
    """Super-resolution factor: the degraded image ends at 1/scale of the input size."""


REALESRGAN = RealESRGANConfig()
"""The full Real-ESRGAN degradation (also used by OSEDiff and DiffBIR v2.1)."""

REALESRGAN_LIGHT = RealESRGANConfig(
    resize_range=(0.3, 1.5),
    noise_range=(1.0, 15.0),
    poisson_scale_range=(0.05, 2.0),
    jpeg_range=(60.0, 95.0),
    second_blur_prob=0.5,
    resize_range2=(0.6, 1.2),
    noise_range2=(1.0, 12.0),
    poisson_scale_range2=(0.05, 1.0),
    jpeg_range2=(60.0, 100.0),
)
"""The lighter variant of SeeSR and PASD (``params_realesrgan.yml``); kernels unchanged."""


def _bessel_j1(x: np.ndarray) -> np.ndarray:
    """Bessel function of the first kind, order 1, from Bessel's integral
    ``J1(x) = 1/(2 pi) * integral_{-pi}^{pi} cos(x sin t - t) dt``; the trapezoidal rule on a periodic integrand
    converges geometrically, and 256 nodes are exact to float64 rounding for |x| < 150."""
    x = np.asarray(x, dtype=np.float64)
    if np.abs(x).max(initial=0.0) >= 150:
        raise ValueError("_bessel_j1 is accurate for |x| < 150 only.")
    t = -np.pi + 2.0 * np.pi * np.arange(256) / 256
    return np.cos(np.multiply.outer(x, np.sin(t)) - t).mean(axis=-1)


def circular_lowpass_kernel(cutoff: float, kernel_size: int) -> np.ndarray:
    """2-D sinc kernel (ideal circular low-pass with cut-off `cutoff` in radians per pixel), normalised to sum 1:
    ``k(r) = cutoff * J1(cutoff * r) / (2 pi r)``, ``k(0) = cutoff^2 / (4 pi)``. Shape [kernel_size, kernel_size]."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}.")
    half = kernel_size // 2
    axis = np.arange(-half, half + 1, dtype=np.float64)
    radius = np.hypot(*np.meshgrid(axis, axis))
    safe = np.where(radius == 0, 1.0, radius)
    kernel = np.where(radius == 0, cutoff**2 / (4 * np.pi), cutoff * _bessel_j1(cutoff * safe) / (2 * np.pi * safe))
    return (kernel / kernel.sum()).astype(np.float32)


def _anisotropic_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, theta: float, shape: str, beta: float = 1.0
) -> np.ndarray:
    """Gaussian-family kernel on the quadratic form q = p^T Sigma^-1 p with Sigma = R diag(sx^2, sy^2) R^T:
    gaussian exp(-q/2), generalised exp(-q^beta / 2), plateau 1 / (1 + q^beta). Normalised to sum 1."""
    half = kernel_size // 2
    axis = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(axis, axis)
    cos, sin = math.cos(theta), math.sin(theta)
    rotation = np.array([[cos, -sin], [sin, cos]])
    inverse = np.linalg.inv(rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T)
    q = inverse[0, 0] * xx * xx + (inverse[0, 1] + inverse[1, 0]) * xx * yy + inverse[1, 1] * yy * yy
    if shape == "gaussian":
        kernel = np.exp(-0.5 * q)
    elif shape == "generalized":
        kernel = np.exp(-0.5 * np.power(q, beta))
    elif shape == "plateau":
        kernel = 1.0 / (np.power(q, beta) + 1.0)
    else:
        raise ValueError(f"unknown kernel shape {shape!r}.")
    return (kernel / kernel.sum()).astype(np.float32)


def _draw_beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    # Half the draws below 1 and half above (Real-ESRGAN's scheme; with a range starting at 1 the lower half is 1).
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def random_realesrgan_kernel(
    rng: np.random.Generator,
    kernel_sizes: Sequence[int],
    kernel_types: Sequence[str],
    kernel_probs: Sequence[float],
    blur_sigma: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    sinc_prob: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One Real-ESRGAN blur kernel: a 2-D sinc with probability `sinc_prob` (cut-off U(pi/3, pi), or U(pi/5, pi)
    for sizes >= 13), else a Gaussian-family kernel of a type drawn with `kernel_probs`. Returns (kernel, params)."""
    size = int(rng.choice(kernel_sizes))
    if rng.uniform() < sinc_prob:
        cutoff = float(rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi))
        return circular_lowpass_kernel(cutoff, size), {"type": "sinc", "size": size, "cutoff": round(cutoff, 6)}
    kind = str(kernel_types[int(rng.choice(len(kernel_types), p=np.asarray(kernel_probs) / np.sum(kernel_probs)))])
    isotropic = kind.endswith("iso") and not kind.endswith("aniso")
    sigma_x = float(rng.uniform(*blur_sigma))
    if isotropic:
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = float(rng.uniform(*blur_sigma)), float(rng.uniform(-np.pi, np.pi))
    if kind.startswith("generalized"):
        shape, beta = "generalized", _draw_beta(rng, betag_range)
    elif kind.startswith("plateau"):
        shape, beta = "plateau", _draw_beta(rng, betap_range)
    else:
        shape, beta = "gaussian", 1.0
    kernel = _anisotropic_kernel(size, sigma_x, sigma_y, theta, shape, beta)
    params = {"type": kind, "size": size, "sigma_x": round(sigma_x, 6), "sigma_y": round(sigma_y, 6),
              "theta": round(theta, 6), "beta": round(beta, 6)}
    return kernel, params


def _fast_fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n."""
    best = 1 << (n - 1).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            candidate = power35
            while candidate < n:
                candidate *= 2
            best = min(best, candidate)
            power35 *= 3
        power5 *= 5
    return best


def _filter2d(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate a CxHxW float32 array with a square odd kernel, reflect padding (as Real-ESRGAN's filter2D),
    through real FFTs over the last two axes. Returns CxHxW float32."""
    height, width = values.shape[1:]
    size = kernel.shape[0]
    half = size // 2
    padded = np.pad(values, ((0, 0), (half, half), (half, half)), mode="reflect")
    fft_shape = (_fast_fft_size(padded.shape[1]), _fast_fft_size(padded.shape[2]))
    # Gaussian-family and sinc kernels are point-symmetric, so correlation equals convolution; the flip keeps the
    # correlation exact for any kernel. Circular wrap-around only touches outputs before index size - 1.
    spectrum = np.fft.rfft2(padded, s=fft_shape)
    spectrum *= np.fft.rfft2(kernel[::-1, ::-1].astype(np.float32), s=fft_shape)
    full = np.fft.irfft2(spectrum, s=fft_shape)
    return np.ascontiguousarray(full[:, size - 1 : size - 1 + height, size - 1 : size - 1 + width], dtype=np.float32)


def _resize_float(values: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize a CxHxW float32 array to `size` = (width, height) with PIL's float ("F") filters, channel by channel."""
    if (values.shape[2], values.shape[1]) == size:
        return values
    return np.stack(
        [np.asarray(Image.fromarray(channel).resize(size, _RESAMPLING[interpolation])) for channel in values]
    )


def _add_noise_float(
    values: np.ndarray,
    rng: np.random.Generator,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Real-ESRGAN's random noise on a CxHxW float32 array in [0, 1] (values may leave [0, 1], as in the paper)."""
    gray = bool(rng.uniform() < gray_prob)
    if rng.uniform() < gaussian_prob:
        sigma = float(rng.uniform(*sigma_range))
        shape = (1,) + values.shape[1:] if gray else values.shape
        noise = np.take(_normal_quantiles(), rng.integers(0, 65536, size=shape, dtype=np.uint16))
        return values + noise * np.float32(sigma / 255.0), {"type": "gaussian", "sigma": round(sigma, 6), "gray": gray}
    scale = float(rng.uniform(*poisson_range))
    quantised = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    if gray:
        noise = _poisson_noise_float(_grey_uint8(quantised.transpose(1, 2, 0)), rng)[None]
    else:
        noise = _poisson_noise_float(quantised, rng)
    return values + noise * np.float32(scale), {"type": "poisson", "scale": round(scale, 6), "gray": gray}


def _to_uint8_image(values: np.ndarray) -> Image.Image:
    """CxHxW float32 in [0, 1] -> 8-bit RGB image (rounded, clipped)."""
    return Image.fromarray(np.clip(np.rint(values.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8))


def _from_uint8_image(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


def _jpeg_float(values: np.ndarray, quality: float) -> np.ndarray:
    return _from_uint8_image(_jpeg_roundtrip(_to_uint8_image(values), int(round(quality))))


def _random_resize_plan(
    rng: np.random.Generator, probs: tuple[float, float, float], scale_range: tuple[float, float]
) -> tuple[float, str]:
    mode = ("up", "down", "keep")[int(rng.choice(3, p=np.asarray(probs) / np.sum(probs)))]
    if mode == "up":
        scale = float(rng.uniform(1.0, scale_range[1]))
    elif mode == "down":
        scale = float(rng.uniform(scale_range[0], 1.0))
    else:
        scale = 1.0
    interpolation = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
    return scale, interpolation


def realesrgan_degradation(
    image: Image.Image,
    rng: RngLike = None,
    config: RealESRGANConfig | str = REALESRGAN,
    resize_back: bool = True,
) -> tuple[Image.Image, list[Record]]:
    """Real-ESRGAN's second-order degradation (Wang et al. 2021), in numpy/PIL on float32 values in [0, 1].

    First order: blur (kernel from :func:`random_realesrgan_kernel`), random resize (up/down/keep, area/bilinear/
    bicubic), gaussian or Poisson noise (grey with probability 0.4), JPEG. Second order: blur with probability
    `second_blur_prob`, resize relative to 1/scale of the input, noise, then in random order {resize to 1/scale,
    final sinc (probability 0.8), JPEG}. Finally the LQ image is rounded to 8 bits and, with `resize_back`,
    resized (bicubic) back to the input size, as the latent-diffusion restorers do before encoding.

    Args:
        image: any PIL image; degraded as RGB (mode kept on return).
        rng: generator or seed.
        config: a :class:`RealESRGANConfig`, or "realesrgan" / "realesrgan_light".
        resize_back: return the LQ image at the input size (True) or at 1/scale of it (False).

    Returns:
        ``(image, [{"name": "realesrgan" | "realesrgan_light", "params": {...every draw...}}])``.
    """
    rng = _as_rng(rng)
    name = "realesrgan"
    if isinstance(config, str):
        if config not in ("realesrgan", "realesrgan_light"):
            raise ValueError(f"config must be 'realesrgan', 'realesrgan_light' or a RealESRGANConfig, got {config!r}.")
        name, config = config, (REALESRGAN if config == "realesrgan" else REALESRGAN_LIGHT)
    elif config == REALESRGAN_LIGHT:
        name = "realesrgan_light"
    work, context = _to_working(_check_image(image))
    rgb = work.convert("RGB")
    width, height = rgb.size
    c = config
    values = _from_uint8_image(rgb)  # CxHxW float32 in [0, 1]
    params: dict[str, Any] = {"scale": c.scale}

    # ---- first degradation
    kernel, params["kernel1"] = random_realesrgan_kernel(
        rng, c.kernel_sizes, c.kernel_types, c.kernel_probs, c.blur_sigma, c.betag_range, c.betap_range, c.sinc_prob
    )
    values = _filter2d(values, kernel)
    scale, interpolation = _random_resize_plan(rng, c.resize_prob, c.resize_range)
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    values = _resize_float(values, size, interpolation)
    params["resize1"] = {"scale": round(scale, 6), "interpolation": interpolation}
    values, params["noise1"] = _add_noise_float(
        values, rng, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob
    )
    quality = float(rng.uniform(*c.jpeg_range))
    values = _jpeg_float(values, quality)
    params["jpeg1"] = round(quality, 6)

    # ---- second degradation
    if rng.uniform() < c.second_blur_prob:
        kernel, params["kernel2"] = random_realesrgan_kernel(
            rng, c.kernel_sizes, c.kernel_types, c.kernel_probs, c.blur_sigma2, c.betag_range2, c.betap_range2,
            c.sinc_prob2,
        )
        values = _filter2d(values, kernel)
    else:
        params["kernel2"] = None
    scale, interpolation = _random_resize_plan(rng, c.resize_prob2, c.resize_range2)
    size = (max(1, int(width / c.scale * scale)), max(1, int(height / c.scale * scale)))
    values = _resize_float(values, size, interpolation)
    params["resize2"] = {"scale": round(scale, 6), "interpolation": interpolation}
    values, params["noise2"] = _add_noise_float(
        values, rng, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2
    )

    # ---- final: resize to 1/scale + sinc, and JPEG, in random order
    final_size = (max(1, width // c.scale), max(1, height // c.scale))
    if rng.uniform() < c.final_sinc_prob:
        sinc_size = int(rng.choice(c.kernel_sizes))
        cutoff = float(rng.uniform(np.pi / 3, np.pi))
        sinc = circular_lowpass_kernel(cutoff, sinc_size)
        params["final_sinc"] = {"size": sinc_size, "cutoff": round(cutoff, 6)}
    else:
        sinc = None
        params["final_sinc"] = None
    interpolation = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
    quality = float(rng.uniform(*c.jpeg_range2))
    jpeg_first = bool(rng.uniform() >= 0.5)
    params["final"] = {"order": "jpeg_resize_sinc" if jpeg_first else "resize_sinc_jpeg",
                       "interpolation": interpolation, "jpeg": round(quality, 6)}
    if jpeg_first:
        values = _jpeg_float(values, quality)
    values = _resize_float(values, final_size, interpolation)
    if sinc is not None:
        values = _filter2d(values, sinc)
    if not jpeg_first:
        values = _jpeg_float(values, quality)
    out = _to_uint8_image(values)
    if resize_back:
        out = out.resize((width, height), Image.Resampling.BICUBIC)
    params["resize_back"] = resize_back
    if work.mode == "L":
        out = out.convert("L")
    if not resize_back and context.alpha is not None:
        context.alpha = context.alpha.resize(out.size, Image.Resampling.BICUBIC)
    return _from_working(out, context), [{"name": name, "params": params}]


# ------------------------------------------------------------------------------ super-resolution pairs, severity


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
    rng = _as_rng(rng)
    image = to_rgb(_check_image(image))
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
    return hq, lq, [_record("area_downsample", factor=2, crop_box=[left, top, left + crop, top + crop])]


def _severity_bin(value: float, value_range: tuple[float, float]) -> int:
    edges = np.linspace(value_range[0], value_range[1], SEVERITY_BINS + 1)
    return int(np.clip(np.digitize(value, edges) - 1, 0, SEVERITY_BINS - 1))


def severity(hq: Image.Image | np.ndarray, lq: Image.Image | np.ndarray) -> dict[str, float | int]:
    """GenDeg's (CVPR 2025) severity of a pair: mean and population std of ``|HQ - LQ|`` over all pixels and
    channels, on the [0, 1] scale, with their indices among 128 equal bins over [0, 0.7] (mu) and [0, 0.4] (sigma);
    values beyond the range fall in bin 127.

    Args:
        hq, lq: PIL images (any mode, compared as RGB) or HxWx3 uint8 arrays. An LQ of another size is resized to
            the HQ size with the Lanczos filter first.

    Returns:
        ``{"mu": float, "sigma": float, "mu_bin": int, "sigma_bin": int}``.
    """

    def as_image(value: Any, argument: str) -> Image.Image:
        if isinstance(value, np.ndarray):
            if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
                raise ValueError(f"{argument} must be an HxWx3 uint8 array or a PIL image, got {value.dtype} "
                                 f"{value.shape}.")
            return Image.fromarray(value)
        return to_rgb(_check_image(value, argument))

    hq_image, lq_image = as_image(hq, "hq"), as_image(lq, "lq")
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


def _pixels(value: Any, argument: str) -> np.ndarray:
    """An RGB float64 HxWx3 array on the 0-255 scale from a PIL image (any mode) or an HxWx3 uint8 array."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
            raise ValueError(f"{argument} must be an HxWx3 uint8 array or a PIL image, got {value.dtype} {value.shape}.")
        return value.astype(np.float64)
    return np.asarray(to_rgb(_check_image(value, argument)), dtype=np.float64)


def _same_size(clean: np.ndarray, degraded: np.ndarray) -> None:
    if clean.shape != degraded.shape:
        raise ValueError(f"clean and degraded images differ in size: {clean.shape[1]}x{clean.shape[0]} vs "
                         f"{degraded.shape[1]}x{degraded.shape[0]}.")


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
    clean_image = Image.fromarray(_pixels(clean, "clean").astype(np.uint8))
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


# ------------------------------------------------------------------------------------------ specs and presets

ONE_OF = "one_of"
"""Name of a parsed ``a|b|c`` spec: one alternative is drawn uniformly per image."""

PRESETS = ("random", "realesrgan", "realesrgan_light")
"""Composite degradations accepted wherever a spec is: ``random[:n]``, ``realesrgan``, ``realesrgan_light``."""

MODEL = "model"
MODEL_PREFIX = "model:"
"""A learned degradation (GenDeg's synthetic pairs): ``model:DIR;NAME:MU_BIN:SIGMA_BIN[,...]`` runs the
:class:`~diffusers_restore.SanaDegradationPipeline` saved in ``DIR`` (``train_paired.py --direction degrade``) with one
of the listed requests (degradation name and GenDeg severity bins, 0-127), drawn per image; e.g.
``model:./my-degrader;jpeg:10:8,gaussian_noise:12:20``. It combines with ``|`` like any spec."""

_DEGRADERS: dict[str, Any] = {}  # one loaded degradation model per folder and process


def parse_model_degradation(spec: str) -> DegradationSpec:
    """Parse ``model:DIR;NAME:MU_BIN:SIGMA_BIN[,...]`` (see :data:`MODEL_PREFIX`).

    Raises:
        ValueError: no folder or no request, a malformed request or bin, or a folder without ``model_index.json``.
    """
    import os

    folder, _, requests = spec[len(MODEL_PREFIX):].partition(";")
    parsed = []
    for request in filter(None, (part.strip() for part in requests.split(","))):
        parts = request.split(":")
        try:
            name, mu_bin, sigma_bin = parts[0], int(parts[1]), int(parts[2])
            if len(parts) != 3 or not name or not (0 <= mu_bin < SEVERITY_BINS and 0 <= sigma_bin < SEVERITY_BINS):
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"degrader request {request!r}: expected NAME:MU_BIN:SIGMA_BIN with bins in 0-127, e.g. "
                             "'jpeg:10:8'.") from None
        parsed.append((name, mu_bin, sigma_bin))
    if not folder or not parsed:
        raise ValueError(f"{spec!r}: a model degradation needs a folder and at least one request, e.g. "
                         "'model:./my-degrader;jpeg:10:8' (make-pairs: --degrader-request NAME:MU_BIN:SIGMA_BIN).")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"{spec!r}: no model_index.json in {folder} (a SanaDegradationPipeline folder written by "
                         "train_paired.py --direction degrade).")
    return DegradationSpec(MODEL, {"folder": folder, "requests": tuple(parsed)})


def _model_degrade(image: Image.Image, spec: DegradationSpec, rng: np.random.Generator
                   ) -> tuple[Image.Image, list[Record]]:
    """Degrade `image` with the model of a parsed model spec; the request and the model's seed come from `rng`.
    The output has the input's size and RGB mode."""
    import torch

    from ..pipelines.pipeline_sana_degradation import SanaDegradationPipeline

    folder = spec.params["folder"]
    if folder not in _DEGRADERS:
        _DEGRADERS[folder] = SanaDegradationPipeline.from_pretrained(folder)
        _DEGRADERS[folder].set_progress_bar_config(disable=True)
    requests = spec.params["requests"]
    name, mu_bin, sigma_bin = requests[int(rng.integers(len(requests)))]
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    degraded = _DEGRADERS[folder](to_rgb(image), degradation=name, mu_bin=mu_bin, sigma_bin=sigma_bin,
                                  generator=generator).images[0].convert("RGB")
    if degraded.size != image.size:
        degraded = degraded.resize(image.size, Image.Resampling.BICUBIC)
    return degraded, [_record(name, model=folder, mu_bin=mu_bin, sigma_bin=sigma_bin)]

# Positional parameters of each degradation in a spec, with their types.
_SPEC_PARAMETERS: dict[str, tuple[tuple[str, type], ...]] = {
    "gaussian_noise": (("sigma", float), ("gray", bool)),
    "poisson_noise": (("scale", float), ("gray", bool)),
    "jpeg": (("quality", int),),
    "gaussian_blur": (("kernel_size", int), ("sigma", float)),
    "downscale": (("factor", float), ("down_interpolation", str), ("up_interpolation", str)),
    "colour_jitter": (("brightness", float), ("contrast", float)),
    "random": (("num_degradations", int),),
    "realesrgan": (("scale", int),),
    "realesrgan_light": (("scale", int),),
}


@dataclass(frozen=True)
class DegradationSpec:
    """A parsed spec: the canonical degradation name and the parameters fixed by the spec (others are drawn)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.name == ONE_OF:
            return "|".join(str(option) for option in self.params["options"])
        if self.name == MODEL:
            requests = ",".join(f"{name}:{mu}:{sigma}" for name, mu, sigma in self.params["requests"])
            return f"{MODEL_PREFIX}{self.params['folder']};{requests}"
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{key}={value}" for key, value in self.params.items())


def _known_names() -> str:
    return ", ".join(list(DEGRADATIONS) + list(PRESETS))


def _canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DEGRADATIONS and key not in PRESETS:
        raise ValueError(f"unknown degradation {name!r}; known: {_known_names()}.")
    return key


def _convert(value: str, kind: type, name: str, key: str) -> Any:
    try:
        if kind is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "gray", "grey"):
                return True
            if lowered in ("0", "false", "no", "color", "colour"):
                return False
            raise ValueError
        if kind is int:
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}: parameter {key} must be {kind.__name__}, got {value!r}.") from None


def parse_degradation_spec(spec: str) -> DegradationSpec:
    """Parse ``name[:value[,value...]]``; values are positional in the order of the degradation's parameters or
    ``key=value``. Examples: ``gaussian_noise:25``, ``jpeg:20``, ``downscale:2``, ``gaussian_blur:7``,
    ``colour_jitter:0.1,-0.1``, ``gaussian_noise:sigma=15,gray=true``, ``random``, ``random:2``, ``realesrgan``.
    Alternatives separated by ``|`` pick one of them uniformly per image, e.g. ``gaussian_noise|jpeg|downscale:2``
    (a training mixture; parameters a spec leaves out are drawn from that degradation's range).

    Raises:
        ValueError: unknown name (the message lists the known ones), unknown or repeated parameter, a value of the
            wrong type, or a value outside what the degradation accepts (e.g. ``jpeg:0``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a degradation spec must be a non-empty string like 'gaussian_noise:25', got {spec!r}.")
    if "|" in spec:
        parts = [part.strip() for part in spec.split("|")]
        if not all(parts):
            raise ValueError(f"{spec!r}: empty alternative between '|' separators.")
        return DegradationSpec(ONE_OF, {"options": tuple(parse_degradation_spec(part) for part in parts)})
    if spec.strip().startswith(MODEL_PREFIX):
        return parse_model_degradation(spec.strip())
    name_part, _, value_part = spec.strip().partition(":")
    name = _canonical_name(name_part)
    parameters = _SPEC_PARAMETERS[name]
    by_key = dict(parameters)
    params: dict[str, Any] = {}
    if value_part.strip():
        for position, item in enumerate(value_part.split(",")):
            item = item.strip()
            if "=" in item:
                key, _, value = item.partition("=")
                key = key.strip()
                if key not in by_key:
                    raise ValueError(f"{name}: unknown parameter {key!r}; accepted: {', '.join(by_key)}.")
            else:
                if position >= len(parameters):
                    raise ValueError(f"{name} takes at most {len(parameters)} value(s) ({', '.join(by_key)}), "
                                     f"got {spec!r}.")
                key, value = parameters[position][0], item
            if key in params:
                raise ValueError(f"{name}: parameter {key} given twice in {spec!r}.")
            params[key] = _convert(value.strip(), by_key[key], name, key)
    parsed = DegradationSpec(name, params)
    # Validate values with a tiny probe image, so that errors surface at parse time (the CLI's argument check).
    try:
        apply_degradation_spec(Image.new("RGB", (8, 8)), parsed, np.random.default_rng(0))
    except ValueError as error:
        raise ValueError(f"{spec!r}: {error}") from None
    return parsed


def apply_degradation_spec(
    image: Image.Image, spec: str | DegradationSpec, rng: RngLike = None
) -> tuple[Image.Image, list[Record]]:
    """Apply a spec (see :func:`parse_degradation_spec`); parameters the spec leaves out are drawn with `rng`.

    Returns:
        ``(image, records)``: a list of records (one for a single degradation).
    """
    if isinstance(spec, str):
        spec = parse_degradation_spec(spec)
    rng = _as_rng(rng)
    if spec.name == ONE_OF:
        options = spec.params["options"]
        return apply_degradation_spec(image, options[int(rng.integers(len(options)))], rng)
    if spec.name == MODEL:
        return _model_degrade(image, spec, rng)
    if spec.name == "random":
        count = spec.params.get("num_degradations")
        return random_degradation(image, num_degradations=(1, 3) if count is None else count, rng=rng)
    if spec.name in ("realesrgan", "realesrgan_light"):
        config = REALESRGAN if spec.name == "realesrgan" else REALESRGAN_LIGHT
        if "scale" in spec.params:
            if spec.params["scale"] < 1:
                raise ValueError(f"scale must be >= 1, got {spec.params['scale']}.")
            config = RealESRGANConfig(**{**config.__dict__, "scale": spec.params["scale"]})
        image, records = realesrgan_degradation(image, rng=rng, config=config)
        records[0]["name"] = spec.name
        return image, records
    image, record = DEGRADATIONS[spec.name](image, rng=rng, **spec.params)
    return image, [record]


def get_degradation_fn(
    degradation: str | DegradationSpec | Callable[..., Any],
) -> Callable[[Image.Image, np.random.Generator], tuple[Image.Image, list[Record]]]:
    """Normalise a degradation choice to ``fn(image, rng) -> (image, records)``.

    Accepts "random", "realesrgan", "realesrgan_light", any spec string, a :class:`DegradationSpec`, or a callable
    ``fn(image, rng)`` returning an image, ``(image, record)`` or ``(image, [records])``.
    """
    if isinstance(degradation, (str, DegradationSpec)):
        spec = parse_degradation_spec(degradation) if isinstance(degradation, str) else degradation
        return functools.partial(_apply_parsed, spec=spec)
    if callable(degradation):
        return functools.partial(_apply_callable, function=degradation)
    raise TypeError(f"degradation must be a spec string or a callable, got {type(degradation).__name__}.")


def _apply_parsed(image: Image.Image, rng: np.random.Generator, spec: DegradationSpec):
    return apply_degradation_spec(image, spec, rng)


def _apply_callable(image: Image.Image, rng: np.random.Generator, function: Callable[..., Any]):
    result = function(image, rng)
    if isinstance(result, Image.Image):
        return result, [{"name": getattr(function, "__name__", "custom"), "params": {}}]
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Image.Image):
        records = result[1]
        if isinstance(records, dict):
            records = [records]
        return result[0], list(records)
    raise TypeError("a degradation callable must return an image or (image, record(s)).")


# -------------------------------------------------------------------------------------------------- prompts

# Whole prompts for a single degradation, several phrasings each so that training sees varied text.
_SINGLE_PROMPTS: dict[str, tuple[str, ...]] = {
    "gaussian_noise": (
        "Remove gaussian noise from this image",
        "Remove the noise from this photo",
        "Denoise this image",
        "Clean up the grainy noise in this picture",
    ),
    "poisson_noise": (
        "Remove the shot noise from this low-light photo",
        "Remove the noise from this image",
        "Denoise this low-light image",
        "Clean up the grain in this dark photo",
    ),
    "jpeg": (
        "Remove JPEG compression artifacts, restore sharp details",
        "Remove the blocky compression artifacts from this image",
        "Fix the JPEG artifacts in this photo",
        "Undo the heavy JPEG compression of this picture",
    ),
    "gaussian_blur": (
        "Deblur this image",
        "Remove the blur and restore sharp details",
        "Sharpen this blurry photo",
        "Bring this out-of-focus image back into focus",
    ),
    "downscale": (
        "Upscale this low-resolution image and restore fine details",
        "Restore the fine details lost to downscaling",
        "Increase the resolution of this blurry, pixelated image",
        "Turn this low-resolution photo into a sharp high-resolution one",
    ),
    "area_downsample": (
        "Upscale this low-resolution image and restore fine details",
        "Increase the resolution of this image",
        "Super-resolve this photo, restore sharp textures",
    ),
    "colour_jitter": (
        "Correct the colours of this image",
        "Fix the brightness and contrast of this photo",
        "Restore the natural colours and exposure of this image",
        "Correct the washed-out colours of this picture",
    ),
    "realesrgan": (
        "Restore this low-quality photo: remove blur, noise and compression artifacts",
        "Remove the blur, noise and JPEG artifacts from this image and restore fine details",
        "Enhance this degraded low-resolution image to high quality",
        "Restore this real-world low-quality image with sharp, clean details",
    ),
}
_SINGLE_PROMPTS["realesrgan_light"] = _SINGLE_PROMPTS["realesrgan"]

# Noun phrases used to combine several degradations in one prompt.
_NOUNS: dict[str, tuple[str, ...]] = {
    "gaussian_noise": ("gaussian noise", "sensor noise", "grainy noise"),
    "poisson_noise": ("low-light noise", "shot noise", "photon noise"),
    "jpeg": ("JPEG compression artifacts", "compression artifacts", "JPEG artifacts"),
    "gaussian_blur": ("blur", "defocus blur", "softness"),
    "downscale": ("low-resolution blur", "pixelation", "resolution loss"),
    "area_downsample": ("low-resolution blur", "resolution loss"),
    "colour_jitter": ("the colour cast", "brightness and contrast shifts", "colour distortion"),
    "realesrgan": ("blur, noise and compression artifacts",),
    "realesrgan_light": ("blur, noise and compression artifacts",),
}
_MULTI_TEMPLATES = (
    "Remove {items} from this image",
    "Remove {items}, restore sharp details",
    "Fix {items} in this photo",
    "Restore this image: remove {items}",
    "Clean up {items}; restore this picture to high quality",
)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def degradation_prompt(
    records: Record | Sequence[Record] | None, rng: RngLike = None, generic_probability: float = 0.1
) -> str:
    """A training prompt describing what was applied, in one of several phrasings.

    Args:
        records: a record, a list of records (as returned by the degradations), or ``None``/empty.
        rng: generator or seed (phrasing choice).
        generic_probability: chance of answering :data:`GENERIC_PROMPT` ("Restore this image to high quality")
            even when the degradations are known, so that the model also learns the prompt used when the user does
            not know what went wrong.

    Returns:
        The prompt. Unknown names (custom callables) and an empty record give :data:`GENERIC_PROMPT`.
    """
    rng = _as_rng(rng)
    if records is None:
        return GENERIC_PROMPT
    if isinstance(records, dict):
        records = [records]
    names = [r.get("name") for r in records]
    if not names or any(name not in _SINGLE_PROMPTS for name in names) or rng.uniform() < generic_probability:
        return GENERIC_PROMPT
    if len(names) == 1:
        choices = _SINGLE_PROMPTS[names[0]]
        return choices[int(rng.integers(len(choices)))]
    nouns: list[str] = []
    for name in names:
        noun = _NOUNS[name][int(rng.integers(len(_NOUNS[name])))]
        if noun not in nouns:
            nouns.append(noun)
    template = _MULTI_TEMPLATES[int(rng.integers(len(_MULTI_TEMPLATES)))]
    return template.format(items=_join(nouns))


def records_to_json(records: Sequence[Record]) -> str:
    """Compact, key-sorted JSON of a record list (what datasets and CSV tooling store)."""
    return json.dumps(list(records), sort_keys=True, separators=(",", ":"))
