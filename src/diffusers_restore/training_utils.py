# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Helpers shared by the training scripts in `examples/` (`train_paired.py`, `train_degradation_removal.py`,
`train_decoder.py`): checkpoints, divergence, the output folder's lock, data checks and one-line errors. Inference code
never imports this module.

Sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`, which accelerate uses with `fsdp_version: 2`) turns
each parameter into a `DTensor` that holds this process's shard. The helpers below that touch weights (`local_tensor`,
`full_tensor`, `gather_full_state_dict`, `check_finite_weights`, `save_ema_checkpoint`, `load_ema_checkpoint`) work
on plain, data-parallel and sharded models alike; the ones that gather are collectives that every process must call.

Checkpoints are folders `output_dir/checkpoint-<step>` written by accelerate's `save_state` plus a
`training_state.json`. They are written atomically (into `checkpoint-<step>.tmp`, renamed when complete), pruned
atomically (renamed to `.pruned.tmp` before deletion), and never written when a weight is NaN or infinite, so that
`--resume_from_checkpoint latest` only ever finds complete, finite checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from huggingface_hub import create_repo
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.data import Sampler

from .data.latents import LatentCacheError
from .data.paired_dataset import PairedDataError, PairedDataset, validate_paired_csv
from .image_io import load_rgb


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"
# The file a running script locks in its output folder (see `output_dir_lock`).
LOCK_NAME = ".lock"


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight; nothing non-finite was saved."""


class OutputDirBusy(ValueError):
    """Another live training run holds the output folder."""


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line (`prog: error: message`, exit status 2), without the usage
    block of a training script's many flags."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def output_dir_lock(output_dir: str):
    """Lock `output_dir` for the block, so that a second run into it is refused at its start (`OutputDirBusy`) instead
    of breaking the first one's checkpoints. Taken by the process of global rank 0 only (the `RANK` a launcher sets);
    the lock is the operating system's, released when the process ends however it ends."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    from filelock import FileLock, Timeout

    os.makedirs(output_dir, exist_ok=True)
    lock = FileLock(os.path.join(output_dir, LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirBusy(f"--output_dir {output_dir} is in use by another training run.") from None
    try:
        yield
    finally:
        lock.release()


def run_script(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """A training script's `__main__`: `main(args)` with the output folder locked (`output_dir_lock`). A busy output
    folder and the data errors found after parsing (an image that cannot be decoded, a latent cache built with other
    settings) end the script like an argument error: one line on stderr, exit status 2."""
    try:
        with output_dir_lock(args.output_dir):
            main(args)
    except (OutputDirBusy, PairedDataError, LatentCacheError) as error:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: error: {error}\n")
        sys.exit(2)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as sorted (step, path) pairs.

    Only folders named exactly `checkpoint-<step>` count. A checkpoint is written into `checkpoint-<step>.tmp` and
    renamed once complete, and one being pruned or replaced is first renamed to `checkpoint-<step>.<why>.tmp`, so
    every folder with the exact name is complete and the `.tmp` ones are ignored.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def remove_unfinished_checkpoints(output_dir: str) -> None:
    """Delete the `checkpoint-*.tmp` folders left by a run killed while saving, pruning or replacing a checkpoint."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and name.endswith(".tmp") and os.path.isdir(path):
            logger.info(f"Removing {path}, left by an interrupted save or prune.")
            shutil.rmtree(path)


def prune_checkpoints(output_dir: str, limit: int) -> None:
    """Delete the oldest complete checkpoints until at most `limit` (>= 1) remain; the newest is always kept.

    Each folder is first renamed (one atomic step) to `checkpoint-<step>.pruned.tmp`, which `list_checkpoints` and
    `resolve_checkpoint` refuse, and only then deleted: a run killed midway leaves a `.tmp` folder that the next
    start removes, never a half-deleted `checkpoint-<step>` that still looks resumable.
    """
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - limit)]:
        logger.info(f"Removing {path} (--checkpoints_total_limit {limit})")
        doomed = path + ".pruned.tmp"
        if os.path.exists(doomed):
            shutil.rmtree(doomed)
        os.replace(path, doomed)
        shutil.rmtree(doomed)


def check_resume_argument(resume_from_checkpoint: str | None) -> None:
    """Refuse a --resume_from_checkpoint that is neither 'latest' nor (the path of) a `checkpoint-<step>` folder."""
    if resume_from_checkpoint is None or resume_from_checkpoint == "latest":
        return
    if not CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(resume_from_checkpoint))):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: expected 'latest', 'checkpoint-<step>' or the path of "
            "such a folder."
        )


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """The checkpoint folder named by --resume_from_checkpoint: 'latest' (None when there is none) or a bare
    `checkpoint-<step>` inside `output_dir`, as in diffusers' examples, or a path, taken as it is (a path whose folder
    does not exist is an error, never replaced by a checkpoint of the same name in `output_dir`)."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.dirname(os.path.normpath(path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint ({path}).")
    if not os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
        raise ValueError(f"{path} is not a complete checkpoint written by this script (no {TRAINING_STATE_NAME}).")
    return path


def read_training_state(checkpoint: str) -> dict[str, Any]:
    """The `training_state.json` of a checkpoint folder."""
    with open(os.path.join(checkpoint, TRAINING_STATE_NAME), encoding="utf-8") as handle:
        return json.load(handle)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of `tensor`: its shard for a `DTensor` (FSDP2), else `tensor` itself. Local, no
    communication."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` is a `DTensor` (the module was sharded with FSDP2's `fully_shard`)."""
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole, as a detached CPU copy: gathered from every process's shard for a `DTensor` (a collective:
    every process must call it, for the same tensors in the same order), copied otherwise."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def gather_full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every tensor whole and on the CPU, on every process (see `full_tensor`): what a
    sharded model's `save_pretrained` needs. Every process must call it."""
    return {name: full_tensor(tensor) for name, tensor in module.state_dict().items()}


