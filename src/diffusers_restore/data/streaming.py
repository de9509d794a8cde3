# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Pairs that stream: WebDataset tar shards and 🤗 datasets streaming, for pair sets larger than memory or one disk.

Shard format (what ``make-pairs --shards N`` and :func:`write_pair_shards` write, readable by the ``webdataset``
package too): plain tar files ``pairs-000000.tar``, ``pairs-000001.tar``, ..., each sample stored as consecutive members
sharing a key, ``<key>.clean.<ext>`` (the clean image), ``<key>.degraded.<ext>`` (the degraded one; absent: degraded on
the fly) and ``<key>.txt`` (the caption; absent or empty: a prompt describing the degradation). Images keep their
original encoded bytes.

How a stream is split (:class:`StreamingPairDataset`): the readers are the processes times their dataloader workers.
Tar shards are dealt to readers round-robin (reader ``r`` of ``R`` reads shards ``r, r + R, ...``), so no pair is
read by two readers in a pass; a 🤗 streaming dataset is split by ``datasets.distributed.split_dataset_by_node`` and
its own worker split. Uneven shards: each reader loops over its part for as long as training asks (a new shuffle
each pass), so a reader with fewer pairs never runs dry and no process waits for another; training length is set
in steps (``--max_train_steps``), and pairs of small parts recur a little more often. A stream with fewer shards than
readers is refused (some reader would have nothing). Every draw (shard order, shuffle buffer, crops, on-the-fly
degradations) is seeded by (seed, pass, reader), so a run is reproducible and a resumed run skips exactly the pairs it
had consumed (:attr:`StreamingPairDataset.consumed_batches`) and continues with the same ones (for a 🤗 streaming
dataset, which datasets splits over the dataloader workers itself, with at most one worker).
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..image_io import decode_rgb, load_rgb, to_rgb
from .degradations import DegradationSpec, get_degradation_fn
from .paired_dataset import PairedDataError, PairRow, make_pair_item, match_pair_sizes


logger = logging.getLogger(__name__)

SHARD_NAME = "pairs-{:06d}.tar"
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shard_pattern(pattern: str) -> list[str]:
    """The shard paths a pattern names: ``"data/pairs-{000000..000099}.tar"`` (WebDataset's brace range, zero padding
    kept), several patterns separated by ``::`` or commas, or plain paths. Every path must exist."""
    paths = [path for part in re.split(r"::|,", pattern) if part.strip() for path in _expand_braces(part.strip())]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"shard pattern {pattern!r}: {len(missing)} of {len(paths)} shards do not exist "
                                f"(e.g. {missing[0]}).")
    if not paths:
        raise ValueError(f"shard pattern {pattern!r} names no shard.")
    return paths


def _expand_braces(part: str) -> list[str]:
    match = _BRACES.search(part)
    if match is None:
        return [part]
    first, last = match.group(1), match.group(2)
    if int(last) < int(first):
        raise ValueError(f"shard pattern {part!r}: the range {{{first}..{last}}} is empty.")
    width = len(first)
    return [path for number in range(int(first), int(last) + 1)
            for path in _expand_braces(part[: match.start()] + f"{number:0{width}d}" + part[match.end():])]


