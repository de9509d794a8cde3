"""Offline tests of scripts/build_photo_corpus.py: the rules that need no download (near-duplicate detection,
reserved sources, the split rule, decoding conventions, licences, manifests and the record check)."""

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "build_photo_corpus.py")
_spec = importlib.util.spec_from_file_location("build_photo_corpus", SCRIPT)
corpus = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = corpus  # dataclasses look their module up there
_spec.loader.exec_module(corpus)


def synthetic_photo(seed: int, height: int = 240, width: int = 320) -> np.ndarray:
    """A photo-like uint8 (H, W, 3) image, different for every seed: coloured noise summed over octaves (most
    energy at coarse scales) under 60 flat "objects" of random size and colour, whose corners give ORB features."""
    rng = np.random.default_rng(seed)
    total = np.zeros((height, width, 3))
    for octave, cells in enumerate((3, 6, 12, 24, 48, 96)):
        noise = rng.uniform(0, 255, size=(cells, cells * width // height + 1, 3)).astype(np.uint8)
        layer = np.asarray(Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC), dtype=float)
        total += layer * 0.7 ** octave
    total = (total - total.min()) / (total.max() - total.min()) * 255
    for _ in range(60):
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        size = rng.integers(3, max(4, min(height, width) // 6), size=2)
        total[top:top + size[0], left:left + size[1]] = rng.uniform(0, 255, size=3)
    return np.round(total).astype(np.uint8)


def jpeg_copy(rgb: np.ndarray, quality: int = 80) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def resized(rgb: np.ndarray, scale: float) -> np.ndarray:
    height, width = rgb.shape[:2]
    size = (round(width * scale), round(height * scale))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))


def duplicate_pairs(images):
    return {(i, j) for i, j, _ in corpus.find_near_duplicates(images)}


# --------------------------------------------------------------------------------------------------------------------
# Near-duplicate detection


@pytest.mark.parametrize(
    "transform",
    [
        lambda x: x[:, ::-1],
        lambda x: x[::-1],
        lambda x: np.rot90(x, 1),
        lambda x: np.rot90(x, 2),
        lambda x: np.rot90(x, 3),
        lambda x: np.transpose(x, (1, 0, 2)),
        lambda x: x[..., [2, 0, 1]],
        lambda x: resized(x, 0.5),
        lambda x: resized(x, 1.6),
        lambda x: jpeg_copy(x, 60),
        lambda x: np.rot90(resized(x[..., ::-1], 0.7), 1),
    ],
    ids=["flip-lr", "flip-tb", "rot90", "rot180", "rot270", "transpose", "channels", "half", "enlarged", "jpeg",
         "combined"],
)
def test_copies_have_the_same_fingerprint(transform):
    photo = synthetic_photo(0)
    copy = np.ascontiguousarray(transform(photo))
    correlation, _ = corpus.frame_similarity(corpus.photo_fingerprint(photo), corpus.photo_fingerprint(copy))
    assert correlation >= corpus.SAME_PHOTO_CORRELATION


def test_fingerprint_of_a_channel_permutation_is_identical():
    photo = synthetic_photo(1)
    np.testing.assert_array_equal(corpus.photo_fingerprint(photo), corpus.photo_fingerprint(photo[..., [1, 2, 0]]))


def test_dihedral_variant_names_the_transform():
    photo = synthetic_photo(2, 200, 200)
    _, index = corpus.frame_similarity(corpus.photo_fingerprint(np.rot90(photo, 1)), corpus.photo_fingerprint(photo))
    assert corpus.DIHEDRAL_NAMES[index] == "rotated 90"


def test_different_photos_are_not_merged():
    photos = [synthetic_photo(seed) for seed in range(10, 16)]
    assert duplicate_pairs(photos) == set()
    for i in range(len(photos)):
        for j in range(i + 1, len(photos)):
            correlation, _ = corpus.frame_similarity(corpus.photo_fingerprint(photos[i]),
                                                     corpus.photo_fingerprint(photos[j]))
            assert correlation < corpus.SAME_PHOTO_CORRELATION


def test_stereo_pair_crop_and_padded_copy_are_one_scene():
    pytest.importorskip("cv2")
    wide = synthetic_photo(20, 240, 400)
    left, right = wide[:, :320], wide[:, 60:380]  # two views of one scene, shifted by 60 px
    crop = wide[40:220, 100:340]
    padded = np.pad(wide, ((40, 40), (0, 0), (0, 0)), constant_values=255)
    other = synthetic_photo(21, 240, 320)
    images = [left, right, crop, padded, other]
    pairs = duplicate_pairs(images)
    groups = corpus.group_duplicates(len(images), corpus.find_near_duplicates(images))
    assert groups[:4] == [0, 0, 0, 0], pairs
    assert groups[4] == 4
    assert corpus.scene_inliers(corpus.scene_features(left), corpus.scene_features(other)) == 0


def test_group_duplicates_joins_chains():
    assert corpus.group_duplicates(5, [(0, 3, ""), (3, 4, ""), (1, 2, "")]) == [0, 1, 1, 0, 0]


# --------------------------------------------------------------------------------------------------------------------
# Reserved sources


@pytest.mark.parametrize(
    "package, kind",
    [("matplotlib", "pip"), ("Matplotlib", "pip"), ("scikit-learn", "pip"), ("scikit_learn", "pip"),
     ("sklearn", "pip"), ("pyiqa", "pip"), ("python3-matplotlib", "deb"), ("python-matplotlib-data", "deb"),
     ("python3-sklearn", "deb"), ("gnome-backgrounds", "deb"), ("kde-wallpapers", "deb"),
     ("ubuntu-wallpapers-jammy", "deb"), ("xfce4-artwork-wallpapers", "deb")],
)
def test_reserved_packages_are_refused(package, kind):
    with pytest.raises(ValueError, match="reserved for independent evaluation"):
        corpus.refuse_reserved(package, kind)


@pytest.mark.parametrize("path", ["matplotlib/mpl-data/sample_data/grace_hopper.jpg",
                                  "sklearn/datasets/images/china.jpg", "pyiqa/data/sample.png"])
def test_reserved_paths_are_refused(path):
    with pytest.raises(ValueError, match="reserved for independent evaluation"):
        corpus.refuse_reserved("some-package", "pip", (path,))


def test_allowed_packages_pass_and_the_pinned_table_is_clean():
    for package, kind in [("scikit-image", "pip"), ("pillow", "pip"), ("opencv-doc", "deb"),
                          ("libjxl-testdata", "deb")]:
        corpus.refuse_reserved(package, kind)
    corpus.check_sources(corpus.SOURCES)


def test_a_reserved_source_in_the_table_is_refused():
    source = corpus.Source(name="mpl", kind="pip", package="matplotlib", version="3.9.0", archive="x.whl",
                           sha256="0" * 64, roots=("matplotlib/mpl-data/sample_data",), licence_file="METADATA")
    with pytest.raises(ValueError, match="matplotlib"):
        corpus.check_sources(corpus.SOURCES + (source,))


def test_content_exclusions_name_known_sources():
    names = {source.name for source in corpus.SOURCES}
    assert {source for source, _ in corpus.CONTENT_EXCLUSIONS} <= names
    assert all(reason.strip() for reason in corpus.CONTENT_EXCLUSIONS.values())


# --------------------------------------------------------------------------------------------------------------------
# Split rule


def make_photos(counts: dict[str, int]) -> list:
    return [corpus.Photo(source, f"photo{index:02d}", f"{source}/photo{index:02d}.jpg")
            for source, count in counts.items() for index in range(count)]


def test_split_keeps_the_held_out_package_out_of_train_and_validation():
    photos = make_photos({"pillow": 11, "opencv-doc": 28, "scikit-image": 6, "scipy": 1, "gradio": 4})
    corpus.split_photos(photos, held_out_source="pillow", n_validation=8)
    assert {p.split for p in photos if p.source == "pillow"} == {"held_out"}
    assert all(p.source == "pillow" for p in photos if p.split == "held_out")
    assert sum(p.split == "validation" for p in photos) == 8
    for source in ("opencv-doc", "scikit-image", "scipy", "gradio"):  # every training package keeps a train photo
        assert any(p.split == "train" for p in photos if p.source == source)
    corpus.check_split_sizes(photos)


def test_split_is_independent_of_input_order():
    photos = make_photos({"a": 9, "b": 17, "c": 12, "held": 7})
    corpus.split_photos(photos, held_out_source="held", n_validation=6)
    expected = {(p.source, p.name): p.split for p in photos}
    shuffled = make_photos({"a": 9, "b": 17, "c": 12, "held": 7})[::-1]
    np.random.default_rng(0).shuffle(shuffled)
    corpus.split_photos(shuffled, held_out_source="held", n_validation=6)
    assert {(p.source, p.name): p.split for p in shuffled} == expected


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match="held-out source 'pillow' contributes no photo"):
        corpus.split_photos(make_photos({"a": 40}), held_out_source="pillow")
    with pytest.raises(ValueError, match="cannot spare 8 validation photos"):
        corpus.split_photos(make_photos({"a": 1, "b": 1, "held": 6}), held_out_source="held", n_validation=8)
    small = make_photos({"a": 20, "held": 6})
    corpus.split_photos(small, held_out_source="held", n_validation=6)
    with pytest.raises(ValueError, match="train has 14 photos"):
        corpus.check_split_sizes(small)
    mixed = make_photos({"a": 40, "held": 6})
    corpus.split_photos(mixed, held_out_source="held", n_validation=6)
    mixed[0].split = "held_out"
    with pytest.raises(ValueError, match=r"\['a'\] are in held_out and in train/validation"):
        corpus.check_split_sizes(mixed)


