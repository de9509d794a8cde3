# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Streaming pairs: tar shards (write, read, pattern), the split across processes and dataloader workers, the
endless-stream policy for uneven shards, exact resumption, 🤗 datasets streaming on local files, make-pairs --shards."""

import importlib
import itertools
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_restore.data.paired_dataset import PairedDataError, PairedDataset, PairRow, read_paired_csv
from diffusers_restore.data.streaming import (
    StreamingPairDataset,
    expand_shard_pattern,
    read_shard,
    write_pair_shards,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Seven random 48 x 64 RGB images with captions 'pair <i>', the last two with a degraded copy."""
    root = tmp_path_factory.mktemp("stream-photos")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(7):
        path = root / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        degraded = None
        if index >= 5:
            degraded = root / f"{index}_lq.png"
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(degraded)
            degraded = str(degraded)
        rows.append(PairRow(str(path), degraded, f"pair {index}", str(path)))
    return root, rows


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory):
    _, rows = photos
    return write_pair_shards(rows, tmp_path_factory.mktemp("shards"), 3)


def _prompts(dataset, count):
    return [item["prompt"] for item in itertools.islice(iter(dataset), count)]


def _stream(shards, **kwargs):
    kwargs = {"resolution": 32, "degradation": "gaussian_noise:25", "shuffle_buffer": 3, **kwargs}
    return StreamingPairDataset(shards=shards, **kwargs)


def test_shards_round_trip_the_pairs(photos, shards):
    _, rows = photos
    assert [os.path.basename(path) for path in shards] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    samples = [sample for path in shards for sample in read_shard(path)]
    assert sorted(len(list(read_shard(path))) for path in shards) == [2, 2, 3]  # sizes differ by at most one pair
    by_caption = {sample["caption"]: sample for sample in samples}
    assert set(by_caption) == {row.caption for row in rows}
    for row in rows:
        sample = by_caption[row.caption]
        with open(row.image_path, "rb") as handle:
            assert sample["clean"] == handle.read()  # the file's own bytes, not re-encoded
        if row.condition_image_path:
            with open(row.condition_image_path, "rb") as handle:
                assert sample["degraded"] == handle.read()
        else:
            assert sample["degraded"] is None
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_pair_shards(rows, os.path.dirname(shards[0]), 3)
    with pytest.raises(ValueError, match="8 shards for 7 pairs"):
        write_pair_shards(rows, os.path.dirname(shards[0]) + "-more", 8)


