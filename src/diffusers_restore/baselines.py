"""Classical restoration baselines scored beside a model by ``sana-restore evaluate --baselines``.

* ``blur``: a Gaussian blur; every sigma of :data:`BLUR_SIGMAS` is scored, and the evaluation report keeps the one
  with the best mean PSNR on the evaluated set itself (an oracle choice, which flatters the baseline).
* ``nlm``: scikit-image's non-local means (``denoise_nl_means``, ``h = 0.6 * sigma``), with sigma the known noise level
  of a ``gaussian_noise:S`` degradation or :func:`estimate_noise_sigma` otherwise. Needs scikit-image
  (``pip install scikit-image``), which is not a runtime dependency of the package.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

BLUR_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5)
KNOWN_BASELINES = ("blur", "nlm")


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    """Blur an RGB image with a Gaussian of standard deviation `sigma` pixels."""
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def estimate_noise_sigma(array: np.ndarray) -> float:
    """Gaussian noise level of an HWC float image in [0, 1]: Donoho's robust estimator, median(|HH|) / 0.6745 on the
    finest diagonal Haar detail coefficients, averaged over channels. (scikit-image's `estimate_sigma` does the same
    with a Daubechies wavelet but needs PyWavelets.)"""
    height, width = (array.shape[0] // 2) * 2, (array.shape[1] // 2) * 2
    blocks = array[:height, :width]
    diagonal = (blocks[0::2, 0::2] - blocks[0::2, 1::2] - blocks[1::2, 0::2] + blocks[1::2, 1::2]) / 2.0
    return float(np.mean(np.median(np.abs(diagonal.reshape(-1, array.shape[-1])), axis=0) / 0.6745))


def non_local_means(image: Image.Image, noise_sigma: float | None = None) -> Image.Image:
    """scikit-image non-local means with ``h = 0.6 * sigma`` (sigma on the [0, 1] scale).

    Raises:
        RuntimeError: scikit-image is not installed.
    """
    try:
        from skimage.restoration import denoise_nl_means
    except ImportError as error:
        raise RuntimeError("the 'nlm' baseline needs scikit-image: pip install scikit-image") from error
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if noise_sigma is None:
        noise_sigma = estimate_noise_sigma(array)
    denoised = denoise_nl_means(
        array, h=0.6 * noise_sigma, sigma=noise_sigma, fast_mode=True, patch_size=5, patch_distance=6, channel_axis=-1
    )
    return Image.fromarray(np.clip(np.rint(denoised * 255.0), 0, 255).astype(np.uint8))


def _noise_sigma_from_spec(spec: str) -> float | None:
    name, _, value = spec.partition(":")
    if name == "gaussian_noise" and value:
        try:
            return float(value.split(",")[0]) / 255.0
        except ValueError:
            return None
    return None


def run_baselines(degraded: Image.Image, clean: Image.Image, names: str, degradation: str) -> dict[str, Image.Image]:
    """Run the comma-separated baselines `names` on `degraded`; returns {method name: image}.

    `clean` is unused by the methods themselves (no baseline sees the reference); it is accepted so callers can pass
    a case as a whole. Blur results are named ``blur:sigma=S`` for every sigma in :data:`BLUR_SIGMAS`.
    """
    del clean
    results: dict[str, Image.Image] = {}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "blur":
            for sigma in BLUR_SIGMAS:
                results[f"blur:sigma={sigma}"] = gaussian_blur(degraded, sigma)
        elif name == "nlm":
            results["nlm"] = non_local_means(degraded, _noise_sigma_from_spec(degradation))
        else:
            raise ValueError(f"unknown baseline '{name}': choose from {', '.join(KNOWN_BASELINES)}.")
    return results


def keep_best_blur(summary: dict[str, dict[str, dict[str, float | None]]]) -> None:
    """In an evaluation summary {degradation: {method: means}}, replace the ``blur:sigma=S`` rows of each degradation
    by the single one with the best mean PSNR, renamed ``blur (best sigma S)``."""
    for methods in summary.values():
        blur = {m: v for m, v in methods.items() if m.startswith("blur:sigma=")}
        if not blur:
            continue
        best = max(blur, key=lambda m: -np.inf if blur[m].get("psnr") is None else blur[m]["psnr"])
        for method in blur:
            values = methods.pop(method)
            if method == best:
                methods[f"blur (best sigma {method.split('=')[1]})"] = values
