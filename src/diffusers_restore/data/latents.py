"""Latent-space tools for training: condition-latent augmentation and a cache of VAE latents.

* :func:`degrade_latents`: add gaussian noise with a per-sample sigma ~ U[0, max_sigma] to condition latents, so the
  model learns to tolerate imperfect latents of the degraded image.
* :func:`build_latent_cache` / :class:`CachedLatentDataset`: encode every (clean, degraded) pair once with the VAE
  (``z = vae.encode(x).latent * scaling_factor``) into safetensors shards, optionally with the prompts' text
  embeddings (stored once per unique prompt), and read them back for training without a VAE forward per step.

Cache layout (``output_dir``)::

    latents-00000-of-00004.safetensors   "latents", "conditioning_latents" [N, C, h, w], "indices" [N] (int64);
                                         metadata: JSON lists "prompts" and "degradations" (one per sample)
    prompt_embeds-00000-of-00001.safetensors   "prompt_embeds" [P, L, D], "prompt_attention_mask" [P, L];
                                         metadata: JSON list "prompts" (the P unique prompts, in row order)
    index.json                           written last: metadata, every file's size and sha256, the prompt table
    progress.json                        only while a build is unfinished (what is done, for resuming)

Integrity: every file is written to a temporary name, flushed to disk and renamed into place, so a file under its
final name is always complete; its sha256 is recorded (progress.json, then index.json). An interrupted build
leaves at most a stray temporary file (removed on the next build) and no index; rebuilding skips the shards whose
recorded checksum still matches. The reader refuses a cache without an index, checks every shard's size and
safetensors header and sha256 when it is created (``verify="sha256"``, the default), and raises
:class:`LatentCacheError` naming the file. The index records the VAE (class, config hash, scaling factor and, by
default, a hash of its weights), the resolution, dataset length, seed, epoch and degradation, and what the caller
says in ``extra_metadata`` (e.g. the network its ``condition_transform`` ran); building into or reading from a cache
made with other settings is refused with an error that lists the differences.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from ..image_io import TEMP_PREFIX, atomic_write, atomic_write_json, read_json, remove_stray_temp_files, sha256_file

from ..models.vae_latents import decode_latents, encode_latents

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"

__all__ = [
    "CachedLatentDataset",
    "LatentCacheError",
    "build_latent_cache",
    "degrade_latents",
    "decode_latents",
    "encode_latents",
    "vae_fingerprint",
]

PromptEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class LatentCacheError(RuntimeError):
    """A latent cache that is missing, incomplete, corrupt, or built with other settings."""


# ------------------------------------------------------------------------------------ latent augmentation


def degrade_latents(
    latents: torch.Tensor,
    max_sigma: float = 0.12,
    generator: torch.Generator | None = None,
    return_sigmas: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Add gaussian noise with a per-sample standard deviation ``sigma ~ U[0, max_sigma]`` to condition latents.

    Args:
        latents: [B, C, H, W] (any trailing shape) scaled latents.
        max_sigma: upper bound of the per-sample sigma (0 returns the latents unchanged).
        generator: torch generator for reproducibility (may live on another device than `latents`).
        return_sigmas: also return the sigmas drawn, shape [B].

    Returns:
        The noisy latents (same shape and dtype), and the sigmas [B] (float32) if `return_sigmas`.
    """
    if max_sigma < 0:
        raise ValueError(f"max_sigma must be >= 0, got {max_sigma}.")
    if latents.ndim < 1 or latents.shape[0] == 0:
        raise ValueError(f"latents must have a non-empty batch dimension, got shape {tuple(latents.shape)}.")
    batch = latents.shape[0]
    # Draw on the generator's device (a CPU generator gives the same numbers whatever device trains), then move.
    draw_device = generator.device if generator is not None else latents.device
    sigmas = torch.rand(batch, generator=generator, device=draw_device, dtype=torch.float32) * max_sigma
    noise = torch.randn(latents.shape, generator=generator, device=draw_device, dtype=torch.float32)
    sigmas, noise = sigmas.to(latents.device), noise.to(latents.device)
    view = (batch,) + (1,) * (latents.ndim - 1)
    noisy = (latents.float() + sigmas.view(view) * noise).to(latents.dtype)
    return (noisy, sigmas) if return_sigmas else noisy


