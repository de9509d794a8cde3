# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Benchmark a restoration pipeline on (clean, degraded) pairs: the harness behind ``sana-restore evaluate``.

* Cases: the pairs of a pairs CSV (:func:`read_pair_cases`), or clean images degraded by specs
  (:func:`degrade_cases`).
* :func:`evaluate`: restores every case and scores it (PSNR, SSIM, optionally LPIPS) against the clean image, beside
  the degraded input itself, classical baselines (:mod:`diffusers_restore.baselines`), a two-stage pipeline's first
  stage alone, and the VAE round trip of the clean and the degraded image (:func:`autoencode`, the ceiling of any
  restorer working in that latent space); optionally FID per method and degradation. It writes ``results.json``,
  ``results.md`` and one ``degraded | restored | clean`` grid per case.

``results.json`` is strict JSON (RFC 8259): a value that is not finite, such as the infinite PSNR of an output equal
to its clean image, is written as ``null`` and the report's ``notes`` say so.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch

from .image_io import atomic_write, load_rgb, save_image
from .metrics import FID_RECOMMENDED_MIN_IMAGES, MetricUnavailable, compute_metrics, fid_features, frechet_distance
from .metrics import to_tensor01
from .models.vae_latents import decode_latents, encode_latents
from .pipelines.image_processing_restoration import pad_to_multiple

__all__ = ["EvaluationCase", "STAGE_METHOD", "autoencode", "degrade_cases", "evaluate", "read_pair_cases"]

STAGE_METHOD = "degradation removal stage"
"""The method name, in the tables, of a two-stage pipeline's `degradation_removal` stage alone."""

# Errors that concern one case (unreadable file, a size the model cannot take, non-finite output): the case is
# reported and skipped. Anything else is a bug and propagates.
PER_IMAGE_ERRORS = (ValueError, RuntimeError, OSError)

Reporter = Callable[[str, BaseException], str]
"""``report(where, error) -> reason``: says that one input or case failed (and is skipped); returns the reason."""


@dataclass
class EvaluationCase:
    """One (clean, degraded) pair to evaluate."""

    name: str
    degradation: str
    clean: PIL.Image.Image
    degraded: PIL.Image.Image
    prompt: str | None = None
    noise_sigma: float | None = None
    """Known noise standard deviation of the degradation on the [0, 1] scale (for the denoising baselines)."""


@torch.no_grad()
def autoencode(pipe, image, output_type: str = "pil") -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """``decode(encode(image))`` with `pipe`'s VAE, as a restoration call encodes its input: RGB in [0, 1], padded by
    reflection to `pipe.size_multiple`, scaled latents (:mod:`~diffusers_restore.models.vae_latents`), decoded and
    cropped back. Scored against the clean image this is the VAE's ceiling: the best any restorer working in this
    latent space can reach. The VAE's own tiling applies when enabled (``pipe.vae.enable_tiling()``).

    Args:
        pipe: a `SanaRestorationPipeline` (only its `vae`, `image_processor` and `size_multiple` are used).
        image: what the pipeline accepts as `image`; alpha channels are left out.
        output_type: "pil", "np" (`(batch, H, W, 3)` float in [0, 1]) or "pt" (`(batch, 3, H, W)`).
    """
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
    pixels, _ = pipe.image_processor.preprocess(image)
    height, width = pixels.shape[-2:]
    device = getattr(pipe, "_execution_device", None) or pipe.vae.device
    padded = pad_to_multiple(pixels.to(device), pipe.size_multiple)
    decoded = decode_latents(pipe.vae, encode_latents(pipe.vae, padded * 2.0 - 1.0))[:, :, :height, :width]
    return pipe.image_processor.postprocess((decoded / 2 + 0.5).clamp(0.0, 1.0), output_type)


# ---------------------------------------------------------------------------------------------------- cases


def _unique_name(name: str, seen: set[str]) -> str:
    candidate, index = name, 2
    while candidate in seen:
        candidate, index = f"{name}~{index}", index + 1
    seen.add(candidate)
    return candidate


