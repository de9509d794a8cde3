"""``sana-restore demo``: degrade a photo, restore it, write degraded | restored | clean as one labelled PNG.

The demo runs offline with the restorer bundled in the package (:data:`BUNDLED_MODEL_DIR`), sampled with the
defaults its model folder carries, or with any pipeline given by ``--model``. The photo is a 256 px centre crop of a
scikit-image photo; the default, ``coffee``, is in the validation split of the corpus the bundled restorer was
trained on (never trained on; ``sample_photos.VALIDATION_PHOTOS``).
"""

from __future__ import annotations

import argparse
import zlib
from typing import TYPE_CHECKING, Sequence

from .cli_common import BUNDLED, BUNDLED_MODEL_DIR, CLIError, load_pipeline, prepare_output_file, resolve_model

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["BUNDLED_MODEL_DIR", "DEMO_CROP", "labelled_panels", "run_demo"]

DEMO_CROP = 256


def labelled_panels(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """One row of equally sized panels (``diffusers.utils.make_image_grid``) with a caption strip under each panel.

    Panels are resized (bicubic) to the first image's size. Captions may hold several lines; they use PIL's default
    font at 1/16 of the panel width (at least 12 px), so they stay readable at 256 px.

    Args:
        images: the panels, left to right.
        labels: one caption per panel.

    Returns:
        An RGB image ``len(images) * width`` wide and ``height`` plus the caption strip high.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageFont

    if len(images) != len(labels) or not images:
        raise ValueError(f"need one label per image, got {len(images)} image(s) and {len(labels)} label(s).")
    width, height = images[0].size
    panels = [image.convert("RGB").resize((width, height), resample=Image.Resampling.BICUBIC)
              if image.size != (width, height) else image.convert("RGB") for image in images]
    row = make_image_grid(panels, rows=1, cols=len(panels))
    font_size = max(12, width // 16)
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(row)
    boxes = [draw.multiline_textbbox((0, 0), label, font=font, align="center") for label in labels]
    margin = font_size // 2
    strip = max(box[3] - box[1] for box in boxes) + 2 * margin
    canvas = Image.new("RGB", (row.width, height + strip), "white")
    canvas.paste(row, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (label, box) in enumerate(zip(labels, boxes)):
        left = index * width + (width - (box[2] - box[0])) // 2 - box[0]
        draw.multiline_text((left, height + margin - box[1]), label, fill="black", font=font, align="center")
    return canvas


def run_demo(args: argparse.Namespace) -> int:
    """Run ``sana-restore demo`` with the parsed `args` (``output``, ``degradation``, ``model``, ``photo``,
    ``steps``, ``seed``); user errors raise :class:`~diffusers_restore.cli_common.CLIError`."""
    import numpy as np
    import torch

    from .data.degradations import apply_degradation_spec, parse_degradation_spec
    from .image_io import save_image
    from .metrics import compute_metrics, to_tensor01
    from .sample_photos import center_crop, load_photo

    try:
        parse_degradation_spec(args.degradation)
    except ValueError as error:
        raise CLIError(f"--degradation '{args.degradation}': {error}") from error
    source = resolve_model(args.model)
    output = prepare_output_file(args.output)
    try:
        clean = center_crop(load_photo(args.photo), DEMO_CROP)
    except RuntimeError as error:  # scikit-image missing
        raise CLIError(str(error)) from error
    rng = np.random.default_rng(zlib.crc32(f"{args.seed}:{args.photo}:{args.degradation}".encode()))
    degraded, _ = apply_degradation_spec(clean, args.degradation, rng)

    pipe = load_pipeline(source)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {} if args.steps is None else {"num_inference_steps": args.steps}
    restored = pipe(degraded, generator=torch.Generator().manual_seed(args.seed), **kwargs).images[0]

    reference = to_tensor01(clean)
    scores = {name: compute_metrics(to_tensor01(image), reference, metrics=("psnr", "ssim"))
              for name, image in (("degraded", degraded), ("restored", restored))}
    labels = [f"degraded\nPSNR {float(scores['degraded']['psnr']):.2f} dB",
              f"restored\nPSNR {float(scores['restored']['psnr']):.2f} dB",
              "clean\n(reference)"]
    save_image(labelled_panels([degraded, restored, clean], labels), output)
    label = "the bundled restorer" if args.model == BUNDLED else args.model
    from .sample_photos import VALIDATION_PHOTOS

    seen = "never trained on" if args.photo in VALIDATION_PHOTOS else "a training photo of the bundled restorer"
    print(f"photo: scikit-image '{args.photo}' ({seen}), {DEMO_CROP} px centre crop; "
          f"degradation: {args.degradation}; restored with {label}.")
    for name, values in scores.items():
        print(f"  {name:9s} PSNR {float(values['psnr']):6.2f} dB   SSIM {float(values['ssim']):.4f}")
    if args.model == BUNDLED:  # what it restores and what it does not, as its card's first paragraph says
        from .app import describe_model_card, read_model_card

        print(f"the bundled restorer: {describe_model_card(read_model_card(BUNDLED_MODEL_DIR))}")
    print(f"wrote {output} (degraded | restored | clean)")
    return 0