# ---------------------------------------------------------------------------------------------- encoding
# `encode_latents` / `decode_latents` (re-exported here) live in `diffusers_restore.models.vae_latents`, shared with
# the pipeline.


def _config_dict(vae: torch.nn.Module) -> dict[str, Any]:
    config = dict(getattr(vae, "config", {}) or {})
    return {key: value for key, value in config.items() if not key.startswith("_")}


def vae_fingerprint(vae: torch.nn.Module, hash_weights: bool = True) -> dict[str, Any]:
    """What identifies a VAE for the cache: class, sha256 of its config (without bookkeeping keys such as
    ``_name_or_path``), scaling/shift factors and, if `hash_weights`, a sha256 over all of its parameters and
    buffers (about a second per GB of weights)."""
    config = _config_dict(vae)
    fingerprint = {
        "class": type(vae).__name__,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "scaling_factor": config.get("scaling_factor"),
        "shift_factor": config.get("shift_factor"),
    }
    if hash_weights:
        digest = hashlib.sha256()
        for name, tensor in sorted(vae.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        fingerprint["weights_sha256"] = digest.hexdigest()
    return fingerprint


# ------------------------------------------------------------------------------------------ file helpers


def _open_shard(path: str, expected_size: int | None = None):
    """Open a cache file with ``safetensors.safe_open``, which checks that the header is complete and that the tensor
    data cover the rest of the file exactly; a missing, resized, truncated or otherwise invalid file raises
    :class:`LatentCacheError` naming it. Returns the open handle (a context manager)."""
    if not os.path.isfile(path):
        raise LatentCacheError(f"{path}: cache file is missing.")
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        raise LatentCacheError(f"{path}: {size} bytes, the index records {expected_size}: the file is truncated or "
                               f"was replaced. Rebuild the cache with build_latent_cache.")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise LatentCacheError(f"{path}: not a valid safetensors file ({error}); rebuild the cache.") from None


def _read_cache_json(path: str) -> dict[str, Any]:
    try:
        return read_json(path, "Delete it, or build the cache again with build_latent_cache(..., overwrite=True).")
    except ValueError as error:
        raise LatentCacheError(str(error)) from None


def _verify_file(path: str, entry: dict[str, Any], checksum: bool) -> None:
    with _open_shard(path, entry["size"]):
        pass
    if checksum and sha256_file(path) != entry["sha256"]:
        raise LatentCacheError(f"{path}: sha256 mismatch with the index (corrupt or replaced); rebuild the cache.")


def _still_intact(path: str, entry: dict[str, Any]) -> bool:
    """Whether a shard that progress.json records as done is still intact (size, header, sha256); logs why not."""
    try:
        _verify_file(path, entry, checksum=True)
        return True
    except LatentCacheError as error:
        logger.warning("re-encoding %s: %s", os.path.basename(path), error)
        return False


def _differences(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: cache has {b!r}, expected {a!r}")
    return lines


# ------------------------------------------------------------------------------------------------ build


def _shard_name(kind: str, number: int, total: int) -> str:
    return f"{kind}-{number:05d}-of-{total:05d}.safetensors"


def _batch_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "conditioning_pixel_values": torch.stack([item["conditioning_pixel_values"] for item in items]),
        "prompt": [item.get("prompt", "") for item in items],
        "degradation": [item.get("degradation", "") for item in items],
        "index": torch.tensor([int(item.get("index", -1)) for item in items], dtype=torch.int64),
    }


def _cache_metadata(dataset: Any, vae: torch.nn.Module, dtype: torch.dtype, shard_size: int, with_prompts: bool,
                    hash_weights: bool, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    metadata = {
        "format_version": FORMAT_VERSION,
        "vae": vae_fingerprint(vae, hash_weights=hash_weights),
        "resolution": getattr(dataset, "resolution", None),
        "dataset_length": len(dataset),
        "dataset_source": (
            os.path.abspath(dataset.source) if isinstance(getattr(dataset, "source", None), str) else None
        ),
        "seed": getattr(dataset, "seed", None),
        "epoch": getattr(dataset, "epoch", None),
        "degradation": str(getattr(dataset, "degradation", None)),
        "dtype": str(dtype).replace("torch.", ""),
        "shard_size": shard_size,
        "prompt_embeds": with_prompts,
    }
    if extra_metadata is not None:  # only when given, so that caches made before this entry existed still match
        metadata["extra"] = extra_metadata
    return metadata


@torch.no_grad()
def build_latent_cache(
    dataset: Any,
    vae: torch.nn.Module,
    output_dir: str | os.PathLike,
    batch_size: int = 8,
    shard_size: int = 1024,
    encode_prompt_fn: PromptEncoder | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    prompt_batch_size: int = 64,
    prompt_shard_size: int = 1024,
    overwrite: bool = False,
    hash_weights: bool = True,
    condition_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Encode every pair of `dataset` once and write a latent cache (see the module docstring for the layout).

    With several processes (`num_processes` > 1, every process calling this with the same arguments and its own
    `process_index`), each encodes its share of the latent shards (shard `n` goes to process `n mod num_processes`)
    and records them in its own ``progress-<rank>.json``; after `wait_for_everyone`, process 0 merges them: it checks
    every shard, encodes the prompt table and writes ``index.json``, the same cache a single process writes. A build
    interrupted with one number of processes resumes with another (every process's progress file is read).

    Args:
        dataset: a map-style dataset whose items have ``pixel_values`` and ``conditioning_pixel_values`` ([3, H, W]
            in [-1, 1]), ``prompt`` and optionally ``degradation`` (e.g. :class:`PairedDataset`; its current epoch's
            on-the-fly degradations are what gets cached). Its ``resolution``, ``seed``, ``epoch``, ``degradation``
            and ``source`` attributes, when present, are recorded.
        vae: the autoencoder (see :func:`encode_latents`); run in eval mode under ``torch.no_grad``.
        output_dir: the cache folder (created if needed).
        batch_size: images per VAE forward.
        shard_size: samples per latent shard.
        encode_prompt_fn: optional ``fn(prompts: list[str]) -> (prompt_embeds [P, L, D], attention_mask [P, L])``;
            the embeddings of each unique prompt are stored once. ``L`` must be the same for every call (pad to a
            fixed ``max_sequence_length``, as SANA does).
        dtype: storage dtype of latents and embeddings (the VAE runs in its own dtype).
        device: where the VAE runs (default: the VAE's device).
        num_workers: DataLoader workers producing the pairs.
        prompt_batch_size: prompts per `encode_prompt_fn` call.
        prompt_shard_size: unique prompts per embedding shard.
        overwrite: replace a cache in `output_dir` that was built with other settings instead of raising.
        hash_weights: include a hash of the VAE weights in the cache's identity (recommended).
        condition_transform: optional ``fn(conditioning_pixels) -> pixels`` applied to each batch of degraded images
            (``[B, 3, H, W]`` in [-1, 1], float32 on `device`) before they are encoded, e.g. a first restoration
            stage; it must return the same shape and range. Needs `extra_metadata` saying what it is.
        extra_metadata: JSON-serialisable settings of the caller recorded in the cache's identity (under ``extra``)
            and compared like the others, so that a cache is not reused by a caller with other settings.
        process_index, num_processes: this process's rank and the number of processes building together.
        wait_for_everyone: a barrier over those processes (e.g. ``accelerator.wait_for_everyone``); required when
            `num_processes` > 1.

    Returns:
        The index (as written to ``index.json``).

    Raises:
        LatentCacheError: `output_dir` holds a cache (finished or not) built with other settings and not
            `overwrite`; or `encode_prompt_fn` returns inconsistent shapes.
    """
    if batch_size < 1 or shard_size < 1 or prompt_batch_size < 1 or prompt_shard_size < 1:
        raise ValueError("batch_size, shard_size, prompt_batch_size and prompt_shard_size must be >= 1.")
    if len(dataset) == 0:
        raise ValueError("dataset is empty.")
    if num_processes > 1 and wait_for_everyone is None:
        raise ValueError("num_processes > 1 needs wait_for_everyone (a barrier over the building processes).")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not in [0, {num_processes}).")
    barrier = wait_for_everyone or (lambda: None)
    is_main = process_index == 0
    if condition_transform is not None and extra_metadata is None:
        raise ValueError("condition_transform needs extra_metadata recording what it is (the cache must not be reused "
                         "by a run without it).")
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if device is None:
        device = next(vae.parameters()).device
    vae_dtype = next(vae.parameters()).dtype
    vae.eval()
    metadata = _cache_metadata(
        dataset, vae, dtype, shard_size, encode_prompt_fn is not None, hash_weights, extra_metadata
    )
    index_path, progress_path = os.path.join(output_dir, INDEX_FILE), os.path.join(output_dir, PROGRESS_FILE)

    # ---- an existing cache: reuse it if it matches, refuse (or clear) otherwise
    index = _reusable_index(output_dir, metadata, overwrite, is_main, barrier)
    if index is not None:
        return index
    # every process's progress: the shards already written, by whichever process wrote them
    progress = {"metadata": metadata, "shards": {}, "prompt_shards": {}}
    for path in _progress_files(output_dir):
        recorded = _read_cache_json(path)
        progress["shards"].update(recorded.get("shards", {}))
        if os.path.basename(path) == PROGRESS_FILE:
            progress["prompt_shards"].update(recorded.get("prompt_shards", {}))
    if num_processes > 1:
        progress_path = os.path.join(output_dir, f"progress-{process_index}.json")

    # ---- latent shards (this process's share)
    num_samples = len(dataset)
    num_shards = (num_samples + shard_size - 1) // shard_size
    checked = set()  # the shards this process verified or wrote: not read again below
    for number in range(process_index, num_shards, num_processes):
        name = _shard_name("latents", number, num_shards)
        path = os.path.join(output_dir, name)
        start, stop = number * shard_size, min(num_samples, (number + 1) * shard_size)
        checked.add(name)
        entry = progress["shards"].get(name)
        if entry is not None and _still_intact(path, entry):
            continue
        progress["shards"][name] = _encode_shard(
            dataset, vae, path, start, stop, batch_size, num_workers, condition_transform, device, vae_dtype, dtype)
        atomic_write_json(progress_path, {**progress, "prompt_shards": {}} if num_processes > 1 else progress)
    barrier()
    if not is_main:
        barrier()  # process 0 merges and writes the index
        return _read_cache_json(index_path)

    if num_processes > 1:
        # ---- merge: the shards the other processes wrote must be there and intact
        for path in _progress_files(output_dir):
            progress["shards"].update(_read_cache_json(path).get("shards", {}))
        for number in range(num_shards):
            name = _shard_name("latents", number, num_shards)
            entry = progress["shards"].get(name)
            if name not in checked and (entry is None or not _still_intact(os.path.join(output_dir, name), entry)):
                raise LatentCacheError(f"{os.path.join(output_dir, name)} is missing or damaged after the build: a "
                                       "process failed; run the build again to redo it.")
        progress_path = os.path.join(output_dir, PROGRESS_FILE)
        atomic_write_json(progress_path, progress)
        for path in _progress_files(output_dir):
            if os.path.basename(path) != PROGRESS_FILE:
                os.remove(path)
    shard_entries = [progress["shards"][_shard_name("latents", number, num_shards)] for number in range(num_shards)]
    index = _finish_index(output_dir, metadata, num_samples, shard_entries, progress, progress_path,
                          encode_prompt_fn, dtype, prompt_batch_size, prompt_shard_size)
    barrier()
    return index


def _progress_files(output_dir: str) -> list[str]:
    """progress.json (a single process's build, or a merge) and every progress-<rank>.json."""
    names = sorted(name for name in os.listdir(output_dir)
                   if name == PROGRESS_FILE or (name.startswith("progress-") and name.endswith(".json")))
    return [os.path.join(output_dir, name) for name in names]


def _reusable_index(output_dir: str, metadata: dict[str, Any], overwrite: bool, is_main: bool,
                    barrier: Callable[[], None]) -> dict[str, Any] | None:
    """The index of a finished cache of these settings (every file intact), or None after clearing what must go.

    Process 0 refuses (or, with `overwrite`, clears) a cache of other settings and removes stray temporary files;
    every process then sees the same folder."""
    index_path = os.path.join(output_dir, INDEX_FILE)
    if is_main:
        _check_existing(output_dir, metadata, overwrite)
    barrier()
    if not os.path.isfile(index_path):
        return None
    index = _read_cache_json(index_path)
    intact = True
    try:
        for entry in index["shards"] + index["prompt_shards"]:
            _verify_file(os.path.join(output_dir, entry["file"]), entry, checksum=True)
    except LatentCacheError as error:
        intact = False
        if is_main:
            logger.warning("rebuilding the damaged parts of the cache: %s", error)
    barrier()
    if intact:
        return index
    if is_main:
        os.remove(index_path)
        progress = {"metadata": metadata, "shards": {e["file"]: e for e in index["shards"]}, "prompt_shards": {}}
        atomic_write_json(os.path.join(output_dir, PROGRESS_FILE), progress)
    barrier()
    return None


def _check_existing(output_dir: str, metadata: dict[str, Any], overwrite: bool) -> None:
    for path in [os.path.join(output_dir, INDEX_FILE)] + _progress_files(output_dir):
        if not os.path.isfile(path):
            continue
        try:
            previous = _read_cache_json(path)
        except LatentCacheError:
            if not overwrite:
                raise
            previous = {}  # unreadable: cleared below like a cache of other settings
        differences = _differences(metadata, previous.get("metadata", {}))
        if differences and not overwrite:
            raise LatentCacheError(
                f"{path}: {output_dir} holds a latent cache built with other settings:\n  " + "\n  ".join(differences)
                + "\nUse another output_dir or overwrite=True."
            )
        if differences:
            _clear_cache_files(output_dir)
            break
    remove_stray_temp_files(output_dir)


def _encode_shard(dataset, vae, path: str, start: int, stop: int, batch_size: int, num_workers: int,
                  condition_transform, device, vae_dtype: torch.dtype, dtype: torch.dtype) -> dict[str, Any]:
    """Encode samples [start, stop) of `dataset` into the latent shard `path`; return its progress entry."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(start, stop)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_batch_items,
    )
    latents, conditioning, indices, prompts, degradations = [], [], [], [], []
    for batch in loader:
        degraded = batch["conditioning_pixel_values"]
        if condition_transform is not None:
            degraded = condition_transform(degraded.to(device=device, dtype=torch.float32))
        pixels = torch.cat([batch["pixel_values"].to(device), degraded.to(device)])
        encoded = encode_latents(vae, pixels.to(dtype=vae_dtype)).to("cpu", dtype)
        count = batch["pixel_values"].shape[0]
        latents.append(encoded[:count])
        conditioning.append(encoded[count:])
        indices.append(batch["index"])
        prompts += batch["prompt"]
        degradations += batch["degradation"]
    tensors = {
        "latents": torch.cat(latents).contiguous(),
        "conditioning_latents": torch.cat(conditioning).contiguous(),
        "indices": torch.cat(indices).contiguous(),
    }
    blob = safetensors_save(
        tensors, metadata={"prompts": json.dumps(prompts), "degradations": json.dumps(degradations)}
    )
    atomic_write(path, blob)
    return {"file": os.path.basename(path), "start": start, "num_samples": stop - start, "size": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest()}


def _finish_index(output_dir: str, metadata: dict[str, Any], num_samples: int, shard_entries: list[dict[str, Any]],
                  progress: dict[str, Any], progress_path: str, encode_prompt_fn: PromptEncoder | None,
                  dtype: torch.dtype, prompt_batch_size: int, prompt_shard_size: int) -> dict[str, Any]:
    """The prompt table and its embeddings (one row per unique prompt), then index.json (written last)."""
    unique_prompts: list[str] = []
    seen: set[str] = set()
    for entry in shard_entries:
        with _open_shard(os.path.join(output_dir, entry["file"])) as handle:
            for prompt in json.loads(handle.metadata()["prompts"]):
                if prompt not in seen:
                    seen.add(prompt)
                    unique_prompts.append(prompt)
    prompt_entries = []
    if encode_prompt_fn is not None:
        prompt_entries = _build_prompt_shards(
            unique_prompts, encode_prompt_fn, output_dir, progress, progress_path, dtype, prompt_batch_size,
            prompt_shard_size,
        )

    index_path = os.path.join(output_dir, INDEX_FILE)
    index = {
        "format_version": FORMAT_VERSION,
        "metadata": metadata,
        "num_samples": num_samples,
        "shards": shard_entries,
        "prompt_shards": prompt_entries,
        "prompts": unique_prompts,
    }
    atomic_write_json(index_path, index)
    os.remove(progress_path)
    return index


def _build_prompt_shards(
    prompts: list[str],
    encode_prompt_fn: PromptEncoder,
    output_dir: str,
    progress: dict[str, Any],
    progress_path: str,
    dtype: torch.dtype,
    prompt_batch_size: int,
    prompt_shard_size: int,
) -> list[dict[str, Any]]:
    num_shards = max(1, (len(prompts) + prompt_shard_size - 1) // prompt_shard_size)
    entries, expected_shape = [], None
    for number in range(num_shards):
        name = _shard_name("prompt_embeds", number, num_shards)
        path = os.path.join(output_dir, name)
        chunk = prompts[number * prompt_shard_size : (number + 1) * prompt_shard_size]
        entry = progress["prompt_shards"].get(name)
        if entry is not None and entry.get("prompts_sha256") == _prompts_hash(chunk) and _still_intact(path, entry):
            entries.append(entry)
            continue
        embeds, masks = [], []
        for begin in range(0, len(chunk), prompt_batch_size):
            batch = chunk[begin : begin + prompt_batch_size]
            prompt_embeds, attention_mask = encode_prompt_fn(batch)
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != len(batch) or tuple(attention_mask.shape) != tuple(
                prompt_embeds.shape[:2]
            ):
                raise LatentCacheError(
                    f"encode_prompt_fn must return embeddings [P, L, D] and a mask [P, L] for P={len(batch)} prompts, "
                    f"got {tuple(prompt_embeds.shape)} and {tuple(attention_mask.shape)}."
                )
            if expected_shape is None:
                expected_shape = tuple(prompt_embeds.shape[1:])
            elif tuple(prompt_embeds.shape[1:]) != expected_shape:
                raise LatentCacheError(
                    f"encode_prompt_fn returned embeddings of shape {tuple(prompt_embeds.shape[1:])} after "
                    f"{expected_shape}: pad every prompt to the same max_sequence_length."
                )
            embeds.append(prompt_embeds.detach().to("cpu", dtype))
            masks.append(attention_mask.detach().to("cpu", torch.int64))
        blob = safetensors_save(
            {"prompt_embeds": torch.cat(embeds).contiguous(), "prompt_attention_mask": torch.cat(masks).contiguous()},
            metadata={"prompts": json.dumps(chunk)},
        )
        atomic_write(path, blob)
        entry = {"file": name, "start": number * prompt_shard_size, "num_prompts": len(chunk), "size": len(blob),
                 "sha256": hashlib.sha256(blob).hexdigest(), "prompts_sha256": _prompts_hash(chunk)}
        progress["prompt_shards"][name] = entry
        atomic_write_json(progress_path, progress)
        entries.append(entry)
    return entries


def _prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def _clear_cache_files(output_dir: str) -> None:
    for name in os.listdir(output_dir):
        is_cache_file = name.endswith(".safetensors") and name.startswith(("latents-", "prompt_embeds-"))
        is_progress = name == PROGRESS_FILE or (name.startswith("progress-") and name.endswith(".json"))
        if is_cache_file or is_progress or name == INDEX_FILE or name.startswith(TEMP_PREFIX):
            os.remove(os.path.join(output_dir, name))


# ------------------------------------------------------------------------------------------------- read


class _ShardReader:
    """Single rows of the tensors of one cache file, read with safetensors' ``safe_open(...).get_slice(name)[row]``:
    the file is memory-mapped, so a row costs a read of that row, not a load of the shard.

    Rows are returned as private copies (``clone``): safe_open hands out views of one mapping per tensor, shared by
    every read in the process, so an in-place change of one item would otherwise show up in the next read of that
    row. The handle is opened lazily, once per process (it cannot be pickled into DataLoader workers). Files are
    only ever replaced by a rename, never rewritten in place, so an open mapping keeps seeing the file it verified.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._handle = None
        self._pid: int | None = None
        self.metadata: dict[str, str] = self._file().metadata() or {}

    def _file(self):
        if self._pid != os.getpid():
            self._handle, self._pid = _open_shard(self.path), os.getpid()
        return self._handle

    def row(self, name: str, index: int) -> torch.Tensor:
        return self._file().get_slice(name)[index].clone()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"], state["_pid"] = None, None  # handles are per process
        return state


class CachedLatentDataset(torch.utils.data.Dataset):
    """Reads a cache written by :func:`build_latent_cache`.

    Args:
        cache_dir: the cache folder.
        vae: if given, the cache must have been built with this VAE (class, config, scaling factor and, when the
            cache recorded one, weights hash); otherwise :class:`LatentCacheError` lists the differences.
        resolution: if given, the cache must have been built at this resolution.
        load_prompt_embeds: return the cached prompt embeddings (needs a cache built with ``encode_prompt_fn``).
        verify: when the dataset is created, check every file's size, safetensors header and sha256 ("sha256",
            the default; reads the whole cache once), size and header only ("size"), or nothing ("none").

    Items: ``latents`` and ``conditioning_latents`` [C, h, w] (the stored dtype), ``prompt`` (str), ``index`` (the
    source dataset's index), ``degradation`` (str), and with `load_prompt_embeds` ``prompt_embeds`` [L, D] and
    ``prompt_attention_mask`` [L] (int64). torch's default collate batches them.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        vae: torch.nn.Module | None = None,
        resolution: int | None = None,
        load_prompt_embeds: bool = True,
        verify: str = "sha256",
    ) -> None:
        if verify not in ("sha256", "size", "none"):
            raise ValueError(f"verify must be 'sha256', 'size' or 'none', got {verify!r}.")
        self.cache_dir = os.fspath(cache_dir)
        index_path = os.path.join(self.cache_dir, INDEX_FILE)
        if not os.path.isfile(index_path):
            hint = (
                " A build was interrupted (progress.json is present): run build_latent_cache again to finish it."
                if os.path.isfile(os.path.join(self.cache_dir, PROGRESS_FILE))
                else ""
            )
            raise LatentCacheError(f"{index_path}: no cache index; the cache is missing or unfinished.{hint}")
        self.index = _read_cache_json(index_path)
        if self.index.get("format_version") != FORMAT_VERSION:
            raise LatentCacheError(
                f"{index_path}: cache format {self.index.get('format_version')}, this reader needs {FORMAT_VERSION}."
            )
        self.metadata = self.index["metadata"]
        expected = {}
        if vae is not None:
            recorded = self.metadata["vae"]
            expected["vae"] = vae_fingerprint(vae, hash_weights="weights_sha256" in recorded)
        if resolution is not None:
            expected["resolution"] = resolution
        differences = _differences(expected, {key: self.metadata.get(key) for key in expected})
        if differences:
            raise LatentCacheError(
                f"{index_path}: the cache was built with other settings:\n  " + "\n  ".join(differences)
            )
        if load_prompt_embeds and not self.index["prompt_shards"]:
            raise LatentCacheError(
                f"{index_path}: the cache has no prompt embeddings (built without encode_prompt_fn); "
                "pass load_prompt_embeds=False."
            )
        self.load_prompt_embeds = load_prompt_embeds
        self.verify = verify
        self._shards = self.index["shards"]
        self._prompt_shards = self.index["prompt_shards"] if load_prompt_embeds else []
        self._starts = [entry["start"] for entry in self._shards]
        self._prompt_starts = [entry["start"] for entry in self._prompt_shards]
        prompt_ids = {prompt: number for number, prompt in enumerate(self.index["prompts"])}
        self._sample_prompts: list[str] = []
        self._sample_degradations: list[str] = []
        for entry in self._shards + self._prompt_shards:
            if verify != "none":
                _verify_file(self._path(entry), entry, checksum=verify == "sha256")
        self._readers: dict[str, _ShardReader] = {}
        for entry in self._prompt_shards:
            self._readers[entry["file"]] = _ShardReader(self._path(entry))
        for entry in self._shards:
            reader = self._readers[entry["file"]] = _ShardReader(self._path(entry))
            self._sample_prompts += json.loads(reader.metadata["prompts"])
            self._sample_degradations += json.loads(reader.metadata["degradations"])
        self._sample_prompt_ids = [prompt_ids[prompt] for prompt in self._sample_prompts]
        if len(self._sample_prompts) != self.index["num_samples"]:
            raise LatentCacheError(
                f"{index_path}: the shards hold {len(self._sample_prompts)} samples, the index "
                f"{self.index['num_samples']}; rebuild the cache."
            )

    def _path(self, entry: dict[str, Any]) -> str:
        return os.path.join(self.cache_dir, entry["file"])

    def __len__(self) -> int:
        return self.index["num_samples"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} samples.")
        index %= len(self)
        shard_number = bisect.bisect_right(self._starts, index) - 1
        entry = self._shards[shard_number]
        row = index - entry["start"]
        shard = self._readers[entry["file"]]
        item = {
            "latents": shard.row("latents", row),
            "conditioning_latents": shard.row("conditioning_latents", row),
            "prompt": self._sample_prompts[index],
            "index": int(shard.row("indices", row)),
            "degradation": self._sample_degradations[index],
        }
        if self.load_prompt_embeds:
            prompt_id = self._sample_prompt_ids[index]
            prompt_entry = self._prompt_shards[bisect.bisect_right(self._prompt_starts, prompt_id) - 1]
            prompt_shard = self._readers[prompt_entry["file"]]
            prompt_row = prompt_id - prompt_entry["start"]
            item["prompt_embeds"] = prompt_shard.row("prompt_embeds", prompt_row)
            item["prompt_attention_mask"] = prompt_shard.row("prompt_attention_mask", prompt_row)
        return item

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(cache_dir={self.cache_dir!r}, samples={len(self)}, "
                f"resolution={self.metadata.get('resolution')}, prompts={len(self.index['prompts'])})")
