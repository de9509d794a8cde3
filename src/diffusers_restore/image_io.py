"""Image files in and out: the one folder walker, loader, RGB conversion and atomic writer of the package.

Used by the training data tools (``diffusers_restore.data``) and by the command line (``sana-restore restore`` and
``evaluate``), so it imports only the standard library, numpy and PIL: no torch, nothing from ``data/``.

* :func:`find_images`: every image under a folder, recursively, in a deterministic order, leaving out (with a
  logged line) broken links and the folders this package wrote (:func:`mark_output_folder`).
* :func:`load_image`: open and fully decode a file, apply its EXIF orientation, keep its ICC profile; a damaged file
  raises :class:`ImageReadError` naming the file (and saying "truncated" when it is), and so does a file holding
  several frames (an animation or a multi-page TIFF): no reader silently takes its first frame.
* :func:`to_rgb` / :func:`load_rgb`: the one conversion of any PIL mode to 8-bit RGB; :func:`high_bit_to_unit`: the
  one rule for 16-bit, 32-bit integer and float grey images (which the pipeline uses too).
* :func:`save_image`: write an image atomically, format from the extension, ICC profile embedded where the format
  can hold one.
* :func:`atomic_write`, :func:`atomic_write_json`, :func:`read_json`, :func:`sha256_file`,
  :func:`remove_stray_temp_files`: the file helpers behind them, shared with the pair generator and the latent cache.

Atomic writes: data goes to a temporary file in the destination's folder (named ``.tmp-<name>.<random>``), is
flushed to disk, then renamed over the destination, so a file under its final name is always complete; an
interrupted write leaves at most a stray temporary file, which :func:`find_images` never lists and
:func:`remove_stray_temp_files` deletes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import struct
import tempfile
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
"""File name endings :func:`find_images` lists (compared case-insensitively)."""

TEMP_PREFIX = ".tmp-"
"""Name prefix of the temporary files of :func:`atomic_write`."""

ICC_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF")
"""PIL formats in which :func:`save_image` embeds an ICC profile."""

OUTPUT_MARKER = ".sana-restore-output"
"""The file that marks a folder this package wrote (see :func:`mark_output_folder`)."""

__all__ = [
    "HIGH_BIT_MODES",
    "ICC_FORMATS",
    "IMAGE_EXTENSIONS",
    "OUTPUT_MARKER",
    "TEMP_PREFIX",
    "ImageReadError",
    "atomic_write",
    "atomic_write_json",
    "find_images",
    "high_bit_to_uint8",
    "high_bit_to_unit",
    "icc_colour_space",
    "image_size",
    "is_same_file",
    "load_image",
    "mark_output_folder",
    "load_rgb",
    "read_json",
    "remove_stray_temp_files",
    "save_image",
    "sha256_file",
    "to_rgb",
]


class ImageReadError(OSError):
    """An image file that exists but cannot be decoded (truncated, damaged, or not an image).

    Attributes:
        path: the file.
        problem: what is wrong, without the path.
    """

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# ------------------------------------------------------------------------------------------------ files


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import (os.umask can only be read by setting it, which is not safe while other threads create files).
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` through a temporary file in the same folder, then rename it into place.

    The folder is created if needed. The file gets the permissions a plain ``open(path, "wb")`` would give (the
    process umask applied to 0o666), not the private 0o600 of a temporary file.

    Args:
        path: the destination; replaced if it exists.
        data: the whole content.
        fsync: flush the data to disk before the rename, so that even a power cut leaves the old or the new
            content, never a partial file.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}.", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.chmod(temp_path, _FILE_MODE)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int | None = 1) -> None:
    """:func:`atomic_write` of ``json.dumps(payload, indent=indent, sort_keys=True)`` plus a newline (UTF-8)."""
    atomic_write(path, (json.dumps(payload, indent=indent, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike, what_to_do: str = "") -> Any:
    """Parse a JSON file; a damaged one raises ``ValueError`` naming the file, the position and `what_to_do`.

    Args:
        path: the file.
        what_to_do: appended to the error message (e.g. "delete it and run the command again").

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not UTF-8 JSON (empty, cut short, or hand-edited into something else).
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:
        data = handle.read()
    suffix = f" {what_to_do}" if what_to_do else ""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}).{suffix}") from None
    except json.JSONDecodeError as error:
        problem = "it is empty" if not data.strip() else f"{error.msg} at line {error.lineno} column {error.colno}"
        raise ValueError(f"{path} is not valid JSON ({problem}).{suffix}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stray_temp_files(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls left in `folder` (and below it if
    `recursive`), logging each one. Returns their paths."""
    folder = os.fspath(folder)
    removed = []
    walk = os.walk(folder) if recursive else [(folder, [], os.listdir(folder))]
    for directory, _, names in walk:
        for name in names:
            path = os.path.join(directory, name)
            if name.startswith(TEMP_PREFIX) and os.path.isfile(path):
                logger.warning("removing %s, left by an interrupted write", path)
                os.remove(path)
                removed.append(path)
    return removed


def is_same_file(path_a: str | os.PathLike, path_b: str | os.PathLike) -> bool:
    """True when both paths name the same file: same inode when both exist (hard links, symlinks, case-insensitive
    file systems), else the same resolved path."""
    try:
        return os.path.samefile(path_a, path_b)
    except OSError:  # one of them does not exist yet
        return os.path.normcase(os.path.realpath(path_a)) == os.path.normcase(os.path.realpath(path_b))


def mark_output_folder(folder: str | os.PathLike, command: str) -> None:
    """Mark `folder` as written by ``sana-restore `command```: a small :data:`OUTPUT_MARKER` file in it, so that
    :func:`find_images` leaves the folder out when it lies inside a folder given as input (a rerun does not take
    earlier outputs for photos), while the folder itself given as the input is still read."""
    path = os.path.join(os.fspath(folder), OUTPUT_MARKER)
    if not os.path.isfile(path):
        text = (f"Written by `sana-restore {command}`. Folders holding this file are skipped when they lie inside an "
                "input folder of sana-restore; pass the folder itself as the input to read it.\n")
        atomic_write(path, text.encode("utf-8"), fsync=False)


def find_images(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Every image file under `root`, recursively, sorted by relative path.

    * Images are files whose name ends with one of :data:`IMAGE_EXTENSIONS`, in any letter case.
    * Hidden files and folders (names starting with ``.``) are skipped: temporary files of :func:`atomic_write`,
      macOS ``._name.jpg`` resource forks, ``.ipynb_checkpoints`` copies.
    * Folders in `exclude` (and everything below them) are skipped, e.g. the output folder of a tool that writes
      next to its inputs. Compared after resolving symbolic links.
    * Folders below `root` that this package wrote (they hold :data:`OUTPUT_MARKER`) are skipped with a logged
      warning; `root` itself is always searched.
    * Symbolic links to files are listed; links to folders are not followed (no loops); broken links are skipped
      with a logged warning.
    * The order depends only on the names (not on the file system), so runs are reproducible.

    Args:
        root: the folder.
        exclude: folders to leave out.

    Returns:
        Paths ``os.path.join(root, relative path)`` (absolute when `root` is); ``[]`` when there are none.

    Raises:
        NotADirectoryError: `root` is not a folder.
        OSError: a sub-folder cannot be listed (it is not skipped silently).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"'{root}' is not a folder.")
    excluded = {os.path.realpath(os.fspath(folder)) for folder in exclude}

    def raise_error(error: OSError) -> None:
        raise error

    relative_paths = []
    for directory, subdirectories, names in os.walk(root, onerror=raise_error):
        kept = []
        for name in sorted(subdirectories):
            path = os.path.join(directory, name)
            if name.startswith(".") or os.path.realpath(path) in excluded:
                continue
            if os.path.isfile(os.path.join(path, OUTPUT_MARKER)):
                logger.warning("skipping %s: sana-restore wrote it (it holds %s); pass it as the input to read it.",
                               path, OUTPUT_MARKER)
                continue
            kept.append(name)
        subdirectories[:] = kept
        relative_directory = os.path.relpath(directory, root)
        for name in names:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            if not os.path.exists(os.path.join(directory, name)):
                logger.warning("skipping %s: a broken symbolic link.", os.path.join(directory, name))
                continue
            relative = name if relative_directory == os.curdir else os.path.join(relative_directory, name)
            relative_paths.append(relative)
    relative_paths.sort(key=lambda relative: relative.replace(os.sep, "/").split("/"))
    return [os.path.join(root, relative) for relative in relative_paths]


# ----------------------------------------------------------------------------------------------- reading


def _read_error(path: str, error: BaseException) -> ImageReadError:
    message = str(error)
    if isinstance(error, Image.DecompressionBombError):
        return ImageReadError(path, f"the image is too large to decode safely ({message}).")
    if isinstance(error, UnidentifiedImageError):
        return ImageReadError(path, "cannot identify image file: not an image, or a format PIL cannot read.")
    if "truncated" in message.lower() or isinstance(error, EOFError):
        detail = "" if message == "image file is truncated" else f" ({message})"
        return ImageReadError(path, f"image file is truncated{detail}: the file was cut short; copy it again.")
    return ImageReadError(path, f"cannot decode the image, the file is damaged ({type(error).__name__}: {message}).")


def load_image(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """Open an image file and decode it completely.

    * The file is read to the end here, so a truncated file fails now, not in the middle of a training step.
    * With `exif_transpose`, the EXIF orientation is applied (a portrait phone photo comes out upright) and the
      orientation tag is removed, so that the returned pixels are what a viewer shows and nothing rotates them twice.
    * The ICC profile, if any, stays in ``image.info["icc_profile"]`` (bytes); pixels are not colour converted.
    * The mode is the file's own ("RGB", "L", "RGBA", "P", "I;16", "CMYK", ...): convert with :func:`to_rgb`, or use
      :func:`load_rgb`.
    * A file holding several frames (an animated GIF, PNG or WebP, a multi-page TIFF) is refused: restoring or
      training on its first frame alone would silently drop the others. (A camera's MPO JPEG, whose first frame is
      the photo and the others previews, is read as its first frame.)

    Args:
        path: the image file.
        exif_transpose: apply the EXIF orientation.

    Returns:
        The image, detached from the file (the file is closed).

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: the path cannot be opened (the message names it).
        ImageReadError: the file is not an image PIL can read, is truncated ("image file is truncated") or damaged,
            holds several frames, or is too large to decode safely. Subclass of ``OSError``; the message starts with
            the path.
    """
    path = os.fspath(path)
    return _decode(path, path, exif_transpose)


def decode_rgb(data: bytes, name: str, exif_transpose: bool = True) -> Image.Image:
    """:func:`load_rgb` for an encoded image held in memory (e.g. a member of a tar shard); `name` is what an
    `ImageReadError` names (e.g. ``"pairs-000003.tar:000000042.clean.png"``)."""
    return to_rgb(_decode(io.BytesIO(data), name, exif_transpose))


def _check_single_frame(image: Image.Image, name: str) -> None:
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        raise ImageReadError(name, f"holds {frames} frames (an animated or multi-page {image.format} file); only "
                                   "single images are read: save the frames you want as separate image files.")


def _decode(source: Any, name: str, exif_transpose: bool) -> Image.Image:
    try:
        with Image.open(source) as image:
            _check_single_frame(image, name)
            image.load()
            if exif_transpose:
                ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to rotate
            return image
    except (FileNotFoundError, PermissionError, IsADirectoryError, ImageReadError):
        raise
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as error:
        raise _read_error(name, error) from None


_ORIENTATION_TAG = 0x0112
_ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)  # transpose, rotate 270, transverse, rotate 90


def image_size(path: str | os.PathLike, exif_transpose: bool = True) -> tuple[int, int]:
    """``(width, height)`` of an image file as :func:`load_image` would return it, from the file's header only
    (no decoding): with `exif_transpose`, width and height are swapped for the EXIF orientations 5 to 8. (A PNG
    whose EXIF chunk comes after the pixel data, which is rare, is measured without its orientation.)

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: the path cannot be opened.
        ImageReadError: the file is not an image PIL can read.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            _check_single_frame(image, path)
            width, height = image.size
            # PIL's PNG reader decodes the whole file to look for an eXIf chunk after the pixel data; one before it
            # (where writers normally put it) is in image.info already.
            header_only = image.format != "PNG" or "exif" in image.info
            orientation = image.getexif().get(_ORIENTATION_TAG, 1) if exif_transpose and header_only else 1
    except (FileNotFoundError, PermissionError, IsADirectoryError, ImageReadError):
        raise
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as error:
        raise _read_error(path, error) from None
    return (height, width) if orientation in _ORIENTATIONS_SWAPPING_SIDES else (width, height)


