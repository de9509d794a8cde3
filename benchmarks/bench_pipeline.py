"""SanaRestorationPipeline: pipeline overhead, prompt cache and the memory of tiled restores.

    python benchmarks/bench_pipeline.py --scale tiny                  # seconds
    python benchmarks/bench_pipeline.py --scale real                  # SANA 1.6B + Gemma-2-2B + DC-AE, random bf16
    python benchmarks/bench_pipeline.py --scale real --device cuda
    python benchmarks/bench_pipeline.py --scale real --skip-memory    # overhead only

Measured, each as a ratio within one run (machines are noisy):

1. overhead = wall time of a pipeline call / time spent inside the text encoder, transformer and VAE forwards
   (timed with forward hooks; cold prompt cache so that all three run). Everything else the pipeline does (image
   conversion, padding, tiling, scheduler, colour fix, post-processing) is the difference. Target <= 1.03 at real
   size; at tiny size the models take milliseconds and the figure only shows the fixed cost per call.
2. prompt cache = wall time of a call whose prompts are cached / the same call with a cold cache.
3. memory = peak memory of a restore at twice the native resolution (2048 px for SANA 1024 px; tiled
   automatically) / an untiled restore at the native resolution (1024 px), each in its own subprocess: peak RSS
   (VmHWM, reset after the models are built) on CPU, `torch.cuda.max_memory_allocated` on CUDA. Reported for the
   whole process and for the part above the loaded weights (activations and buffers: what tiling bounds).
   Target <= 1.3. These runs pass pre-computed prompt embeddings (no text encoder), one step, no CFG.

4. latency (on CUDA by default, `--latency` elsewhere): wall time of one 1024 px restore at 20 steps with CFG, and
   peak `max_memory_allocated`: the absolute GPU figures.

Real-size models are built with random weights straight in bf16 (parameters created on the meta device, then
filled), with the published configurations: SANA 1.6B (`testing.real_sana_transformer_config`), Gemma-2-2B
(hidden 2304, 26 layers, 8 heads / 4 KV heads, head dim 256, MLP 9216, vocabulary 256000; about 5.2 GB in bf16) and
DC-AE f32c32 (`testing.real_dc_ae_config`). The tokenizer is the tiny byte-level one: prompts are padded to
`max_sequence_length` = 300 tokens either way, so the text encoder does the real amount of work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run_all import emit_results  # noqa: E402

MEMORY_MARKER = "MEMORY_JSON:"
GEMMA_2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    attn_implementation="eager",
)
PROMPT = "Restore this image to high quality"


# ------------------------------------------------------------------------------------------------ building


def _random_module(build, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """`build()` with parameters created on the meta device, then filled with small random values in `dtype`."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            module = build()
    finally:
        torch.set_default_dtype(default_dtype)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in list(module.named_parameters()):
        value = torch.empty(parameter.shape, dtype=dtype).uniform_(-0.035, 0.035, generator=generator)  # std 0.02
        set_module_tensor_to_device(module, name, device, value=value)
    return module.to(device).eval()


def build_pipeline(scale: str, device: str, with_text_encoder: bool = True):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from diffusers_restore.pipelines.pipeline_sana_restoration import SanaRestorationPipeline
    from diffusers_restore.testing import (
        get_tiny_components,
        get_tiny_tokenizer,
        real_dc_ae_config,
        real_sana_transformer_config,
    )

    if scale == "tiny":
        components = get_tiny_components(seed=0)
    else:
        from transformers import Gemma2Config, Gemma2Model

        dtype = torch.bfloat16
        components = {
            "tokenizer": get_tiny_tokenizer(),
            "text_encoder": _random_module(lambda: Gemma2Model(Gemma2Config(**GEMMA_2_2B)), dtype, device, 1)
            if with_text_encoder
            else None,
            "vae": _random_module(lambda: AutoencoderDC(**real_dc_ae_config()), dtype, device, 2),
            "transformer": _random_module(
                lambda: SanaTransformer2DModel(**real_sana_transformer_config()), dtype, device, 3
            ),
            "scheduler": DPMSolverMultistepScheduler(
                flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++"
            ),
        }
    if not with_text_encoder:
        components["text_encoder"] = components["tokenizer"] = None
    restorer = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**components))
    restorer.to(device)
    restorer.set_progress_bar_config(disable=True)
    return restorer