def sum_over_processes(accelerator, value: float) -> float:
    """`value` summed over all processes; every process must call this."""
    if accelerator.num_processes == 1:
        return value
    total = accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="sum").item()
    # Under gloo (CPU) a worker thread releases the collective's tensors after it completes, which takes the GIL; a
    # process that tears its process group down meanwhile (at exit) deadlocks. The barrier gives the thread its time.
    accelerator.wait_for_everyone()
    return total


def all_processes_finite(accelerator, losses_finite: bool, grad_norm: torch.Tensor | float | None) -> bool:
    """Whether a step is finite everywhere: its losses on every process and, when given, its gradient norm.

    Reduced over the processes, so that all of them skip or stop at the same step (one acting alone would leave the
    others waiting in the next collective).
    """
    finite = losses_finite and (grad_norm is None or math.isfinite(float(grad_norm)))
    return sum_over_processes(accelerator, 0.0 if finite else 1.0) == 0


def weights_to_check(model: torch.nn.Module, ema_model=None) -> list[tuple[str, torch.Tensor]]:
    """The `(name, tensor)` pairs a checkpoint of `model` must hold finite: its trainable parameters (a LoRA run's
    frozen base never changes) and, with `ema_model` (an EMA of all of `model`'s parameters), their shadows."""
    parameters = list(model.named_parameters())
    named = [(name, weight) for name, weight in parameters if weight.requires_grad]
    if ema_model is not None:
        named += [(f"EMA {name}", shadow) for (name, weight), shadow in zip(parameters, ema_model.shadow_params)
                  if weight.requires_grad]
    return named


