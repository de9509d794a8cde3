"""scripts/build_test_split.py: the Qt resource reader against a file written here by an independent encoder of the
documented format, the 2 x 2 area average, and the pins."""

import importlib.util
import os
import struct
import sys
import zlib

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "build_test_split.py")
_spec = importlib.util.spec_from_file_location("build_test_split", SCRIPT)
split = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = split
_spec.loader.exec_module(split)


def _rcc(tree: dict, version: int = 2) -> bytes:
    """Encode nested {name: bytes | dict} as a Qt .rcc: nodes in breadth-first order (each directory's children
    contiguous, as rcc writes them); a file whose name ends in '.z' is stored zlib-compressed."""
    names, payload, nodes = b"", b"", []
    name_offsets = {}

    def name_offset(name):
        nonlocal names
        if name not in name_offsets:
            name_offsets[name] = len(names)
            encoded = name.encode("utf-16-be")
            names += struct.pack(">HI", len(name), 0) + encoded
        return name_offsets[name]

    queue = [("", tree)]
    nodes.append(None)  # the root, filled below
    index_of = {id(tree): 0}
    while queue:
        _, folder = queue.pop(0)
        first = len(nodes)
        children = sorted(folder.items())
        for _ in children:
            nodes.append(None)
        for offset, (name, value) in enumerate(children):
            index = first + offset
            if isinstance(value, dict):
                index_of[id(value)] = index
                queue.append((name, value))
                nodes[index] = ("dir", name, value)
            else:
                blob = value
                flags = 0
                if name.endswith(".z"):
                    blob, flags = struct.pack(">I", len(value)) + zlib.compress(value), 1
                nodes[index] = ("file", name, (len(payload), flags))
                payload += struct.pack(">I", len(blob)) + blob
        parent_index = index_of[id(folder)]
        entry = nodes[parent_index]
        nodes[parent_index] = ("dir", entry[1] if entry else "", (len(children), first))
    node_size = 14 if version == 1 else 22
    packed = b""
    for kind, name, info in nodes:
        offset = name_offset(name) if name else 0
        if kind == "dir":
            count, first = info if isinstance(info, tuple) else (0, 0)
            record = struct.pack(">IHII", offset, 2, count, first)
        else:
            data_offset, flags = info
            record = struct.pack(">IHHHI", offset, flags, 0, 0, data_offset)
        packed += record + b"\0" * (node_size - len(record))
    header_size = 20
    tree_offset = header_size
    data_offset = tree_offset + len(packed)
    names_offset = data_offset + len(payload)
    return b"qres" + struct.pack(">IIII", version, tree_offset, data_offset, names_offset) + packed + payload + names


@pytest.mark.parametrize("version", [1, 2, 3])
def test_read_rcc_reads_nested_plain_and_zlib_files(version):
    tree = {"gcompris": {"a": {"photo.webp": b"\x01\x02webp", "notes.z": b"hello " * 50}, "top.bin": b"x"}}
    files = split.read_rcc(_rcc(tree, version))
    assert files == {"gcompris/a/photo.webp": b"\x01\x02webp", "gcompris/a/notes.z": b"hello " * 50,
                     "gcompris/top.bin": b"x"}


def test_read_rcc_refuses_other_files():
    with pytest.raises(ValueError, match="not a Qt resource file"):
        split.read_rcc(b"PK\x03\x04 a zip file")


def test_halve_is_the_rounded_two_by_two_mean_and_drops_an_odd_edge():
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    half = split.halve(rgb)
    assert half.shape == (2, 3, 3)
    expected = np.rint(rgb[:4, :6].astype(float).reshape(2, 2, 3, 2, 3).mean(axis=(1, 3)))
    assert np.array_equal(half, expected.astype(np.uint8))


def test_photos_are_pinned_and_never_from_reserved_or_corpus_packages():
    assert len(split.PHOTOS) >= 6
    assert all(len(pin) == 64 for *_, pin in split.PHOTOS)
    assert len({path for _, path, *_ in split.PHOTOS}) == len(split.PHOTOS)
    from build_photo_corpus import SOURCES, refuse_reserved

    assert split.SOURCE.package not in {source.package for source in SOURCES}
    refuse_reserved(split.SOURCE.package, split.SOURCE.kind)  # raises for a reserved package


def test_test2_photos_are_pinned_and_from_packages_no_other_split_uses():
    assert len(split.TEST2_PHOTOS) >= 6
    assert all(len(pin) == 64 for *_, pin in split.TEST2_PHOTOS)
    assert len({path for _, path, *_ in split.TEST2_PHOTOS}) == len(split.TEST2_PHOTOS)
    from build_photo_corpus import SOURCES, refuse_reserved

    used = {source.package for source in SOURCES} | {split.SOURCE.package}
    for source in {source for source, *_ in split.TEST2_PHOTOS}:
        assert source.package not in used
        refuse_reserved(source.package, source.kind)