def _image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.5 + 0.4 * np.sin(7 * x + 5 * y + p) for p in rng.uniform(0, 6, 3)], axis=-1)
    image += rng.normal(0, 0.05, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ overhead


class ForwardTimer:
    """Accumulates the time spent inside the forwards of the given modules (outermost calls only)."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: str):
        self.device, self.seconds, self._starts, self._handles = device, {}, {}, []
        for name, module in modules.items():
            self.seconds[name] = 0.0
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._exit(name)))

    def _enter(self, name):
        def hook(module, args):
            _sync(self.device)
            self._starts[name] = time.perf_counter()

        return hook

    def _exit(self, name):
        def hook(module, args, output):
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - self._starts.pop(name)

        return hook

    def remove(self) -> None:
        """Detach the hooks (the pipeline is reused by the latency run)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        for name in self.seconds:
            self.seconds[name] = 0.0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def _timed_call(pipe, image: np.ndarray, steps: int, device: str) -> float:
    """Wall seconds of one pipeline call with the benchmark prompt and SUPIR's linear CFG 1 -> 4 (the first step
    without, the others with the negative-quality prompt), device work included."""
    _sync(device)
    begin = time.perf_counter()
    pipe(image, prompt=PROMPT, num_inference_steps=steps, guidance_scale_start=1.0, guidance_scale=4.0,
         generator=torch.Generator().manual_seed(0))
    _sync(device)
    return time.perf_counter() - begin


def measure_overhead(args, pipe) -> list[dict]:
    size = args.size or (128 if args.scale == "tiny" else 512)
    steps = args.steps or (4 if args.scale == "tiny" else 2)
    timer = ForwardTimer(
        {
            "text_encoder": pipe.text_encoder,
            "transformer": pipe.transformer,
            "vae_encoder": pipe.vae.encoder,
            "vae_decoder": pipe.vae.decoder,
        },
        args.device,
    )
    image = _image(size)

    def call() -> float:
        timer.reset()
        return _timed_call(pipe, image, steps, args.device)

    runs = []
    for run in range(args.runs + 1):  # the first run warms up
        pipe.clear_prompt_cache()
        wall = call()
        runs.append((wall, timer.total, dict(timer.seconds)))
        print(f"  cold run {run}: wall {wall:.3f} s, in models {timer.total:.3f} s {timer.seconds}", flush=True)
    measured = runs[1:] if len(runs) > 1 else runs
    wall, model, parts = min(measured, key=lambda r: r[0] / r[1])
    warm_wall = call()  # prompts now cached: no text encoder
    print(f"  cached-prompt run: wall {warm_wall:.3f} s (text encoder {timer.seconds['text_encoder']:.3f} s)")
    timer.remove()

    label = f"{args.scale}, {size} px, {steps} steps, CFG 1->4, {args.device}"
    return [
        dict(metric=f"overhead: wall / model forwards ({label})", value=round(wall / model, 4), unit="x",
             target=1.03 if args.scale == "real" else None, better="lower"),
        dict(metric=f"wall time per call ({label})", value=round(wall, 3), unit="s", target=None, better="lower"),
        dict(metric=f"time outside the models per call ({label})", value=round(wall - model, 4), unit="s",
             target=None, better="lower"),
        dict(metric=f"cached-prompt call / cold call ({label})", value=round(warm_wall / wall, 4), unit="x",
             target=None, better="lower"),
        *[dict(metric=f"share of model time: {name} ({label})", value=round(seconds / model, 4), unit="fraction",
               target=None, better="lower") for name, seconds in parts.items()],
    ]


# -------------------------------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def memory_run(args) -> None:
    """Subprocess body: one restore at `args.memory_run` px; prints MEMORY_JSON with bytes."""
    pipe = build_pipeline(args.scale, args.device, with_text_encoder=False)
    hidden = pipe.transformer.config.caption_channels
    dtype = pipe.transformer.dtype
    embeds = torch.randn(1, 300, hidden, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
    mask = torch.ones(1, 300, dtype=torch.long, device=args.device)
    image = _image(args.memory_run)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM: construction transients must not count
        baseline = _rss_kib("VmRSS") * 1024
    begin = time.perf_counter()
    pipe(image, prompt_embeds=embeds, prompt_attention_mask=mask, num_inference_steps=1, guidance_scale=1.0,
         tile_size=args.tile_size, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - begin
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    factor = pipe.vae_scale_factor
    tiles = pipe._tile_grid((args.memory_run // factor,) * 2, args.tile_size, None, cell=factor, align=pipe._patch_size)
    tiling = None if len(tiles) == 1 else (tiles.tile, tiles.overlap)
    print(MEMORY_MARKER + " " + json.dumps(dict(size=args.memory_run, baseline=baseline, peak=peak,
                                                seconds=seconds, tiling=tiling)), flush=True)


def _memory_subprocess(args, size: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--scale", args.scale, "--device", args.device,
               "--memory-run", str(size)]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith(MEMORY_MARKER):
            return json.loads(line[len(MEMORY_MARKER):])
    raise RuntimeError(f"memory run at {size} px failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def measure_memory(args) -> list[dict]:
    native = 128 if args.scale == "tiny" else 1024  # transformer sample_size (32) x VAE factor (4 tiny, 32 real)
    untiled = _memory_subprocess(args, native)
    tiled = _memory_subprocess(args, 2 * native)
    for run in (untiled, tiled):
        print(f"  {run['size']} px: tiling {run['tiling']}, baseline {run['baseline'] / 2**30:.2f} GiB, "
              f"peak {run['peak'] / 2**30:.2f} GiB, {run['seconds']:.1f} s", flush=True)
    unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    label = f"{args.scale}, {2 * native} px tiled vs {native} px untiled, {args.device}"
    above = (tiled["peak"] - tiled["baseline"]) / max(untiled["peak"] - untiled["baseline"], 1)
    return [
        dict(metric=f"memory: {unit}, whole process ({label})", value=round(tiled["peak"] / untiled["peak"], 4),
             unit="x", target=1.3, better="lower"),
        dict(metric=f"memory: {unit} above the weights ({label})", value=round(above, 4), unit="x",
             target=1.3 if args.scale == "real" else None, better="lower"),
        dict(metric=f"peak memory, {native} px untiled ({args.scale}, {args.device})",
             value=round(untiled["peak"] / 2**30, 3), unit="GiB", target=None, better="lower"),
        dict(metric=f"peak memory, {2 * native} px tiled ({args.scale}, {args.device})",
             value=round(tiled["peak"] / 2**30, 3), unit="GiB", target=None, better="lower"),
    ]


def measure_latency(args, pipe) -> list[dict]:
    """Absolute figures (meaningful on a GPU): one restore at `--latency-size` px (1024 by default), 20 steps, CFG
    1 -> 4 with the negative-quality prompt, warm prompt cache excluded (cold call), after one warm-up call; peak
    `max_memory_allocated` on CUDA. On a CPU the same code runs (use `--scale tiny --latency` to smoke-test it)."""
    size, steps = args.latency_size, 20
    image = _image(size)

    def call() -> float:
        pipe.clear_prompt_cache()
        return _timed_call(pipe, image, steps, args.device)

    call()  # warm-up (kernels, allocator)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = call()
    label = f"{args.scale}, {size} px, {steps} steps, CFG 1->4, {args.device}"
    rows = [dict(metric=f"restore latency ({label})", value=round(seconds, 3), unit="s", target=None,
                 better="lower")]
    if args.device.startswith("cuda"):
        rows.append(dict(metric=f"peak GPU memory, max_memory_allocated ({label})",
                         value=round(torch.cuda.max_memory_allocated() / 2**30, 3), unit="GiB", target=None,
                         better="lower"))
    print(f"  latency: {seconds:.3f} s for {label}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image side for the overhead runs (tiny 128, real 512)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps for the overhead runs (4 / 2)")
    parser.add_argument("--runs", type=int, default=1, help="measured cold runs after one warm-up run")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                        help="absolute restore latency (20 steps, CFG) and peak GPU memory; default: on for CUDA")
    parser.add_argument("--latency-size", type=int, default=1024, help="image side of the latency run")
    parser.add_argument("--memory-run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tile-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    if args.memory_run is not None:
        memory_run(args)
        return 0

    latency = args.latency if args.latency is not None else args.device.startswith("cuda")
    pipe = None
    if not args.skip_overhead or latency:  # one pipeline in this process serves both (memory runs get their own)
        start = time.perf_counter()
        pipe = build_pipeline(args.scale, args.device)
        print(f"built the {args.scale} pipeline in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    if not args.skip_overhead:
        rows += measure_overhead(args, pipe)
    if latency:
        rows += measure_latency(args, pipe)
    del pipe  # the memory runs build their own pipelines in subprocesses: do not hold a second copy meanwhile
    if not args.skip_memory:
        rows += measure_memory(args)

    print("\n| metric | value | unit | target |\n|---|---|---|---|")
    for row in rows:
        target = "" if row["target"] is None else f"<= {row['target']}"
        print(f"| {row['metric']} | {row['value']} | {row['unit']} | {target} |")
    emit_results([{**row, "benchmark": "pipeline"} for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
