"""Classical restoration baselines scored beside a model by ``sana-restore evaluate --baselines``.

* ``blur``: a Gaussian blur; every sigma of :data:`BLUR_SIGMAS` is scored, and the evaluation report keeps the one
  with the best mean PSNR on the evaluated set itself (an oracle choice, which flatters the baseline).
* ``nlm``: scikit-image's non-local means (``denoise_nl_means``, ``h = 0.6 * sigma``). Needs scikit-image
  (``pip install scikit-image``), which is not a runtime dependency of the package.
* ``bm3d``: CBM3D (Dabov et al., "Color image denoising via sparse 3D collaborative filtering", 2007) from the
  ``bm3d`` package of Tampere University. That package is free for non-commercial use only and runs a closed-source
  binary, so it is never a dependency of diffusers-restore (nor an extra, nor used in CI): it is used only when the
  user has installed it (``pip install bm3d``) and accepted its licence.

The denoisers take the noise level as known when the degradation says it (``gaussian_noise:S``, see
:func:`known_noise_sigma`) and estimate it otherwise (:func:`estimate_noise_sigma`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

BLUR_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5)
KNOWN_BASELINES = ("blur", "nlm", "bm3d")

BM3D_MISSING = (
    "the 'bm3d' baseline needs the bm3d package, which is not installed. It is CBM3D by Tampere University, free for "
    "non-commercial use only, and loads a closed-source binary, so diffusers-restore never installs it: if its "
    "licence suits you, install it yourself with `pip install bm3d`."
)
NLM_MISSING = "the 'nlm' baseline needs scikit-image: pip install scikit-image."


def gaussian_blur(image: Image.Image, sigma: float) -> Image.Image:
    """Blur an RGB image with a Gaussian of standard deviation `sigma` pixels."""
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def estimate_noise_sigma(array: np.ndarray) -> float:
    """Gaussian noise level of an HWC float image in [0, 1] (`models.degradation_removal.estimate_noise_level`, the
    estimator the learned stage is conditioned on; scikit-image's `estimate_sigma` does the same with a Daubechies
    wavelet but needs PyWavelets)."""
    import torch

    from .models.degradation_removal import estimate_noise_level

    return float(estimate_noise_level(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).permute(2, 0, 1)[None]))


def known_noise_sigma(records: Sequence[dict]) -> float | None:
    """The noise standard deviation on the [0, 1] scale when a degradation was exactly one ``gaussian_noise`` (its
    record, from ``data.degradations.apply_degradation_spec``, holds sigma on the 0-255 scale); ``None`` otherwise."""
    if len(records) == 1 and records[0].get("name") == "gaussian_noise":
        sigma = records[0].get("params", {}).get("sigma")
        return None if sigma is None else float(sigma) / 255.0
    return None


def _to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8))


def non_local_means(image: Image.Image, noise_sigma: float | None = None) -> Image.Image:
    """scikit-image non-local means with ``h = 0.6 * sigma`` (sigma on the [0, 1] scale; estimated when ``None``).

    Raises:
        RuntimeError: scikit-image is not installed.
    """
    denoise_nl_means = _require_nlm()
    array = _to_float(image)
    sigma = estimate_noise_sigma(array) if noise_sigma is None else noise_sigma
    denoised = denoise_nl_means(
        array, h=0.6 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6, channel_axis=-1
    )
    return _to_image(denoised)


def _require_nlm():
    try:
        from skimage.restoration import denoise_nl_means
    except ImportError as error:
        raise RuntimeError(NLM_MISSING) from error
    return denoise_nl_means


def _require_bm3d():
    try:
        import bm3d
    except ImportError as error:
        raise RuntimeError(BM3D_MISSING) from error
    return bm3d


def cbm3d(image: Image.Image, noise_sigma: float | None = None) -> Image.Image:
    """CBM3D colour denoising, ``bm3d.bm3d_rgb(noisy, sigma_psd)`` with the package's default profile (it works
    in the opponent colour space), sigma on the [0, 1] scale (estimated when ``None``). Slow: about 20 s per 256 px
    image on a CPU (measured on a shared 2-core machine with bm3d 4.0.3).

    Raises:
        RuntimeError: the bm3d package is not installed (see :data:`BM3D_MISSING`).
    """
    bm3d = _require_bm3d()
    array = _to_float(image)
    sigma = estimate_noise_sigma(array) if noise_sigma is None else noise_sigma
    return _to_image(np.asarray(bm3d.bm3d_rgb(array, sigma)))


# name -> (denoiser(image, noise_sigma), import check raising RuntimeError with what to install)
_DENOISERS: dict[str, tuple[Callable[[Image.Image, float | None], Image.Image], Callable[[], object]]] = {
    "nlm": (non_local_means, _require_nlm),
    "bm3d": (cbm3d, _require_bm3d),
}


def parse_baseline_names(names: str) -> tuple[str, ...]:
    """``"blur, nlm"`` -> ``("blur", "nlm")`` (each once, in order).

    Raises:
        ValueError: an unknown name (the message lists the known ones), or no name at all.
    """
    parsed = tuple(dict.fromkeys(name.strip() for name in names.split(",") if name.strip()))
    unknown = [name for name in parsed if name not in KNOWN_BASELINES]
    if unknown or not parsed:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown) or repr(names)}; choose from "
                         f"{', '.join(KNOWN_BASELINES)}.")
    return parsed


def check_baselines_available(names: Sequence[str]) -> None:
    """Raise `RuntimeError` saying what to install when a baseline in `names` lacks its package (checked before
    any model is loaded, so a missing package costs nothing)."""
    for name in names:
        if name in _DENOISERS:
            _DENOISERS[name][1]()


def run_baselines(degraded: Image.Image, names: Sequence[str], noise_sigma: float | None = None
                  ) -> dict[str, Image.Image]:
    """Run the baselines `names` (see :func:`parse_baseline_names`) on `degraded`; returns {method name: image}.

    No baseline sees the clean reference. Blur results are named ``blur:sigma=S`` for every sigma in
    :data:`BLUR_SIGMAS`; the denoisers use `noise_sigma` (the [0, 1] scale) or estimate it when it is ``None``.
    """
    results: dict[str, Image.Image] = {}
    for name in names:
        if name == "blur":
            for sigma in BLUR_SIGMAS:
                results[f"blur:sigma={sigma}"] = gaussian_blur(degraded, sigma)
        elif name in _DENOISERS:
            results[name] = _DENOISERS[name][0](degraded, noise_sigma)
        else:
            raise ValueError(f"unknown baseline '{name}': choose from {', '.join(KNOWN_BASELINES)}.")
    return results


def keep_best_blur(summary: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, str]:
    """In an evaluation summary {degradation: {method: means}}, replace the ``blur:sigma=S`` rows of each degradation
    by the single one with the best mean PSNR, renamed ``blur (best sigma S)``.

    Returns:
        {new row name: the ``blur:sigma=S`` method it was}, to find that row's images again.
    """
    renamed = {}
    for methods in summary.values():
        blur = {m: v for m, v in methods.items() if m.startswith("blur:sigma=")}
        if not blur:
            continue
        best = max(blur, key=lambda m: -np.inf if blur[m].get("psnr") is None else blur[m]["psnr"])
        for method in blur:
            values = methods.pop(method)
            if method == best:
                name = f"blur (best sigma {method.split('=')[1]})"
                methods[name] = values
                renamed[name] = method
    return renamed
