"""Paired (clean, degraded) image dataset for restoration training.

Sources:

* a CSV with the header ``image_path,condition_image_path,caption``. Relative paths resolve against the CSV's
  folder. An empty ``condition_image_path`` means "degrade the clean image on the fly"; an empty ``caption`` means
  "prompt from the applied degradations" (on the fly) or :data:`GENERIC_PROMPT` (pre-generated pairs);
* a folder of clean images (searched recursively): every image is degraded on the fly.

Per sample, both images get the same spatial augmentation: one crop position and one horizontal-flip draw. The
degraded image is first resized to the clean image's size when they differ (super-resolution pairs); images whose
short side is below `resolution` are resized up (bicubic, both images alike) so that the short side equals
`resolution` before cropping. Larger images are cropped, never resized, so that pre-generated degradations keep
their pixel statistics. All image modes are converted to RGB with :func:`~.degradations.to_rgb` (transparency over
white, 16-bit scaled to 8-bit) after applying the EXIF orientation.

Randomness: the augmentation and the on-the-fly degradation of sample ``i`` in epoch ``e`` come from generators
seeded with ``(seed, e, i)``, so a run is reproducible, independent of how samples are spread over DataLoader
workers, and no two samples (or workers) share a degradation. Call :meth:`PairedDataset.set_epoch` at the start of
each epoch (before iterating the DataLoader); the epoch lives in shared memory, so persistent workers see it too.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .degradations import (
    GENERIC_PROMPT,
    DegradationSpec,
    degradation_prompt,
    get_degradation_fn,
    load_rgb,
    records_to_json,
)

logger = logging.getLogger(__name__)

CSV_HEADER = ("image_path", "condition_image_path", "caption")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

__all__ = [
    "CSV_HEADER",
    "IMAGE_EXTENSIONS",
    "PairRow",
    "PairedCSVReport",
    "PairedDataError",
    "PairedDataset",
    "collate_fn",
    "read_paired_csv",
    "validate_paired_csv",
]


class PairedDataError(ValueError):
    """A bad row or image; the message names the CSV file and line (or the image file for folder sources).

    Attributes:
        location: ``"pairs.csv, line 7"`` (or the image path), when known.
        problem: the problem without the location.
    """

    def __init__(self, problem: str, location: str | None = None) -> None:
        super().__init__(f"{location}: {problem}" if location else problem)
        self.location = location
        self.problem = problem


@dataclass(frozen=True)
class PairRow:
    """One training pair. Paths are absolute; ``condition_image_path`` is ``None`` for on-the-fly degradation."""

    image_path: str
    condition_image_path: str | None
    caption: str
    location: str
    """Where the pair comes from, for messages: ``"pairs.csv, line 7"`` or the image path."""


@dataclass
class PairedCSVReport:
    """Result of :func:`validate_paired_csv`."""

    csv_path: str
    num_rows: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    """``(location, message)`` for every problem found, in file order."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_valid(self) -> int:
        bad_rows = {location for location, _ in self.problems if "line" in location}
        return self.num_rows - len(bad_rows)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.csv_path}: {self.num_rows} rows, no problems."
        lines = [f"{self.csv_path}: {len(self.problems)} problem(s) in {self.num_rows} rows:"]
        lines += [f"  {location}: {message}" for location, message in self.problems]
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        """Raise :class:`PairedDataError` listing every problem, if there are any."""
        if not self.ok:
            raise PairedDataError(str(self))


# ------------------------------------------------------------------------------------------------ reading


def read_paired_csv(
    csv_path: str | os.PathLike, on_error: str = "raise"
) -> tuple[list[PairRow], list[tuple[str, str]]]:
    """Parse a pairs CSV (structure only: header, column count, non-empty clean path; files are not opened).

    Args:
        csv_path: the CSV file; relative image paths resolve against its folder.
        on_error: "raise" (first bad row raises :class:`PairedDataError`) or "skip" (bad rows are returned as
            problems).

    Returns:
        ``(rows, problems)`` with problems as ``(location, message)``.
    """
    _check_on_error(on_error)
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise PairedDataError("no such CSV file.", csv_path)
    root = os.path.dirname(os.path.abspath(csv_path))
    rows: list[PairRow] = []
    problems: list[tuple[str, str]] = []
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
            raise PairedDataError(
                f"the header must be {','.join(CSV_HEADER)}, got {','.join(header or [])!r}.", f"{csv_path}, line 1"
            )
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                fields, message = None, f"malformed CSV ({error})."
            else:
                message = None
            location = f"{csv_path}, line {reader.line_num}"
            if fields is not None and not fields:  # blank line
                continue
            if fields is not None and len(fields) != len(CSV_HEADER):
                message = f"expected {len(CSV_HEADER)} columns ({','.join(CSV_HEADER)}), found {len(fields)}."
            elif fields is not None and not fields[0].strip():
                message = "image_path is empty."
            if message is not None:
                if on_error == "raise":
                    raise PairedDataError(message, location)
                problems.append((location, message))
                continue
            image_path, condition_path, caption = (value.strip() for value in fields)
            rows.append(
                PairRow(
                    image_path=os.path.join(root, image_path),
                    condition_image_path=os.path.join(root, condition_path) if condition_path else None,
                    caption=caption,
                    location=location,
                )
            )
    return rows, problems


