"""Real photographs for demos, learning checks and evaluation, taken from scikit-image's bundled data (BSD licence).

scikit-image is a test/extra dependency (``pip install diffusers-restore[demo]``), never a runtime one. The split is
fixed here once so that nothing is ever trained on a held-out photo: ``cat`` is the same picture as ``chelsea`` and is
therefore not used at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and PIL are imported when a photo is loaded: `sana-restore --help` reads the names only
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
# Greyscale photos (loaded as RGB with equal channels): smooth skies and backgrounds, fine textures; used to widen the
# restorer's one-step stage (examples/build_bundled_model.py), not by the autoencoder.
GREY_TRAIN_PHOTOS = ("camera", "moon", "brick", "grass", "gravel", "coins", "clock")


def load_photo(name: str) -> Image.Image:
    """Load one named photo from scikit-image as an RGB PIL image.

    Greyscale photos come back as RGB with three equal channels.

    Raises:
        ValueError: unknown name.
        RuntimeError: scikit-image is not installed.
    """
    import numpy as np
    from PIL import Image

    known = TRAIN_PHOTOS + GREY_TRAIN_PHOTOS + HELD_OUT_PHOTOS
    if name not in known:
        raise ValueError(f"unknown photo '{name}': choose from {', '.join(known)}.")
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
