"""Data-parallel scaling and sharded memory on CPU processes (gloo): what FSDP2 saves per process, and what a second
process adds to training throughput.

    python benchmarks/bench_sharding.py                  # mid-size transformer, about 3 minutes on 2 cores
    python benchmarks/bench_sharding.py --layers 2 --width 1152

Each configuration is launched with `torch.distributed.run` (this script is also the worker): a
`ConcatConditionedTransformer` of SANA's design at a mid size (default 4 layers of width 1152, SANA 600M's width;
32 latent channels) trains a few AdamW steps with an EMA (`training_utils.create_ema`, as `train_paired.py` builds it)
on random 16 x 16 latents, batch 2 per process, in fp32:
* memory: peak resident memory per process, FSDP2 (`fully_shard` per block and at the root) / DDP, 2 processes;
* scaling: samples/s of 2 DDP processes / samples/s of 1 process, on the same cores (each process gets cores / 2
  threads, the single one all of them): on a CPU data parallelism only splits the same cores, so 1.0 means the
  gradient all-reduce and the duplicated Python work cost nothing; on GPUs each process brings its own device.
The 1.6B arithmetic for comparison is printed beside the measured ratio: weights, gradients, AdamW's two moments
and the EMA in fp32 are 5 x 4 bytes per parameter, all of it divided by the number of processes under FSDP.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from diffusers import SanaTransformer2DModel
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from diffusers_restore import ConcatConditionedTransformer
    from diffusers_restore.training_utils import create_ema

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    heads = args.width // 32
    sana = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=heads, attention_head_dim=32, num_layers=args.layers,
        num_cross_attention_heads=heads // 2, cross_attention_head_dim=64, cross_attention_dim=args.width,
        caption_channels=256, mlp_ratio=2.5, sample_size=32, patch_size=1,
    )
    model = ConcatConditionedTransformer.from_transformer(sana).train()
    parameters = sum(p.numel() for p in model.parameters())
    if args.mode == "fsdp":
        for block in model.transformer.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
        module = model
    else:
        module = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ema = create_ema(model, decay=0.999)
    generator = torch.Generator().manual_seed(rank)
    step_seconds = []
    for step in range(args.steps):
        start = time.perf_counter()
        latents = torch.randn(2, 32, 16, 16, generator=generator)
        output = module(latents, torch.randn(2, 32, 16, 16, generator=generator),
                        torch.randn(2, 20, 256, generator=generator), torch.rand(2, generator=generator) * 1000).sample
        torch.nn.functional.mse_loss(output, latents).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        step_seconds.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = [None] * world
    dist.all_gather_object(results, {"peak_mib": peak_mib, "step_seconds": step_seconds})
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"parameters": parameters, "ranks": results}, handle)
    dist.barrier()
    dist.destroy_process_group()


def launch(mode: str, processes: int, args: argparse.Namespace, folder: str) -> dict:
    out = os.path.join(folder, f"{mode}-{processes}.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               os.path.abspath(__file__), "--worker", "--mode", mode, "--out", out, "--steps", str(args.steps),
               "--layers", str(args.layers), "--width", str(args.width)]
    threads = max(1, (os.cpu_count() or 2) // processes)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode != 0:
        raise SystemExit(f"{mode} x{processes} failed:\n{result.stderr[-3000:]}")
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "real"], default="real",
                        help="tiny: 2 layers of width 576; real: the mid size below (run_all's flag)")
    parser.add_argument("--device", default="cpu", help="cpu only: the processes talk over gloo (run_all's flag)")
    parser.add_argument("--layers", type=int, default=None, help="default 4 (2 at --scale tiny)")
    parser.add_argument("--width", type=int, default=None, help="default 1152 (576 at --scale tiny)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.layers is None:
        args.layers = 2 if args.scale == "tiny" else 4
    if args.width is None:
        args.width = 576 if args.scale == "tiny" else 1152
    if args.device != "cpu":
        raise SystemExit("bench_sharding measures CPU processes over gloo: --device cpu only.")
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_all import emit_results

    with tempfile.TemporaryDirectory(prefix="bench-sharding-") as folder:
        ddp1 = launch("ddp", 1, args, folder)
        ddp2 = launch("ddp", 2, args, folder)
        fsdp2 = launch("fsdp", 2, args, folder)

    def peak(run: dict) -> float:
        return max(rank["peak_mib"] for rank in run["ranks"])

    def samples_per_second(run: dict) -> float:
        warm = [sorted(rank["step_seconds"][1:])[len(rank["step_seconds"][1:]) // 2] for rank in run["ranks"]]
        return 2 * len(run["ranks"]) / max(warm)  # batch 2 per process; the slowest process sets the pace

    parameters = ddp1["parameters"]
    one, two = samples_per_second(ddp1), samples_per_second(ddp2)
    state_gib = 20 * 1.6e9 / 2**30
    print(f"{parameters / 1e6:.1f}M parameters; peak RSS per process: DDP {peak(ddp2):.0f} MiB, FSDP2 "
          f"{peak(fsdp2):.0f} MiB (ratio {peak(fsdp2) / peak(ddp2):.3f}; of which the interpreter and libraries are "
          f"shared overhead). Samples/s on the same cores: 1 process {one:.2f}, 2 processes {two:.2f} (ratio "
          f"{two / one:.2f}).")
    print(f"1.6B arithmetic: weights + gradients + AdamW moments + EMA in fp32 = {state_gib:.1f} GiB per process under "
          f"DDP, {state_gib / 8:.1f} GiB per GPU under FSDP over 8 GPUs (activations not included).")
    emit_results([
        {"benchmark": "sharding", "metric": f"peak RSS per process FSDP2 / DDP, 2 processes, {parameters / 1e6:.0f}M",
         "value": peak(fsdp2) / peak(ddp2), "unit": "", "target": 1.0, "better": "lower"},
        {"benchmark": "sharding", "metric": "DDP samples/s, 2 processes / 1 process, same CPU cores", "value": two / one,
         "unit": "", "target": None, "better": "higher"},
        {"benchmark": "sharding", "metric": "DDP samples/s, 1 process, CPU", "value": one, "unit": "samples/s",
         "target": None, "better": "higher"},
    ])


if __name__ == "__main__":
    main()
