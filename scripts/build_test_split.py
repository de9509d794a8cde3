#!/usr/bin/env python
"""Build the test splits: real photographs from packages that no training, validation or held-out photo comes from.

    python scripts/build_test_split.py                     # corpus/test/ and corpus/test2/ under the repository root
    python scripts/build_test_split.py --output DIR --cache DIR

Why. A test split is scored once, for a final report, and is then no longer untouched: the next recipe needs a new
one. The corpus's held-out split (`scripts/build_photo_corpus.py`, the Pillow sdist's photos) was scored while the
bundled restorer's recipe was still changing; `test` (below) was fixed on 2026-12-03 and scored for that recipe's
report, so it is now a second report too; `test2` was fixed on 2026-12-07, before any work on the next recipe, and is
scored only for that recipe's final report.

`test2`. The 7 camera photos of two Debian packages no other split uses: palapeli-data 4:22.12.3-1 (KDE's jigsaw
puzzle collection, `usr/share/palapeli/collection/*.jpg`, 1024-1620 px, from Wikimedia Commons: public domain or
GNU FDL, as each photo's `.desktop` file says) and puzzle-jigsaw 1.0.2+git20201007.527c529+dfsg-4+b1
(`usr/share/puzzle-jigsaw/samples`, two 1001 px Pexels photos, CC0-1.0 by the package's DEP-5 copyright file). They
are stored as JPEG (palapeli at about quality 90, puzzle-jigsaw at about quality 50); each is halved by 2 x 2 area
averaging like `test`, which averages away most of the compression. Every candidate of both packages is used: none
was left out.

`test`. Debian's `gcompris-qt-data` 3.1-2 (GPL-3+; each photo below is CC0-1.0 or public domain by the README that
ships beside it in the package). GCompris packs its activities' pictures into Qt binary resource files
(`usr/share/gcompris-qt/rcc/<activity>.rcc`); `read_rcc` below reads that format (version 1 to 3, uncompressed or
zlib entries). The photos are camera photos from Wikimedia Commons that GCompris downscaled to about 1024 px wide and
stored as lossy WebP; each is halved here by area averaging (2 x 2 mean), which averages away most of the WebP
compression and leaves a clean reference of about 512 x 340 px. A twelfth photo of the same licence (`erase/crab`) is
left out because GCompris sharpened it (its README says so): sharpening halos are not a clean reference.

Nothing is installed: each .deb is downloaded with `apt-get download` and unpacked with `dpkg-deb -x` through the
corpus script's pinned-archive helpers (`fetch_archive`, `unpack_archive`), and every output's pixels are checked
against the sha256 pinned in `PHOTOS` / `TEST2_PHOTOS`. Output: `<output>/<split>/<source>__<name>.png` and
`<output>/<split>.csv` (file, package, version, path inside the package, author, licence, width, height, pixels
sha256).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_photo_corpus import (  # noqa: E402 - the corpus script's pinned-archive helpers, one home for them
    DEFAULT_OUTPUT,
    Source,
    fetch_archive,
    pixels_sha256,
    rgb_png_bytes,
    to_rgb,
    unpack_archive,
)

SOURCE = Source(
    name="gcompris", kind="deb", package="gcompris-qt-data", version="3.1-2",
    archive="gcompris-qt-data_3.1-2_all.deb",
    sha256="e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f",
    roots=("usr/share/gcompris-qt/rcc",),
    licence_file="usr/share/doc/gcompris-qt-data/copyright", licence_format="dep5",
)

_ACTIVITIES = "gcompris/src/activities"

PALAPELI = Source(
    name="palapeli", kind="deb", package="palapeli-data", version="4:22.12.3-1",
    archive="palapeli-data_4%3a22.12.3-1_all.deb",
    sha256="69a15dce2ac25ed8708ac518cd0cee5f4eb0c70ed15da2fdb8899a19ac0ee058",
    roots=("usr/share/palapeli/collection",),
    # the package's DEP-5 file covers the program; each photo's licence and author are in its .desktop file
    licence_file="usr/share/doc/palapeli-data/copyright", licence_format="dep5",
)
PUZZLE_JIGSAW = Source(
    name="puzzle-jigsaw", kind="deb", package="puzzle-jigsaw", version="1.0.2+git20201007.527c529+dfsg-4+b1",
    archive="puzzle-jigsaw_1.0.2+git20201007.527c529+dfsg-4+b1_amd64.deb",
    sha256="f0c23ba52d3465c9c795ba97024b6968d4b30fbca6e886813ba216047462958e",
    roots=("usr/share/puzzle-jigsaw/samples",),
    licence_file="usr/share/doc/puzzle-jigsaw/copyright", licence_format="dep5",
)
# (source, path inside the package, author, licence as the package states it, sha256 of the halved RGB pixels)
TEST2_PHOTOS: tuple[tuple[Source, str, str, str, str], ...] = (
    (PALAPELI, "usr/share/palapeli/collection/castle-maintenon.jpg", "Eric Pouhier", "FDL",
     "bd3ea1102c3ddbf1902e65baae87c78cdd38b95e28b92c9d98ea4818e08ef005"),
    (PALAPELI, "usr/share/palapeli/collection/cincinnati-bridge.jpg", "Derek Jensen", "Public Domain",
     "a14a942a4f9f6b02478922eb4f152ddd2ebf028fd6113ffd81ec8e81a9e19923"),
    (PALAPELI, "usr/share/palapeli/collection/citrus-fruits.jpg", "US Department of Agriculture", "Public Domain",
     "26eacd0ce63e2cfe0ecd92c92e0a529bdacf9accdb33dc23b6486d26f7f54d4d"),
    (PALAPELI, "usr/share/palapeli/collection/european-honey-bee.jpg", "John Severns", "Public Domain",
     "5e80cfd74e95b14c50164e535bf9b666ce03cba15313af22cd7e0071f056c9b1"),
    (PALAPELI, "usr/share/palapeli/collection/panther-chameleon-female.jpg", "B. Navez and others", "GNU-FDL",
     "954f2ecb397128df7422ea45b62ab2daafd3b392d43e1c4291400d2e33d5540f"),
    (PUZZLE_JIGSAW, "usr/share/puzzle-jigsaw/samples/cat-animal-cat-portrait-mackerel.jpg", "Pexels", "CC0-1.0",
     "d43a8b9c01d4e446d95eccd1dc36534f251fa02de760b93e6f32285213331d79"),
    (PUZZLE_JIGSAW, "usr/share/puzzle-jigsaw/samples/pexels-photo-302304.jpeg", "Pexels", "CC0-1.0",
     "1161f5d98188fa0ea4d4fd119f3b94b8e3d7ee3f68cc7c9d9fd811e631b0197d"),
)

# (rcc bundle, path inside the bundle, author, licence, sha256 of the halved RGB pixels)
PHOTOS: tuple[tuple[str, str, str, str, str], ...] = (
    ("explore_world_music", "explore_world_music/resource/music/mexico.webp", "Elidealista", "CC0-1.0",
     "5b99bac39f545a63b9538a3d238f04939e29eb4f177f50a1b1bc7358478d49cf"),
    ("explore_world_music", "explore_world_music/resource/music/orchestra.webp", "ABC Informática", "Public Domain",
     "3fb124265c72ae6cadc9b413064d0b9f52bc43c410c00410544ce800596f51e3"),
    ("explore_world_music", "explore_world_music/resource/music/japan.webp", "takami torao", "Public Domain",
     "b5b2bc20338ce21327f45fc0f34967cf01a46fb7a473d346487d2a928a02e402"),
    ("explore_world_music", "explore_world_music/resource/music/africa.webp", "Kenneth Ritchards", "Public Domain",
     "0fe065d0be720c4762514752276b8c48128789a16dcbe6cd9f78470f4cfa472b"),
    ("explore_monuments", "explore_monuments/resource/wonders/machuPicchu.webp", "Guillaume Pascal", "CC0-1.0",
     "66c6506455efd7af3ece90b8fa66314c2fdd25828acada53203219ed87b2d68f"),
    ("explore_monuments", "explore_monuments/resource/france/montStMichel.webp", "Ali Sabbagh", "CC0-1.0",
     "c5337a7c640729862d5f4a076020cef1f482905a5f619c896ebe10062711fe8c"),
    ("explore_monuments", "explore_monuments/resource/usa/canyondeChelly.webp", "Nikater", "Public Domain",
     "6dcf7749a5876b7ceb9db87a8d647438347ddd6978042cec70312f9056d842bf"),
    ("explore_monuments", "explore_monuments/resource/germany/neuschwansteinCastle.webp", "cameralends", "CC0-1.0",
     "e55b4a8babf8b827e2c0d2167419c940409d3fd61b2acae34da1d313bf1000a5"),
    ("explore_world_animals", "explore_world_animals/resource/animals/giraffe.webp", "Mike and Lara Wolfe", "CC0-1.0",
     "d9a01b829a950c108f1a3cd238840c7c01996c7ce3c925112266378e6f16b438"),
    ("explore_world_animals", "explore_world_animals/resource/animals/panda.webp", "Jeff Kubina", "Public Domain",
     "96d640ee8f645a6a1a725c85a1ed19823beb0469d7292dd2f85d7f8fdbf038e9"),
    ("explore_world_animals", "explore_world_animals/resource/animals/scarlet_macaw.webp", "Dcoetzee", "CC0-1.0",
     "7e24da8cc60bc62448d7c84669dfacb254024abc9572aef101df2581eeba2955"),
)

CSV_COLUMNS = ("file", "package", "version", "path_in_package", "author", "licence", "width", "height",
               "pixels_sha256")


def read_rcc(data: bytes) -> dict[str, bytes]:
    """The files of a Qt binary resource (``.rcc``, format version 1 to 3) as ``{path: bytes}``.

    Layout (big-endian): the magic ``qres``, then version, tree offset, data offset and names offset (uint32 each).
    A tree node is 14 bytes (22 from version 2, which adds a modification time): name offset (uint32), flags
    (uint16: 1 = zlib-compressed, 2 = directory, 4 = zstd-compressed), then for a directory the child count and the
    first child's index, for a file the locale (uint32) and the data offset (uint32). A name is its length (uint16), a
    hash (uint32) and UTF-16-BE characters; a file's data is its length (uint32) and the bytes, which for zlib start
    with the uncompressed length (uint32).

    Raises:
        ValueError: not an rcc file, or a zstd-compressed entry (not needed here).
    """
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource file (no 'qres' magic)")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        (length,) = struct.unpack(">H", data[names + offset:names + offset + 2])
        start = names + offset + 6
        return data[start:start + 2 * length].decode("utf-16-be")

    files: dict[str, bytes] = {}
    pending = [(0, "")]
    while pending:
        index, prefix = pending.pop()
        node = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", data[node:node + 6])
        path = f"{prefix}/{name_at(name_offset)}".lstrip("/") if index else ""
        if flags & 2:
            count, first = struct.unpack(">II", data[node + 6:node + 14])
            pending.extend((child, path) for child in range(first, first + count))
            continue
        (offset,) = struct.unpack(">I", data[node + 10:node + 14])
        (size,) = struct.unpack(">I", data[payload + offset:payload + offset + 4])
        blob = data[payload + offset + 4:payload + offset + 4 + size]
        if flags & 4:
            raise ValueError(f"{path}: zstd-compressed entry")
        files[path] = zlib.decompress(blob[4:]) if flags & 1 else blob
    return files


def halve(rgb: np.ndarray) -> np.ndarray:
    """2 x 2 area average (an odd last row or column is dropped), rounded to uint8."""
    height, width = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    blocks = rgb[:height, :width].astype(np.float64).reshape(height // 2, 2, width // 2, 2, 3)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def _write_photo(folder: str, source_name: str, name: str, rgb: np.ndarray) -> str:
    target = os.path.join(folder, f"{source_name}__{name}.png")
    with open(target + ".tmp", "wb") as handle:
        handle.write(rgb_png_bytes(rgb))
    os.replace(target + ".tmp", target)
    return target


def _write_split(output: str, split_name: str, rows: list[dict], mismatched: list[str], log) -> int:
    with open(os.path.join(output, f"{split_name}.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if mismatched:
        log(f"error: {split_name}: pixels differ from the pinned ones (a different Pillow / libjpeg / libwebp?):\n  "
            + "\n  ".join(mismatched))
        return 1
    packages = sorted({f"{row['package']} {row['version']}" for row in rows})
    log(f"{os.path.join(output, split_name)}: {len(rows)} photos ({', '.join(packages)})")
    return 0


def _row(split_name: str, source: Source, file_name: str, path: str, author: str, licence: str,
         rgb: np.ndarray, digest: str) -> dict:
    return {"file": f"{split_name}/{file_name}", "package": source.package, "version": source.version,
            "path_in_package": path, "author": author, "licence": licence, "width": rgb.shape[1],
            "height": rgb.shape[0], "pixels_sha256": digest}


def build_test(output: str, cache: str, log=print) -> int:
    """`<output>/test`: the gcompris photos, read from the package's Qt resource files."""
    unpacked = unpack_archive(SOURCE, fetch_archive(SOURCE, cache), cache)
    bundles: dict[str, dict[str, bytes]] = {}
    folder = os.path.join(output, "test")
    os.makedirs(folder, exist_ok=True)
    rows, mismatched = [], []
    for bundle, path, author, licence, pinned in PHOTOS:
        if bundle not in bundles:
            with open(os.path.join(unpacked, SOURCE.roots[0], f"{bundle}.rcc"), "rb") as handle:
                bundles[bundle] = read_rcc(handle.read())
        with Image.open(io.BytesIO(bundles[bundle][f"{_ACTIVITIES}/{path}"])) as image:
            rgb = halve(to_rgb(image))
        digest = pixels_sha256(rgb)
        name = os.path.splitext(os.path.basename(path))[0]
        if pinned and digest != pinned:
            mismatched.append(f"{name}: pixels sha256 {digest}, pinned {pinned}")
        target = _write_photo(folder, SOURCE.name, name, rgb)
        rows.append(_row("test", SOURCE, os.path.basename(target), f"{SOURCE.roots[0]}/{bundle}.rcc:{_ACTIVITIES}/{path}",
                         author, licence, rgb, digest))
    return _write_split(output, "test", rows, mismatched, log)


