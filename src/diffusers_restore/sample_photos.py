"""Real photographs for demos, smoke tests and quick evaluations, taken from scikit-image's bundled data (BSD licence).

scikit-image is a test/extra dependency (``pip install diffusers-restore[demo]``), never a runtime one. These photos
are also part of the project's photo corpus (``scripts/build_photo_corpus.py``), and they keep the corpus's split:

* ``TRAIN_PHOTOS``: in the corpus's training split (the bundled restorer was trained on them);
* ``VALIDATION_PHOTOS``: in its validation split: never trained on, used to tune the recipe (so a score on them is
  slightly optimistic).

The honest test set is the corpus's ``held_out`` split (photos of another package, used only for the final report);
it is not installed with any package: build the corpus and run ``sana-restore evaluate --images corpus/held_out``.
``cat`` is the same picture as ``chelsea`` and is not offered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and PIL are imported when a photo is loaded: `sana-restore --help` reads the names only
    from PIL import Image

TRAIN_PHOTOS = ("astronaut", "chelsea", "hubble_deep_field", "motorcycle_left", "rocket")
VALIDATION_PHOTOS = ("coffee",)


def load_photo(name: str) -> Image.Image:
    """Load one named photo from scikit-image as an RGB PIL image.

    Raises:
        ValueError: unknown name.
        RuntimeError: scikit-image is not installed.
    """
    import numpy as np
    from PIL import Image

    known = TRAIN_PHOTOS + VALIDATION_PHOTOS
    if name not in known:
        raise ValueError(f"unknown photo '{name}': choose from {', '.join(known)}.")
    try:
        from skimage import data
    except ImportError as error:
        raise RuntimeError(
            "the sample photos come from scikit-image: pip install 'diffusers-restore[demo]' (or scikit-image)"
        ) from error
    if name == "motorcycle_left":
        array = data.stereo_motorcycle()[0]
    else:
        array = getattr(data, name)()
    return Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("RGB")


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centred `size` x `size` square of `image` (clamped to the image's short side)."""
    width, height = image.size
    size = min(size, width, height)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))