def test_committed_record_follows_the_split_rule():
    record = corpus.load_record()
    files = list(record["photos"])
    assert record["held_out_source"] == corpus.HELD_OUT_SOURCE
    held = [f for f in files if f.startswith("held_out/")]
    others = [f for f in files if not f.startswith("held_out/")]
    assert len(held) >= corpus.MIN_HELD_OUT
    assert sum(f.startswith("validation/") for f in files) == corpus.N_VALIDATION
    assert sum(f.startswith("train/") for f in files) >= corpus.MIN_TRAIN
    assert all(f.split("/")[1].split("__")[0] == corpus.HELD_OUT_SOURCE for f in held)
    assert all(f.split("/")[1].split("__")[0] != corpus.HELD_OUT_SOURCE for f in others)


# --------------------------------------------------------------------------------------------------------------------
# Decoding conventions


def test_to_rgb_applies_exif_orientation():
    array = synthetic_photo(30, 200, 300)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", exif=exif)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        rgb = corpus.to_rgb(image)
    np.testing.assert_array_equal(rgb, np.rot90(array, -1))


def test_to_rgb_composites_alpha_over_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0  # fully transparent: white
    rgba[0, 1, 3] = 255  # opaque: the colour itself
    rgba[0, 2, 3] = 128  # half: a blend
    rgb = corpus.to_rgb(Image.fromarray(rgba, mode="RGBA"))
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert tuple(rgb[0, 0]) == (255, 255, 255)
    assert tuple(rgb[0, 1]) == (200, 0, 0)
    assert 225 <= rgb[0, 2, 0] <= 229 and 125 <= rgb[0, 2, 1] <= 129


