"""Real photographs for demos, learning checks and evaluation, taken from scikit-image's bundled data (BSD licence).

scikit-image is a test/extra dependency (``pip install diffusers-restore[demo]``), never a runtime one. The split is
fixed here once so that nothing is ever trained on a held-out photo: ``cat`` is the same picture as ``chelsea`` and is
therefore not used at all.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TRAIN_PHOTOS = (
    "astronaut",
    "motorcycle_left",
    "motorcycle_right",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
HELD_OUT_PHOTOS = ("chelsea", "coffee", "rocket")


def load_photo(name: str) -> Image.Image:
    """Load one named photo from scikit-image as an RGB PIL image.

    Raises:
        ValueError: unknown name.
        RuntimeError: scikit-image is not installed.
    """
    if name not in TRAIN_PHOTOS + HELD_OUT_PHOTOS:
        raise ValueError(f"unknown photo '{name}': choose from {', '.join(TRAIN_PHOTOS + HELD_OUT_PHOTOS)}.")
    try:
        from skimage import data
    except ImportError as error:
        raise RuntimeError(
            "the sample photos come from scikit-image: pip install 'diffusers-restore[demo]' (or scikit-image)"
        ) from error
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        array = left if name == "motorcycle_left" else right
    else:
        array = getattr(data, name)()
    return Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("RGB")


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred `size` x `size` square of `image` (clamped to the image's short side)."""
    width, height = image.size
    size = min(size, width, height)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
