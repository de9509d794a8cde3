"""PairedDataset (CSV / folder, shared augmentation, seeding, bad data, workers) and make_pairs."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_restore.data.degradations import GENERIC_PROMPT
from diffusers_restore.data.make_pairs import main as make_pairs_main
from diffusers_restore.data.make_pairs import make_pairs
from diffusers_restore.data.paired_dataset import (
    PairedDataError,
    PairedDataset,
    collate_fn,
    read_paired_csv,
    validate_paired_csv,
)


def _photos(folder, count=4, size=(80, 72)):
    """Real photos from skimage, resized small, written as PNG; returns their file names."""
    skimage_data = pytest.importorskip("skimage.data")
    sources = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    os.makedirs(folder, exist_ok=True)
    names = []
    for number in range(count):
        name = f"photo{number}.png"
        image = Image.fromarray(sources[number % len(sources)]).resize(size, Image.Resampling.BOX)
        if number >= len(sources):
            image = image.transpose(Image.Transpose.ROTATE_180)
        image.save(os.path.join(folder, name))
        names.append(name)
    return names


def _write_csv(path, rows, header="image_path,condition_image_path,caption"):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(header + "\n" + "".join(row + "\n" for row in rows))
    return str(path)


def _hash(tensor):
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------ augmentation


def test_shared_crop_and_flip_keep_pairs_aligned(tmp_path):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 200, size=(90, 110, 3), dtype=np.uint8)
    clean[:, :, 0] = np.linspace(0, 199, 110).astype(np.uint8)  # a horizontal ramp in red shows flips
    Image.fromarray(clean).save(tmp_path / "clean.png")
    Image.fromarray(clean + 7).save(tmp_path / "degraded.png")
    csv_path = _write_csv(tmp_path / "pairs.csv", ["clean.png,degraded.png,a caption"] * 6)
    dataset = PairedDataset(csv_path, resolution=64, seed=1)
    flips, positions = set(), set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            hq, lq = item["pixel_values"], item["conditioning_pixel_values"]
            assert hq.shape == lq.shape == (3, 64, 64) and hq.dtype == torch.float32
            assert hq.min() >= -1 and lq.max() <= 1
            assert torch.allclose(lq - hq, torch.full_like(hq, 7 / 127.5), atol=1e-6)  # aligned everywhere
            ramp = hq[0, 0]
            flips.add(bool(ramp[0] > ramp[-1]))
            positions.add(_hash(hq))
            assert item["prompt"] == "a caption" and item["degradation"] == "[]"
    assert flips == {True, False} and len(positions) > 15


def test_super_resolution_pairs_small_images_and_modes(tmp_path):
    names = _photos(tmp_path, count=1, size=(128, 96))
    clean = Image.open(tmp_path / names[0])
    clean.resize((64, 48), Image.Resampling.BOX).save(tmp_path / "lq.png")  # 2x smaller LQ
    clean.resize((40, 30)).save(tmp_path / "tiny.png")  # smaller than the resolution
    clean.convert("RGBA").save(tmp_path / "rgba.png")
    clean.convert("P").save(tmp_path / "palette.png")
    Image.fromarray((np.asarray(clean.convert("L")).astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    rows = [f"{names[0]},lq.png,", "tiny.png,,", "rgba.png,,", "palette.png,palette.png,", "deep.png,,"]
    dataset = PairedDataset(_write_csv(tmp_path / "pairs.csv", rows), resolution=64, seed=0)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, 64, 64)
        assert item["pixel_values"].abs().max() <= 1
    sr = dataset[0]
    # the LQ was upsampled to the HQ size before the shared crop: the pair stays close
    assert (sr["pixel_values"] - sr["conditioning_pixel_values"]).abs().mean() < 0.1
    assert dataset[2]["prompt"]  # on the fly: a prompt from the degradations
    assert dataset[3]["prompt"] == GENERIC_PROMPT  # pre-generated pair without caption
    deep = dataset[4]["pixel_values"]
    assert deep.max() > 0.5  # 16-bit scaled to 8-bit, not clipped to black/white


def test_resolution_must_be_a_multiple_of_32(tmp_path):
    _photos(tmp_path, count=1)
    for resolution in (48, 0, 100):
        with pytest.raises(ValueError, match="multiple of 32"):
            PairedDataset(str(tmp_path), resolution=resolution)


# ------------------------------------------------------------------------------------ on-the-fly + seeds


def test_on_the_fly_degradation_is_seeded_per_sample_and_epoch(tmp_path):
    _photos(tmp_path, count=3)
    dataset = PairedDataset(str(tmp_path), resolution=64, seed=5)
    first = [dataset[i] for i in range(3)]
    again = PairedDataset(str(tmp_path), resolution=64, seed=5)
    for a, b in zip(first, [again[i] for i in range(3)]):
        assert torch.equal(a["conditioning_pixel_values"], b["conditioning_pixel_values"])
        assert a["prompt"] == b["prompt"] and a["degradation"] == b["degradation"]
    records = json.loads(first[0]["degradation"])
    assert 1 <= len(records) <= 3 and all("name" in r for r in records)
    dataset.set_epoch(1)
    assert dataset.epoch == 1
    assert not torch.equal(dataset[0]["conditioning_pixel_values"], first[0]["conditioning_pixel_values"])
    other_seed = PairedDataset(str(tmp_path), resolution=64, seed=6)
    assert not torch.equal(other_seed[0]["conditioning_pixel_values"], first[0]["conditioning_pixel_values"])


def test_degradation_choices(tmp_path):
    _photos(tmp_path, count=1)
    jpeg = PairedDataset(str(tmp_path), resolution=64, degradation="jpeg:20")[0]
    assert json.loads(jpeg["degradation"]) == [{"name": "jpeg", "params": {"quality": 20}}]
    realesrgan = PairedDataset(str(tmp_path), resolution=64, degradation="realesrgan")[0]
    assert json.loads(realesrgan["degradation"])[0]["name"] == "realesrgan"
    assert realesrgan["conditioning_pixel_values"].shape == (3, 64, 64)
    inverted = PairedDataset(str(tmp_path), resolution=64, degradation=lambda im, rng: im.point(lambda v: 255 - v))[0]
    assert torch.allclose(inverted["conditioning_pixel_values"], -inverted["pixel_values"], atol=1e-6)
    assert inverted["prompt"] == GENERIC_PROMPT
    with pytest.raises(ValueError, match="known"):
        PairedDataset(str(tmp_path), resolution=64, degradation="no_such_thing")


def test_dataloader_workers_match_single_process_and_never_repeat(tmp_path):
    _photos(tmp_path, count=8, size=(72, 64))
    dataset = PairedDataset(str(tmp_path), resolution=64, seed=3)

    def run(num_workers):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=3, num_workers=num_workers, collate_fn=collate_fn,
            persistent_workers=num_workers > 0,
        )
        epochs = []
        for epoch in (0, 1):
            dataset.set_epoch(epoch)  # reaches persistent workers through shared memory
            seen = {}
            for batch in loader:
                assert batch["pixel_values"].shape[1:] == (3, 64, 64) and batch["index"].dtype == torch.int64
                for index, lq, record in zip(batch["index"].tolist(), batch["conditioning_pixel_values"],
                                             batch["degradation"]):
                    seen[index] = (_hash(lq), record)
            epochs.append(seen)
        return epochs

    with_workers, single = run(2), run(0)
    assert with_workers == single
    for seen in with_workers:
        assert sorted(seen) == list(range(8))
        assert len({lq for lq, _ in seen.values()}) == 8  # every sample degraded differently
    assert with_workers[0] != with_workers[1]  # a new epoch draws new degradations


def test_collate_fn(tmp_path):
    _photos(tmp_path, count=2)
    dataset = PairedDataset(str(tmp_path), resolution=64)
    batch = collate_fn([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["conditioning_pixel_values"].is_contiguous()
    assert batch["index"].tolist() == [0, 1] and len(batch["prompt"]) == 2 and len(batch["degradation"]) == 2


# ---------------------------------------------------------------------------------------------- bad data


@pytest.fixture
def bad_csv(tmp_path):
    names = _photos(tmp_path, count=2, size=(64, 64))
    Image.open(tmp_path / names[0]).resize((32, 64)).save(tmp_path / "narrow.png")
    data = (tmp_path / names[1]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    rows = [
        f"{names[0]},,",  # line 2: fine
        f"{names[0]},{names[1]}",  # line 3: two columns
        "missing.png,,",  # line 4: missing file
        f"{names[0]},narrow.png,",  # line 5: aspect ratios disagree
        "truncated.png,,",  # line 6: truncated
        "text.png,,",  # line 7: not an image
        f"{names[1]},,caption",  # line 8: fine
    ]
    return _write_csv(tmp_path / "pairs.csv", rows)


def test_errors_name_the_csv_and_line(bad_csv, tmp_path):
    with pytest.raises(PairedDataError, match=r"pairs\.csv, line 3: expected 3 columns"):
        PairedDataset(bad_csv, resolution=64)
    lines = open(bad_csv).read().splitlines()
    del lines[2]  # drop the two-column row: the file rows are now checked when loaded
    no_columns_problem = _write_csv(tmp_path / "loaded.csv", lines[1:])
    dataset = PairedDataset(no_columns_problem, resolution=64)
    dataset[0]
    expectations = {1: ("line 3", "does not exist"), 2: ("line 4", "aspect ratios disagree"),
                    3: ("line 5", "cannot be read"), 4: ("line 6", "cannot be read")}
    for index, (line, message) in expectations.items():
        with pytest.raises(PairedDataError) as error:
            dataset[index]
        assert "loaded.csv, " + line in str(error.value) and message in str(error.value)
    with pytest.raises(PairedDataError, match="line 1: the header"):
        PairedDataset(_write_csv(tmp_path / "header.csv", [], header="clean,degraded"), resolution=64)


def test_skip_mode_counts_and_logs_each_bad_row_once(bad_csv, caplog):
    with caplog.at_level("WARNING"):
        dataset = PairedDataset(bad_csv, resolution=64, on_error="skip")
    # left out when built: two columns, missing, aspect, not an image (headers are checked up front)
    assert dataset.num_skipped == 4 and len(dataset) == 3
    assert {location.rsplit(" ", 1)[1] for location, _ in dataset.skipped} == {"3", "4", "5", "7"}
    # the truncated file (line 6) passes the header check and is found when decoded: replaced by the next row
    item = dataset[1]
    assert item["index"] == 2 and item["prompt"] == "caption"
    dataset[1]
    assert dataset.num_skipped == 5 and "line 6" in dataset.skipped[-1][0]
    logged = [record.getMessage() for record in caplog.records if "skipping" in record.getMessage()]
    assert len(logged) == 5 and len(set(logged)) == 5


def test_validate_paired_csv_lists_every_problem(bad_csv):
    report = validate_paired_csv(bad_csv)
    assert not report.ok and report.num_rows == 7 and report.num_valid == 2
    lines = [location.rsplit(" ", 1)[1] for location, _ in report.problems]
    assert lines == ["3", "4", "5", "6", "7"]
    with pytest.raises(PairedDataError) as error:
        validate_paired_csv(bad_csv, raise_on_error=True)
    for line in ("line 3", "line 4", "line 5", "line 6", "line 7"):
        assert line in str(error.value)
    quick = validate_paired_csv(bad_csv, decode=False)  # headers only: the truncated file is not caught
    assert [location.rsplit(" ", 1)[1] for location, _ in quick.problems] == ["3", "4", "5", "7"]


def test_unclosed_quote_in_a_caption_is_reported_not_swallowed(tmp_path):
    names = _photos(tmp_path, count=2, size=(64, 64))
    rows = [f'{names[0]},,"12 inch print, denoise'] + [f"{names[1]},,caption {i}" for i in range(1000)]
    csv_path = _write_csv(tmp_path / "pairs.csv", rows)
    # read as one row (lines 2-1002) with a 25,000-character caption: refused, naming file and line, in both modes
    for on_error in ("raise", "skip"):
        with pytest.raises(PairedDataError, match=r"pairs\.csv, line 2: broken quoting: lines 2-1002 .*caption "
                           r"'12 inch print, denoise\.\.\.' starts with a quote"):
            PairedDataset(csv_path, resolution=64, on_error=on_error)
    with pytest.raises(PairedDataError, match="line 2: broken quoting"):  # a caption this long is no caption
        PairedDataset(csv_path, resolution=64, allow_multiline_captions=True)
    report = validate_paired_csv(csv_path)
    assert not report.ok and report.problems[0][0].endswith("pairs.csv, line 2")
    assert "broken quoting" in report.problems[0][1] and "no problems" not in str(report)

    # a quote opened in a path column: never a valid row
    path_quote = _write_csv(tmp_path / "path_quote.csv", [f'"{names[0]},,a', f'{names[1]},,b"'])
    with pytest.raises(PairedDataError, match=r"line 2: broken quoting: .*image_path"):
        PairedDataset(path_quote, resolution=64, allow_multiline_captions=True)
    # a long caption on one line is reported as such
    long_caption = _write_csv(tmp_path / "long.csv", [f"{names[0]},,{'word ' * 600}"])
    assert "caption has 3000 characters" in validate_paired_csv(long_caption).problems[0][1]


def test_multiline_captions_only_with_the_flag(tmp_path):
    names = _photos(tmp_path, count=2, size=(64, 64))
    csv_path = _write_csv(tmp_path / "pairs.csv", [f'{names[0]},,"first line\nsecond line"', f"{names[1]},,next"])
    with pytest.raises(PairedDataError, match="line 2: broken quoting: lines 2-3 .*allow_multiline_captions=True"):
        PairedDataset(csv_path, resolution=64)
    dataset = PairedDataset(csv_path, resolution=64, allow_multiline_captions=True)
    assert [row.caption for row in dataset.rows] == ["first line\nsecond line", "next"]
    assert dataset.rows[1].location.endswith("line 4")  # physical line numbers
    assert validate_paired_csv(csv_path, allow_multiline_captions=True).ok


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_csv_encodings_with_a_byte_order_mark_are_read(tmp_path, encoding):
    names = _photos(tmp_path, count=1, size=(64, 64))
    text = f"image_path,condition_image_path,caption\n{names[0]},,caf\u00e9 \u65e5\u672c\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # big-endian with its mark
    (tmp_path / "pairs.csv").write_bytes(data)
    rows, problems = read_paired_csv(tmp_path / "pairs.csv")
    assert not problems and [row.caption for row in rows] == ["caf\u00e9 \u65e5\u672c"]
    assert rows[0].image_path == os.path.join(str(tmp_path), names[0])


def test_csv_in_another_encoding_is_refused_naming_the_line(tmp_path):
    names = _photos(tmp_path, count=1, size=(64, 64))
    text = f"image_path,condition_image_path,caption\n{names[0]},,plain\n{names[0]},,caf\u00e9\n"
    (tmp_path / "latin1.csv").write_bytes(text.encode("latin-1"))
    for load in (lambda path: PairedDataset(path, resolution=64, on_error="skip"), validate_paired_csv):
        with pytest.raises(PairedDataError, match=r"latin1\.csv, line 3: byte 0xe9 is not valid UTF-8 .*as UTF-8"):
            load(tmp_path / "latin1.csv")
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(PairedDataError, match=r"utf16\.csv, line 1: .*UTF-16 or UTF-32 text without a byte-order mark"):
        read_paired_csv(tmp_path / "utf16.csv")


# --------------------------------------------------------------------------------------------- make_pairs


def _digests(folder):
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def test_make_pairs_is_reproducible_parallel_and_resumable(tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos, count=3, size=(64, 64))
    os.makedirs(photos / "sub")
    Image.open(photos / "photo0.png").rotate(90).save(photos / "sub" / "extra.jpg")

    parallel = make_pairs(photos, tmp_path / "a", degradation="random", seed=2, copies=2, num_workers=2,
                          verbose=False)
    serial = make_pairs(photos, tmp_path / "b", degradation="random", seed=2, copies=2, num_workers=1,
                        verbose=False)
    assert parallel.num_written == serial.num_written == 8 and not parallel.failures
    assert _digests(tmp_path / "a" / "degraded") == _digests(tmp_path / "b" / "degraded")
    csv_text = (tmp_path / "a" / "pairs.csv").read_text()
    assert csv_text == (tmp_path / "b" / "pairs.csv").read_text()
    assert "degraded/sub/extra__1.png" in csv_text

    # the CSV feeds PairedDataset; captions come from the degradation records
    assert validate_paired_csv(tmp_path / "a" / "pairs.csv").ok
    dataset = PairedDataset(tmp_path / "a" / "pairs.csv", resolution=64)
    assert len(dataset) == 8 and all(row.caption for row in dataset.rows)
    assert dataset[0]["prompt"] == dataset.rows[0].caption

    # seeds follow file names, not order: a new photo leaves every existing output unchanged
    before = _digests(tmp_path / "b" / "degraded")
    Image.open(photos / "photo1.png").save(photos / "aaa_first.png")
    result = make_pairs(photos, tmp_path / "b", degradation="random", seed=2, copies=2, num_workers=1,
                        verbose=False)
    assert result.num_resumed == 8 and result.num_written == 2
    after = _digests(tmp_path / "b" / "degraded")
    assert all(after[name] == digest for name, digest in before.items())

    # resumable: a deleted output and a stray temporary file from an interrupted run
    os.remove(tmp_path / "a" / "degraded" / "photo1__0.png")
    (tmp_path / "a" / "degraded" / ".tmp-photo2__0.png.x1").write_bytes(b"partial")
    assert make_pairs_main(["--input-dir", str(photos), "--output-dir", str(tmp_path / "a"), "--seed", "2",
                            "--copies", "2", "--workers", "1", "--quiet"]) == 0
    assert "3 written, 7 already done" in capsys.readouterr().out
    assert not (tmp_path / "a" / "degraded" / ".tmp-photo2__0.png.x1").exists()
    assert _digests(tmp_path / "a" / "degraded")["photo1__0.png"] == after["photo1__0.png"]

    # other settings into the same folder: refused before any work, the CSV untouched
    csv_before = (tmp_path / "a" / "pairs.csv").read_text()
    assert make_pairs_main(["--input-dir", str(photos), "--output-dir", str(tmp_path / "a"), "--degradation",
                            "jpeg:20", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (tmp_path / "a" / "pairs.csv").read_text() == csv_before
    assert make_pairs_main(["--input-dir", str(photos), "--output-dir", str(tmp_path / "c"), "--degradation",
                            "nope"]) == 2
    assert "known" in capsys.readouterr().err


def test_make_pairs_does_not_take_an_earlier_runs_pairs_for_photos(tmp_path, capsys, caplog):
    photos = tmp_path / "photos"
    _photos(photos, count=2)
    first = ["--input-dir", str(photos), "--output-dir", str(photos / "pairs"), "--degradation", "jpeg:20",
             "--workers", "1", "--quiet"]
    assert make_pairs_main(first) == 0
    assert make_pairs_main(first[:3] + [str(photos / "pairs_noise"), "--degradation", "gaussian_noise:25",
                                        "--workers", "1", "--quiet"]) == 0
    rows, _ = read_paired_csv(photos / "pairs_noise" / "pairs.csv")
    assert sorted(os.path.basename(row.image_path) for row in rows) == ["photo0.png", "photo1.png"]
    assert f"skipping {photos / 'pairs' / 'degraded'}: sana-restore wrote it" in caplog.text
    # the degraded folder given as the input itself is read
    assert make_pairs_main(["--input-dir", str(photos / "pairs" / "degraded"), "--output-dir", str(tmp_path / "again"),
                            "--degradation", "jpeg:20", "--workers", "1", "--quiet"]) == 0
    assert len(read_paired_csv(tmp_path / "again" / "pairs.csv")[0]) == 2


def test_make_pairs_says_it_refuses_an_animated_file(tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, count=1)
    frames = [Image.new("RGB", (32, 24), (80 * index, 40, 90)) for index in range(3)]
    frames[0].save(photos / "clip.gif", save_all=True, append_images=frames[1:])
    result = make_pairs(photos, tmp_path / "pairs", degradation="jpeg:20", num_workers=1, verbose=False)
    assert result.num_written == 1
    assert [(os.path.basename(path), reason) for path, reason in result.failures] == [
        ("clip.gif", "holds 3 frames (an animated or multi-page GIF file); only single images are read: save the "
                     "frames you want as separate image files.")]


def test_make_pairs_redoes_pairs_whose_photo_changed(tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos, count=3, size=(64, 64))
    arguments = ["--input-dir", str(photos), "--output-dir", str(tmp_path / "out"), "--degradation",
                 "gaussian_noise:20", "--workers", "1", "--quiet"]
    assert make_pairs_main(arguments) == 0
    before = _digests(tmp_path / "out" / "degraded")
    kept_stats = {name: os.stat(tmp_path / "out" / "degraded" / name).st_mtime_ns for name in before}

    # photo1 replaced under the same name (and its modification time set back: only the content tells)
    old_stat = os.stat(photos / "photo1.png")
    replacement = np.asarray(Image.open(photos / "photo1.png"))[::-1].copy()  # upside down
    Image.fromarray(replacement).save(photos / "photo1.png")
    os.utime(photos / "photo1.png", ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
    os.utime(photos / "photo2.png")  # touched, content unchanged: kept
    capsys.readouterr()
    assert make_pairs_main(arguments) == 0
    assert "1 written (1 redone: their photo changed), 2 already done" in capsys.readouterr().out
    after = _digests(tmp_path / "out" / "degraded")
    assert after["photo1.png"] != before["photo1.png"]
    for name in ("photo0.png", "photo2.png"):  # byte-identical, not even rewritten
        assert after[name] == before[name]
        assert os.stat(tmp_path / "out" / "degraded" / name).st_mtime_ns == kept_stats[name]
    # the redone pair is what a fresh run on the new photo makes
    fresh = tmp_path / "fresh"
    os.makedirs(fresh)
    Image.fromarray(replacement).save(fresh / "photo1.png")
    make_pairs(fresh, tmp_path / "fresh_out", degradation="gaussian_noise:20", num_workers=1, verbose=False)
    assert _digests(tmp_path / "fresh_out" / "degraded")["photo1.png"] == after["photo1.png"]


def test_make_pairs_names_a_damaged_settings_file(tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos, count=1, size=(64, 64))
    arguments = ["--input-dir", str(photos), "--output-dir", str(tmp_path / "out"), "--workers", "1", "--quiet"]
    assert make_pairs_main(arguments) == 0
    (tmp_path / "out" / "make_pairs.json").write_text("")
    assert make_pairs_main(arguments) == 2
    error = capsys.readouterr().err
    assert "make_pairs.json is not valid JSON (it is empty)" in error and "Delete it and run again" in error
    os.remove(tmp_path / "out" / "make_pairs.json")
    assert make_pairs_main(arguments) == 0
    assert "0 written, 1 already done" in capsys.readouterr().out


def test_make_pairs_super_resolution_mode(tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos, count=2, size=(80, 72))
    Image.new("RGB", (40, 40)).save(photos / "small.png")  # too small for 32 px HQ crops: fails, is left out

    result = make_pairs(photos, tmp_path / "sr", degradation="none", seed=1, num_workers=1, verbose=False,
                        sr_crop=32)
    assert result.num_written == 2 and [os.path.basename(p) for p, _ in result.failures] == ["small.png"]
    rows = (tmp_path / "sr" / "pairs.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:2] for row in rows] == [
        ["hq/photo0.png", "degraded/photo0.png"], ["hq/photo1.png", "degraded/photo1.png"]]
    for index in range(2):
        hq = Image.open(tmp_path / "sr" / "hq" / f"photo{index}.png")
        lq = Image.open(tmp_path / "sr" / "degraded" / f"photo{index}.png")
        assert hq.size == (32, 32) and lq.size == (16, 16)
        # LQ = HQ area-downsampled 0.5x (2x2 box means), nothing else with degradation "none"
        expected = np.asarray(hq, dtype=np.float64).reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
        assert np.abs(np.asarray(lq, dtype=np.float64) - expected).max() <= 1.0
    dataset = PairedDataset(tmp_path / "sr" / "pairs.csv", resolution=32)
    item = dataset[0]
    assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, 32, 32)

    # a rerun resumes; with a degradation on top, the LQ differs from the plain downsample
    again = make_pairs(photos, tmp_path / "sr", degradation="none", seed=1, num_workers=1, verbose=False, sr_crop=32)
    assert again.num_resumed == 2 and again.num_written == 0
    noisy = make_pairs(photos, tmp_path / "sr_noisy", degradation="gaussian_noise:25", seed=1, num_workers=1,
                       verbose=False, sr_crop=32)
    assert noisy.num_written == 2
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "sr_noisy" / "degraded" / "photo0.png")),
                              np.asarray(Image.open(tmp_path / "sr" / "degraded" / "photo0.png")))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sr_noisy" / "hq" / "photo0.png")),
                          np.asarray(Image.open(tmp_path / "sr" / "hq" / "photo0.png")))  # same seed, same crop

    with pytest.raises(ValueError, match="sr_crop"):
        make_pairs(photos, tmp_path / "x", degradation="none", verbose=False)
    with pytest.raises(ValueError, match="even"):
        make_pairs(photos, tmp_path / "y", degradation="none", verbose=False, sr_crop=33)
    assert make_pairs_main(["--input-dir", str(photos), "--output-dir", str(tmp_path / "cli"), "--sr-crop", "32",
                            "--degradation", "none", "--workers", "1", "--quiet"]) == 1  # small.png failed
    assert (tmp_path / "cli" / "hq" / "photo1.png").is_file()