def _folder_rows(folder: str) -> list[PairRow]:
    paths = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(os.path.abspath(directory), name))
    if not paths:
        raise PairedDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found.", folder)
    return [PairRow(path, None, "", path) for path in sorted(paths)]


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")


def _aspect_ratios_agree(clean_size: tuple[int, int], degraded_size: tuple[int, int]) -> bool:
    """True when the degraded image is the clean one resized (up to one degraded pixel of rounding per side)."""
    (clean_w, clean_h), (degraded_w, degraded_h) = clean_size, degraded_size
    scale_w, scale_h = clean_w / degraded_w, clean_h / degraded_h
    tolerance = 0.01 + 2.0 / min(degraded_w, degraded_h)
    return abs(scale_w / scale_h - 1.0) <= tolerance


def _header_size(path: str, role: str) -> tuple[int, int]:
    """The size from the image header (cheap); raises PairedDataError for missing or unidentifiable files."""
    if not os.path.isfile(path):
        raise PairedDataError(f"{role} '{path}' does not exist.")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise PairedDataError(f"{role} '{path}' cannot be read as an image ({error}).") from None


def _check_row(row: PairRow, decode: bool) -> list[str]:
    """All problems of one row's files (existence, readability, full decode if `decode`, aspect ratios)."""
    problems, sizes = [], {}
    for role, path in (("image", row.image_path), ("condition image", row.condition_image_path)):
        if path is None:
            continue
        try:
            sizes[role] = _header_size(path, role)
            if decode:
                load_rgb(path)
        except PairedDataError as error:
            problems.append(error.problem)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            problems.append(f"{role} '{path}' cannot be decoded ({error}).")
    if len(sizes) == 2 and not _aspect_ratios_agree(sizes["image"], sizes["condition image"]):
        problems.append(
            f"aspect ratios disagree: image {sizes['image'][0]}x{sizes['image'][1]}, condition image "
            f"{sizes['condition image'][0]}x{sizes['condition image'][1]}."
        )
    return problems


def validate_paired_csv(
    csv_path: str | os.PathLike, decode: bool = True, raise_on_error: bool = False
) -> PairedCSVReport:
    """Check a whole pairs CSV up front: every row's structure, every file present and openable (fully decoded
    when `decode`, which also catches truncated files), and the aspect ratios of each pair.

    Returns:
        A :class:`PairedCSVReport` listing every problem (``report.ok`` when there are none).

    Raises:
        PairedDataError: with all problems listed, if `raise_on_error` and there are any (a missing file or a bad
            header raises in any case).
    """
    rows, problems = read_paired_csv(csv_path, on_error="skip")
    report = PairedCSVReport(os.fspath(csv_path), num_rows=len(rows) + len(problems), problems=list(problems))
    for row in rows:
        report.problems.extend((row.location, message) for message in _check_row(row, decode))
    report.problems.sort(key=lambda item: _line_number(item[0]))
    if raise_on_error:
        report.raise_if_problems()
    return report


def _line_number(location: str) -> int:
    try:
        return int(location.rsplit("line ", 1)[1])
    except (IndexError, ValueError):
        return 0


# ------------------------------------------------------------------------------------------------ dataset


