# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Sharded training on two CPU processes: FSDP2 (`fully_shard` over gloo) against DDP, with the package's EMA,
finite-check, checkpoint and gathering helpers (`sharded_training_worker.py` is one process of it).

accelerate enables its FSDP plugin only on accelerators, so the training script's FSDP path cannot run here; this test
exercises the parts of it that sharding changes, with the same helpers and the same torch FSDP2 the plugin uses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_restore.training_utils import full_tensor, gather_full_state_dict, is_sharded, local_tensor


WORKER = Path(__file__).with_name("sharded_training_worker.py")


def _launch(tmp_path: Path, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), "--out", str(tmp_path), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    _launch(out, "--mode", "ddp", "--tag", "ddp")
    _launch(out, "--mode", "fsdp", "--tag", "fsdp")
    _launch(out, "--mode", "fsdp", "--tag", "fsdp_resumed", "--resume", str(out / "fsdp-checkpoint"))
    return out


def _read(out: Path, tag: str) -> tuple[dict, dict]:
    return load_file(str(out / f"{tag}.safetensors")), json.loads((out / f"{tag}.json").read_text())


def test_fsdp_parameters_and_ema_are_sharded(runs):
    _, ddp = _read(runs, "ddp")
    _, fsdp = _read(runs, "fsdp")
    assert not ddp["sharded"]
    assert fsdp["sharded"] and fsdp["all_dtensor"] and fsdp["shard_dim0"] and fsdp["ema_dtensor"]
    # each of the two processes holds about half of the weights and half of the EMA (dim-0 shards round up)
    assert fsdp["local_numel"] < 0.6 * fsdp["full_numel"]
    assert fsdp["ema_local_numel"] == fsdp["local_numel"]
    assert fsdp["full_numel"] == ddp["full_numel"]


def test_fsdp_trains_the_weights_and_ema_of_ddp(runs):
    ddp, _ = _read(runs, "ddp")
    fsdp, report = _read(runs, "fsdp")
    assert report["ema_optimization_step"] == 4
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5, msg=key)
    # the runs trained something, and the EMA differs from the weights
    assert not torch.equal(ddp["model.projection.weight"], ddp["ema.projection.weight"])


def test_fsdp_resume_is_exact(runs):
    """Resuming at step 2 from the sharded checkpoint (model and optimizer through torch.distributed.checkpoint, the
    EMA gathered into its diffusers folder and re-sharded on load) ends with the uninterrupted run's weights."""
    uninterrupted, _ = _read(runs, "fsdp")
    resumed, report = _read(runs, "fsdp_resumed")
    assert report["ema_optimization_step"] == 4
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    ema_dir = runs / "fsdp-checkpoint" / "transformer_ema"
    config = json.loads((ema_dir / "config.json").read_text())
    assert config["optimization_step"] == 2 and config["_class_name"] == "ConcatConditionedTransformer"


def test_helpers_on_unsharded_tensors_are_plain_copies():
    module = torch.nn.Linear(3, 2)
    assert not is_sharded(module)
    weight = module.weight
    assert local_tensor(weight) is weight
    copy = full_tensor(weight)
    assert torch.equal(copy, weight.detach()) and copy.data_ptr() != weight.data_ptr() and not copy.requires_grad
    state = gather_full_state_dict(module)
    assert set(state) == {"weight", "bias"}
