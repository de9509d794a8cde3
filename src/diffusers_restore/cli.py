"""The ``sana-restore`` command: restore images, evaluate a restorer, make training pairs, run the demo.

Examples::

    sana-restore restore photo.jpg scans/ -o restored/ --model org/sana-restore --steps 20
    sana-restore evaluate --model ./my-restorer --images photos/ --degradation gaussian_noise:25 -o eval/
    sana-restore evaluate --model ./my-restorer --pairs pairs.csv -o eval/
    sana-restore make-pairs --input-dir photos/ --output-dir pairs/
    sana-restore demo -o demo.png

Every user error (a missing model path, a Hub id while offline, an unknown degradation name, ...) prints one line that
says what to do and exits with status 2. Heavy libraries are imported only by the command that needs them, so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from typing import Any, Sequence

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------- helpers


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and sampling")
    group.add_argument("--model", required=True,
                       help="Local pipeline folder, Hub repo id (org/name), or 'bundled' (the small restorer shipped "
                            "in the package).")
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    group.add_argument("--prompt", default="", help="Restoration prompt (default: empty).")
    group.add_argument("--negative-prompt", default=None, help="Negative prompt (default: the pipeline's quality one).")
    group.add_argument("--steps", type=_positive_int, default=None,
                       help="Denoising steps (default 20; 1 with --model bundled, a one-step restorer).")
    group.add_argument("--guidance-scale", type=float, default=None,
                       help="CFG scale at the noisiest step (default: the pipeline's; 1 with --model bundled).")
    group.add_argument("--guidance-scale-end", type=float, default=None,
                       help="CFG scale at the last step, linear CFG (default: the pipeline's; 1 with --model bundled).")
    group.add_argument("--tau-r", type=float, default=None, help="Restoration guidance tau_r (0 = off).")
    group.add_argument("--strength", type=float, default=1.0, help="Start noise level in (0, 1]; 1 = pure noise.")
    group.add_argument("--upscale", type=float, default=1.0, help="Super-resolution factor (>= 1).")
    group.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default=None, help="Colour correction.")
    group.add_argument("--tile-size", type=int, default=None, help="Tile size in pixels (default: automatic).")
    group.add_argument("--tile-overlap", type=int, default=None, help="Tile overlap in pixels.")
    group.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="Weights dtype (default: bfloat16 on CUDA, float32 on CPU).")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    group.add_argument("--cpu-offload", action="store_true", help="Enable model CPU offload (needs an accelerator).")


def _resolve_device_and_dtype(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype_name)


BUNDLED = "bundled"
"""`--model bundled`: the small restorer shipped inside the package (`diffusers_restore/bundled/sana-restore-tiny`)."""


def load_pipeline(model: str, dtype=None, device: str | None = None, revision: str | None = None, cpu_offload=False):
    """Load a :class:`SanaRestorationPipeline` from a folder or Hub id, turning the usual failures into `CLIError`."""
    from .pipelines.pipeline_sana_restoration import SanaRestorationPipeline

    expanded = os.path.expanduser(model)
    if model == BUNDLED and not os.path.exists(expanded):
        from .demo import BUNDLED_MODEL_DIR

        if not os.path.isfile(os.path.join(BUNDLED_MODEL_DIR, "model_index.json")):
            raise CLIError(f"--model bundled: this installation has no bundled restorer ({BUNDLED_MODEL_DIR} is "
                           "missing); rebuild it with `python examples/build_bundled_model.py`.")
        expanded = model = BUNDLED_MODEL_DIR
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise CLIError(
                f"'{model}' is a folder but not a pipeline (no model_index.json): pass the folder that "
                "SanaRestorationPipeline.save_pretrained wrote."
            )
        source = expanded
    elif os.path.exists(expanded):
        raise CLIError(f"--model '{model}' is a file: pass a pipeline folder or a Hub repo id (org/name).")
    elif not _REPO_ID.match(model) or model.startswith((".", "/", "~")):
        raise CLIError(f"--model path '{model}' does not exist: pass an existing pipeline folder or a Hub repo id.")
    else:
        source = model
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if revision:
        kwargs["revision"] = revision
    try:
        pipe = SanaRestorationPipeline.from_pretrained(source, **kwargs)
    except Exception as error:  # turn Hub/offline failures into one actionable line
        if source is model:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise CLIError(
                    f"'{model}' is not a local folder and the Hub is offline (HF_HUB_OFFLINE=1) with no cached copy: "
                    "download it on a connected machine (huggingface-cli download) or pass a local folder."
                ) from error
            raise CLIError(f"could not load '{model}' from the Hub ({type(error).__name__}: {error}).") from error
        raise
    if cpu_offload:
        pipe.enable_model_cpu_offload()
    elif device is not None:
        pipe.to(device)
    return pipe


def _pipeline_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's call arguments from the CLI flags. `--model bundled` samples as the bundled model is meant to
    be (`demo.BUNDLED_CALL_KWARGS`: one step, no CFG) unless a flag says otherwise; other models get 20 steps and the
    pipeline's own CFG defaults. The unset flags of `args` are filled in place, so reports show what was used."""
    if args.model == BUNDLED:
        from .demo import BUNDLED_CALL_KWARGS

        for flag, key in (("steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                          ("guidance_scale_end", "guidance_scale_end")):
            if getattr(args, flag) is None:
                setattr(args, flag, BUNDLED_CALL_KWARGS[key])
    if args.steps is None:
        args.steps = 20
    kwargs: dict[str, Any] = {
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "strength": args.strength,
        "upscale": args.upscale,
    }
    optional = {
        "negative_prompt": args.negative_prompt,
        "guidance_scale": args.guidance_scale,
        "guidance_scale_end": args.guidance_scale_end,
        "restoration_guidance": args.tau_r,
        "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if args.color_fix is not None:
        kwargs["color_fix"] = None if args.color_fix == "none" else args.color_fix
    return kwargs


def _collect_images(inputs: Sequence[str]) -> list[str]:
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise CLIError(f"input '{item}' does not exist.")
    if not files:
        raise CLIError(f"no images found in {', '.join(inputs)} (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    return files


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with diffusers
        return iterable
    return tqdm(iterable, total=total, desc=desc)


# --------------------------------------------------------------------------------------------------- restore


def cmd_restore(args: argparse.Namespace) -> int:
    from PIL import Image

    files = _collect_images(args.inputs)
    os.makedirs(args.output, exist_ok=True)
    output_dir = os.path.realpath(args.output)
    device, dtype = _resolve_device_and_dtype(args)
    pipe = load_pipeline(args.model, dtype, device, args.revision, args.cpu_offload)
    pipe.set_progress_bar_config(disable=True)

    import torch

    failures = 0
    common = os.path.commonpath([os.path.dirname(os.path.realpath(f)) for f in files])
    for path in _progress(files, len(files), "restoring"):
        relative = os.path.relpath(os.path.realpath(path), common)
        stem, extension = os.path.splitext(relative)
        target = os.path.join(output_dir, stem + args.suffix + (extension if extension.lower() != ".jpg" else ".jpg"))
        if os.path.realpath(target) == os.path.realpath(path):
            target = os.path.join(output_dir, stem + args.suffix + "_restored" + extension)
        try:
            with Image.open(path) as handle:
                handle.load()
                image = handle.copy()
        except Exception as error:  # unreadable file: skip it, report, fail at the end
            print(f"skipping {path}: cannot read image ({error})", file=sys.stderr)
            failures += 1
            continue
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        restored = pipe(image, generator=generator, **_pipeline_kwargs(args)).images[0]
        os.makedirs(os.path.dirname(target), exist_ok=True)
        restored.save(target)
    if failures:
        print(f"{failures} of {len(files)} inputs could not be read; the others were restored into {output_dir}.",
              file=sys.stderr)
        return 1
    print(f"restored {len(files)} image(s) into {output_dir}")
    return 0


# --------------------------------------------------------------------------------------------------- evaluate


def _load_rgb(path: str):
    from PIL import Image

    with Image.open(path) as handle:
        handle.load()
        return handle.convert("RGB")


def _evaluation_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(name, degradation, clean image, degraded image) for each evaluated pair."""
    import zlib

    import numpy as np

    cases = []
    if args.pairs:
        import csv

        if not os.path.isfile(args.pairs):
            raise CLIError(f"--pairs file '{args.pairs}' does not exist.")
        root = os.path.dirname(os.path.abspath(args.pairs))
        with open(args.pairs, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["image_path", "condition_image_path"]:
                raise CLIError(f"{args.pairs}: line 1 must be the header image_path,condition_image_path,caption.")
            for line, row in enumerate(reader, start=2):
                if len(row) < 2 or not row[1].strip():
                    raise CLIError(f"{args.pairs}: line {line} needs both image_path and condition_image_path.")
                clean_path, degraded_path = (os.path.join(root, p.strip()) for p in row[:2])
                for p in (clean_path, degraded_path):
                    if not os.path.isfile(p):
                        raise CLIError(f"{args.pairs}: line {line}: '{p}' does not exist.")
                clean, degraded = _load_rgb(clean_path), _load_rgb(degraded_path)
                if degraded.size != clean.size:
                    degraded = degraded.resize(clean.size, resample=3)
                name = os.path.splitext(os.path.basename(clean_path))[0]
                cases.append(dict(name=name, degradation="pairs", clean=clean, degraded=degraded,
                                  prompt=row[2].strip() if len(row) > 2 else ""))
        return cases

    from .data.degradations import apply_degradation_spec, parse_degradation_spec
    from .sample_photos import center_crop

    specs = args.degradation or ["gaussian_noise:25"]
    for spec in specs:
        try:
            parse_degradation_spec(spec)
        except ValueError as error:
            raise CLIError(f"--degradation '{spec}': {error}") from error
    if args.sample_photos:
        from .sample_photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, load_photo

        names = HELD_OUT_PHOTOS if args.sample_photos == "held-out" else TRAIN_PHOTOS
        try:
            sources = [(name, load_photo(name)) for name in names]
        except RuntimeError as error:  # scikit-image missing
            raise CLIError(str(error)) from error
    else:
        sources = [(os.path.splitext(os.path.basename(path))[0], path) for path in _collect_images([args.images])]
    for name, source in sources:
        clean = _load_rgb(source) if isinstance(source, str) else source
        if args.crop:
            clean = center_crop(clean, args.crop)
        for spec in specs:
            seed = zlib.crc32(f"{args.seed}:{name}:{spec}".encode())
            degraded, _ = apply_degradation_spec(clean, spec, np.random.default_rng(seed))
            cases.append(dict(name=name, degradation=spec, clean=clean, degraded=degraded, prompt=None))
    return cases


def _vae_round_trip(pipe, image, tile_size=None, tile_overlap=None):
    """decode(encode(image)) exactly as the pipeline encodes and decodes (same padding, tiling and latent scaling):
    the best any restorer in its latent space can reach."""
    import numpy as np
    import torch
    from PIL import Image

    from .pipelines.image_processing_restoration import pad_to_multiple

    with torch.no_grad():
        pixels, _ = pipe.prepare_image(image, upscale=1, device=pipe._execution_device)
        height, width = pixels.shape[-2:]
        padded = pad_to_multiple(pixels, pipe.vae_scale_factor)
        tiling = pipe._tiling_plan(padded.shape[-2], padded.shape[-1], tile_size, tile_overlap)
        decoded = pipe._vae_decode(pipe._vae_encode(padded * 2.0 - 1.0, tiling), tiling)[..., :height, :width]
    return Image.fromarray((decoded[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8))


def _grid(images):
    from PIL import Image

    width, height = images[0].size
    canvas = Image.new("RGB", (width * len(images), height))
    for index, image in enumerate(images):
        canvas.paste(image.resize((width, height)) if image.size != (width, height) else image, (index * width, 0))
    return canvas


def _markdown_table(summary: dict[str, dict[str, dict[str, float | None]]], metric_names: list[str]) -> str:
    lines = ["| degradation | method | n | " + " | ".join(metric_names) + " |",
             "|---|---|---|" + "---|" * len(metric_names)]
    for degradation, methods in summary.items():
        for method, values in methods.items():
            cells = []
            for metric in metric_names:
                value = values.get(metric)
                cells.append("n/a" if value is None else f"{value:.4f}" if metric != "psnr" else f"{value:.2f}")
            lines.append(f"| {degradation} | {method} | {values['n']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .metrics import compute_metrics, to_tensor01

    if sum(bool(source) for source in (args.pairs, args.images, args.sample_photos)) != 1:
        raise CLIError("pass exactly one of --pairs CSV, --images DIR or --sample-photos {held-out,train}.")
    if args.pairs and args.degradation:
        raise CLIError("--degradation applies to --images and --sample-photos only (pairs are already degraded).")
    if args.images and not os.path.isdir(args.images):
        raise CLIError(f"--images folder '{args.images}' does not exist.")
    if args.baselines:
        from .baselines import KNOWN_BASELINES

        unknown = [n for n in args.baselines.split(",") if n.strip() and n.strip() not in KNOWN_BASELINES]
        if unknown:
            raise CLIError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(KNOWN_BASELINES)}.")
    cases = _evaluation_cases(args)
    device, dtype = _resolve_device_and_dtype(args)
    pipe = load_pipeline(args.model, dtype, device, args.revision, args.cpu_offload)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(os.path.join(args.output, "grids"), exist_ok=True)

    metric_names = ["psnr", "ssim"] + (["lpips"] if args.lpips else [])
    records, unavailable = [], {}
    for case in _progress(cases, len(cases), "evaluating"):
        kwargs = _pipeline_kwargs(args)
        if case["prompt"]:
            kwargs["prompt"] = case["prompt"]
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        restored = pipe(case["degraded"], generator=generator, **kwargs).images[0]
        outputs = {"input": case["degraded"], "restored": restored}
        if args.vae_roundtrip:
            outputs["vae(clean)"] = _vae_round_trip(pipe, case["clean"], args.tile_size, args.tile_overlap)
            outputs["vae(input)"] = _vae_round_trip(pipe, case["degraded"], args.tile_size, args.tile_overlap)
        if args.baselines:
            from .baselines import run_baselines

            outputs.update(run_baselines(case["degraded"], case["clean"], args.baselines, case["degradation"]))
        reference = to_tensor01(case["clean"])
        for method, image in outputs.items():
            result = compute_metrics(to_tensor01(image), reference, metrics=tuple(metric_names),
                                     crop_border=args.crop_border, y_channel=args.y_channel)
            unavailable.update(result.pop("unavailable", {}) or {})
            records.append(dict(image=case["name"], degradation=case["degradation"], method=method,
                                **{k: (None if v is None else float(v)) for k, v in result.items()}))
        grid_name = f"{case['name']}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', case['degradation'])}.png"
        _grid([case["degraded"], restored, case["clean"]]).save(os.path.join(args.output, "grids", grid_name))

    summary: dict[str, dict[str, dict[str, float | None]]] = defaultdict(dict)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["degradation"], record["method"])].append(record)
    for (degradation, method), rows in groups.items():
        means: dict[str, float | None] = {"n": float(len(rows))}
        for metric in metric_names:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            means[metric] = sum(values) / len(values) if values else None
        summary[degradation][method] = means
    if args.baselines:
        from .baselines import keep_best_blur

        keep_best_blur(summary)

    report = {"model": args.model, "steps": args.steps, "seed": args.seed, "metrics": metric_names,
              "per_image": records, "mean": summary, "unavailable_metrics": unavailable}
    with open(os.path.join(args.output, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    table = _markdown_table(summary, metric_names)
    notes = "".join(f"\n- {name} unavailable: {reason}" for name, reason in unavailable.items())
    with open(os.path.join(args.output, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# Evaluation of {args.model}\n\n{table}{notes}\n")
    print(table + notes)
    return 0


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sana-restore",
        description="Restore degraded photos with a SANA restoration pipeline, evaluate it, or make training pairs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    restore = commands.add_parser("restore", help="Restore image files or folders.",
                                  description="Restore images; inputs are never overwritten.")
    restore.add_argument("inputs", nargs="+", metavar="INPUT", help="Image files or folders.")
    restore.add_argument("-o", "--output", required=True, help="Output folder (created if missing).")
    restore.add_argument("--suffix", default="", help="Suffix added to output file names.")
    _add_pipeline_arguments(restore)
    restore.set_defaults(func=cmd_restore)

    evaluate = commands.add_parser(
        "evaluate", help="Restore degraded images and report PSNR/SSIM (+LPIPS) against the clean ones.",
        description="Writes results.json, results.md and degraded | restored | clean grids into --output.")
    source = evaluate.add_argument_group("data (one of)")
    source.add_argument("--pairs", help="CSV with image_path,condition_image_path,caption (clean, degraded).")
    source.add_argument("--images", help="Folder of clean images, degraded with --degradation.")
    source.add_argument("--sample-photos", choices=["held-out", "train"], default=None,
                        help="scikit-image's photos as split by diffusers_restore.sample_photos (held-out: chelsea, "
                             "coffee, rocket; never used to train the bundled restorer), degraded with --degradation.")
    evaluate.add_argument("--degradation", action="append", metavar="SPEC",
                          help="Degradation spec, repeatable (e.g. gaussian_noise:25, jpeg:20, downscale:2).")
    evaluate.add_argument("--crop", type=int, default=None, help="Centre-crop clean images to this size first.")
    evaluate.add_argument("--crop-border", type=int, default=0, help="Pixels ignored at each border by metrics.")
    evaluate.add_argument("--y-channel", action="store_true", help="Compute PSNR/SSIM on the Y channel.")
    evaluate.add_argument("--lpips", action="store_true", help="Also report LPIPS (needs local weights).")
    evaluate.add_argument("--baselines", default=None,
                          help="Comma list of classical baselines to score beside the model: blur, nlm.")
    evaluate.add_argument("--vae-roundtrip", action="store_true",
                          help="Also score decode(encode(x)) of the clean image (the ceiling of any restorer in this "
                               "latent space) and of the degraded input.")
    evaluate.add_argument("-o", "--output", required=True, help="Output folder.")
    _add_pipeline_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    make_pairs = commands.add_parser("make-pairs", help="Write degraded copies of clean photos and a pairs CSV.",
                                     add_help=False)
    make_pairs.set_defaults(func=None)

    demo = commands.add_parser("demo", help="Degrade a held-out photo, restore it, write a comparison PNG.")
    demo.add_argument("-o", "--output", default="sana_restore_demo.png", help="PNG to write.")
    demo.add_argument("--degradation", default="gaussian_noise:25", help="Degradation spec (default gaussian_noise:25).")
    demo.add_argument("--model", default=None, help="Pipeline to use instead of the bundled one.")
    from .sample_photos import HELD_OUT_PHOTOS

    demo.add_argument("--photo", choices=list(HELD_OUT_PHOTOS), default="coffee",
                      help="Held-out scikit-image photo to use (default coffee).")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="Denoising steps (default: 1 for the bundled restorer, else the pipeline's default).")
    demo.add_argument("--seed", type=int, default=0, help="Random seed.")
    demo.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-pairs":  # its own parser owns the flags
        from .data.make_pairs import main as make_pairs_main

        return int(make_pairs_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return int(run_demo(args) or 0)
        return int(args.func(args) or 0)
    except CLIError as error:
        print(f"sana-restore {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
