# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Image helpers of [`SanaRestorationPipeline`]: input conversion, colour fix and overlapping tiles.

Everything here is plain torch on `[0, 1]` RGB tensors of shape `(batch, channels, height, width)` unless stated
otherwise, so each helper can be used (and tested) on its own.

* Input and output (`RestorationImageProcessor`, `image_items`): PIL (any mode), numpy (HWC / NHWC) and torch (CHW /
  NCHW) images, single or in a list, become one float32 batch in `[0, 1]`, with the alpha channel of PIL images kept
  aside and put back on PIL outputs.
* Colour fix (`wavelet_color_fix`, `adain_color_fix`): move a result's low frequencies (or channel statistics) to a
  reference's, the usual last step of diffusion restorers (StableSR, SUPIR, PASD, DiffBIR).
* Tiles (`TileGrid`, `tile_starts`, `blend_weights`): evaluate a function on overlapping tiles and blend the
  results with smooth weights that never reach zero and fade each tile's border out, so tiled results have no
  seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffusers.configuration_utils import register_to_config
from diffusers.image_processor import VaeImageProcessor

from ..image_io import HIGH_BIT_MODES, high_bit_to_unit

__all__ = [
    "COLOR_FIX_METHODS",
    "adain_color_fix",
    "apply_color_fix",
    "blend_weights",
    "ImageItem",
    "image_items",
    "pad_to_multiple",
    "RestorationImageProcessor",
    "TileGrid",
    "tile_starts",
    "wavelet_color_fix",
    "wavelet_decomposition",
]

COLOR_FIX_METHODS = ("wavelet", "adain")

# PIL modes that carry an alpha channel (premultiplied ones included).
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# ---------------------------------------------------------------------------------------------------------- inputs