def build_test2(output: str, cache: str, log=print) -> int:
    """`<output>/test2`: the palapeli-data and puzzle-jigsaw photos, read from the unpacked packages."""
    folder = os.path.join(output, "test2")
    os.makedirs(folder, exist_ok=True)
    unpacked: dict[str, str] = {}
    rows, mismatched = [], []
    for source, path, author, licence, pinned in TEST2_PHOTOS:
        if source.name not in unpacked:
            unpacked[source.name] = unpack_archive(source, fetch_archive(source, cache), cache)
        with Image.open(os.path.join(unpacked[source.name], path)) as image:
            rgb = halve(to_rgb(image))
        digest = pixels_sha256(rgb)
        name = os.path.splitext(os.path.basename(path))[0]
        if pinned and digest != pinned:
            mismatched.append(f"{name}: pixels sha256 {digest}, pinned {pinned}")
        target = _write_photo(folder, source.name, name, rgb)
        rows.append(_row("test2", source, os.path.basename(target), path, author, licence, rgb, digest))
    return _write_split(output, "test2", rows, mismatched, log)


def build(output: str, cache: str, log=print) -> int:
    return max(build_test(output, cache, log), build_test2(output, cache, log))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="corpus folder (default: corpus/ in the repository)")
    parser.add_argument("--cache", default=None, help="download cache (default: <output>/.downloads)")
    args = parser.parse_args(argv)
    output = os.path.abspath(args.output)
    cache = os.path.abspath(args.cache) if args.cache else os.path.join(output, ".downloads")
    try:
        return build(output, cache)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