def icc_colour_space(profile: bytes | None) -> str | None:
    """The data colour space an ICC profile describes, from its header (bytes 16-19): "RGB", "GRAY", "CMYK",
    "Lab", ...; ``None`` for no profile or bytes too short to be one."""
    if not profile or len(profile) < 20:
        return None
    return profile[16:20].decode("latin-1").strip()


_COLOUR_SPACE_OF_MODE = {"RGB": "RGB", "RGBA": "RGB", "RGBX": "RGB", "P": "RGB", "PA": "RGB",
                         "L": "GRAY", "LA": "GRAY", "1": "GRAY", "I;16": "GRAY", "I": "GRAY", "CMYK": "CMYK",
                         "LAB": "Lab"}


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""PIL modes of one grey channel with more than 8 bits (integer or float), read by :func:`high_bit_to_unit`."""


def high_bit_to_unit(image: Image.Image) -> np.ndarray:
    """The grey levels of a :data:`HIGH_BIT_MODES` image as float32 [H, W] in [0, 1]: the package's one rule for these
    modes, used by every entry point (the pipeline's image argument, the CLI, the app, the datasets, make-pairs).

    * ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: 16-bit, ``value / 65535``.
    * ``I`` (32-bit integer): 16-bit (``value / 65535``) when any value exceeds 255, else 8-bit (``value / 255``).
    * ``F`` (32-bit float): the smallest of the ranges [0, 1], [0, 255] and [0, 65535] that holds every value, scaled
      to [0, 1] (so a [0, 1] float image is taken as it is).

    Raises:
        ValueError: an ``I`` or ``F`` image with a negative, non-finite or above-65535 value (no range fits it).
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode.startswith("I;16"):
        return values / 65535.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
        raise ValueError(
            f"a mode {image.mode} image has values in [{low:g}, {high:g}]; mode {image.mode} images must hold values "
            "in [0, 65535] (their scale, 0-1, 0-255 or 0-65535, is read from their largest value)."
        )
    ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
    return values / next(full for full in ranges if high <= full)


def high_bit_to_uint8(image: Image.Image) -> np.ndarray:
    """8-bit [H, W] uint8 array of a :data:`HIGH_BIT_MODES` image, by :func:`high_bit_to_unit`'s rule."""
    return np.rint(high_bit_to_unit(image) * 255.0).astype(np.uint8)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, deliberately.

    * ``RGB``: returned as is. ``L``/``1``/``CMYK``/``YCbCr``/...: PIL's conversion.
    * Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent index): composited over `background`
      (white by default), so that what hides under transparent pixels never shows.
    * 16-bit, 32-bit integer and float greyscale (:data:`HIGH_BIT_MODES`): :func:`high_bit_to_unit`'s rule.
    * ICC profile: kept in ``info["icc_profile"]`` when it describes RGB data (the pixels keep their meaning), dropped
      when it describes another colour space (a grey or CMYK profile would mislabel RGB pixels).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}.")
    mode = image.mode
    if mode == "RGB":
        return image
    profile = image.info.get("icc_profile")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        converted = Image.new("RGB", rgba.size, background)
        converted.paste(rgba, mask=rgba.getchannel("A"))
    elif mode in HIGH_BIT_MODES:
        converted = Image.fromarray(high_bit_to_uint8(image)).convert("RGB")
    else:
        converted = image.convert("RGB")
    converted.info.pop("icc_profile", None)
    if icc_colour_space(profile) == "RGB":
        converted.info["icc_profile"] = profile
    return converted