def _pil_to_array(image: PIL.Image.Image, index: int, argument: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One PIL image -> (`float32` HWC array in `[0, 1]` with 1 (grey) or 3 (RGB) channels, `float32` HW alpha in
    `[0, 1]` or `None`)."""
    try:
        image.load()  # PIL reads lazily: a damaged file fails here, not in a conversion below
    except OSError as error:
        problem = "is truncated (the file ends early)" if "truncated" in str(error) else "cannot be read"
        raise ValueError(f"`{argument}` (item {index}) {problem}: {error}") from None
    mode = image.mode
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        if mode == "La":  # PIL cannot go from La to RGBA directly
            image = image.convert("LA")
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3], rgba[..., 3]
    if mode in HIGH_BIT_MODES:
        try:
            return high_bit_to_unit(image)[..., None], None
        except ValueError as error:
            raise ValueError(f"`{argument}` (item {index}): {error}") from None
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float32)[..., None] / 255.0, None
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(
            f"`{argument}` (item {index}) has PIL mode {mode!r}, which cannot be converted to RGB: {error}"
        ) from None
    return np.asarray(rgb, dtype=np.float32) / 255.0, None


def _check_float_range(values: np.ndarray | torch.Tensor, name: str) -> None:
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} has float values in [{low:.3g}, {high:.3g}], but float images must lie in [0, 1] "
            "(0 = black, 1 = white). Images in [-1, 1] are not accepted: convert them with `(x + 1) / 2`; "
            "8-bit data should be passed as uint8."
        )


def _integer_scale(dtype, name: str) -> float:
    if dtype in (np.uint8, torch.uint8):
        return 255.0
    if dtype in (np.uint16, torch.uint16):
        return 65535.0
    if dtype in (np.bool_, torch.bool):
        return 1.0
    raise ValueError(f"{name} has dtype {dtype}; use uint8, uint16, bool or float values.")


@dataclass
class ImageItem:
    """One image of an `image` argument, converted by `image_items`."""

    pixels: torch.Tensor
    """`(channels, height, width)`: PIL images and integer arrays scaled to [0, 1] (float32); float arrays as given
    (float16 -> 32)."""
    alpha: torch.Tensor | None
    """`(1, height, width)` alpha in [0, 1] of a PIL image that had one, else `None`."""
    scaled: bool
    """Whether the data was scaled to [0, 1] here (PIL images, integer arrays) rather than float data as given."""
    name: str
    """How to name it in errors: "`image` (item 2, numpy array of shape ...)"."""


def _numpy_items(array: np.ndarray, index: int, argument: str) -> list[ImageItem]:
    name = f"`{argument}` (item {index}, numpy array of shape {array.shape})"
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name}: numpy images must be channels-last (HW, HWC or NHWC) with 1 or 3 channels. RGBA arrays are not "
            "accepted: "
            "pass `array[..., :3]`, or the PIL image to keep its alpha channel."
        )
    scaled = not np.issubdtype(array.dtype, np.floating)
    if scaled:
        values = array.astype(np.float32) / _integer_scale(array.dtype.type, name)
    else:
        values = array.astype(np.float32) if array.dtype == np.float16 else array
    # copy: torch.from_numpy would share (and warn about) read-only memory such as scikit-image's sample photos
    tensor = torch.from_numpy(np.array(values, copy=True)).permute(0, 3, 1, 2)
    return [ImageItem(item, None, scaled, name) for item in tensor]


def _torch_items(tensor: torch.Tensor, index: int, argument: str) -> list[ImageItem]:
    name = f"`{argument}` (item {index}, tensor of shape {tuple(tensor.shape)})"
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4:
        raise ValueError(f"{name}: torch images must be HW, CHW or NCHW (channels first).")
    scaled = not tensor.is_floating_point()
    if scaled:
        values = tensor.detach().float() / _integer_scale(tensor.dtype, name)
    else:
        values = tensor.detach().float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.detach()
    return [ImageItem(item, None, scaled, name) for item in values]


def image_items(image, argument: str = "image") -> list[ImageItem]:
    """Split an image argument into single images, each as a `(channels, height, width)` tensor: the one conversion
    behind the pipeline's inputs (`RestorationImageProcessor.preprocess`) and the metrics (`metrics.to_tensor01`).

    Accepted, alone or in a list or tuple (which may mix kinds):

    * `PIL.Image.Image` of any mode. Alpha modes (RGBA, LA, PA, RGBa, La, P with transparency) give their RGB (after
      un-premultiplying) and keep their alpha aside; grey modes (1, L) give one channel in [0, 1]; 16-bit, 32-bit
      integer and float grey (I;16*, I, F) follow the package's one rule, `image_io.high_bit_to_unit` (I;16* is
      16-bit; I is 16-bit when any value exceeds 255, else 8-bit; F is scaled by the smallest of 1, 255 and 65535
      that holds its values); every other mode (P, CMYK, YCbCr, LAB, HSV, ...) goes through PIL's RGB conversion. A
      truncated file raises a `ValueError` saying so.
    * `np.ndarray`: HW, HWC or NHWC with 1 or 3 channels last.
    * `torch.Tensor`: HW, CHW or NCHW, channels first.

    Integer data (uint8, uint16, bool) is divided by its dtype's maximum; float data is returned as given (float16
    and bfloat16 become float32), so callers decide what range floats must have. `argument` names the images in
    errors.
    """
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if len(items) == 0:
        raise ValueError(f"`{argument}` is an empty list: pass at least one image.")
    converted: list[ImageItem] = []
    for index, item in enumerate(items):
        if isinstance(item, PIL.Image.Image):
            array, alpha = _pil_to_array(item, index, argument)
            pixels = torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1)  # a writable copy
            alpha = None if alpha is None else torch.from_numpy(np.array(alpha, dtype=np.float32))[None]
            name = f"`{argument}` (item {index}, PIL mode {item.mode!r})"
            converted.append(ImageItem(pixels, alpha, True, name))
        elif isinstance(item, np.ndarray):
            converted += _numpy_items(item, index, argument)
        elif isinstance(item, torch.Tensor):
            converted += _torch_items(item, index, argument)
        else:
            raise ValueError(
                f"`{argument}` (item {index}) has type {type(item).__name__}; expected a PIL image, a numpy array or "
                "a torch tensor (or a list of them)."
            )
    sizes = {tuple(item.pixels.shape[-2:]) for item in converted}
    if len(sizes) > 1:
        raise ValueError(
            f"`{argument}` holds images of different sizes {sorted(sizes)}; a batch must share one size. Call once "
            "per size (each call handles any size)."
        )
    return converted


class RestorationImageProcessor(VaeImageProcessor):
    """The [`VaeImageProcessor`] of [`SanaRestorationPipeline`]: images of any size and kind in, RGB tensors in [0, 1]
    out, and back (the pipeline maps [0, 1] to the VAE's [-1, 1] itself, so nothing here resizes or normalises).

    `preprocess` takes what `image_items` takes and keeps the alpha channels aside; `postprocess` converts to
    `output_type` as diffusers does and gives PIL outputs their input's alpha back (RGBA).
    """

    @register_to_config
    def __init__(self, vae_scale_factor: int = 32):
        super().__init__(vae_scale_factor=vae_scale_factor, do_resize=False, do_normalize=False)

    def preprocess(self, image) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Convert an `image` argument to one RGB batch: `(pixels, alphas)`, `pixels` of shape `(batch, 3, height,
        width)`, float32 in [0, 1], on the device of the first tensor input (else the CPU); `alphas`, one per image,
        `(1, height, width)` in [0, 1] for PIL images with alpha, else `None`. Float data must lie in [0, 1] (diffusers'
        internal [-1, 1] is refused, as are NaN and infinite values); grey images are repeated to 3 channels."""
        items = image_items(image)
        device = items[0].pixels.device
        pixels = []
        for item in items:
            if item.pixels.shape[0] not in (1, 3):
                raise ValueError(
                    f"{item.name}: images must have 1 or 3 channels (channels-last tensors are not accepted: use "
                    "`tensor.permute(2, 0, 1)`)."
                )
            if not item.scaled:
                _check_float_range(item.pixels, item.name)
            pixels.append(item.pixels.to(device=device, dtype=torch.float32).expand(3, -1, -1))
        return torch.stack(pixels).contiguous(), [item.alpha for item in items]

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", alphas: list | None = None):
        """`(batch, 3, H, W)` in [0, 1] to `output_type` ("pil", "np", "pt" or "latent", as diffusers). With `alphas`
        (one per input image, `num_images_per_prompt` consecutive outputs each), a PIL output of an image that had
        one is RGBA, its alpha resized to the output's size."""
        if output_type != "pil" or not any(alpha is not None for alpha in alphas or ()):
            return super().postprocess(image, output_type)
        outputs = []
        for index, rgb in enumerate(image):
            alpha = alphas[index * len(alphas) // len(image)]
            if alpha is not None:
                if alpha.shape[-2:] != rgb.shape[-2:]:
                    alpha = F.interpolate(alpha[None], size=rgb.shape[-2:], mode="bicubic", align_corners=False)[0]
                rgb = torch.cat([rgb, alpha.to(rgb).clamp(0.0, 1.0)])
            outputs += super().postprocess(rgb[None], "pil")
        return outputs


def pad_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad `(batch, channels, height, width)` at the bottom and right, by reflection, to multiples of `multiple`.

    Reflection continues the image content (no constant border for the VAE to reproduce); it needs a pad smaller than
    the side, which holds whenever each side is at least `multiple` pixels (the pipeline's minimum size); smaller
    sides fall back to edge replication.
    """
    height, width = pixels.shape[-2:]
    pad_bottom, pad_right = (-height) % multiple, (-width) % multiple
    if pad_bottom == 0 and pad_right == 0:
        return pixels
    mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
    return F.pad(pixels, (0, pad_right, 0, pad_bottom), mode=mode)


# ---------------------------------------------------------------------------------------------------- colour fix


def _binomial_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur ([1, 2, 1]^T [1, 2, 1] / 16) with the given dilation and replicate padding, per channel."""
    channels = image.shape[1]
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=image.dtype, device=image.device)
    kernel = (taps[:, None] * taps[None, :] / 16.0).expand(channels, 1, 3, 3)
    padded = F.pad(image, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(padded, kernel, dilation=dilation, groups=channels)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """À-trous wavelet split of `(batch, channels, height, width)` into `(high, low)` with `high + low == image`.

    Level `i` (0-based) blurs the previous low band with the 3x3 binomial kernel dilated by `2**i`; `high` is the sum
    of the detail bands (`image - low`), `low` the last blur (a smooth image: the support of 5 levels is 125 px).
    """
    if levels < 1:
        raise ValueError(f"`levels` must be >= 1, got {levels}.")
    low = image
    for level in range(levels):
        low = _binomial_blur(low, 2**level)
    return image - low, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep `image`'s detail bands and take the low band (colour, large-scale tone) from `reference`.

    `image` and `reference`: `(batch, channels, height, width)` of the same shape (values in [0, 1]; the result is
    not clamped). `wavelet_color_fix(x, x) == x` up to rounding.
    """
    if image.shape != reference.shape:
        raise ValueError(f"`image` {tuple(image.shape)} and `reference` {tuple(reference.shape)} must have one shape.")
    # high(image) + low(reference) = image - low(image) + low(reference) = image - low(image - reference): the blur
    # is linear, so one decomposition of the difference does the work of two
    _, low_difference = wavelet_decomposition(image - reference.to(image.dtype), levels)
    return image - low_difference


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each image's per-channel mean and standard deviation to `reference`'s (adaptive instance norm).

    `image` `(batch, channels, height, width)`; `reference` `(batch, channels, H', W')` (any size). Standard
    deviations are `sqrt(var + eps)`.
    """
    if image.shape[:2] != reference.shape[:2]:
        raise ValueError(
            f"`image` {tuple(image.shape)} and `reference` {tuple(reference.shape)} need the same batch and channels."
        )
    reference = reference.to(image.dtype)
    image_mean = image.mean(dim=(2, 3), keepdim=True)
    image_std = (image.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    reference_mean = reference.mean(dim=(2, 3), keepdim=True)
    reference_std = (reference.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return (image - image_mean) / image_std * reference_std + reference_mean


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str | None) -> torch.Tensor:
    """`method` in `COLOR_FIX_METHODS` or `None` (no change); the result is clamped to [0, 1]."""
    if method is None:
        return image
    if method == "wavelet":
        fixed = wavelet_color_fix(image, reference)
    elif method == "adain":
        fixed = adain_color_fix(image, reference)
    else:
        raise ValueError(f"`color_fix` must be one of {COLOR_FIX_METHODS} or None, got {method!r}.")
    return fixed.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------- tiles


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of size `tile` covering `[0, length)` with at least `overlap` shared cells.

    The first tile starts at 0 and the last ends at `length`; the others are spread evenly in between, so every
    tile has the full size and neighbours share `>= overlap` cells. One tile (`[0]`) when `length <= tile`.
    With `align > 1` every start is a multiple of `align` (`length` and `tile` must then be multiples of it), so that
    a model with a grid of its own (patches, pixel-unshuffle) sees each tile on the same grid as the whole image.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}.")
    if length <= tile:
        return [0]
    if align < 1 or length % align or tile % align:
        raise ValueError(f"length {length} and tile {tile} must be multiples of align={align}.")
    slots, tile_slots = length // align, tile // align
    # rounding a start to the grid moves it by at most half a slot: plan for one slot more of overlap
    overlap_slots = min(math.ceil(overlap / align) + (1 if align > 1 else 0), tile_slots - 1)
    count = math.ceil((slots - overlap_slots) / (tile_slots - overlap_slots))
    return [round(index * (slots - tile_slots) / (count - 1)) * align for index in range(count)]


# Weight of a tile's outermost cells: positive (so weights never sum to zero), small enough to hide its border.
_EDGE_WEIGHT = 1e-3


def _ramp(length: int, width: int, device, dtype) -> torch.Tensor:
    """1-D blending weight over `[0, length)` for tiles that overlap their neighbours by (at least) `width` cells.

    Going inward from each end: `_EDGE_WEIGHT` over the first quarter of `width` (where a tile's own border
    artefacts live: zero padding, attention over a cut-off context), a raised-cosine rise over the middle half, 1
    beyond. Two neighbours overlapping by `width` thus cross-fade over the middle half of their overlap.
    """
    if width <= 0:
        return torch.ones(length, device=device, dtype=dtype)
    centers = torch.arange(length, device=device, dtype=torch.float64) + 0.5
    distance = torch.minimum(centers, length - centers)  # to the nearest end, in (0, length / 2]
    progress = ((distance / width - 0.25) * 2.0).clamp(0.0, 1.0)
    rise = 0.5 - 0.5 * torch.cos(math.pi * progress)
    return (_EDGE_WEIGHT + (1.0 - _EDGE_WEIGHT) * rise).to(dtype)


def blend_weights(height: int, width: int, ramp: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Blending weight of one tile, shape `(1, 1, height, width)`: the outer product of two ramps (`_ramp`) for an
    overlap of `ramp` cells. It is smooth, strictly positive (no division by zero) and 1 away from the border."""
    weights = _ramp(height, ramp, device, dtype)[:, None] * _ramp(width, ramp, device, dtype)[None, :]
    return weights[None, None]


@dataclass(frozen=True)
class TileGrid:
    """Overlapping tiles covering a grid of `size` cells (latent pixels, or pixels), the pipeline's one tiling
    design: the degradation removal stage, the VAE's encoding and decoding and every denoising step each evaluate a
    function tile by tile and blend the results (`blend`).

    Args:
        size: `(height, width)` of the grid in cells.
        tile: tile side in cells; one tile covers the whole grid when it is at least the grid's longer side.
        overlap: minimum overlap of neighbouring tiles in cells (`0 <= overlap < tile`).
        align: tile starts are multiples of it (see `tile_starts`).
    """

    size: tuple[int, int]
    tile: int
    overlap: int = 0
    align: int = 1

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """`(top, left, height, width)` of every tile, row by row."""
        height, width = min(self.tile, self.size[0]), min(self.tile, self.size[1])
        rows = tile_starts(self.size[0], self.tile, self.overlap, self.align)
        cols = tile_starts(self.size[1], self.tile, self.overlap, self.align)
        return [(top, left, height, width) for top in rows for left in cols]

    def __len__(self) -> int:
        return len(self.boxes)

    def blend(
        self,
        function: Callable[[int, int, int, int], torch.Tensor],
        output_scale: int = 1,
        progress=None,
    ) -> torch.Tensor:
        """Evaluate `function(top, left, height, width)` on every tile and blend the results into one tensor.

        Args:
            function: returns the tile's result, `(batch, channels, height * output_scale, width * output_scale)`.
            output_scale: output pixels per grid cell (the VAE factor when decoding, 1 otherwise).
            progress: a progress bar (anything with `update()`), advanced once per tile.

        Returns:
            `(batch, channels, grid height * output_scale, grid width * output_scale)` float32: the single tile's
            result, or the weighted mean of the tiles' results with weights from `blend_weights` (a ramp of
            `overlap * output_scale` output pixels).
        """
        boxes = self.boxes
        output = weight_sum = weights = None
        for top, left, height, width in boxes:
            result = function(top, left, height, width).float()
            if progress is not None:
                progress.update()
            if len(boxes) == 1:
                return result
            if output is None:
                full = (self.size[0] * output_scale, self.size[1] * output_scale)
                output = result.new_zeros(*result.shape[:2], *full)
                weight_sum = result.new_zeros(1, 1, *full)
                weights = blend_weights(*result.shape[-2:], self.overlap * output_scale, device=result.device)
            rows = slice(top * output_scale, (top + height) * output_scale)
            cols = slice(left * output_scale, (left + width) * output_scale)
            output[:, :, rows, cols] += result * weights
            weight_sum[:, :, rows, cols] += weights
        return output / weight_sum
