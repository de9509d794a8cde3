"""Pre-generate degraded copies of clean photos and the pairs CSV that :class:`PairedDataset` reads.

    sana-restore make-pairs --input-dir photos/ --output-dir pairs/ --degradation random --workers 8
    python -m diffusers_restore.data.make_pairs --input-dir photos/ --output-dir pairs/ --degradation jpeg:20

Writes ``<output-dir>/degraded/<relative path>.png`` for every image under ``--input-dir`` (``__<k>`` appended per
copy when ``--copies`` > 1) and ``<output-dir>/pairs.csv`` (``image_path,condition_image_path,caption``, paths
relative to the CSV; the caption is built from the degradations applied).

* Reproducible: each output's generator is seeded from (``--seed``, the file's relative path, the copy number),
  never from the processing order, so any number of workers gives byte-identical outputs.
* Parallel: a process pool over ``--workers`` cores (default: all).
* Resumable: every output is written to a temporary file and renamed into place, and carries its degradation
  record, its caption and the sha256 of the photo it was made from in a PNG text chunk; a rerun keeps the outputs
  already made with the same settings from the same photo contents, redoes those whose photo was replaced since (same
  name, other content: the old degraded file would no longer match it), and computes the missing ones. The sources
  are hashed on every run (a few milliseconds per photo, in the worker processes) rather than trusted by size and
  modification time, which copies and backup restores preserve. The settings are recorded in
  ``<output-dir>/make_pairs.json``; a run with other settings into the same folder stops before doing anything,
  unless ``--overwrite``.
* The CSV is written once, at the end, atomically.
* ``degraded/`` and ``hq/`` are marked as written by the package (:func:`~diffusers_restore.image_io.mark_output_folder`):
  a later run (or ``restore``) over a folder that contains them does not read them as photos.
Degraded images are lossless PNG (RGB), so that what the degradation produced (e.g. JPEG artifacts) is kept exactly.

Pairs from a learned degradation model (GenDeg's synthetic pairs): ``--degradation model:DIR`` runs the
:class:`SanaDegradationPipeline` saved in ``DIR`` (trained by ``train_paired.py --direction degrade``) on every photo,
in this process, with a request drawn per photo from the ``--degrader-request NAME:MU_BIN:SIGMA_BIN`` list (one or
more; e.g. ``jpeg:10:8``; or written in the spec, ``model:DIR;jpeg:10:8``: the degradation spec of
:data:`~.degradations.MODEL_PREFIX`); the caption names the requested degradation as for analytic pairs.

Super-resolution pairs (``--sr-crop 512``): each photo gives an HQ image, a random 512 px crop of the photo
area-downsampled 0.5x (:func:`~.degradations.area_downsample_pair`), written to ``<output-dir>/hq/``, and an LQ image,
the HQ area-downsampled 0.5x (256 px), then degraded by ``--degradation`` unless it is ``none``, written to
``degraded/``. The CSV pairs them; :class:`PairedDataset` resizes the LQ to the HQ size (the pipeline's ``upscale``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, PngImagePlugin

from ..image_io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    atomic_write_json,
    find_images,
    load_rgb,
    mark_output_folder,
    read_json,
    remove_stray_temp_files,
    save_image,
    sha256_file,
)
from .degradations import (
    MODEL_PREFIX,
    apply_degradation_spec,
    area_downsample_pair,
    degradation_prompt,
    parse_degradation_spec,
)
from .paired_dataset import csv_path_field, write_paired_csv

PNG_TEXT_KEY = "sana_restore_pair"
DEGRADED_FOLDER = "degraded"
HQ_FOLDER = "hq"
NO_DEGRADATION = "none"
"""With `sr_crop`: the LQ image is the area-downsampled HQ with nothing more applied."""

__all__ = ["MakePairsResult", "make_pairs", "main", "pair_seed"]


@dataclass
class MakePairsResult:
    csv_path: str
    num_written: int = 0
    """Outputs computed by this run, including the redone ones."""
    num_resumed: int = 0
    """Outputs kept from an earlier run (same settings, same photo content)."""
    num_redone: int = 0
    """Outputs computed again because their photo's content changed since they were made."""
    failures: list[tuple[str, str]] = field(default_factory=list)
    """``(input path, error)`` for every photo that could not be processed (left out of the CSV)."""
    seconds: float = 0.0