def load_rgb(path: str | os.PathLike, exif_transpose: bool = True) -> Image.Image:
    """:func:`load_image` then :func:`to_rgb`: the file as an upright 8-bit RGB image."""
    return to_rgb(load_image(path, exif_transpose=exif_transpose))


# ----------------------------------------------------------------------------------------------- writing


def _format_for(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"cannot tell the image format of '{path}' from its extension {extension!r}; use one of "
                         f"{', '.join(IMAGE_EXTENSIONS)}.")
    return image_format


def save_image(
    image: Image.Image,
    path: str | os.PathLike,
    icc_profile: bytes | None = None,
    protected_paths: Iterable[str | os.PathLike] = (),
    **save_options: Any,
) -> None:
    """Write `image` to `path` atomically (see :func:`atomic_write`), in the format its extension names.

    The image is encoded in memory first, so an encoding error leaves no file behind and an existing file at
    `path` unchanged.

    Args:
        image: the image; its mode must suit the format (e.g. JPEG takes no alpha: convert with :func:`to_rgb`).
        path: the destination (".png", ".jpg", ".webp", ".tif", ... in any letter case); replaced if it exists.
        icc_profile: ICC profile to embed; default: the image's own ``info["icc_profile"]``, if any. Embedded in
            the formats of :data:`ICC_FORMATS`; for other formats (BMP, ...) it is left out with a logged warning,
            as is a profile whose colour space does not match the image mode (a grey profile on an RGB image).
        protected_paths: files that must not be replaced, typically the inputs of the command; `path` naming one of
            them (by any name, see :func:`is_same_file`) raises ``FileExistsError`` before anything is written.
        **save_options: passed to ``PIL.Image.Image.save`` (e.g. ``quality=95`` for JPEG/WebP, ``compress_level``
            for PNG).

    Raises:
        ValueError: unknown extension, or PIL cannot write this image in that format (the message names `path`).
        FileExistsError: `path` is one of `protected_paths`.
    """
    path = os.fspath(path)
    for protected in protected_paths:
        if is_same_file(path, protected):
            raise FileExistsError(f"refusing to write '{path}': it is the input '{os.fspath(protected)}'.")
    image_format = _format_for(path)
    profile = image.info.get("icc_profile") if icc_profile is None else icc_profile
    options = dict(save_options)
    if profile:
        profile_space, image_space = icc_colour_space(profile), _COLOUR_SPACE_OF_MODE.get(image.mode)
        if image_format not in ICC_FORMATS:
            logger.warning("%s: the %s format cannot hold an ICC profile; written without it.", path, image_format)
            profile = None
        elif profile_space != image_space:
            logger.warning("%s: the ICC profile describes %s data, the image is %s; written without it.",
                           path, profile_space, image.mode)
            profile = None
    if image_format in ICC_FORMATS:
        options["icc_profile"] = profile or None  # None: PIL must not take a profile from image.info either
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=image_format, **options)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot write '{path}' as {image_format}: {error}") from None
    atomic_write(path, buffer.getvalue())