def read_pair_cases(csv_path: str, report: Reporter) -> list[EvaluationCase]:
    """The cases of a pairs CSV (clean, degraded, optional caption as the prompt). Pairs whose images cannot be read
    are reported and left out; a degraded image of another size (a super-resolution pair) is resized to the clean
    one's.

    Raises:
        ValueError: the CSV cannot be read, has no rows, or a row has no degraded image.
    """
    from .data.paired_dataset import read_paired_csv

    rows, _ = read_paired_csv(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has a header but no pairs: add rows image_path,condition_image_path,caption "
                         "(clean, degraded, optional caption).")
    for row in rows:
        if row.condition_image_path is None:
            raise ValueError(f"{row.location}: condition_image_path is empty; evaluation needs pre-degraded pairs.")
    root = os.path.dirname(os.path.abspath(csv_path))
    cases, seen = [], set()
    for row in rows:
        try:
            clean, degraded = load_rgb(row.image_path), load_rgb(row.condition_image_path)
        except OSError as error:
            report(row.location, error)
            continue
        if degraded.size != clean.size:
            degraded = degraded.resize(clean.size, resample=PIL.Image.Resampling.BICUBIC)
        name = _unique_name(os.path.splitext(os.path.relpath(row.image_path, root))[0], seen)
        cases.append(EvaluationCase(name, "pairs", clean, degraded, prompt=row.caption or None))
    return cases


def degrade_cases(sources: Sequence[tuple[str, PIL.Image.Image]], specs: Sequence[str], seed: int,
                  crop: int | None = None) -> list[EvaluationCase]:
    """One case per (clean image, degradation spec): `sources` are ``(name, RGB image)`` (a repeated name gets
    ``~2``, ``~3``, ...), centre-cropped to `crop` first when given; each degradation is seeded by (`seed`, name,
    spec), so a case is the same in every run."""
    from .baselines import known_noise_sigma
    from .data.degradations import apply_degradation_spec
    from .sample_photos import center_crop

    cases, seen = [], set()
    for name, clean in sources:
        name = _unique_name(name, seen)
        if crop:
            clean = center_crop(clean, crop)
        for spec in specs:
            rng = np.random.default_rng(zlib.crc32(f"{seed}:{name}:{spec}".encode()))
            degraded, records = apply_degradation_spec(clean, spec, rng)
            cases.append(EvaluationCase(name, spec, clean, degraded.convert("RGB"),
                                        noise_sigma=known_noise_sigma(records)))
    return cases


# ------------------------------------------------------------------------------------------------ harness


def _first_stage_output(pipe, degraded: PIL.Image.Image, tile_size: int | None) -> PIL.Image.Image:
    """The pipeline's `degradation_removal` stage alone on `degraded`."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    cleaned = pipe.remove_degradations(to_tensor01(degraded).to(device), tile_size)
    return pipe.image_processor.postprocess(cleaned)[0]


def _comparison_grid(case: EvaluationCase, restored: PIL.Image.Image) -> PIL.Image.Image:
    """degraded | restored | clean, each at the clean image's size."""
    from diffusers.utils import make_image_grid

    panels = [image if image.size == case.clean.size else image.resize(case.clean.size, resample=3)
              for image in (case.degraded, restored.convert("RGB"), case.clean)]
    return make_image_grid(panels, rows=1, cols=3)


