"""``sana-restore demo``: degrade a held-out photo, restore it, write degraded | restored | clean as one PNG.

The demo uses the restorer bundled in the package (``diffusers_restore/bundled/sana-restore-tiny``) when it is there.
Until it is, it falls back to an untrained pipeline built from the tiny offline kit, says so loudly, and serves as
an offline smoke test of the whole chain (photo -> degradation -> pipeline -> metrics -> PNG).
"""

from __future__ import annotations

import argparse
import os
import zlib

import numpy as np

BUNDLED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "sana-restore-tiny")
DEMO_PHOTO = "coffee"
DEMO_CROP = 256
# How the bundled restorer is sampled: one step, no CFG. Its last training stage (`--training_objective one_step`)
# makes it a one-step restorer (one Euler step from sigma = 1 gives its clean-image estimate; more steps lose PSNR);
# the pipeline's own defaults (20 steps, CFG 1 -> 4) are meant for flow-matching SANA 1.6B fine-tunes.
BUNDLED_CALL_KWARGS = {"num_inference_steps": 1, "guidance_scale": 1.0, "guidance_scale_end": 1.0}


def _untrained_tiny_pipeline():
    from .pipelines.pipeline_sana_restoration import SanaRestorationPipeline
    from .testing import get_tiny_components

    from diffusers import SanaPipeline

    return SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(seed=0)))


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from .cli import CLIError, _grid, load_pipeline
    from .data.degradations import apply_degradation_spec, parse_degradation_spec
    from .metrics import compute_metrics, to_tensor01
    from .sample_photos import center_crop, load_photo

    try:
        parse_degradation_spec(args.degradation)
    except ValueError as error:
        raise CLIError(f"--degradation '{args.degradation}': {error}") from error
    photo = args.photo
    try:
        clean = center_crop(load_photo(photo), DEMO_CROP)
    except RuntimeError as error:
        raise CLIError(str(error)) from error
    rng = np.random.default_rng(zlib.crc32(f"{args.seed}:{photo}:{args.degradation}".encode()))
    degraded, _ = apply_degradation_spec(clean, args.degradation, rng)

    kwargs: dict = {}
    if args.model:
        pipe, label = load_pipeline(args.model), args.model
    elif os.path.isfile(os.path.join(BUNDLED_MODEL_DIR, "model_index.json")):
        pipe, label = load_pipeline(BUNDLED_MODEL_DIR), "the bundled restorer"
        kwargs.update(BUNDLED_CALL_KWARGS)
    else:
        print("NOTE: no bundled restorer is installed; running an UNTRAINED tiny pipeline (random weights) as an "
              "offline smoke test. Its output is noise, not a restoration. Rebuild the bundled restorer with "
              "`python examples/build_bundled_model.py`.")
        pipe, label = _untrained_tiny_pipeline(), "an untrained tiny pipeline"
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    if args.steps:
        kwargs["num_inference_steps"] = args.steps
    restored = pipe(degraded, generator=generator, **kwargs).images[0]

    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    _grid([degraded, restored, clean]).save(output)
    reference = to_tensor01(clean)
    print(f"photo: scikit-image '{photo}' (held out from training), {DEMO_CROP} px centre crop; "
          f"degradation: {args.degradation}; restored with {label}.")
    for name, image in (("degraded", degraded), ("restored", restored)):
        scores = compute_metrics(to_tensor01(image), reference, metrics=("psnr", "ssim"))
        print(f"  {name:9s} PSNR {float(scores['psnr']):6.2f} dB   SSIM {float(scores['ssim']):.4f}")
    print(f"wrote {output} (degraded | restored | clean)")
    return 0