def test_shard_pattern(shards, tmp_path):
    folder = os.path.dirname(shards[0])
    assert expand_shard_pattern(os.path.join(folder, "pairs-{000000..000002}.tar")) == shards
    assert expand_shard_pattern(f"{shards[2]},{shards[0]}") == [shards[2], shards[0]]
    with pytest.raises(FileNotFoundError, match="1 of 4 shards do not exist"):
        expand_shard_pattern(os.path.join(folder, "pairs-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="empty"):
        expand_shard_pattern(os.path.join(folder, "pairs-{000002..000001}.tar"))


def test_a_sample_without_a_clean_image_names_shard_and_key(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("000000007.txt")
        info.size = 0
        archive.addfile(info)
    with pytest.raises(PairedDataError, match=r"bad\.tar:000000007.*no '<key>\.clean"):
        list(read_shard(str(path)))


def test_processes_split_the_shards_without_duplicates_and_loop_when_uneven(shards):
    """Process 0 reads shards 0 and 2 (5 pairs), process 1 shard 1 (2 pairs): one pass of each covers every pair
    exactly once; the smaller part then starts its next pass instead of running dry."""
    first = _prompts(_stream(shards, process_index=0, num_processes=2), 5)
    second = _prompts(_stream(shards, process_index=1, num_processes=2), 2)
    assert sorted(first + second) == sorted(f"pair {i}" for i in range(7))
    assert not set(first) & set(second)
    longer = _prompts(_stream(shards, process_index=1, num_processes=2), 9)  # far past its 2 pairs
    assert set(longer) == set(second) and len(longer) == 9
    # the stream is reproducible, and a new pass is reshuffled
    again = _prompts(_stream(shards, process_index=0, num_processes=2), 15)
    assert again[:5] == first
    assert sorted(again[5:10]) == sorted(first)


def test_dataloader_workers_are_readers_too(shards):
    """2 processes x 2 workers would need 4 shards: refused with the counts; 1 process x 2 workers splits 3 shards."""
    with pytest.raises(ValueError, match=r"3 shards for 4 readers \(2 processes x 2 dataloader workers\)"):
        _stream(shards, process_index=0, num_processes=2).check_readers(2)
    dataset = _stream(shards, batch_size=1, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=lambda items: items[0])
    # worker 0 reads shards 0 and 2 (5 pairs), worker 1 shard 1 (2 pairs); the loader alternates between them
    prompts = [item["prompt"] for item in itertools.islice(iter(loader), 4)]
    worker1 = {row for row in ("pair 1", "pair 4")}
    assert prompts[1] in worker1 and prompts[3] in worker1 and prompts[0] not in worker1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resuming_skips_exactly_what_was_consumed(shards, num_workers):
    def batches(consumed):
        dataset = _stream(shards, batch_size=2)
        dataset.consumed_batches = consumed
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=num_workers)
        return list(itertools.islice(iter(loader), 5 - consumed))

    uninterrupted = batches(0)
    resumed = batches(3)
    for expected, got in zip(uninterrupted[3:], resumed, strict=True):
        assert expected["prompt"] == got["prompt"]
        assert torch.equal(expected["pixel_values"], got["pixel_values"])
        assert torch.equal(expected["conditioning_pixel_values"], got["conditioning_pixel_values"])


def test_items_are_made_as_paired_dataset_makes_them(photos, shards, tmp_path):
    """Same crop, resize and tensor conventions: a pre-degraded pair, centre-cropped without flips, gives the same
    tensors from a shard as from a pairs CSV."""
    root, rows = photos
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("image_path,condition_image_path,caption\n"
                        + "".join(f"{row.image_path},{row.condition_image_path or ''},{row.caption}\n" for row in rows))
    reference = PairedDataset(str(csv_path), resolution=32, center_crop=True, random_flip=False)
    expected = {item["prompt"]: item for item in (reference[index] for index in (5, 6))}
    streamed = _stream(shards, center_crop=True, random_flip=False, shuffle_buffer=0)
    found = {item["prompt"]: item for item in itertools.islice(iter(streamed), 7) if item["prompt"] in expected}
    assert found.keys() == expected.keys()
    for prompt, item in found.items():
        assert torch.equal(item["pixel_values"], expected[prompt]["pixel_values"])
        assert torch.equal(item["conditioning_pixel_values"], expected[prompt]["conditioning_pixel_values"])
        assert item["degradation"] == "[]"


def test_hf_streaming_dataset_is_split_across_processes(photos, tmp_path):
    """`load_dataset(<local imagefolder>, streaming=True)`, offline: every row once over two processes."""
    datasets = pytest.importorskip("datasets")
    root, rows = photos
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = ["file_name,text"]
    for index, row in enumerate(rows):
        Image.open(row.image_path).save(folder / f"{index}.png")
        lines.append(f"{index}.png,{row.caption}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    stream = datasets.load_dataset(str(folder), split="train", streaming=True)
    parts = []
    for rank in (0, 1):
        dataset = StreamingPairDataset(hf_dataset=stream, resolution=32, degradation="jpeg:30", process_index=rank,
                                       num_processes=2, shuffle_buffer=0, caption_column="text")
        parts.append(_prompts(dataset, 4 if rank == 0 else 3))
    assert sorted(parts[0] + parts[1]) == sorted(row.caption for row in rows)
    item = next(iter(dataset))
    assert item["pixel_values"].shape == (3, 32, 32) and item["conditioning_pixel_values"].shape == (3, 32, 32)


def test_make_pairs_writes_shards(photos, tmp_path, capsys):
    make_pairs_module = importlib.import_module("diffusers_restore.data.make_pairs")
    root, _ = photos
    clean = tmp_path / "clean"
    clean.mkdir()
    for index in range(4):
        Image.open(root / f"{index}.png").save(clean / f"{index}.png")
    out = tmp_path / "out"
    code = make_pairs_module.main(["--input-dir", str(clean), "--output-dir", str(out), "--degradation", "jpeg:30",
                                   "--workers", "1", "--quiet", "--shards", "2"])
    assert code == 0
    assert "pairs-{000000..000001}.tar" in capsys.readouterr().out
    rows, _ = read_paired_csv(str(out / "pairs.csv"))
    shard_paths = expand_shard_pattern(str(out / "shards" / "pairs-{000000..000001}.tar"))
    samples = [sample for path in shard_paths for sample in read_shard(path)]
    assert len(samples) == len(rows) == 4
    assert all(sample["degraded"] is not None for sample in samples)
    # run again: the shards exist and are not overwritten
    code = make_pairs_module.main(["--input-dir", str(clean), "--output-dir", str(out), "--degradation", "jpeg:30",
                                   "--workers", "1", "--quiet", "--shards", "2"])
    assert code == 2 and "never overwritten" in capsys.readouterr().err
