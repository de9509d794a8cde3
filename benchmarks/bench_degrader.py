"""Does a degradation model make the degradation it is asked for? Requested vs measured severity.

    python benchmarks/bench_degrader.py --degrader my-degrader --images corpus/validation --crop 128 \\
        --degradation gaussian_noise:25 --degradation jpeg:20

For every photo (centre crop) and degradation spec: the analytic degradation (seeded) is applied and its severity
measured (`diffusers_restore.data.degradations.severity`: GenDeg's mean / spread bins of |clean - degraded|, 0-127);
the degradation model (`SanaDegradationPipeline`, its own sampling defaults) is then asked for that degradation at
those bins, and the severity of its output is measured. Reported per spec: the mean requested and measured bins, the
mean absolute error in bins, and the same error for a model that returns the clean image unchanged (measured 0, 0),
the reference a trained degrader must beat. A second table measures each output the way its degradation type is
usually measured (`TYPE_MEASURES`: the noise sigma of the residual, JPEG blockiness, the gaussian blur width), for the
clean photo, the analytic degradation and the model's output.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

from diffusers_restore import SanaDegradationPipeline
from diffusers_restore.data.degradations import (
    apply_degradation_spec,
    blockiness,
    blur_sigma,
    noise_sigma,
    parse_degradation_spec,
    severity,
)
from diffusers_restore.image_io import find_images, load_rgb

# The type-specific measure of each degradation: (label, function of (clean, degraded)).
TYPE_MEASURES = {
    "gaussian_noise": ("noise sigma (0-255)", noise_sigma),
    "jpeg": ("blockiness (1 = none)", lambda clean, degraded: blockiness(degraded)),
    "gaussian_blur": ("blur sigma (px)", blur_sigma),
}


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--degrader", required=True, help="A SanaDegradationPipeline folder.")
    parser.add_argument("--images", required=True, help="Folder of clean photos.")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--degradation", action="append", required=True, help="Analytic spec, repeatable.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_all import emit_results

    degrader = SanaDegradationPipeline.from_pretrained(args.degrader)
    degrader.set_progress_bar_config(disable=True)
    photos = [centre_crop(load_rgb(path), args.crop) for path in find_images(args.images)]
    rows = []
    typed = []
    print("| degradation | requested mu / sigma bin | measured | abs error (bins) | clean returned: error |")
    print("|---|---|---|---|---|")
    for spec in args.degradation:
        parse_degradation_spec(spec)  # a clear error for a bad spec before any work
        requested, measured = [], []
        for number, clean in enumerate(photos):
            rng = np.random.default_rng([args.seed, number])
            analytic, records = apply_degradation_spec(clean, spec, rng)
            target = severity(clean, analytic)
            name = records[0]["name"]
            output = degrader(clean, degradation=name, mu_bin=target["mu_bin"], sigma_bin=target["sigma_bin"],
                              generator=torch.Generator().manual_seed(args.seed + number)).images[0]
            got = severity(clean, output)
            if name in TYPE_MEASURES:
                label, measure = TYPE_MEASURES[name]
                typed.append((spec, label, measure(clean, clean), measure(clean, analytic), measure(clean, output)))
            requested.append((target["mu_bin"], target["sigma_bin"]))
            measured.append((got["mu_bin"], got["sigma_bin"]))
        requested_array, measured_array = np.asarray(requested, float), np.asarray(measured, float)
        error = np.abs(measured_array - requested_array).mean(axis=0)
        identity = np.abs(requested_array).mean(axis=0)
        print(f"| {spec} | {requested_array[:, 0].mean():.1f} / {requested_array[:, 1].mean():.1f} | "
              f"{measured_array[:, 0].mean():.1f} / {measured_array[:, 1].mean():.1f} | {error[0]:.1f} / {error[1]:.1f} "
              f"| {identity[0]:.1f} / {identity[1]:.1f} |")
        rows += [
            {"benchmark": "degrader", "metric": f"{spec}: mean |measured - requested| mu bin", "value": float(error[0]),
             "unit": "bins", "target": float(identity[0]), "better": "lower"},
            {"benchmark": "degrader", "metric": f"{spec}: mean |measured - requested| sigma bin",
             "value": float(error[1]), "unit": "bins", "target": float(identity[1]), "better": "lower"},
        ]
    if typed:
        print("\n| degradation | measure | clean photo | analytic degradation (requested) | degradation model |")
        print("|---|---|---|---|---|")
        for spec in dict.fromkeys(row[0] for row in typed):
            values = np.asarray([row[2:] for row in typed if row[0] == spec], float).mean(axis=0)
            label = next(row[1] for row in typed if row[0] == spec)
            print(f"| {spec} | {label} | {values[0]:.2f} | {values[1]:.2f} | {values[2]:.2f} |")
            # the model's distance to the requested measure, against that of returning the clean photo
            rows.append({"benchmark": "degrader", "metric": f"{spec}: |{label} of the output - requested|",
                         "value": float(abs(values[2] - values[1])), "unit": "",
                         "target": float(abs(values[0] - values[1])), "better": "lower"})
    emit_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