def check_finite_weights(accelerator, named_tensors: list[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise `NonFiniteError` if any tensor holds NaN or inf, on any process (every process must call this).

    Args:
        named_tensors: `(name, tensor)` pairs of this process (its shards under FSDP / DeepSpeed).
        what: what was about to be written, for the message (e.g. "checkpoint-500").
    """
    bad = []
    if named_tensors:
        # one device sync for all tensors (their local shards under FSDP2)
        finite = torch.stack([torch.isfinite(local_tensor(tensor).detach()).all() for _, tensor in named_tensors]).tolist()
        bad = [name for (name, _), ok in zip(named_tensors, finite, strict=True) if not ok]
    count = int(sum_over_processes(accelerator, float(len(bad))))
    if count > 0:
        raise NonFiniteError(
            f"Not writing {what}: {count} weight tensor(s) hold NaN or inf values"
            + (f" (e.g. {', '.join(bad[:3])})" if bad else "")
            + ". Training diverged; the checkpoints already written are kept."
        )


def save_checkpoint(
    accelerator,
    output_dir: str,
    global_step: int,
    generator: torch.Generator | None,
    named_weights: list[tuple[str, torch.Tensor]],
    training_state: dict[str, Any],
    checkpoints_total_limit: int | None = None,
) -> str:
    """Write `output_dir/checkpoint-<global_step>` atomically; every process must call this.

    The weights (`named_weights`: the trained models' and their EMAs') are checked first: a NaN or inf anywhere raises
    `NonFiniteError` and nothing is written or pruned. Everything then goes into `checkpoint-<step>.tmp` (accelerate's
    state, with whatever its save hooks write, each process's noise-generator state if any, then
    training_state.json with `global_step` and `training_state`); only then is it renamed to `checkpoint-<step>` and are old checkpoints
    pruned. A run killed while saving leaves the previous checkpoints untouched, and `resolve_checkpoint(...,
    "latest")` never picks an unfinished one.
    """
    final_dir = os.path.join(output_dir, f"checkpoint-{global_step}")
    check_finite_weights(accelerator, named_weights, os.path.basename(final_dir))
    tmp_dir = final_dir + ".tmp"
    if accelerator.is_main_process:
        remove_unfinished_checkpoints(output_dir)
    accelerator.wait_for_everyone()

    accelerator.save_state(tmp_dir)
    if generator is not None:
        save_file(
            {"state": generator.get_state()},
            os.path.join(tmp_dir, f"training_generator_{accelerator.process_index}.safetensors"),
        )
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        state = {"global_step": global_step, **training_state, "num_processes": accelerator.num_processes}
        with open(os.path.join(tmp_dir, TRAINING_STATE_NAME), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)
        if os.path.exists(final_dir):  # the same step saved by an earlier run: replace it, never write into it
            replaced = final_dir + ".replaced.tmp"  # removed above if an earlier replacement was interrupted
            os.replace(final_dir, replaced)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(replaced)
        else:
            os.replace(tmp_dir, final_dir)
        logger.info(f"Saved state to {final_dir}")

        if checkpoints_total_limit is not None:
            prune_checkpoints(output_dir, checkpoints_total_limit)
    accelerator.wait_for_everyone()
    return final_dir


def prepare_hub_repo(args, accelerator) -> str | None:
    """Check that --push_to_hub can work and create the repo, before any training time is spent (`args`:
    `hub_token`, `hub_model_id`, `output_dir`; the repo is named after the output folder unless `hub_model_id`).

    Returns the repo id on the main process (None elsewhere).
    """
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            "--push_to_hub needs the Hub, but huggingface_hub is offline (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE, "
            "or train without --push_to_hub and upload output_dir later with `hf upload`."
        )
    token = args.hub_token or get_token()
    if token is None:
        raise ValueError("--push_to_hub needs a Hub token: run `hf auth login` or pass --hub_token.")
    if not accelerator.is_main_process:
        return None
    try:
        return create_repo(
            repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=token
        ).repo_id
    except Exception as error:
        raise ValueError(
            f"--push_to_hub: could not create the repo {args.hub_model_id or Path(args.output_dir).name!r} on "
            f"{constants.ENDPOINT} ({type(error).__name__}: {error}). Check the token and the network."
        ) from error


def save_ema_checkpoint(ema_model, ema_dir: str, is_main_process: bool = True) -> None:
    """Write `ema_model` (a diffusers `EMAModel`) as `EMAModel.save_pretrained` does: a model folder of its
    `model_cls` with the averaged weights and the EMA's counters (decay, optimization_step, ...) in its config.json.

    Sharded shadows (the EMA of an FSDP2 model holds `DTensor` shards, see `create_ema`) are gathered first, so the
    folder is the same whatever the sharding and a run can resume on another number of processes. Every process must
    call this; only the main one writes.
    """
    shadows = ema_model.shadow_params
    if not any(isinstance(shadow, DTensor) for shadow in shadows):
        if is_main_process:
            ema_model.save_pretrained(ema_dir)
        return
    whole = [full_tensor(shadow) for shadow in shadows]
    if not is_main_process:
        return
    model = ema_model.model_cls.from_config(ema_model.model_config)
    counters = ema_model.state_dict()
    counters.pop("shadow_params")
    model.register_to_config(**counters)
    with torch.no_grad():
        for parameter, value in zip(model.parameters(), whole, strict=True):
            parameter.copy_(value)
    model.save_pretrained(ema_dir)


def load_ema_checkpoint(ema_model, ema_dir: str, model_cls: type | None = None) -> None:
    """Load what `save_ema_checkpoint` (or `EMAModel.save_pretrained`) wrote into `ema_model`, in place.

    The weights are read from safetensors only (`EMAModel.from_pretrained` would fall back to pickled files), the
    counters (decay, optimization_step, ...) from the same config.json. Sharded shadows receive their shard of the
    saved weights, whatever the number of processes that wrote them (every process must call this then).

    Args:
        ema_model: the `EMAModel` to load into (its shadows keep their device, dtype and sharding).
        ema_dir: the folder written by `save_ema_checkpoint`.
        model_cls: the class of the averaged model (default: `ema_model.model_cls`).
    """
    model_cls = model_cls or ema_model.model_cls
    loaded = model_cls.from_pretrained(ema_dir, use_safetensors=True)  # shard index files included
    config = model_cls.load_config(ema_dir)
    saved = list(loaded.named_parameters())
    if len(saved) != len(ema_model.shadow_params):
        raise ValueError(f"{ema_dir} holds {len(saved)} tensors but the EMA tracks {len(ema_model.shadow_params)}.")
    with torch.no_grad():
        for (name, value), shadow in zip(saved, ema_model.shadow_params, strict=True):
            value = value.detach().to(dtype=shadow.dtype)
            if isinstance(shadow, DTensor):
                value = distribute_tensor(value.to(shadow.device), shadow.device_mesh, shadow.placements)
            else:
                value = value.to(shadow.device)
            if value.shape != shadow.shape:
                raise ValueError(f"{ema_dir}: {name} has shape {tuple(value.shape)}, the EMA's is {tuple(shadow.shape)}.")
            shadow.copy_(value)
    counters = {key: config[key] for key in ema_model.state_dict() if key != "shadow_params" and key in config}
    for key, value in counters.items():
        setattr(ema_model, key, value)


def create_ema(model: torch.nn.Module, decay: float):
    """A diffusers `EMAModel` of `model`'s parameters, as they are now: build it after the model is sharded (FSDP2),
    so that each shadow is a `DTensor` shard beside its parameter's shard (an EMA built from the unsharded weights
    would be stepped with mismatched tensors) and costs each process only its share of memory. For a plain or DDP
    model it is the usual full copy."""
    from diffusers.training_utils import EMAModel
    from torch.distributed.fsdp import FSDPModule

    # fully_shard gives the module a new class (FSDP<Name>, a subclass of FSDPModule and <Name>): save as <Name>
    model_cls = next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))
    return EMAModel(list(model.parameters()), decay=decay, model_cls=model_cls, model_config=model.config)


@contextlib.contextmanager
def ema_weights(ema_model, model: torch.nn.Module):
    """Within the block, `model` holds the weights of `ema_model` (a diffusers `EMAModel`; no-op when None); the
    trained weights come back after."""
    if ema_model is None:
        yield
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield
    finally:
        ema_model.restore(model.parameters())


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of the dataset that depends only on (seed, epoch).

    The order does not consume any global random state, so a run resumed from a checkpoint sees exactly the batches
    the uninterrupted run would have seen (the resumed epoch's first batches are skipped).
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def check_output_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with `args.output_dir` and `args.resume_from_checkpoint`, in one line, or None (see
    `resolve_checkpoint`)."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        return f"--output_dir {args.output_dir} is a file, not a folder."
    if args.resume_from_checkpoint is not None:
        try:
            check_resume_argument(args.resume_from_checkpoint)
            resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        except ValueError as error:
            return str(error)
    return None


def check_pairs_csv(csv_path: str, skip_bad_samples: bool, allow_multiline_captions: bool = False) -> str | None:
    """Every row of a pairs CSV checked before training (its files exist and their headers read as images of
    compatible sizes; the pixels are not decoded): one line naming all bad rows (file and line), or None.

    With `skip_bad_samples` the bad rows are logged and left for `PairedDataset(on_error="skip")` to skip; only a CSV
    without a usable row is then an error."""
    report = validate_paired_csv(csv_path, decode=False, allow_multiline_captions=allow_multiline_captions)
    if report.num_rows == 0:
        return f"{csv_path} holds no pairs (a header only)."
    if report.ok:
        return None
    problems = "; ".join(f"{location}: {message}" for location, message in report.problems)
    if skip_bad_samples and report.num_valid > 0:
        logger.warning(f"--skip_bad_samples: {report.num_rows - report.num_valid} bad row(s) left out: {problems}")
        return None
    return (
        f"{report.num_rows - report.num_valid} of the {report.num_rows} rows of {csv_path} are bad (fix them, or pass "
        f"--skip_bad_samples to leave them out): {problems}"
    )


def build_paired_dataset(data: str, args: argparse.Namespace, seed: int) -> PairedDataset:
    """The training pairs of a pairs CSV or a folder of clean images, as the scripts' data flags ask (`resolution`,
    `degradation`, `random_flip`, `center_crop`, `skip_bad_samples`, `allow_multiline_captions`, `max_train_samples`,
    `repeats`). Each repeat is its own sample: samples are seeded by their index, so copies get their own crop, flip
    and degradation."""
    dataset = PairedDataset(
        data,
        resolution=args.resolution,
        degradation=args.degradation,
        seed=seed,
        random_flip=args.random_flip,
        center_crop=args.center_crop,
        on_error="skip" if args.skip_bad_samples else "raise",
        allow_multiline_captions=args.allow_multiline_captions,
    )
    if args.max_train_samples is not None:
        dataset.rows = dataset.rows[: args.max_train_samples]
    dataset.rows = dataset.rows * args.repeats
    return dataset


def load_validation_pairs(images: list[str], targets: list[str] | None) -> list[tuple[Any, Any]]:
    """`(image, target or None)` RGB PIL images of the --validation_image / --validation_target_image files; an image
    of another size than its target (e.g. a low-resolution input) is resized to the target's."""
    from PIL import Image

    pairs = []
    for index, path in enumerate(images):
        image = load_rgb(path)
        target = load_rgb(targets[index]) if targets else None
        if target is not None and target.size != image.size:
            image = image.resize(target.size, Image.BICUBIC)
        pairs.append((image, target))
    return pairs