def test_raw_array_is_read_like_scipy_face(tmp_path):
    array = synthetic_photo(31, 12, 16)
    path = tmp_path / "face.dat"
    path.write_bytes(bz2.compress(array.tobytes()))
    np.testing.assert_array_equal(corpus.read_raw_array(str(path), True, (12, 16, 3)), array)
    with pytest.raises(ValueError, match="face.dat: 576 bytes, expected 600"):
        corpus.read_raw_array(str(path), True, (10, 20, 3))


def test_technical_rules():
    photo = synthetic_photo(32, 200, 260)
    assert corpus.technical_rejection(photo) == ""
    assert corpus.technical_rejection(photo[:191]).startswith("tiny: short side 191 px")
    grey = np.repeat(photo.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    assert corpus.technical_rejection(jpeg_copy(grey)).startswith("greyscale")
    palette = np.asarray(Image.fromarray(photo).quantize(64).convert("RGB"))
    assert corpus.technical_rejection(palette).startswith("at most 256 distinct colours")


# --------------------------------------------------------------------------------------------------------------------
# Licences


def test_dep5_last_matching_stanza_wins():
    text = ("Format: https://example.invalid/dep5\n\nFiles: *\nCopyright: someone\nLicense: Apache-2.0\n\n"
            "Files: external/wesaturate/*\n       external/raw.pixls/*\nCopyright: none\nLicense: CC0\n\n"
            "License: CC0\n Creative Commons Zero\n")
    stanzas = corpus.parse_dep5(text)
    assert corpus.dep5_licence(stanzas, "jxl/flower/flower.png") == ("Apache-2.0", "*")
    assert corpus.dep5_licence(stanzas, "external/wesaturate/500px/a.png") == ("CC0", "external/wesaturate/*")
    assert corpus.dep5_licence(stanzas, "external/raw.pixls/b.png") == ("CC0", "external/raw.pixls/*")


def test_metadata_licence_prefers_expression_then_classifiers():
    assert corpus.metadata_licence("Name: a\nLicense-Expression: MIT-CMU\nLicense: long text\n\nbody") == (
        "MIT-CMU", "License-Expression")
    assert corpus.metadata_licence(
        "Name: a\nLicense: Copyright (c) someone\nClassifier: License :: OSI Approved :: BSD License\n") == (
        "BSD License", "licence classifier")
    assert corpus.metadata_licence("Name: a\nLicense: MIT\n") == ("MIT", "License")
    with pytest.raises(ValueError, match="no licence field"):
        corpus.metadata_licence("Name: a\n")


# --------------------------------------------------------------------------------------------------------------------
# Manifests, record and check


def fake_rows(photos):
    rows = []
    for index, photo in enumerate(photos):
        png = corpus.rgb_png_bytes(photo.rgb)
        rows.append({"split": photo.split, "file": photo.file, "source": photo.source, "package": photo.source,
                     "version": "1.0", "path_in_package": photo.path_in_package, "licence": "MIT",
                     "licence_source": "METADATA (License)", "sha256": hashlib.sha256(png).hexdigest(),
                     "pixels_sha256": corpus.pixels_sha256(photo.rgb), "width": photo.rgb.shape[1],
                     "height": photo.rgb.shape[0], "_png": png})
    return rows


@pytest.fixture
def small_corpus(tmp_path):
    photos = [corpus.Photo("src", f"p{i}", f"data/p{i}.jpg", synthetic_photo(40 + i, 32, 48), split)
              for i, split in enumerate(("train", "train", "validation", "held_out"))]
    rows = fake_rows(photos)
    excluded = [{"file": "src:data/logo.png", "reason": "logo (graphic)"}]
    output, record_path = str(tmp_path / "corpus"), str(tmp_path / "record.json")
    assert corpus.write_corpus(output, rows, excluded, log=lambda *_: None) == 4
    corpus.record_corpus(rows, record_path)
    return output, record_path, rows, excluded


def test_manifest_writing_is_idempotent_and_readable(small_corpus):
    output, record_path, rows, excluded = small_corpus
    manifest = os.path.join(output, "photos.csv")
    before = open(manifest, "rb").read()
    assert corpus.write_corpus(output, rows, excluded, log=lambda *_: None) == 0
    assert open(manifest, "rb").read() == before
    read = corpus.read_csv(manifest, corpus.PHOTOS_CSV_COLUMNS)
    assert [row["file"] for row in read] == [row["file"] for row in rows]
    assert read[0]["width"] == "48" and read[0]["height"] == "32"
    for row in rows:
        with Image.open(os.path.join(output, row["file"])) as image:
            assert image.mode == "RGB"
        assert corpus.sha256_file(os.path.join(output, row["file"])) == row["sha256"]
    with open(os.path.join(output, "excluded.csv"), newline="") as handle:
        assert list(csv.reader(handle)) == [["file", "reason"], ["src:data/logo.png", "logo (graphic)"]]


def test_read_csv_rejects_another_header(tmp_path):
    path = tmp_path / "photos.csv"
    path.write_text("split,file\ntrain,a.png\n")
    with pytest.raises(ValueError, match="photos.csv: header"):
        corpus.read_csv(str(path), corpus.PHOTOS_CSV_COLUMNS)


def test_png_encoding_is_deterministic_and_lossless():
    photo = synthetic_photo(50, 40, 30)
    first, second = corpus.rgb_png_bytes(photo), corpus.rgb_png_bytes(photo.copy())
    assert first == second
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(first))), photo)