def write_pair_shards(rows: Sequence[PairRow], output_dir: str | os.PathLike, num_shards: int) -> list[str]:
    """Pack pairs into `num_shards` tar shards ``output_dir/pairs-000000.tar`` ... (format: module docstring).

    Pair ``i`` goes to shard ``i % num_shards`` with key ``i`` (9 digits), so the shards differ in size by at most one
    pair. Each shard is written to ``<name>.tmp`` and renamed when complete; existing shards are never overwritten.

    Args:
        rows: the pairs (e.g. from `read_paired_csv`); images are stored as their files' bytes.
        output_dir: the folder for the shards (created).
        num_shards: at least 1 and at most the number of pairs.

    Returns:
        The shard paths, in order.
    """
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}.")
    if num_shards > len(rows):
        raise ValueError(f"{num_shards} shards for {len(rows)} pairs: some shards would be empty; use at most "
                         f"{len(rows)}.")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, SHARD_NAME.format(number)) for number in range(num_shards)]
    existing = [path for path in paths if os.path.exists(path)]
    if existing:
        raise FileExistsError(f"{existing[0]} exists: shards are never overwritten (remove them or pick another "
                              "folder).")
    for number, path in enumerate(paths):
        partial = path + ".tmp"
        with tarfile.open(partial, "w") as archive:
            for index in range(number, len(rows), num_shards):
                row = rows[index]
                key = f"{index:09d}"
                members = [(f"{key}.clean{_extension(row.image_path)}", row.image_path)]
                if row.condition_image_path:
                    members.append((f"{key}.degraded{_extension(row.condition_image_path)}", row.condition_image_path))
                for name, source in members:
                    with open(source, "rb") as handle:
                        _add_member(archive, name, handle.read())
                _add_member(archive, f"{key}.txt", (row.caption or "").encode("utf-8"))
        os.replace(partial, path)
    return paths


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower() or ".png"


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, in order: dicts with ``key``, ``clean`` and ``degraded`` (encoded bytes or None),
    ``caption`` (str) and ``location`` (``"<shard>:<key>"``). A sample without a clean image raises
    `PairedDataError` naming the shard and key; members that are not files (directories, links) are refused."""
    current: dict[str, Any] | None = None

    def finish(sample: dict[str, Any]) -> dict[str, Any]:
        if sample["clean"] is None:
            raise PairedDataError("the sample has no '<key>.clean.<ext>' image.", sample["location"])
        return sample

    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isdir():
                continue
            if not member.isfile():
                raise PairedDataError(f"member {member.name!r} is not a regular file.", path)
            name = os.path.basename(member.name)
            key, _, suffix = name.partition(".")
            if current is None or key != current["key"]:
                if current is not None:
                    yield finish(current)
                current = {"key": key, "clean": None, "degraded": None, "caption": "", "location": f"{path}:{key}"}
            data = archive.extractfile(member).read()
            kind = suffix.split(".")[0]
            if kind == "clean":
                current["clean"] = data
            elif kind == "degraded":
                current["degraded"] = data
            elif suffix == "txt":
                current["caption"] = data.decode("utf-8").strip()
        if current is not None:
            yield finish(current)


def _reader() -> tuple[int, int]:
    """(this dataloader worker's id, the number of workers) of the current process; (0, 1) outside workers."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class StreamingPairDataset(torch.utils.data.IterableDataset):
    """Training pairs from tar shards or a 🤗 streaming dataset, split across processes and dataloader workers, as an
    endless stream (the split, uneven-shard and resume policies are in the module docstring).

    Items are :class:`PairedDataset`'s (same crop, flip, on-the-fly degradation and prompt rules; ``index`` counts the
    reader's stream). Batch them with `collate_fn`.

    Args:
        shards: tar shard paths (e.g. from `expand_shard_pattern`); or None with `hf_dataset`.
        hf_dataset: a `datasets.IterableDataset` (``load_dataset(..., streaming=True)``) with the columns below.
        resolution, degradation, random_flip, center_crop, generic_prompt_probability: as :class:`PairedDataset`.
        seed: base seed of every draw.
        process_index, num_processes: this process's rank and the number of processes.
        shuffle_buffer: pairs held in the shuffle buffer of each reader (0: the shards' order, shards still shuffled).
        batch_size: the dataloader's batch size, for `consumed_batches`.
        image_column, conditioning_image_column, caption_column: the `hf_dataset` columns (the last two optional).
    """

    def __init__(
        self,
        shards: Sequence[str] | None = None,
        hf_dataset: Any = None,
        resolution: int = 512,
        degradation: str | DegradationSpec | Callable[..., Any] = "random",
        seed: int = 0,
        random_flip: bool = True,
        center_crop: bool = False,
        generic_prompt_probability: float = 0.1,
        process_index: int = 0,
        num_processes: int = 1,
        shuffle_buffer: int = 1000,
        batch_size: int = 1,
        image_column: str = "image",
        conditioning_image_column: str | None = None,
        caption_column: str | None = None,
    ) -> None:
        super().__init__()
        if (shards is None) == (hf_dataset is None):
            raise ValueError("Give either shards or hf_dataset.")
        if not isinstance(resolution, int) or resolution <= 0 or resolution % 32:
            raise ValueError(f"resolution must be a positive multiple of 32, got {resolution!r}.")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes}).")
        if shuffle_buffer < 0 or batch_size < 1:
            raise ValueError(f"shuffle_buffer must be >= 0 and batch_size >= 1, got {shuffle_buffer}, {batch_size}.")
        self.shards = list(shards) if shards is not None else None
        if self.shards is not None and not self.shards:
            raise ValueError("no shards given.")
        self.hf_dataset = hf_dataset
        self.resolution = resolution
        self.degradation = degradation if isinstance(degradation, str) else getattr(degradation, "__name__", "custom")
        self._degrade = get_degradation_fn(degradation)
        self.seed = int(seed)
        self.random_flip = random_flip
        self.center_crop = center_crop
        self.generic_prompt_probability = generic_prompt_probability
        self.process_index = process_index
        self.num_processes = num_processes
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.image_column = image_column
        self.conditioning_image_column = conditioning_image_column
        self.caption_column = caption_column
        self.consumed_batches = 0
        """Batches this process already trained on (set when resuming): each reader skips its share of them."""
        self.source = ", ".join(self.shards[:3]) + (" ..." if len(self.shards) > 3 else "") if self.shards else (
            getattr(hf_dataset, "info", None) and getattr(hf_dataset.info, "dataset_name", None) or "a 🤗 dataset")

    def check_readers(self, num_workers: int) -> None:
        """Refuse a split in which some reader (process x dataloader worker) would get no shard."""
        readers = self.num_processes * max(1, num_workers)
        if self.shards is not None and len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} shards for {readers} readers ({self.num_processes} processes x "
                f"{max(1, num_workers)} dataloader workers): every reader needs at least one shard. Write more shards "
                "(make-pairs --shards N) or use fewer workers."
            )

    def _skip_count(self, worker: int, num_workers: int) -> int:
        """Pairs this reader already gave: the dataloader takes whole batches from its workers in turn (batch k from
        worker k mod W)."""
        batches = self.consumed_batches
        own = (batches - worker + num_workers - 1) // num_workers if batches > worker else 0
        return own * self.batch_size

    def _raw_pairs(self, reader: int, readers: int, passes: int):
        """This reader's (clean, degraded, caption, location) of pass `passes`, shuffled."""
        if self.shards is not None:
            mine = self.shards[reader::readers]
            order = np.random.default_rng([self.seed, passes, reader, 2]).permutation(len(mine))
            for number in order:
                for sample in read_shard(mine[number]):
                    yield sample
            return
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(self.hf_dataset, rank=self.process_index, world_size=self.num_processes)
        stream.set_epoch(passes)
        for number, row in enumerate(stream):
            caption = row.get(self.caption_column) if self.caption_column else ""
            yield {
                "key": str(number),
                "clean": row[self.image_column],
                "degraded": row.get(self.conditioning_image_column) if self.conditioning_image_column else None,
                "caption": caption or "",
                "location": f"{self.source} (process {self.process_index}, row {number})",
            }

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = int(rng.integers(len(buffer)))
            yield buffer[slot]
            buffer[slot] = sample
        order = rng.permutation(len(buffer))
        for slot in order:
            yield buffer[slot]

    def _image(self, value: Any, location: str, role: str):
        if isinstance(value, bytes):
            return decode_rgb(value, f"{location} ({role})")
        if isinstance(value, dict) and value.get("bytes") is not None:  # a 🤗 Image feature without decoding
            return decode_rgb(value["bytes"], f"{location} ({role})")
        if isinstance(value, str):
            return load_rgb(value)
        if isinstance(value, Image.Image):
            return to_rgb(value)
        raise PairedDataError(f"{role}: expected an image, got {type(value).__name__}.", location)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _reader()
        # A dataloader takes batch k from worker k mod W, starting again at worker 0 when resumed: the worker that
        # now goes first plays the part of the one whose batch came next, so the resumed batches are the same.
        worker = (worker + self.consumed_batches) % num_workers
        reader = self.process_index * num_workers + worker
        readers = self.num_processes * num_workers
        if self.shards is not None:
            self.check_readers(num_workers)
        # (a 🤗 streaming dataset is split over the dataloader workers by datasets itself, by its shards)
        skip = self._skip_count(worker, num_workers)
        position = 0  # pairs this reader has produced (or skipped), across passes
        passes = 0
        while True:
            given = 0
            rng = np.random.default_rng([self.seed, passes, reader, 3])
            for sample in self._shuffled(self._raw_pairs(reader, readers, passes), rng):
                given += 1
                position += 1
                if position <= skip:
                    continue
                index = position - 1
                augmentation_rng = np.random.default_rng([self.seed, reader, index, 0])
                degradation_rng = np.random.default_rng([self.seed, reader, index, 1])
                clean = self._image(sample["clean"], sample["location"], "image")
                degraded = None
                if sample["degraded"] is not None:
                    degraded = self._image(sample["degraded"], sample["location"], "condition image")
                    degraded = match_pair_sizes(clean, degraded, sample["location"])
                yield make_pair_item(
                    clean, degraded, sample["caption"], index, augmentation_rng, degradation_rng,
                    resolution=self.resolution, degrade=self._degrade, random_flip=self.random_flip,
                    center_crop=self.center_crop, generic_prompt_probability=self.generic_prompt_probability,
                )
            if given == 0:
                raise PairedDataError("this reader's part of the stream holds no pair.",
                                      f"{self.source} (process {self.process_index}, worker {worker})")
            passes += 1

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, resolution={self.resolution}, "
                f"degradation={self.degradation!r}, seed={self.seed}, process={self.process_index}/"
                f"{self.num_processes})")
