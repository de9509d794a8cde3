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
their pixel statistics. Files are read with :func:`diffusers_restore.image_io.load_rgb`: EXIF orientation applied,
every mode converted to 8-bit RGB (transparency over white, 16-bit scaled to 8-bit).

Randomness: the augmentation and the on-the-fly degradation of sample ``i`` in epoch ``e`` come from generators
seeded with ``(seed, e, i)``, so a run is reproducible, independent of how samples are spread over DataLoader
workers, and no two samples (or workers) share a degradation. Call :meth:`PairedDataset.set_epoch` at the start of
each epoch (before iterating the DataLoader); the epoch lives in shared memory, so persistent workers see it too.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..image_io import IMAGE_EXTENSIONS, ImageReadError, atomic_write, find_images, image_size, load_rgb
from .degradations import GENERIC_PROMPT, DegradationSpec, degradation_prompt, get_degradation_fn, records_to_json

logger = logging.getLogger(__name__)

CSV_HEADER = ("image_path", "condition_image_path", "caption")
MAX_CAPTION_CHARS = 2000
"""Longer captions are reported: SANA's text encoder reads 300 tokens (roughly 1200 characters), so a longer caption
is almost always the rows after an unclosed quote, read as one field."""
MAX_PATH_CHARS = 4096
"""Longer path fields are reported (PATH_MAX on Linux is 4096 bytes)."""
BROKEN_QUOTING = "broken quoting"
"""Start of the message of a row that runs over several lines because of a quote (see :func:`read_paired_csv`)."""

