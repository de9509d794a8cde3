# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Content captions for a pairs CSV (`sana-restore caption`, `make-pairs --caption-model`).

Each row's caption becomes `combine_prompt(content caption, its degradation prompt, template)`. The content caption
describes the *degraded* image by default (that is the image that exists at inference time) or the clean one
(`source="clean"`). Captions are cached by image content beside the output CSV (`<output>.captions.jsonl`), so an
interrupted run resumes and a rerun captions nothing twice.
"""

from __future__ import annotations

import os

from ..captioning import DEFAULT_PROMPT_TEMPLATE, ImageCaptioner, combine_prompt
from ..image_io import is_same_file, load_rgb
from .paired_dataset import PairRow, csv_path_field, read_paired_csv, write_paired_csv

CAPTION_SOURCES = ("degraded", "clean")


def caption_cache_file(output_csv: str | os.PathLike) -> str:
    """Where the caption cache of an output CSV lives."""
    return os.fspath(output_csv) + ".captions.jsonl"


def check_caption_job(
    csv_path: str | os.PathLike,
    output_csv: str | os.PathLike,
    source: str = "degraded",
    template: str = DEFAULT_PROMPT_TEMPLATE,
    replace_input: bool = False,
) -> list[PairRow]:
    """Everything :func:`caption_pairs` checks before any model time is spent: the source, the template, the output
    not being the input, and the CSV itself (read and checked as the dataset reads it). Returns its rows.

    Raises:
        ValueError: the first of these that is wrong (the CSV's own errors name the file and line).
    """
    if source not in CAPTION_SOURCES:
        raise ValueError(f"source must be one of {CAPTION_SOURCES}, got {source!r}.")
    combine_prompt("test", "prompt", template)
    if not replace_input and is_same_file(csv_path, output_csv):
        raise ValueError(f"The output CSV {output_csv} is the input {csv_path}: choose another file.")
    return read_paired_csv(csv_path)[0]


def caption_pairs(
    csv_path: str | os.PathLike,
    output_csv: str | os.PathLike,
    captioner: ImageCaptioner,
    source: str = "degraded",
    template: str = DEFAULT_PROMPT_TEMPLATE,
    replace_input: bool = False,
) -> int:
    """Write `output_csv`: the rows of `csv_path` with content captions combined into their captions.

    Args:
        csv_path: a pairs CSV (`image_path,condition_image_path,caption`).
        output_csv: the CSV to write (atomically); image paths are rewritten relative to its folder.
        captioner: an `ImageCaptioner` (give it `cache_file=caption_cache_file(output_csv)` to resume). To fail on a
            bad CSV before a model is loaded, call :func:`check_caption_job` before making it.
        source: "degraded" (the condition image; the clean one for rows without) or "clean".
        template: how caption and prompt combine (`{caption}`, `{prompt}`).
        replace_input: allow `output_csv` to be `csv_path` (only for a CSV this package wrote itself, e.g. by
            `make-pairs`); otherwise that is refused, so an input is never overwritten.

    Returns:
        The number of rows written.
    """
    rows = check_caption_job(csv_path, output_csv, source, template, replace_input)
    paths = [
        row.condition_image_path if source == "degraded" and row.condition_image_path else row.image_path
        for row in rows
    ]
    captions = []
    batch = max(1, captioner.batch_size)
    for start in range(0, len(paths), batch):
        captions += captioner.caption([load_rgb(path) for path in paths[start : start + batch]])
    folder = os.path.dirname(os.path.abspath(output_csv))

    def relative(path: str | None) -> str:
        return "" if path is None else csv_path_field(path, folder)

    write_paired_csv(output_csv, [
        (relative(row.image_path), relative(row.condition_image_path), combine_prompt(caption, row.caption, template))
        for row, caption in zip(rows, captions)
    ])
    return len(rows)
