# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""One process of the sharded-training test (`test_sharded_training.py`), started by `torch.distributed.run` with two
processes over gloo on the CPU.

It trains the tiny `ConcatConditionedTransformer` for a few AdamW steps with an EMA, either data-parallel (`--mode
ddp`) or sharded with FSDP2's `fully_shard` (`--mode fsdp`, each transformer block and then the root, as accelerate's
FSDP2 plugin wraps it). The package's training helpers do what the training script does with them: `create_ema`
after sharding, `check_finite_weights` on the shards, `save_ema_checkpoint` / `load_ema_checkpoint` and
`gather_full_state_dict`. The model and optimizer state go through `torch.distributed.checkpoint`, as accelerate saves
them under FSDP. At `--save_step` the state is checkpointed; with `--resume` the run starts from that checkpoint
instead. Rank 0 writes the final full weights and EMA (`<out>/<tag>.safetensors`) and what it saw (`<tag>.json`).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from diffusers_restore import ConcatConditionedTransformer
from diffusers_restore.testing import TINY_CAPTION_CHANNELS, TINY_LATENT_CHANNELS, get_tiny_transformer
from diffusers_restore.training_utils import (
    check_finite_weights,
    create_ema,
    gather_full_state_dict,
    is_sharded,
    load_ema_checkpoint,
    save_ema_checkpoint,
)


class _ProcessGroup:
    """The two attributes of an accelerate `Accelerator` that `check_finite_weights` uses, over torch.distributed."""

    num_processes = 2
    distributed_type = DistributedType.MULTI_CPU
    device = torch.device("cpu")

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def wait_for_everyone(self) -> None:
        dist.barrier()


def build_model(mode: str) -> tuple[torch.nn.Module, ConcatConditionedTransformer]:
    """The tiny concat-conditioned transformer (2 layers, non-zero condition projection so every weight trains), the
    same on every process, wrapped for `mode`. Returns (the module to call, the underlying model)."""
    model = ConcatConditionedTransformer.from_transformer(get_tiny_transformer(seed=0, num_layers=2))
    with torch.no_grad():
        model.projection.weight.add_(0.05 * torch.randn(model.projection.weight.shape, generator=torch.Generator().manual_seed(1)))
    model.train()
    if mode == "fsdp":
        for block in model.transformer.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
        return model, model
    return DistributedDataParallel(model), model


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """This process's batch of a step: different on each process, the same in every run."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    shape = (2, TINY_LATENT_CHANNELS, 8, 8)
    return {
        "hidden_states": torch.randn(shape, generator=generator),
        "condition_latents": torch.randn(shape, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, TINY_CAPTION_CHANNELS, generator=generator),
        "timestep": torch.rand(2, generator=generator) * 1000,
        "target": torch.randn(shape, generator=generator),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save_step", type=int, default=2)
    parser.add_argument("--resume", default=None, help="A checkpoint folder written by --save_step.")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    module, model = build_model(args.mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    ema = create_ema(model, decay=0.9)
    group = _ProcessGroup()

    report = {"sharded": is_sharded(model)}
    if args.mode == "fsdp":
        parameters = list(model.parameters())
        report["all_dtensor"] = all(isinstance(p, DTensor) for p in parameters)
        report["shard_dim0"] = all(p.placements == (Shard(0),) for p in parameters)
        report["local_numel"] = sum(p.to_local().numel() for p in parameters)
        report["ema_dtensor"] = all(isinstance(s, DTensor) for s in ema.shadow_params)
        report["ema_local_numel"] = sum(s.to_local().numel() for s in ema.shadow_params)
    report["full_numel"] = sum(p.numel() for p in model.parameters())

    start = 0
    if args.resume is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(args.resume, "model_and_optimizer"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        load_ema_checkpoint(ema, os.path.join(args.resume, "transformer_ema"))
        with open(os.path.join(args.resume, "step.json"), encoding="utf-8") as handle:
            start = json.load(handle)["step"]

    for step in range(start, args.steps):
        inputs = batch(step, rank)
        target = inputs.pop("target")
        prediction = module(**inputs).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        if step + 1 == args.save_step and args.resume is None:
            named = list(model.named_parameters()) + [(f"EMA {i}", s) for i, s in enumerate(ema.shadow_params)]
            check_finite_weights(group, named, f"checkpoint-{step + 1}")
            checkpoint = os.path.join(args.out, f"{args.tag}-checkpoint")
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state},
                     checkpoint_id=os.path.join(checkpoint, "model_and_optimizer"))
            save_ema_checkpoint(ema, os.path.join(checkpoint, "transformer_ema"), is_main_process=rank == 0)
            if rank == 0:
                with open(os.path.join(checkpoint, "step.json"), "w", encoding="utf-8") as handle:
                    json.dump({"step": step + 1}, handle)
            dist.barrier()

    weights = gather_full_state_dict(model)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    ema_weights = gather_full_state_dict(model)
    ema.restore(model.parameters())
    report["ema_optimization_step"] = ema.optimization_step
    if rank == 0:
        tensors = {f"model.{k}": v.contiguous() for k, v in weights.items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in ema_weights.items()})
        save_file(tensors, os.path.join(args.out, f"{args.tag}.safetensors"))
        with open(os.path.join(args.out, f"{args.tag}.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
