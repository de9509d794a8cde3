"""What a restorer does to the photos users have: the 13-row quality table of the bundled restorer, with the plain call.

    python benchmarks/bench_quality.py --split validation                       # the bundled model, corpus/validation
    python benchmarks/bench_quality.py --model DIR --split validation --baselines nlm,bm3d -o eval/validation.json
    python benchmarks/bench_quality.py --model DIR --images FOLDER --stage-only  # a degradation removal stage alone

Every photo of the split (a centre crop, 256 px by default) is degraded by each row's degradation, seeded by photo
and row (`diffusers_restore.evaluation.degrade_cases`, as `sana-restore evaluate` does), and restored by `pipe(image)`, the plain call: no argument says what the degradation is, so whatever the
model is conditioned on is estimated from the image, as for a user. Rows (`ROWS`):

| row | degradation spec (`diffusers_restore.data.degradations`) |
|---|---|
| clean | `identity`: the clean crop itself (a restorer should leave it almost unchanged) |
| noise sigma 5 / 15 / 25 / 50 | `gaussian_noise:S` (independent colour noise on the 0-255 scale) |
| JPEG q10 / q40 / q70 | `jpeg:Q` (Pillow's libjpeg, 4:2:0) |
| 2x down-up bicubic / bilinear / lanczos / area | `downscale:2,K,K`: halved and enlarged back with the same kernel (area = box) |
| blur sigma 1 | `gaussian_blur:sigma=1` |

Methods per row: the degraded input, the restorer (the whole pipeline), its first stage alone
(`pipe.remove_degradations`, for a pipeline with a `degradation_removal` stage), non-local means (scikit-image,
h = 0.6 sigma, told the true sigma; noise rows only) and CBM3D (`--baselines bm3d`: only where `pip install bm3d` was
done by the user; non-commercial licence, never a dependency; noise rows only). Reported per row: PSNR dB / SSIM means
over the photos (RGB, whole crop) and, per photo, how many the restorer wins against the input, NLM / CBM3D and the
first stage alone (PSNR; a photo within 0.005 dB is a tie, counted as neither), then the bar each row is held to
(`BAR`) and whether the mean meets it. `--stage-only` scores the first stage alone (a training run of the stage, whose
transformer is untrained). The JSON output (`-o`) has every per-photo figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from diffusers_restore import SanaRestorationPipeline
from diffusers_restore.baselines import cbm3d, check_baselines_available, non_local_means
from diffusers_restore.cli_common import BUNDLED_MODEL_DIR
from diffusers_restore.evaluation import degrade_cases
from diffusers_restore.image_io import find_images, load_rgb
from diffusers_restore.metrics import psnr, ssim, to_tensor01

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "validation", "held_out", "test", "test2")

# (row label, degradation spec)
ROWS: tuple[tuple[str, str], ...] = (
    ("clean", "identity"),
    ("noise sigma 5", "gaussian_noise:5"),
    ("noise sigma 15", "gaussian_noise:15"),
    ("noise sigma 25", "gaussian_noise:25"),
    ("noise sigma 50", "gaussian_noise:50"),
    ("JPEG q10", "jpeg:10"),
    ("JPEG q40", "jpeg:40"),
    ("JPEG q70", "jpeg:70"),
    ("2x down-up bicubic", "downscale:2,bicubic,bicubic"),
    ("2x down-up bilinear", "downscale:2,bilinear,bilinear"),
    ("2x down-up lanczos", "downscale:2,lanczos,lanczos"),
    ("2x down-up area", "downscale:2,area,area"),
    ("blur sigma 1", "gaussian_blur:sigma=1"),
)

# The bar of each row, on the mean PSNR (and SSIM where it says so): ("psnr_at_least", dB), ("input_plus", dB) or
# ("nlm", None: at least NLM on PSNR and SSIM). Every row also: the pipeline >= its first stage alone - 0.05 dB.
BAR: dict[str, tuple[str, float | None]] = {
    "clean": ("psnr_at_least", 40.0),
    "noise sigma 5": ("nlm", None),
    "noise sigma 15": ("nlm", None),
    "noise sigma 25": ("nlm", None),
    "noise sigma 50": ("nlm", None),
    "JPEG q10": ("input_plus", 0.5),
    "JPEG q40": ("input_plus", 0.25),
    "JPEG q70": ("input_plus", -0.05),
    "2x down-up bicubic": ("input_plus", 0.3),
    "2x down-up bilinear": ("input_plus", -0.05),
    "2x down-up lanczos": ("input_plus", -0.05),
    "2x down-up area": ("input_plus", -0.05),
    "blur sigma 1": ("input_plus", 0.3),
}
STAGE_MARGIN = -0.05
TIE = 0.005


def split_folder(split: str) -> str:
    return os.path.join(REPO_ROOT, "corpus", split)


def first_stage(pipe: SanaRestorationPipeline, image: Image.Image) -> Image.Image:
    with torch.no_grad():
        cleaned = pipe.remove_degradations(to_tensor01(image))[0]
    return Image.fromarray((cleaned.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8))


def scores(image: Image.Image, reference: torch.Tensor) -> tuple[float, float]:
    candidate = to_tensor01(image.convert("RGB"))
    return float(psnr(candidate, reference)), float(ssim(candidate, reference))


def wins(per_photo: list[dict], method: str, other: str) -> str | None:
    pairs = [(row[method][0], row[other][0]) for row in per_photo if method in row and other in row]
    if not pairs:
        return None
    won = sum(a > b + TIE for a, b in pairs)
    lost = sum(a < b - TIE for a, b in pairs)
    return f"{won}/{lost}"


def bar_check(label: str, means: dict[str, tuple[float, float]], method: str) -> str:
    kind, value = BAR[label]
    if method not in means:
        return ""
    got_psnr, got_ssim = means[method]
    checks = []
    if kind == "psnr_at_least":
        checks.append((got_psnr >= value, f">= {value:.0f} dB"))
    elif kind == "input_plus":
        checks.append((got_psnr >= means["input"][0] + value, f"input {value:+.2f}"))
    elif kind == "nlm" and "NLM" in means:
        checks.append((got_psnr >= means["NLM"][0] and got_ssim >= means["NLM"][1], "NLM (PSNR, SSIM)"))
    if method == "restored" and "stage 1" in means:
        checks.append((got_psnr >= means["stage 1"][0] + STAGE_MARGIN, "stage 1 - 0.05"))
    return ", ".join(("ok " if ok else "MISS ") + text for ok, text in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="'bundled' (the package's restorer) or a pipeline folder.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--split", choices=SPLITS, help="A split of the corpus (corpus/<split>).")
    source.add_argument("--images", help="A folder of clean photos.")
    parser.add_argument("--crop", type=int, default=256, help="Centre crop side in pixels (0: whole photos).")
    parser.add_argument("--baselines", default="nlm", help="Denoisers on the noise rows: 'nlm', 'nlm,bm3d' or ''.")
    parser.add_argument("--stage-only", action="store_true",
                        help="Score the first stage alone (skips the whole pipeline: for a stage's training run).")
    parser.add_argument("--rows", default=None, help="Comma-separated row labels to run (default: all 13).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the degradations (and the pipeline's noise).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("-o", "--output", default=None, help="Write the per-photo figures and means as JSON here.")
    args = parser.parse_args(argv)

    folder = args.images or split_folder(args.split or "validation")
    if not os.path.isdir(folder):
        parser.error(f"{folder} does not exist (build it: scripts/build_photo_corpus.py, scripts/build_test_split.py)")
    baselines = tuple(name for name in args.baselines.replace(" ", "").split(",") if name)
    if set(baselines) - {"nlm", "bm3d"}:
        parser.error(f"--baselines: unknown {sorted(set(baselines) - {'nlm', 'bm3d'})}; use nlm and/or bm3d")
    try:
        check_baselines_available(baselines)
    except RuntimeError as error:
        parser.error(f"--baselines: {error}")
    rows = ROWS
    if args.rows:
        wanted = [label.strip() for label in args.rows.split(",")]
        unknown = set(wanted) - {label for label, _ in ROWS}
        if unknown:
            parser.error(f"--rows: unknown {sorted(unknown)}; known: {', '.join(label for label, _ in ROWS)}")
        rows = tuple(row for row in ROWS if row[0] in wanted)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = BUNDLED_MODEL_DIR if args.model == "bundled" else args.model
    pipe = SanaRestorationPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    has_stage = getattr(pipe, "degradation_removal", None) is not None
    if args.stage_only and not has_stage:
        parser.error(f"--stage-only: {model} has no degradation_removal stage")

    photos = [(os.path.splitext(os.path.basename(path))[0], load_rgb(path)) for path in find_images(folder)]
    if not photos:
        parser.error(f"{folder} holds no images")

    start = time.time()
    results: dict[str, list[dict]] = {}
    for label, spec in rows:
        per_photo = []
        for case in degrade_cases(photos, [spec], args.seed, crop=args.crop or None):
            reference = to_tensor01(case.clean)
            degraded, sigma = case.degraded, case.noise_sigma
            outputs = {"input": degraded}
            if not args.stage_only:
                generator = torch.Generator().manual_seed(args.seed)
                outputs["restored"] = pipe(degraded, generator=generator).images[0]
            if has_stage:
                outputs["stage 1"] = first_stage(pipe, degraded)
            if sigma is not None:
                if "nlm" in baselines:
                    outputs["NLM"] = non_local_means(degraded, sigma)
                if "bm3d" in baselines:
                    outputs["CBM3D"] = cbm3d(degraded, sigma)
            per_photo.append({"photo": case.name,
                              **{method: scores(image, reference) for method, image in outputs.items()}})
        results[label] = per_photo
        print(f"{label}: done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    main_method = "stage 1" if args.stage_only else "restored"
    methods = ["input", "restored", "stage 1", "NLM", "CBM3D"]
    header = ("| row | " + " | ".join(methods) + " | wins vs input | vs NLM | vs CBM3D | vs stage 1 | bar |")
    lines = [f"{len(photos)} photos of {folder}, {args.crop or 'whole'} px crops; PSNR dB / SSIM means; wins/losses "
             f"per photo on PSNR ({main_method}); model {args.model}", "", header,
             "|---" * (len(methods) + 6) + "|"]
    summary = {}
    for label, per_photo in results.items():
        means = {method: (float(np.mean([row[method][0] for row in per_photo])),
                          float(np.mean([row[method][1] for row in per_photo])))
                 for method in methods if method in per_photo[0]}
        summary[label] = means
        cells = [f"{means[m][0]:.2f} / {means[m][1]:.4f}" if m in means else "" for m in methods]
        versus = [wins(per_photo, main_method, other) or "" for other in ("input", "NLM", "CBM3D")]
        versus.append("" if args.stage_only else wins(per_photo, "restored", "stage 1") or "")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(versus)
                     + f" | {bar_check(label, means, main_method)} |")
    print("\n".join(lines))
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "images": folder, "crop": args.crop, "seed": args.seed,
                       "stage_only": args.stage_only, "mean": summary, "per_photo": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