def test_complete_corpus_is_recognised_and_a_missing_photo_is_not(small_corpus):
    output, record_path, rows, _ = small_corpus
    record = corpus.load_record(record_path)
    assert corpus.corpus_is_complete(output, record)
    assert corpus.check_corpus(output, record, log=lambda *_: None)
    os.remove(os.path.join(output, rows[0]["file"]))
    assert not corpus.corpus_is_complete(output, record)
    messages = []
    assert not corpus.check_corpus(output, record, log=messages.append)
    assert messages == [f"problem: {rows[0]['file']}: listed in photos.csv but missing"]


def test_check_tells_pixel_changes_from_encoder_changes(small_corpus):
    output, record_path, rows, _ = small_corpus
    record = corpus.load_record(record_path)
    reencoded = os.path.join(output, rows[1]["file"])
    Image.open(reencoded).save(reencoded, format="PNG", compress_level=1)  # same pixels, other bytes
    messages = []
    assert corpus.check_corpus(output, record, log=messages.append)
    assert f"note: {rows[1]['file']}: same pixels, different PNG bytes (another PNG encoder)" in messages
    changed = os.path.join(output, rows[2]["file"])
    pixels = np.asarray(Image.open(changed)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(changed)
    messages = []
    assert not corpus.check_corpus(output, record, log=messages.append)
    assert f"problem: {rows[2]['file']}: pixels differ from the recorded ones" in messages


def test_record_lists_every_photo_with_both_hashes(small_corpus):
    _, record_path, rows, _ = small_corpus
    with open(record_path) as handle:
        record = json.load(handle)
    assert record["photos"] == {row["file"]: {"sha256": row["sha256"], "pixels_sha256": row["pixels_sha256"]}
                                for row in rows}
    assert corpus.compare_with_record(rows, record) == ([], [])
