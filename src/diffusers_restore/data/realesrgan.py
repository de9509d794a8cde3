# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Real-ESRGAN's second-order degradation (Wang et al., ICCV-W 2021), in numpy and PIL on float32 values in [0, 1].

Two rounds of blur (Gaussian-family or sinc kernels), random resize, gaussian or Poisson noise and JPEG, then a final
resize to 1/scale with a sinc filter and JPEG in random order: the synthetic "real-world" degradation that OSEDiff,
DiffBIR, SeeSR and PASD train on. :data:`REALESRGAN` is the full preset, :data:`REALESRGAN_LIGHT` the lighter one of
SeeSR and PASD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .degradation_ops import (
    RESAMPLING,
    Record,
    RngLike,
    as_8bit,
    as_rng,
    grey_uint8,
    jpeg_roundtrip,
    normal_quantiles,
    poisson_noise_float,
)

__all__ = [
    "REALESRGAN",
    "REALESRGAN_LIGHT",
    "RealESRGANConfig",
    "circular_lowpass_kernel",
    "random_realesrgan_kernel",
    "realesrgan_degradation",
]


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


SCALES = tuple(range(1, 9))
"""The accepted super-resolution factors (``scale``) of the Real-ESRGAN degradation."""

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
        [np.asarray(Image.fromarray(channel).resize(size, RESAMPLING[interpolation])) for channel in values]
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
        noise = np.take(normal_quantiles(), rng.integers(0, 65536, size=shape, dtype=np.uint16))
        return values + noise * np.float32(sigma / 255.0), {"type": "gaussian", "sigma": round(sigma, 6), "gray": gray}
    scale = float(rng.uniform(*poisson_range))
    quantised = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    if gray:
        noise = poisson_noise_float(grey_uint8(quantised.transpose(1, 2, 0)), rng)[None]
    else:
        noise = poisson_noise_float(quantised, rng)
    return values + noise * np.float32(scale), {"type": "poisson", "scale": round(scale, 6), "gray": gray}


def _to_uint8_image(values: np.ndarray) -> Image.Image:
    """CxHxW float32 in [0, 1] -> 8-bit RGB image (rounded, clipped)."""
    return Image.fromarray(np.clip(np.rint(values.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8))


def _from_uint8_image(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


def _jpeg_float(values: np.ndarray, quality: float) -> np.ndarray:
    return _from_uint8_image(jpeg_roundtrip(_to_uint8_image(values), int(round(quality))))


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
        image: a PIL image; an ``L`` image comes back ``L``, any other as RGB (converted as in
            :func:`~.degradation_ops.as_8bit`).
        rng: generator or seed.
        config: a :class:`RealESRGANConfig`, or "realesrgan" / "realesrgan_light".
        resize_back: return the LQ image at the input size (True) or at 1/scale of it (False).

    Returns:
        ``(image, [{"name": "realesrgan" | "realesrgan_light", "params": {...every draw...}}])``.
    """
    rng = as_rng(rng)
    name = "realesrgan"
    if isinstance(config, str):
        if config not in ("realesrgan", "realesrgan_light"):
            raise ValueError(f"config must be 'realesrgan', 'realesrgan_light' or a RealESRGANConfig, got {config!r}.")
        name, config = config, (REALESRGAN if config == "realesrgan" else REALESRGAN_LIGHT)
    elif config == REALESRGAN_LIGHT:
        name = "realesrgan_light"
    if config.scale not in SCALES:
        raise ValueError(f"realesrgan: scale must be an integer in [{SCALES[0]}, {SCALES[-1]}], got {config.scale}.")
    image = as_8bit(image)
    rgb = image.convert("RGB")
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
    return out.convert(image.mode), [{"name": name, "params": params}]