def _markdown_table(summary: dict[str, dict[str, dict[str, float | None]]], metric_names: list[str]) -> str:
    lines = ["| degradation | method | n | " + " | ".join(metric_names) + " |",
             "|---|---|---|" + "---|" * len(metric_names)]
    for degradation, methods in summary.items():
        for method, values in methods.items():
            cells = []
            for metric in metric_names:
                value = values.get(metric)
                cells.append("n/a" if value is None else f"{value:.2f}" if metric in ("psnr", "fid") else
                             f"{value:.4f}")
            lines.append(f"| {degradation} | {method} | {values['n']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _set_fids(summary, images: dict[tuple[str, str], list], clean: dict[str, list], renamed: dict[str, str],
              device: str, unavailable: dict[str, str], warn: Callable[[str], None]) -> None:
    """Fill ``summary[degradation][method]["fid"]``: FID of each method's output set against the clean set of that
    degradation (a set-level score: one number per row, not a mean over images)."""
    smallest = min(len(images_of_degradation) for images_of_degradation in clean.values())
    if smallest < 2:
        unavailable["fid"] = f"FID needs at least 2 images per set; the smallest set has {smallest}."
        return
    if smallest < FID_RECOMMENDED_MIN_IMAGES:
        warn(f"FID on {smallest} image(s) per set is unstable and biased (its 2048-d feature covariance needs at least "
             f"{FID_RECOMMENDED_MIN_IMAGES} images; published FIDs use 10k-50k): compare only FIDs computed on the "
             "same images.")
    for degradation, methods in summary.items():
        try:
            clean_features = fid_features(clean[degradation], device=device)  # once per degradation
            for method, values in methods.items():
                outputs = fid_features(images[(degradation, renamed.get(method, method))], device=device)
                values["fid"] = max(frechet_distance(outputs, clean_features), 0.0)
        except MetricUnavailable as error:
            unavailable["fid"] = error.reason
            return


