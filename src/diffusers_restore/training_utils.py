# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint and divergence helpers shared by the training scripts in `examples/` (`train_paired.py`,
`train_decoder.py`). Inference code never imports this module.

Checkpoints are folders `output_dir/checkpoint-<step>` written by accelerate's `save_state` plus a
`training_state.json`. They are written atomically (into `checkpoint-<step>.tmp`, renamed when complete), pruned
atomically (renamed to `.pruned.tmp` before deletion), and never written when a weight is NaN or infinite, so that
`--resume_from_checkpoint latest` only ever finds complete, finite checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import create_repo
from safetensors.torch import save_file
from torch.utils.data import Sampler


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE_NAME = "training_state.json"


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinite loss, gradient or weight; nothing non-finite was saved."""


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
    """The checkpoint folder named by --resume_from_checkpoint ('latest' gives None when there is none)."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, os.path.basename(os.path.normpath(resume_from_checkpoint)))
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint ({path}).")
    if not os.path.isfile(os.path.join(path, TRAINING_STATE_NAME)):
        raise ValueError(f"{path} is not a complete checkpoint written by this script (no {TRAINING_STATE_NAME}).")
    return path


def read_training_state(checkpoint: str) -> dict[str, Any]:
    """The `training_state.json` of a checkpoint folder."""
    with open(os.path.join(checkpoint, TRAINING_STATE_NAME), encoding="utf-8") as handle:
        return json.load(handle)


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


def check_finite_weights(accelerator, named_tensors: list[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise `NonFiniteError` if any tensor holds NaN or inf, on any process (every process must call this).

    Args:
        named_tensors: `(name, tensor)` pairs of this process (its shards under FSDP / DeepSpeed).
        what: what was about to be written, for the message (e.g. "checkpoint-500").
    """
    bad = []
    if named_tensors:
        finite = torch.stack([torch.isfinite(tensor.detach()).all() for _, tensor in named_tensors]).tolist()
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
    generator: torch.Generator,
    named_weights: list[tuple[str, torch.Tensor]],
    training_state: dict[str, Any],
    checkpoints_total_limit: int | None = None,
) -> str:
    """Write `output_dir/checkpoint-<global_step>` atomically; every process must call this.

    The weights (`named_weights`: the trained models' and their EMAs') are checked first: a NaN or inf anywhere raises
    `NonFiniteError` and nothing is written or pruned. Everything then goes into `checkpoint-<step>.tmp` (accelerate's
    state, with whatever its save hooks write, each process's noise-generator state, then training_state.json with
    `global_step` and `training_state`); only then is it renamed to `checkpoint-<step>` and are old checkpoints
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