@dataclass(frozen=True)
class _Job:
    input_root: str
    relative_path: str
    copy: int
    output_path: str
    degradation: str
    seed: int
    overwrite: bool
    generic_prompt_probability: float
    sr_crop: int | None = None
    hq_path: str | None = None


def pair_seed(seed: int, relative_path: str, copy: int = 0) -> list[int]:
    """The entropy of one output's generator: (seed, 64-bit hash of the relative path and copy number).
    Independent of processing order and of the number of workers."""
    key = f"{relative_path.replace(os.sep, '/')}#{copy}".encode()
    return [int(seed), int.from_bytes(hashlib.sha256(key).digest()[:8], "little")]


def _settings(job: _Job) -> dict:
    settings = {"source": job.relative_path.replace(os.sep, "/"), "copy": job.copy, "seed": job.seed,
                "degradation": job.degradation}
    if job.sr_crop is not None:
        settings["sr_crop"] = job.sr_crop
    return settings


def _read_existing(path: str) -> dict | None:
    """The pair record stored in an existing output, or None if it has none."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}) or {}
            return json.loads(text[PNG_TEXT_KEY]) if PNG_TEXT_KEY in text else None
    except (OSError, ValueError):
        return None


def _process(job: _Job) -> tuple[_Job, str, str, str | None]:
    """Degrade one photo. Returns (job, caption, status, error) with status "written", "redone" (written again
    because the photo changed), "resumed" or "failed"."""
    try:
        source_path = os.path.join(job.input_root, job.relative_path)
        source_sha256 = sha256_file(source_path)
        status = "written"
        if os.path.exists(job.output_path):
            existing = _read_existing(job.output_path)
            complete = job.hq_path is None or os.path.exists(job.hq_path)  # the HQ file is written first
            if complete and existing is not None and all(existing.get(k) == v for k, v in _settings(job).items()):
                if existing.get("source_sha256") == source_sha256:
                    return job, existing["caption"], "resumed", None
                status = "redone"  # made by this command with these settings, from another version of the photo
            elif not job.overwrite:
                return job, "", "failed", (
                    f"{job.output_path} exists but was not made by this command with these settings "
                    f"(found {None if existing is None else {k: existing.get(k) for k in _settings(job)}}); "
                    "use another --output-dir or --overwrite."
                )
        rng = np.random.default_rng(pair_seed(job.seed, job.relative_path, job.copy))
        clean = load_rgb(source_path)
        profile = clean.info.get("icc_profile")  # outputs keep the photo's colour space, so they keep its label
        if job.sr_crop is not None:
            clean, degraded, records = area_downsample_pair(clean, crop=job.sr_crop, rng=rng)
            if job.degradation != NO_DEGRADATION:
                degraded, more = apply_degradation_spec(degraded, job.degradation, rng)
                records = records + more
            save_image(clean, job.hq_path, icc_profile=profile, compress_level=1)
            degraded = degraded.convert("RGB")  # LQ keeps its half size
        else:
            degraded, records = apply_degradation_spec(clean, job.degradation, rng)
            degraded = degraded.convert("RGB")
            if degraded.size != clean.size:
                degraded = degraded.resize(clean.size, Image.Resampling.BICUBIC)
        caption = degradation_prompt(records, rng, job.generic_prompt_probability)
        record = {**_settings(job), "source_sha256": source_sha256, "records": records, "caption": caption}
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_TEXT_KEY, json.dumps(record))
        save_image(degraded, job.output_path, icc_profile=profile, pnginfo=info, compress_level=1)
        return job, caption, status, None
    except ImageReadError as error:  # reported per file; one bad photo must not stop a long run
        return job, "", "failed", error.problem
    except (OSError, ValueError) as error:
        return job, "", "failed", str(error)
    except Exception as error:
        return job, "", "failed", f"{type(error).__name__}: {error}"


MANIFEST_FILE = "make_pairs.json"


def _check_manifest(output_dir: str, settings: dict, overwrite: bool) -> None:
    """Refuse to mix outputs of different settings in one folder (unless `overwrite`); record the settings."""
    path = os.path.join(output_dir, MANIFEST_FILE)
    if os.path.isfile(path) and not overwrite:
        previous = read_json(
            path,
            f"It records the settings the pairs in {output_dir} were made with. Delete it and run again (the pairs "
            "whose own records match this run's settings are kept, the others are reported), or use another "
            "--output-dir.",
        )
        if previous != settings:
            raise ValueError(
                f"{output_dir} holds pairs made with other settings ({previous}, now {settings}); use another "
                "--output-dir or --overwrite."
            )
    atomic_write_json(path, settings, indent=None)


def make_pairs(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    degradation: str = "random",
    seed: int = 0,
    copies: int = 1,
    num_workers: int | None = None,
    csv_name: str = "pairs.csv",
    overwrite: bool = False,
    generic_prompt_probability: float = 0.1,
    verbose: bool = True,
    sr_crop: int | None = None,
    degrader_requests: Sequence[str] = (),
) -> MakePairsResult:
    """Degrade every image under `input_dir` and write the pairs CSV (see the module docstring).

    Args:
        input_dir: folder of clean photos (searched recursively).
        output_dir: where ``degraded/`` and the CSV go.
        degradation: a spec accepted by :func:`~.degradations.parse_degradation_spec` ("random", "realesrgan",
            "jpeg:20", ...).
        seed: base seed.
        copies: degraded versions per photo (each with its own generator).
        num_workers: processes (default: all cores; 1 runs in this process).
        csv_name: the CSV's file name inside `output_dir`.
        overwrite: redo outputs that were made with other settings instead of failing on them.
        generic_prompt_probability: share of captions that are the generic restoration prompt.
        sr_crop: super-resolution pairs (see the module docstring): HQ crops of this even size from the photo
            area-downsampled 0.5x, LQ = HQ area-downsampled 0.5x, then `degradation` unless it is "none". Photos whose
            short side is below 2 * `sr_crop` fail with a message and are left out.
        degrader_requests: with `degradation` "model:DIR", the requests ``NAME:MU_BIN:SIGMA_BIN`` drawn from per photo.

    Returns:
        A :class:`MakePairsResult` (photos that failed are listed and left out of the CSV).
    """
    start_time = time.perf_counter()
    input_dir, output_dir = os.fspath(input_dir), os.fspath(output_dir)
    if not os.path.isdir(input_dir):
        raise ValueError(f"input_dir '{input_dir}' is not a folder.")
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}.")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
    if sr_crop is not None and (sr_crop < 2 or sr_crop % 2):
        raise ValueError(f"sr_crop must be an even number >= 2, got {sr_crop}.")
    if degradation.startswith(MODEL_PREFIX):
        if sr_crop is not None:
            raise ValueError("--degradation model:DIR makes same-size pairs: leave out sr_crop.")
        folder_part, _, own_requests = degradation.partition(";")
        degradation = f"{folder_part};{','.join(filter(None, [own_requests, *degrader_requests]))}"
        parse_degradation_spec(degradation)  # the folder and the requests, before any work
        num_workers = 1  # the model runs in this process
    elif degrader_requests:
        raise ValueError("--degrader-request only applies to --degradation model:DIR.")
    elif degradation == NO_DEGRADATION:
        if sr_crop is None:
            raise ValueError("degradation 'none' only makes sense with sr_crop (the LQ is then the downsampled HQ).")
    else:
        parse_degradation_spec(degradation)  # a clear ValueError for a bad spec, before any work
    degraded_root = os.path.join(output_dir, DEGRADED_FOLDER)
    hq_root = os.path.join(output_dir, HQ_FOLDER)
    excluded = [degraded_root] + ([hq_root] if sr_crop is not None else [])
    relative_paths = [os.path.relpath(path, input_dir) for path in find_images(input_dir, exclude=excluded)]
    if not relative_paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{input_dir}'.")
    os.makedirs(output_dir, exist_ok=True)
    manifest = {"degradation": degradation, "seed": int(seed), "generic_prompt_probability": generic_prompt_probability}
    if sr_crop is not None:
        manifest["sr_crop"] = int(sr_crop)
    _check_manifest(output_dir, manifest, overwrite)
    for folder in (degraded_root, hq_root):
        if os.path.isdir(folder):
            remove_stray_temp_files(folder, recursive=True)
    input_abs = os.path.abspath(input_dir)
    if os.path.commonpath([input_abs, os.path.abspath(degraded_root)]) == os.path.abspath(degraded_root):
        raise ValueError("input_dir must not lie inside output_dir/degraded.")
    for folder in excluded:  # a later run over a folder that holds these does not take them for photos
        mark_output_folder(folder, "make-pairs")

    jobs = []
    for relative_path in relative_paths:
        stem = os.path.splitext(relative_path)[0]
        for copy in range(copies):
            suffix = f"__{copy}" if copies > 1 else ""
            hq_path = os.path.join(hq_root, stem + suffix + ".png") if sr_crop is not None else None
            jobs.append(
                _Job(input_abs, relative_path, copy, os.path.join(degraded_root, stem + suffix + ".png"),
                     degradation, int(seed), overwrite, generic_prompt_probability, sr_crop, hq_path)
            )
    if len({job.output_path for job in jobs}) != len(jobs):
        raise ValueError(f"two inputs under '{input_dir}' differ only by extension; their outputs would collide.")

    workers = min(num_workers or os.cpu_count() or 1, len(jobs))
    result = MakePairsResult(csv_path=os.path.join(output_dir, csv_name))
    outcomes = []
    report_every = max(1, len(jobs) // 20)
    if workers == 1:
        iterator = map(_process, jobs)
        outcomes = _collect(iterator, len(jobs), report_every, verbose)
    else:
        # spawn: safe whatever threads the parent runs (torch, tokenizers), same behaviour on every platform
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            outcomes = _collect(pool.imap_unordered(_process, jobs, chunksize=4), len(jobs), report_every, verbose)

    rows = []
    for job, caption, status, error in sorted(outcomes, key=lambda o: (o[0].relative_path, o[0].copy)):
        if status == "failed":
            result.failures.append((os.path.join(input_dir, job.relative_path), error or "unknown error"))
            continue
        result.num_written += status in ("written", "redone")
        result.num_redone += status == "redone"
        result.num_resumed += status == "resumed"
        clean_path = job.hq_path if job.hq_path is not None else os.path.join(input_abs, job.relative_path)
        rows.append((
            csv_path_field(clean_path, os.path.abspath(output_dir)),
            csv_path_field(job.output_path, os.path.abspath(output_dir)),
            caption,
        ))
    result.seconds = time.perf_counter() - start_time
    if not rows:  # keep any earlier CSV rather than replacing it by an empty one
        return result
    write_paired_csv(result.csv_path, rows)
    result.seconds = time.perf_counter() - start_time
    return result


def _collect(iterator, total: int, report_every: int, verbose: bool) -> list:
    outcomes = []
    for outcome in iterator:
        outcomes.append(outcome)
        if verbose and (len(outcomes) % report_every == 0 or len(outcomes) == total):
            print(f"make-pairs: {len(outcomes)}/{total}", file=sys.stderr, flush=True)
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sana-restore make-pairs",
        description="Write degraded copies of clean photos and a pairs CSV (image_path,condition_image_path,caption) "
        "for PairedDataset. Reproducible (seeded per file name), parallel, resumable.",
    )
    parser.add_argument("--input-dir", required=True, help="Folder of clean photos (searched recursively).")
    parser.add_argument("--output-dir", required=True, help="Where degraded/ and the CSV are written.")
    parser.add_argument("--degradation", default="random",
                        help="random (1-3 of the basic degradations), realesrgan, realesrgan_light, or a spec such as "
                        "gaussian_noise:25, jpeg:20, gaussian_blur:7, downscale:2, colour_jitter:0.1,-0.1 "
                        "(default: random); or model:DIR, a learned degradation model (with --degrader-request).")
    parser.add_argument("--degrader-request", action="append", default=[], metavar="NAME:MU_BIN:SIGMA_BIN",
                        help="With --degradation model:DIR (a SanaDegradationPipeline folder): a degradation to ask "
                        "the model for, e.g. jpeg:10:8 (GenDeg's severity bins, 0-127). Repeat for several; one is "
                        "drawn per photo.")
    parser.add_argument("--sr-crop", type=int, default=None, metavar="PX",
                        help="Super-resolution pairs: PX-pixel HQ crops of the photo area-downsampled 0.5x (written to "
                        "hq/), LQ = HQ area-downsampled 0.5x then --degradation (use 'none' for a clean LQ).")
    parser.add_argument("--seed", type=int, default=0, help="Base seed (default 0).")
    parser.add_argument("--copies", type=int, default=1, help="Degraded versions per photo (default 1).")
    parser.add_argument("--workers", type=int, default=None, help="Processes (default: all cores).")
    parser.add_argument("--csv-name", default="pairs.csv", help="CSV file name in the output folder.")
    parser.add_argument("--generic-prompt-probability", type=float, default=0.1,
                        help="Share of captions that are the generic 'Restore this image to high quality' (0.1).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Redo outputs made with other settings instead of stopping.")
    parser.add_argument("--quiet", action="store_true", help="No progress lines.")
    captions = parser.add_argument_group("content captions (optional)")
    captions.add_argument("--caption-model", default=None, metavar="ID",
                          help="A transformers image-text-to-text model (Hub id or folder): each caption becomes "
                               "'<content caption>. <degradation prompt>' (see `sana-restore caption`).")
    captions.add_argument("--caption-source", choices=["degraded", "clean"], default="degraded",
                          help="Which image is described (default: the degraded one, which exists at inference).")
    captions.add_argument("--caption-template", default=None,
                          help="How the caption and the prompt combine (default '{caption}. {prompt}').")
    captions.add_argument("--caption-batch-size", type=int, default=8, help="Images per generate call (8).")
    parser.add_argument("--shards", type=int, default=None, metavar="N",
                        help="Also pack the pairs (after captioning) into N WebDataset tar shards "
                        "<output-dir>/shards/pairs-000000.tar ... for train_paired.py --train_data_shards "
                        "(streamed, split across processes). Existing shards are never overwritten.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry (``sana-restore make-pairs``). Returns 0 on success, 1 if some photos failed, 2 on a usage
    error."""
    args = build_parser().parse_args(argv)
    try:
        result = make_pairs(
            args.input_dir, args.output_dir, degradation=args.degradation, seed=args.seed, copies=args.copies,
            num_workers=args.workers, csv_name=args.csv_name, overwrite=args.overwrite,
            generic_prompt_probability=args.generic_prompt_probability, verbose=not args.quiet,
            sr_crop=args.sr_crop, degrader_requests=args.degrader_request,
        )
    except ValueError as error:
        print(f"sana-restore make-pairs: error: {error}", file=sys.stderr)
        return 2
    for path, error in result.failures:
        print(f"sana-restore make-pairs: failed: {path}: {error}", file=sys.stderr)
    if args.caption_model is not None and os.path.isfile(result.csv_path):
        from ..captioning import DEFAULT_PROMPT_TEMPLATE, ImageCaptioner
        from .captions import caption_cache_file, caption_pairs

        try:
            captioner = ImageCaptioner(args.caption_model, batch_size=args.caption_batch_size,
                                       cache_file=caption_cache_file(result.csv_path))
            count = caption_pairs(result.csv_path, result.csv_path, captioner, source=args.caption_source,
                                  template=args.caption_template or DEFAULT_PROMPT_TEMPLATE, replace_input=True)
        except (ValueError, OSError) as error:
            print(f"sana-restore make-pairs: error: captions: {error}", file=sys.stderr)
            return 2
        print(f"{result.csv_path}: {count} captions from {args.caption_model} ({args.caption_source} images)")
    if args.shards is not None and os.path.isfile(result.csv_path):
        from .paired_dataset import read_paired_csv
        from .streaming import write_pair_shards

        shard_dir = os.path.join(args.output_dir, "shards")
        try:
            rows, _ = read_paired_csv(result.csv_path)
            paths = write_pair_shards(rows, shard_dir, args.shards)
        except (ValueError, OSError) as error:
            print(f"sana-restore make-pairs: error: shards: {error}", file=sys.stderr)
            return 2
        last = len(paths) - 1
        print(f"{shard_dir}: {len(rows)} pairs in {len(paths)} shards: --train_data_shards "
              f"'{os.path.join(shard_dir, 'pairs-{' + f'{0:06d}..{last:06d}' + '}.tar')}'")
    redone = f" ({result.num_redone} redone: their photo changed)" if result.num_redone else ""
    print(f"{result.csv_path}: {result.num_written + result.num_resumed} pairs ({result.num_written} written{redone}, "
          f"{result.num_resumed} already done, {len(result.failures)} failed) in {result.seconds:.1f} s")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