__all__ = [
    "CSV_HEADER",
    "IMAGE_EXTENSIONS",
    "MAX_CAPTION_CHARS",
    "PairRow",
    "PairedCSVReport",
    "PairedDataError",
    "PairedDataset",
    "collate_fn",
    "csv_path_field",
    "image_to_tensor",
    "read_paired_csv",
    "validate_paired_csv",
    "write_paired_csv",
]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float32 tensor of shape `(3, H, W)` in [-1, 1], the diffusers VAE convention."""
    # numpy does the arithmetic: single-threaded, so no intra-op thread pool is woken per sample
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(array))


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

_BYTE_ORDER_MARKS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


def _read_csv_text(csv_path: str) -> str:
    """The CSV's text. UTF-8 (with or without a byte-order mark) and UTF-16/UTF-32 with a byte-order mark (what
    spreadsheet programs write) are read; anything else raises :class:`PairedDataError` naming the line of the first
    byte that does not decode, instead of guessing an encoding and turning paths into other paths."""
    with open(csv_path, "rb") as handle:
        data = handle.read()
    codec, name = "utf-8", "UTF-8"
    for mark, mark_codec, mark_name in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            codec, name = mark_codec, mark_name
            break
    if codec == "utf-8" and b"\x00" in data[:4096]:
        raise PairedDataError(
            "the file holds NUL bytes: it looks like UTF-16 or UTF-32 text without a byte-order mark. Save it as "
            "UTF-8 (in Excel: 'CSV UTF-8').", f"{csv_path}, line 1"
        )
    try:
        return data.decode(codec)
    except UnicodeDecodeError as error:
        line = data[: error.start].decode(codec, errors="replace").count("\n") + 1
        raise PairedDataError(
            f"byte {data[error.start]:#04x} is not valid {name} ({error.reason}): the file is in another encoding, "
            f"probably Latin-1/Windows-1252. Save it as UTF-8 (in Excel: 'CSV UTF-8').",
            f"{csv_path}, line {line}",
        ) from None


def _field_preview(value: str, length: int = 40) -> str:
    first_line = value.splitlines()[0] if value else ""
    return repr(first_line[:length] + ("..." if len(first_line) > length or "\n" in value else ""))


def _row_problem(
    fields: list[str], first_line: int, last_line: int, allow_multiline_captions: bool
) -> str | None:
    """What is wrong with one parsed row, or None. Rows running over several lines are checked first: a quote
    that is not closed at the end of its field makes the csv module read every following line, up to the next
    quote or the end of the file, into that field."""
    names = CSV_HEADER[: len(fields)] if len(fields) <= len(CSV_HEADER) else CSV_HEADER
    if last_line > first_line:
        spanning = [name for name, value in zip(names, fields) if "\n" in value or "\r" in value]
        where = ", ".join(f"{name} {_field_preview(fields[names.index(name)])}" for name in spanning) or "a field"
        lines = f"lines {first_line}-{last_line} ({last_line - first_line + 1} lines) were read as one row"
        path_spans = any(name != "caption" for name in spanning)
        too_long = len(fields) >= 3 and len(fields[2]) > MAX_CAPTION_CHARS
        if not allow_multiline_captions or path_spans or too_long:
            return (
                f"{BROKEN_QUOTING}: {lines}, because {where} starts with a quote that is not closed on its line. "
                "Close or remove the quote (a quote inside a field is written as two quotes \"\"). "
                + ("" if path_spans or too_long else "If captions really hold line breaks, pass "
                   "allow_multiline_captions=True.")
            ).rstrip()
    if len(fields) != len(CSV_HEADER):
        return f"expected {len(CSV_HEADER)} columns ({','.join(CSV_HEADER)}), found {len(fields)}."
    if not fields[0].strip():
        return "image_path is empty."
    for name, value in zip(CSV_HEADER[:2], fields[:2]):
        if len(value) > MAX_PATH_CHARS or any(character in value for character in "\n\r\x00"):
            return f"{name} is not a file path ({len(value)} characters: {_field_preview(value)})."
    if len(fields[2]) > MAX_CAPTION_CHARS:
        return (f"the caption has {len(fields[2])} characters, more than {MAX_CAPTION_CHARS} (a text encoder reads a "
                f"few hundred tokens); an unclosed quote may have joined rows: {_field_preview(fields[2])}.")
    return None


def read_paired_csv(
    csv_path: str | os.PathLike, on_error: str = "raise", allow_multiline_captions: bool = False
) -> tuple[list[PairRow], list[tuple[str, str]]]:
    """Parse a pairs CSV: the one reader of the format (structure only; image files are not opened).

    Checked: the encoding (UTF-8, or UTF-8/16/32 with a byte-order mark; other bytes raise naming the line), the
    header ``image_path,condition_image_path,caption``, every row's column count, a non-empty ``image_path``, path
    fields that look like paths, captions of at most :data:`MAX_CAPTION_CHARS` characters, and rows that run over
    several lines. The last catch an unclosed quote: ``a.png,,"12 inch print, denoise`` makes the csv module read
    all the following lines, up to the next quote, as one caption; such a row is reported (location: the line where
    it starts) with a message starting with :data:`BROKEN_QUOTING`.

    Args:
        csv_path: the CSV file; relative image paths resolve against its folder.
        on_error: "raise" (the first problem raises :class:`PairedDataError`) or "skip" (bad rows are returned as
            problems; encoding and header problems raise in any case).
        allow_multiline_captions: accept captions that hold line breaks (valid CSV: a quoted field may span lines),
            unless they are longer than :data:`MAX_CAPTION_CHARS`. Path fields never may.

    Returns:
        ``(rows, problems)`` with problems as ``(location, message)``, locations like ``"pairs.csv, line 7"``.
    """
    _check_on_error(on_error)
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise PairedDataError("no such CSV file.", csv_path)
    root = os.path.dirname(os.path.abspath(csv_path))
    rows: list[PairRow] = []
    problems: list[tuple[str, str]] = []
    reader = csv.reader(io.StringIO(_read_csv_text(csv_path), newline=""))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
        raise PairedDataError(
            f"the header must be {','.join(CSV_HEADER)}, got {','.join(header or [])!r}.", f"{csv_path}, line 1"
        )
    while True:
        first_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            fields, message = None, f"malformed CSV ({error})."
            if "field limit" in str(error):  # a quote left open in a long file
                message = f"{BROKEN_QUOTING}: {message[:-1]}: a field starts with a quote that is not closed."
        else:
            message = None
        location = f"{csv_path}, line {first_line}"
        if fields is not None:
            if not fields:  # blank line
                continue
            message = _row_problem(fields, first_line, reader.line_num, allow_multiline_captions)
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


def csv_path_field(path: str, csv_folder: str) -> str:
    """How a pairs CSV in `csv_folder` names the file `path`: relative to the CSV, with forward slashes (absolute
    when no relative path exists, e.g. on another Windows drive)."""
    try:
        relative = os.path.relpath(path, csv_folder)
    except ValueError:  # another drive (Windows)
        return os.path.abspath(path)
    return relative.replace(os.sep, "/")


def write_paired_csv(csv_path: str | os.PathLike, rows: Sequence[Sequence[str]]) -> None:
    """Write a pairs CSV atomically (see `image_io.atomic_write`): the header, then `rows` as given
    (``(image_path, condition_image_path, caption)``, paths already as the CSV names them: see `csv_path_field`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    atomic_write(csv_path, buffer.getvalue().encode("utf-8"))


def _folder_rows(folder: str) -> list[PairRow]:
    paths = find_images(os.path.abspath(folder))
    if not paths:
        raise PairedDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found.", folder)
    return [PairRow(path, None, "", path) for path in paths]


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
    """The upright size from the image header (cheap); raises PairedDataError for missing or unidentifiable files."""
    if not os.path.isfile(path):
        raise PairedDataError(f"{role} '{path}' does not exist.")
    try:
        return image_size(path)
    except OSError as error:
        raise PairedDataError(f"{role} '{path}' cannot be read as an image ({_problem(error)})") from None


def _problem(error: OSError) -> str:
    """The message of a loading error without the path (which our messages give already)."""
    return error.problem if isinstance(error, ImageReadError) else str(error)


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
        except (OSError, ValueError) as error:
            problems.append(f"{role} '{path}' cannot be decoded ({_problem(error)})")
    if len(sizes) == 2 and not _aspect_ratios_agree(sizes["image"], sizes["condition image"]):
        problems.append(
            f"aspect ratios disagree: image {sizes['image'][0]}x{sizes['image'][1]}, condition image "
            f"{sizes['condition image'][0]}x{sizes['condition image'][1]}."
        )
    return problems


def validate_paired_csv(
    csv_path: str | os.PathLike, decode: bool = True, raise_on_error: bool = False,
    allow_multiline_captions: bool = False,
) -> PairedCSVReport:
    """Check a whole pairs CSV up front: every row's structure (see :func:`read_paired_csv`, whose
    `allow_multiline_captions` this passes on), every file present and openable (fully decoded when `decode`, which
    also catches truncated files), and the aspect ratios of each pair (EXIF orientation applied).

    Returns:
        A :class:`PairedCSVReport` listing every problem (``report.ok`` when there are none).

    Raises:
        PairedDataError: with all problems listed, if `raise_on_error` and there are any (a missing file, an
            undecodable encoding or a bad header raises in any case).
    """
    rows, problems = read_paired_csv(csv_path, on_error="skip", allow_multiline_captions=allow_multiline_captions)
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
            A CSV whose quoting is broken (a row running over several lines, see :func:`read_paired_csv`) is
            refused in both modes: the rows after an unclosed quote were read into one field and would be lost.
        generic_prompt_probability: chance that an on-the-fly sample gets :data:`GENERIC_PROMPT` instead of a
            description of its degradations.
        allow_multiline_captions: accept quoted captions that hold line breaks (see :func:`read_paired_csv`).

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
        allow_multiline_captions: bool = False,
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
            rows, problems = read_paired_csv(
                data, on_error=on_error, allow_multiline_captions=allow_multiline_captions
            )
            for location, message in problems:
                if message.startswith(BROKEN_QUOTING):
                    raise PairedDataError(message, location)
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
        except (OSError, ValueError) as error:
            raise PairedDataError(f"{role} '{path}' cannot be read ({_problem(error)})", row.location) from None

    def _load_pair(self, row: PairRow) -> tuple[Image.Image, Image.Image | None]:
        clean = self._load(row.image_path, row, "image")
        if row.condition_image_path is None:
            return clean, None
        degraded = self._load(row.condition_image_path, row, "condition image")
        return clean, match_pair_sizes(clean, degraded, row.location)

    def _make_item(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        augmentation_rng, degradation_rng = self.sample_rngs(index)
        clean, degraded = self._load_pair(row)
        return make_pair_item(
            clean, degraded, row.caption, index, augmentation_rng, degradation_rng, resolution=self.resolution,
            degrade=self._degrade, random_flip=self.random_flip, center_crop=self.center_crop,
            generic_prompt_probability=self.generic_prompt_probability,
        )

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


def augment_pair(
    images: Sequence[Image.Image | None], rng: np.random.Generator, resolution: int, random_flip: bool = True,
    center_crop: bool = False,
) -> list[Image.Image | None]:
    """One crop box and one flip draw, applied to every image (all of the same size; None entries stay None).

    An image whose short side is under `resolution` is first upscaled (bicubic) so that it is `resolution`.
    """
    width, height = images[0].size
    short = min(width, height)
    if short < resolution:  # upscale so that the short side is `resolution`
        scale = resolution / short
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        images = [None if im is None else im.resize(size, Image.Resampling.BICUBIC) for im in images]
        width, height = size
    if center_crop:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(rng.integers(0, width - resolution + 1))
        top = int(rng.integers(0, height - resolution + 1))
    flip = bool(rng.uniform() < 0.5) and random_flip
    box = (left, top, left + resolution, top + resolution)
    out = []
    for image in images:
        if image is not None:
            image = image.crop(box)
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(image)
    return out


def make_pair_item(
    clean: Image.Image,
    degraded: Image.Image | None,
    caption: str | None,
    index: int,
    augmentation_rng: np.random.Generator,
    degradation_rng: np.random.Generator,
    *,
    resolution: int,
    degrade: Callable[..., Any],
    random_flip: bool = True,
    center_crop: bool = False,
    generic_prompt_probability: float = 0.1,
) -> dict[str, Any]:
    """One training item from a loaded pair, as :class:`PairedDataset` and the streaming datasets make it.

    Both images get the same crop and flip (`augmentation_rng`); without a degraded image the crop is degraded on the
    fly by `degrade(image, rng)` (returning ``(image, records)``, see `get_degradation_fn`) with `degradation_rng`, and
    the prompt describes what was applied unless a caption is given. `degraded`, when given, has `clean`'s size.
    Returns the item dict documented on :class:`PairedDataset`.
    """
    clean, degraded = augment_pair([clean, degraded], augmentation_rng, resolution, random_flip, center_crop)
    if degraded is None:
        degraded, records = degrade(clean, degradation_rng)
        if degraded.mode != "RGB":
            degraded = degraded.convert("RGB")
        if degraded.size != clean.size:
            degraded = degraded.resize(clean.size, Image.Resampling.BICUBIC)
        prompt = caption or degradation_prompt(records, degradation_rng, generic_prompt_probability)
        record_json = records_to_json(records)
    else:
        prompt = caption or GENERIC_PROMPT
        record_json = "[]"
    return {
        "pixel_values": image_to_tensor(clean),
        "conditioning_pixel_values": image_to_tensor(degraded),
        "prompt": prompt,
        "index": index,
        "degradation": record_json,
    }


def match_pair_sizes(clean: Image.Image, degraded: Image.Image, location: str) -> Image.Image:
    """`degraded` at `clean`'s size (bicubic); `PairedDataError` at `location` when their aspect ratios disagree."""
    if not _aspect_ratios_agree(clean.size, degraded.size):
        raise PairedDataError(
            f"aspect ratios disagree: image {clean.width}x{clean.height}, condition image "
            f"{degraded.width}x{degraded.height}.",
            location,
        )
    if degraded.size != clean.size:
        degraded = degraded.resize(clean.size, Image.Resampling.BICUBIC)
    return degraded


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