def optimizer_step_if_finite(
    accelerator, optimizer, lr_scheduler, parameters, max_grad_norm: float, losses_finite: bool
) -> tuple[Any, bool]:
    """The end of a training step of diffusers' examples (gradient clipping, optimizer and learning-rate steps,
    zero_grad), where the step is taken only if it is finite on every process: its losses (`losses_finite`: all those of
    the accumulation window) and its gradient norm. Under fp16 the GradScaler skips overflowing steps by itself
    (routine), so there only the losses decide. Returns `(grad_norm or None, finite)`; `finite` is True between
    accumulation steps."""
    grad_norm, finite = None, True
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
        finite = all_processes_finite(accelerator, losses_finite, grad_norm if accelerator.scaler is None else None)
    if finite:
        optimizer.step()
        lr_scheduler.step()
    elif accelerator.scaler is not None:
        accelerator.scaler.update()  # clip_grad_norm_ unscaled the gradients: close the step
    optimizer.zero_grad()
    return grad_norm, finite


def log_validation_images(
    accelerator, rows: list[list[Any]], metrics: dict[str, float | None], output_dir: str, global_step: int,
    is_final: bool, caption: str,
) -> str:
    """Save and log a validation grid (one row of PIL images per validation image, shorter rows padded with black, every
    cell at the first image's size) and its metrics: `validation/<name>` (`test/<name>` for the final validation) to
    the trackers, the grid to TensorBoard / wandb and to `output_dir/validation/step-<N>.png` (`validation.png` for the
    final one). Returns the grid's path."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    size, columns = rows[0][0].size, max(len(row) for row in rows)
    cells = [image.resize(size) for row in rows for image in row + [Image.new("RGB", size)] * (columns - len(row))]
    grid = make_image_grid(cells, rows=len(rows), cols=columns)
    phase = "test" if is_final else "validation"
    path = os.path.join(output_dir, "validation.png" if is_final else f"validation/step-{global_step}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)
    accelerator.log({f"{phase}/{key}": value for key, value in metrics.items() if value is not None}, step=global_step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(phase, np.asarray(grid)[None], global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({phase: [wandb.Image(grid, caption=caption)]}, step=global_step)
    logger.info(f"Validation at step {global_step}: {path}, {metrics}")
    return path


def skip_nonfinite_step(
    accelerator, args: argparse.Namespace, global_step: int, loss: float, grad_norm, skipped_steps: int
) -> int:
    """Account for a step whose loss or gradient norm was NaN or infinite (on some process; nothing was updated):
    while fewer than `args.max_nonfinite_steps` were skipped, log it and return the new count of skipped steps; else
    stop the run with a `NonFiniteError` naming the step and the last checkpoint (every process raises)."""
    grad_text = f"{float(grad_norm):.4g}" if grad_norm is not None else "n/a"
    if skipped_steps >= args.max_nonfinite_steps:
        accelerator.end_training()
        last = list_checkpoints(args.output_dir)
        raise NonFiniteError(
            f"Training diverged at step {global_step + 1}: the loss ({loss:.4g}) or the gradient norm ({grad_text}) is "
            "NaN or infinite" + (" on some process" if accelerator.num_processes > 1 else "")
            + f". Nothing was saved for this step; the last checkpoint is {last[-1][1] if last else 'none'}. Lower "
            "--learning_rate, add --lr_warmup_steps, or pass --max_nonfinite_steps N to skip up to N such steps."
            + (f" ({skipped_steps} were skipped already.)" if skipped_steps else "")
        )
    logger.warning(
        f"Step {global_step + 1}: non-finite loss ({loss:.4g}) or gradient norm ({grad_text}); skipped without "
        f"updating anything ({skipped_steps + 1} of --max_nonfinite_steps {args.max_nonfinite_steps})."
    )
    return skipped_steps + 1