class PairedDataset(torch.utils.data.Dataset):
    """Paired restoration dataset: ``(clean, degraded, prompt)`` per sample.

    Args:
        data: a pairs CSV (``image_path,condition_image_path,caption``) or a folder of clean images.
        resolution: side of the square crops; a multiple of 32 (the DC-AE downsampling factor).
        degradation: how to degrade on the fly (rows without a condition image): "random", "realesrgan",
            "realesrgan_light", any spec string such as "gaussian_noise:25", or a callable ``fn(image, rng)``
            returning an image or ``(image, records)``.
        seed: base seed of the augmentation and degradation generators.
        random_flip: horizontal flip with probability 0.5 (same draw for both images).
        center_crop: centre crops instead of random ones.
        on_error: "raise": a missing, unreadable or truncated image, a malformed row or a pair whose aspect ratios
            disagree raises :class:`PairedDataError` naming the CSV file and line. "skip": such rows are logged
            once and left out; files are checked (headers and aspect ratios) when the dataset is built, so
            :attr:`num_skipped` and :attr:`skipped` are complete except for images that are truncated (detected when
            decoded: the sample is then replaced by the next valid one and recorded in the process that found it).
        generic_prompt_probability: chance that an on-the-fly sample gets :data:`GENERIC_PROMPT` instead of a
            description of its degradations.

    Items are dicts: ``pixel_values`` (clean) and ``conditioning_pixel_values`` (degraded), float32 tensors of shape
    [3, resolution, resolution] in [-1, 1]; ``prompt`` (str); ``index`` (int); ``degradation`` (JSON list of the
    records applied on the fly, ``"[]"`` for pre-generated pairs). Batch them with :func:`collate_fn`.
    """

    def __init__(
        self,
        data: str | os.PathLike,
        resolution: int = 512,
        degradation: str | DegradationSpec | Callable[..., Any] = "random",
        seed: int = 0,
        random_flip: bool = True,
        center_crop: bool = False,
        on_error: str = "raise",
        generic_prompt_probability: float = 0.1,
    ) -> None:
        _check_on_error(on_error)
        if not isinstance(resolution, int) or resolution <= 0 or resolution % 32:
            raise ValueError(f"resolution must be a positive multiple of 32, got {resolution!r}.")
        if not 0.0 <= generic_prompt_probability <= 1.0:
            raise ValueError(f"generic_prompt_probability must be in [0, 1], got {generic_prompt_probability}.")
        data = os.fspath(data)
        self.source = data
        self.resolution = resolution
        self.seed = int(seed)
        self.random_flip = random_flip
        self.center_crop = center_crop
        self.on_error = on_error
        self.generic_prompt_probability = generic_prompt_probability
        self.degradation = degradation if isinstance(degradation, str) else getattr(degradation, "__name__", "custom")
        self._degrade = get_degradation_fn(degradation)
        self.skipped: list[tuple[str, str]] = []
        """``(location, message)`` of every row left out (on_error="skip")."""
        self._logged: set[str] = set()
        self._bad_indices: set[int] = set()
        # Shared memory, so that set_epoch reaches DataLoader workers, persistent ones included.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

        if os.path.isdir(data):
            rows = _folder_rows(data)
        elif os.path.isfile(data):
            rows, problems = read_paired_csv(data, on_error=on_error)
            for location, message in problems:
                self._skip(location, message)
        else:
            raise PairedDataError("neither a pairs CSV file nor a folder of images.", data)
        if on_error == "skip":
            checked = []
            for row in rows:
                row_problems = _check_row(row, decode=False)
                for message in row_problems:
                    self._skip(row.location, message)
                if not row_problems:
                    checked.append(row)
            rows = checked
        if not rows:
            raise PairedDataError(f"no usable pairs ({len(self.skipped)} skipped).", data)
        self.rows: list[PairRow] = rows

    # --------------------------------------------------------------------------------------- bookkeeping

    @property
    def num_skipped(self) -> int:
        """How many rows were left out (on_error="skip"); see :attr:`skipped`."""
        return len({location for location, _ in self.skipped})

    def _skip(self, location: str, message: str) -> None:
        self.skipped.append((location, message))
        if location not in self._logged:
            self._logged.add(location)
            logger.warning("skipping %s: %s", location, message)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations and degradations the next iteration draws."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def __len__(self) -> int:
        return len(self.rows)

    def sample_rngs(self, index: int) -> tuple[np.random.Generator, np.random.Generator]:
        """The (augmentation, degradation) generators of sample `index` in the current epoch."""
        epoch = self.epoch
        return (
            np.random.default_rng([self.seed, epoch, index, 0]),
            np.random.default_rng([self.seed, epoch, index, 1]),
        )

    # ------------------------------------------------------------------------------------------- loading

    def _load(self, path: str, row: PairRow, role: str) -> Image.Image:
        if not os.path.isfile(path):
            raise PairedDataError(f"{role} '{path}' does not exist.", row.location)
        try:
            return load_rgb(path)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            raise PairedDataError(f"{role} '{path}' cannot be read ({error}).", row.location) from None

    def _load_pair(self, row: PairRow) -> tuple[Image.Image, Image.Image | None]:
        clean = self._load(row.image_path, row, "image")
        if row.condition_image_path is None:
            return clean, None
        degraded = self._load(row.condition_image_path, row, "condition image")
        if not _aspect_ratios_agree(clean.size, degraded.size):
            raise PairedDataError(
                f"aspect ratios disagree: image {clean.width}x{clean.height}, condition image "
                f"{degraded.width}x{degraded.height}.",
                row.location,
            )
        if degraded.size != clean.size:
            degraded = degraded.resize(clean.size, Image.Resampling.BICUBIC)
        return clean, degraded

    def _augment(
        self, images: Sequence[Image.Image | None], rng: np.random.Generator
    ) -> list[Image.Image | None]:
        """One crop box and one flip draw, applied to every image (all of the same size)."""
        width, height = images[0].size
        short = min(width, height)
        if short < self.resolution:  # upscale so that the short side is `resolution`
            scale = self.resolution / short
            size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
            images = [None if im is None else im.resize(size, Image.Resampling.BICUBIC) for im in images]
            width, height = size
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left = int(rng.integers(0, width - self.resolution + 1))
            top = int(rng.integers(0, height - self.resolution + 1))
        flip = bool(rng.uniform() < 0.5) and self.random_flip
        box = (left, top, left + self.resolution, top + self.resolution)
        out = []
        for image in images:
            if image is not None:
                image = image.crop(box)
                if flip:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(image)
        return out

    @staticmethod
    def _to_tensor(image: Image.Image) -> torch.Tensor:
        # numpy does the arithmetic: single-threaded, so no intra-op thread pool is woken per sample
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
        return torch.from_numpy(np.ascontiguousarray(array))

    def _make_item(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        augmentation_rng, degradation_rng = self.sample_rngs(index)
        clean, degraded = self._load_pair(row)
        clean, degraded = self._augment([clean, degraded], augmentation_rng)
        if degraded is None:
            degraded, records = self._degrade(clean, degradation_rng)
            if degraded.mode != "RGB":
                degraded = degraded.convert("RGB")
            if degraded.size != clean.size:
                degraded = degraded.resize(clean.size, Image.Resampling.BICUBIC)
            prompt = row.caption or degradation_prompt(records, degradation_rng, self.generic_prompt_probability)
            record_json = records_to_json(records)
        else:
            prompt = row.caption or GENERIC_PROMPT
            record_json = "[]"
        return {
            "pixel_values": self._to_tensor(clean),
            "conditioning_pixel_values": self._to_tensor(degraded),
            "prompt": prompt,
            "index": index,
            "degradation": record_json,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} pairs.")
        index %= len(self)
        if self.on_error == "raise":
            return self._make_item(index)
        for attempt in range(len(self)):
            candidate = (index + attempt) % len(self)
            if candidate in self._bad_indices:
                continue
            try:
                return self._make_item(candidate)
            except PairedDataError as error:
                self._bad_indices.add(candidate)
                self._skip(error.location or self.rows[candidate].location, error.problem)
        raise PairedDataError(f"no readable pair left ({len(self.skipped)} problems).", self.source)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source!r}, pairs={len(self)}, resolution={self.resolution}, "
            f"degradation={self.degradation!r}, seed={self.seed}, epoch={self.epoch}, skipped={self.num_skipped})"
        )


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`PairedDataset` items: ``pixel_values`` and ``conditioning_pixel_values`` [B, 3, H, W] float32,
    ``prompt`` list[str], ``index`` int64 [B], ``degradation`` list[str] (JSON records)."""
    if not examples:
        raise ValueError("collate_fn needs at least one example.")
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "conditioning_pixel_values": torch.stack([e["conditioning_pixel_values"] for e in examples]).contiguous(),
        "prompt": [e["prompt"] for e in examples],
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.int64),
        "degradation": [e["degradation"] for e in examples],
    }


def records_from_item(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The degradation records of an item (parsed back from its JSON string)."""
    return json.loads(item["degradation"])