def _strict_json(value: Any, non_finite: list[str], where: str = "") -> Any:
    """`value` with every float that is not finite replaced by ``None``; `non_finite` collects where they were."""
    if isinstance(value, dict):
        return {key: _strict_json(item, non_finite, f"{where}.{key}" if where else str(key))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item, non_finite, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        non_finite.append(f"{where} = {value}")
        return None
    return value


def evaluate(
    pipe,
    cases: Sequence[EvaluationCase],
    output_dir: str,
    call_kwargs: dict[str, Any],
    *,
    report: Reporter,
    failures: list[tuple[str, str]] | None = None,
    seed: int = 0,
    lpips: bool = False,
    crop_border: int = 0,
    y_channel: bool = False,
    fid: bool = False,
    baselines: Sequence[str] = (),
    vae_roundtrip: bool = False,
    description: dict[str, Any] | None = None,
    progress: Callable[[Sequence[EvaluationCase]], Any] = iter,
    warn: Callable[[str], None] = print,
) -> str:
    """Restore and score every case; write ``results.json``, ``results.md`` and ``grids/`` into `output_dir`.

    Args:
        pipe: the restoration pipeline, called as ``pipe(case.degraded, generator=..., **call_kwargs)`` (a pair's
            caption replaces the prompt).
        cases: from :func:`read_pair_cases` or :func:`degrade_cases`.
        output_dir: an existing, writable folder.
        call_kwargs: the pipeline call arguments.
        report: called for each case that fails (it is then skipped).
        failures: ``(input, reason)`` of inputs that failed before (e.g. could not be read); the cases that fail here
            are added, and ``results.json`` lists them all.
        seed: the pipeline's generator seed for every case.
        lpips, fid: also score LPIPS, and FID of each method's output set against the clean set per degradation.
        crop_border, y_channel: PSNR/SSIM options (see :func:`~diffusers_restore.metrics.psnr`).
        baselines: classical baselines to score beside the model (:mod:`diffusers_restore.baselines`).
        vae_roundtrip: also score :func:`autoencode` of the clean and of the degraded image.
        description: what ``results.json`` records about the run (model, sampling settings, ...).
        progress: wraps the case list (e.g. a progress bar).
        warn: how a warning about the results is said.

    Returns:
        The markdown table with its notes; empty when every case failed (nothing is then written).
    """
    from .baselines import keep_best_blur, run_baselines

    metric_names = ["psnr", "ssim"] + (["lpips"] if lpips else [])
    records, unavailable = [], {}
    failures = [] if failures is None else failures
    fid_images: dict[tuple[str, str], list] = defaultdict(list)
    fid_clean: dict[str, list] = defaultdict(list)
    tile_size = call_kwargs.get("tile_size")
    for case in progress(cases):
        label = f"{case.name} ({case.degradation})"
        try:
            call = dict(call_kwargs, prompt=case.prompt) if case.prompt else call_kwargs
            generator = torch.Generator(device="cpu").manual_seed(seed)
            restored = pipe(case.degraded, generator=generator, **call).images[0]
            outputs = {"input": case.degraded, "restored": restored}
            if getattr(pipe, "degradation_removal", None) is not None:
                outputs[STAGE_METHOD] = _first_stage_output(pipe, case.degraded, tile_size)
            if vae_roundtrip:
                outputs["vae(clean)"] = autoencode(pipe, case.clean)[0]
                outputs["vae(input)"] = autoencode(pipe, case.degraded)[0]
            if baselines:
                outputs.update(run_baselines(case.degraded, baselines, case.noise_sigma))
            reference = to_tensor01(case.clean)
            case_records = []
            for method, image in outputs.items():
                result = compute_metrics(to_tensor01(image.convert("RGB")), reference, metrics=tuple(metric_names),
                                         crop_border=crop_border, y_channel=y_channel)
                unavailable.update(result.pop("unavailable"))
                case_records.append(dict(image=case.name, degradation=case.degradation, method=method,
                                         **{k: (None if v is None else float(v)) for k, v in result.items()}))
            grid_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{case.name}__{case.degradation}")
            save_image(_comparison_grid(case, restored), os.path.join(output_dir, "grids", grid_name + ".png"))
        except PER_IMAGE_ERRORS as error:
            failures.append((label, report(label, error)))
            continue
        records.extend(case_records)
        if fid:
            fid_clean[case.degradation].append(case.clean)
            for method, image in outputs.items():
                fid_images[(case.degradation, method)].append(image.convert("RGB"))
    if not records:
        return ""

    summary: dict[str, dict[str, dict[str, float | None]]] = defaultdict(dict)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["degradation"], record["method"])].append(record)
    for (degradation, method), rows in groups.items():
        means: dict[str, float | None] = {"n": float(len(rows))}
        for metric in metric_names:
            values = [row[metric] for row in rows if row.get(metric) is not None]
            means[metric] = sum(values) / len(values) if values else None
        summary[degradation][method] = means
    renamed = keep_best_blur(summary) if baselines else {}
    table_metrics = list(metric_names)
    if fid:
        device = getattr(pipe, "_execution_device", None) or pipe.device
        _set_fids(summary, fid_images, fid_clean, renamed, device, unavailable, warn)
        table_metrics.append("fid")

    non_finite: list[str] = []
    results = _strict_json({**(description or {}), "seed": seed, "metrics": table_metrics, "per_image": records,
                            "mean": summary, "unavailable_metrics": unavailable,
                            "failed": [{"input": where, "reason": reason} for where, reason in failures]}, non_finite)
    notes = "".join(f"\n- {name} unavailable: {reason}" for name, reason in unavailable.items())
    if non_finite:
        results["notes"] = [f"null where a value is not finite ({len(non_finite)}: {', '.join(non_finite[:3])}"
                            f"{', ...' if len(non_finite) > 3 else ''}); PSNR is infinite when an output equals its "
                            "clean image exactly."]
        notes += f"\n- results.json: {results['notes'][0]}"
    if fid:
        notes += ("\n- fid: one score per row, the row's output set against the clean set of its degradation "
                  f"(n images each; unstable below {FID_RECOMMENDED_MIN_IMAGES} images).")
    atomic_write(os.path.join(output_dir, "results.json"),
                 json.dumps(results, indent=2, allow_nan=False).encode("utf-8"))
    table = _markdown_table(summary, table_metrics)
    title = (description or {}).get("model", "a restorer")
    atomic_write(os.path.join(output_dir, "results.md"), f"# Evaluation of {title}\n\n{table}{notes}\n".encode("utf-8"))
    return table + notes
