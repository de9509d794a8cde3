"""Memory of a restoration pipeline with quantized weights and with model CPU offload, at SANA's real size.

    python benchmarks/bench_memory.py --scale tiny                  # about 2 minutes: smoke test of every part
    python benchmarks/bench_memory.py --scale real                  # SANA 1.6B + Gemma-2-2B + DC-AE f32c32, random
    python benchmarks/bench_memory.py --scale real --device cuda    # adds whole-pipeline runs and model CPU offload
    python benchmarks/bench_memory.py --scale real --configs bf16 int8 --skip-train   # a subset
    python benchmarks/bench_memory.py --scale real --stages train --configs bf16 int8   # one stage
    python benchmarks/bench_memory.py --scale real --weights-only   # load and count the weights, run nothing

Configurations: ``bf16`` (the reference), ``int8`` and ``nf4`` (`diffusers_restore.quantization`'s recommended
configs: torchao int8 weight-only and bitsandbytes NF4 for the transformer and the text encoder, loaded with
`from_pretrained(..., quantization_config=...)`), ``int8-pointwise`` (int8, plus SANA's 1x1 convolutions, its Mix-FFN,
quantized as linear layers: a measurement of that option, not something the package does), and on CUDA ``offload``
and ``nf4-offload`` (`enable_model_cpu_offload`). Diffusers' bitsandbytes quantizer refuses a machine without a GPU;
on a CPU the nf4 rows load the same NF4 layers through the same quantizer with its GPU check lifted (this script
only), since bitsandbytes runs them on a CPU: real bytes and real peak memory, not the product's CPU path (which
refuses nf4).

Measured, each in its own subprocess so that peaks do not mix (CPU: peak RSS, `VmHWM`, above the process's RSS
before any model is loaded; CUDA: `max_memory_allocated`):

1. weights: bytes of each component as loaded (`quantization.weight_bytes`, which counts quantized storage).
2. stages of a 1024 px restore (512 px at tiny scale... the transformer's native size): the text encoder on one
   300-token prompt, one transformer forward on the 1024 px latent (batch 1), the VAE encode + decode (unquantized in
   every configuration, so measured once). Each stage's process holds only that stage's component, so its peak is
   also what model CPU offload needs at most for that stage. The peak of a restore with every component resident is
   derived beside it: all weights + the largest stage's working memory (stage peak - its weights). On CUDA a
   whole-pipeline 1024 px restore per configuration measures it directly (`--whole`, default on CUDA; on a shared
   24 GB CPU machine a bf16 restore with Gemma-2-2B resident does not fit beside other jobs).
3. time of the quantized stages against bf16 (text encoder, transformer), in the same run.
4. training: one LoRA rank-16 step (to_q, to_k, to_v; the condition projection trained in float32, AdamW) at 512 px
   (tiny: 64 px), batch 1, gradient checkpointing on, bf16 autocast, prompt embeddings precomputed (the text encoder
   and the VAE are not resident, as with cached latents and embeddings): peak memory and step time against bf16.
5. fidelity (`--skip-fidelity` to leave out): random weights say nothing about quality, so the bundled trained
   restorer restores the six sample photos (256 px centre crops, Gaussian noise sigma 25, its sampling defaults,
   seed 0) unquantized (bf16) and quantized; PSNR of each quantized output against the bf16 output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import diffusers_restore  # noqa: F401  (first: it quiets the import-time notices of diffusers' optional backends)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_pipeline import GEMMA_2_2B, PROMPT, _image, _random_module, _rss_kib  # noqa: E402
from run_all import emit_results  # noqa: E402

MARKER = "MEMORY_STAGE_JSON:"
QUANTIZED = {"bf16": "none", "int8": "int8", "int8-pointwise": "int8", "nf4": "nf4", "offload": "none",
             "nf4-offload": "nf4"}
CONFIGS = tuple(QUANTIZED)
CUDA_ONLY = {"offload", "nf4-offload"}


# ------------------------------------------------------------------------------------------ the model folder


def write_random_pipeline(folder: str, scale: str) -> None:
    """A `SanaRestorationPipeline` folder with random bf16 weights (real scale: SANA 1.6B, Gemma-2-2B, DC-AE f32c32,
    built and saved one component at a time so that only one is in memory), loaded back by every stage."""
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from diffusers_restore import ConcatConditionedTransformer, SanaRestorationPipeline
    from diffusers_restore.testing import get_tiny_components, real_dc_ae_config, real_sana_transformer_config

    tiny = SanaRestorationPipeline.from_sana_pipeline(SanaPipeline(**get_tiny_components(seed=0)))
    tiny.to(torch.bfloat16).save_pretrained(folder)
    if scale == "tiny":
        return
    dtype = torch.bfloat16
    builders = {
        "transformer": lambda: ConcatConditionedTransformer.from_transformer(
            _random_module(lambda: SanaTransformer2DModel(**real_sana_transformer_config()), dtype, "cpu", 3)
        ),
        "text_encoder": lambda: _random_module(lambda: Gemma2Model(Gemma2Config(**GEMMA_2_2B)), dtype, "cpu", 1),
        "vae": lambda: _random_module(lambda: AutoencoderDC(**real_dc_ae_config()), dtype, "cpu", 2),
    }
    for name, build in builders.items():
        start = time.perf_counter()
        module = build()
        shutil.rmtree(os.path.join(folder, name))
        module.save_pretrained(os.path.join(folder, name), max_shard_size="1GB")  # a shard at a time in memory
        del module
        print(f"  wrote {name} in {time.perf_counter() - start:.0f} s", flush=True)


@contextlib.contextmanager
def bnb_4bit_on_cpu():
    """Lift diffusers' GPU requirement for its bitsandbytes 4-bit quantizer (bitsandbytes itself runs NF4 layers on
    a CPU). For measurement only: the package's nf4 mode refuses a CPU."""
    from unittest import mock

    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    with mock.patch.object(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None), \
            mock.patch.object(BnB4BitDiffusersQuantizer, "update_device_map", lambda self, device_map: {"": "cpu"}):
        yield


class PointwiseConvAsLinear(torch.nn.Linear):
    """A 1x1 `Conv2d` computed as a linear layer over the channel axis of a `[B, C, H, W]` input, so that a
    weight-only quantizer that takes `nn.Linear` layers quantizes it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden_states.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)


def quantize_pointwise_convs(transformer: torch.nn.Module) -> int:
    """Replace the 1x1 convolutions of SANA's Mix-FFN (`GLUMBConv.conv_inverted`, `conv_point`) by
    `PointwiseConvAsLinear` layers with the same weights and quantize them with torchao int8 weight-only (the
    depthwise 3x3 convolution stays). Returns the number of layers replaced."""
    from diffusers.models.transformers.sana_transformer import GLUMBConv
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    replaced = 0
    for module in transformer.modules():
        if not isinstance(module, GLUMBConv):
            continue
        for name in ("conv_inverted", "conv_point"):
            conv = getattr(module, name)
            linear = PointwiseConvAsLinear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                                           device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.flatten(1))
                if conv.bias is not None:
                    linear.bias.copy_(conv.bias)
            setattr(module, name, linear)
            replaced += 1
    quantize_(transformer, Int8WeightOnlyConfig(version=2), filter_fn=lambda m, _: isinstance(m, PointwiseConvAsLinear))
    return replaced


def load_component(folder: str, name: str, config: str, device: str):
    """One component of the saved pipeline as `SanaRestorationPipeline.from_pretrained` loads it with
    `quantization_config=pipeline_quantization_config(...)` (the same per-model configs)."""
    from diffusers import AutoencoderDC
    from transformers import Gemma2Model

    from diffusers_restore import ConcatConditionedTransformer
    from diffusers_restore.quantization import text_encoder_quantization_config, transformer_quantization_config

    mode = QUANTIZED[config]
    kwargs = dict(dtype=torch.bfloat16)
    if name == "vae":
        return AutoencoderDC.from_pretrained(folder, subfolder="vae", **kwargs).to(device).eval()
    if name == "text_encoder":
        if mode != "none":
            kwargs["quantization_config"] = text_encoder_quantization_config(mode)
        model = Gemma2Model.from_pretrained(folder, subfolder="text_encoder", **kwargs)
    else:
        if mode != "none":
            kwargs["quantization_config"] = transformer_quantization_config(mode)
        with bnb_4bit_on_cpu() if mode == "nf4" and device == "cpu" else contextlib.nullcontext():
            model = ConcatConditionedTransformer.from_pretrained(folder, subfolder="transformer", **kwargs)
        if config == "int8-pointwise":
            quantize_pointwise_convs(model)
    if mode != "nf4":  # bitsandbytes layers are placed on the device while loading
        model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- stages


class Meter:
    """Peak memory above a baseline: VmHWM above the RSS at construction on CPU, `max_memory_allocated` above the
    allocation at construction on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = _rss_kib("VmRSS") * 1024
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # VmHWM := VmRSS

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _rss_kib("VmHWM") * 1024 - self.baseline


def _timed(device: str, function):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        result = function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def _sizes(scale: str) -> dict:
    """Image sides: the restore at the transformer's native size (SANA 1.6B: 32 latent x 32 = 1024 px), training at
    half of it; latent factor and channels."""
    if scale == "tiny":
        return dict(restore=128, train=64, factor=4)
    return dict(restore=1024, train=512, factor=32)


def run_stage(args) -> dict:
    """Subprocess body: load what one stage needs, run it once, report weights, peaks and seconds."""
    from diffusers_restore.quantization import weight_bytes

    device, config, stage = args.device, args.config, args.stage
    sizes = _sizes(args.scale)
    torch.manual_seed(0)
    _import_libraries()  # imports are part of the process baseline, not of the stage
    meter = Meter(device)
    start = time.perf_counter()
    if stage == "whole":
        pipe = _load_pipeline(args.folder, config, device)
        components = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    else:
        name = "transformer" if stage == "train" else stage
        components = {name: load_component(args.folder, name, config, device)}
    load_seconds = time.perf_counter() - start
    result = dict(config=config, stage=stage, load_peak=meter.peak(), load_seconds=load_seconds,
                  weights={name: weight_bytes(module) for name, module in components.items()})
    if not device.startswith("cuda"):
        _make_resident(components.values())
    result["resident"] = meter.peak() if device.startswith("cuda") else _rss_kib("VmRSS") * 1024 - meter.baseline
    if args.weights_only:
        return result
    meter.reset()
    generator = torch.Generator().manual_seed(0)
    if stage == "text_encoder":
        from diffusers_restore import SanaRestorationPipeline
        from diffusers_restore.testing import get_tiny_tokenizer

        pipe = SanaRestorationPipeline(tokenizer=get_tiny_tokenizer(), text_encoder=components["text_encoder"],
                                       vae=None, transformer=None, scheduler=None)
        pipe.prompt_cache_size = 0
        _, result["seconds"] = _timed(device, lambda: pipe.encode_prompt(PROMPT, False, device=torch.device(device)))
    elif stage == "transformer":
        model = components["transformer"]
        side = sizes["restore"] // sizes["factor"]
        latents = torch.randn(1, model.config.in_channels, side, side, generator=generator).to(device, torch.bfloat16)
        text = torch.randn(1, 300, model.config.caption_channels, generator=generator).to(device, torch.bfloat16)
        mask = torch.ones(1, 300, dtype=torch.long, device=device)
        condition = torch.randn(1, model.config.condition_channels, side, side, generator=generator)
        condition = condition.to(device, torch.bfloat16)
        timestep = torch.tensor([500.0], device=device)
        _, result["seconds"] = _timed(device, lambda: model(latents, condition, text, timestep,
                                                            encoder_attention_mask=mask))
    elif stage == "vae":
        from diffusers_restore.models.vae_latents import decode_latents, encode_latents

        vae = components["vae"]
        pixels = torch.from_numpy(_image(sizes["restore"])).permute(2, 0, 1)[None].to(device, torch.bfloat16)
        pixels = pixels / 127.5 - 1
        _, result["seconds"] = _timed(device, lambda: decode_latents(vae, encode_latents(vae, pixels)))
    elif stage == "train":
        result["seconds"] = _train_step(components["transformer"], sizes, device, generator)
    elif stage == "whole":
        image = _image(sizes["restore"])
        _, result["seconds"] = _timed(device, lambda: pipe(image, prompt=PROMPT, num_inference_steps=args.steps,
                                                           generator=torch.Generator().manual_seed(0)))
    result["peak"] = meter.peak()
    return result


def _make_resident(modules) -> None:
    """Copy every plain parameter and buffer out of the memory-mapped checkpoint into process memory, then hand the
    allocator's free loading buffers back to the system: from here the RSS holds every weight, as a GPU would, and
    nothing else (a memory-mapped weight counts only once its pages are read, and quantizing while loading leaves
    the read pages of the unquantized checkpoint mapped)."""
    import ctypes
    import gc

    for module in modules:
        for submodule in module.modules():
            for name, tensor in list(submodule._parameters.items()) + list(submodule._buffers.items()):
                if tensor is not None and type(tensor) in (torch.Tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.clone()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _import_libraries() -> None:
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderDC  # noqa: F401
    from transformers import Gemma2Model  # noqa: F401

    from diffusers_restore import ConcatConditionedTransformer, SanaRestorationPipeline  # noqa: F401
    from diffusers_restore.quantization import pipeline_quantization_config

    for mode in ("int8", "nf4"):
        with contextlib.suppress(ImportError):
            pipeline_quantization_config(mode)  # imports the backend


def _load_pipeline(folder: str, config: str, device: str):
    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.quantization import pipeline_quantization_config

    mode = QUANTIZED[config]
    with bnb_4bit_on_cpu() if mode == "nf4" and device == "cpu" else contextlib.nullcontext():
        pipe = SanaRestorationPipeline.from_pretrained(folder, dtype=torch.bfloat16,
                                                       quantization_config=pipeline_quantization_config(mode))
    if config.endswith("offload"):
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)  # bitsandbytes layers are already there; the other components move
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train_step(model, sizes: dict, device: str, generator: torch.Generator) -> float:
    """One LoRA rank-16 step as `examples/train_paired.py --use_lora --gradient_checkpointing` takes it (flow
    matching, velocity target); returns its seconds."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v"]))
    cast_training_params(model, dtype=torch.float32)
    model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    side = sizes["train"] // sizes["factor"]
    clean = torch.randn(1, model.config.in_channels, side, side, generator=generator).to(device)
    condition = torch.randn(1, model.config.condition_channels, side, side, generator=generator).to(device)
    noise = torch.randn(clean.shape, generator=generator).to(device)
    text = torch.randn(1, 300, model.config.caption_channels, generator=generator).to(device, torch.bfloat16)
    sigma = torch.tensor([0.7], device=device)
    noisy = (1 - sigma) * clean + sigma * noise
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        prediction = model(noisy, condition, text, sigma * 1000).sample
    loss = torch.nn.functional.mse_loss(prediction.float(), noise - clean)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {loss.item()}")
    return time.perf_counter() - start


def _print_stage(row: dict, note: str) -> None:
    weights = sum(row["weights"].values())
    run = f", peak {row['peak'] / 1e9:.4f} GB, {row['seconds']:.1f} s" if "peak" in row else ", not run (weights only)"
    print(f"  {row['config']:>14} {row['stage']:>12}: weights {weights / 1e9:.4f} GB, load peak "
          f"{row['load_peak'] / 1e9:.4f} GB{run} ({note})", flush=True)


def _measure_stage(args, config: str, stage: str) -> dict:
    """`run_stage` in a subprocess of its own (`--subprocess`, the default at real scale), else in this process."""
    if args.subprocess:
        return _stage_subprocess(args, config, stage)
    begin = time.perf_counter()
    row = run_stage(argparse.Namespace(**vars(args), config=config, stage=stage))
    _print_stage(row, f"in process, {time.perf_counter() - begin:.0f} s")
    return row


def _stage_subprocess(args, config: str, stage: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--scale", args.scale, "--device", args.device,
               "--folder", args.folder, "--run-config", config, "--run-stage", stage, "--steps", str(args.steps)]
    command += ["--weights-only"] if args.weights_only else []
    begin = time.perf_counter()
    # glibc returns every freed block of 64 KiB or more to the system at once, so that the peak RSS follows the live
    # memory (as `max_memory_allocated` does on a GPU) rather than what the allocator keeps for reuse
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run(["nice", "-n", "10", *command] if args.nice else command, capture_output=True, text=True,
                            env=env)
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            row = json.loads(line[len(MARKER):])
            weights = sum(row["weights"].values())
            _print_stage(row, f"process {time.perf_counter() - begin:.0f} s")
            return row
    raise RuntimeError(f"{config} {stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------- fidelity


def measure_fidelity(configs: list[str], device: str) -> list[dict]:
    """PSNR of the bundled restorer's quantized outputs against its bf16 outputs on the six sample photos."""
    from diffusers_restore import SanaRestorationPipeline
    from diffusers_restore.cli_common import BUNDLED_MODEL_DIR
    from diffusers_restore.data.degradations import apply_degradation_spec
    from diffusers_restore.metrics import psnr
    from diffusers_restore.quantization import pipeline_quantization_config
    from diffusers_restore.sample_photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, center_crop, load_photo

    rng = np.random.default_rng(0)
    clean = [center_crop(load_photo(name), 256) for name in TRAIN_PHOTOS + VALIDATION_PHOTOS]
    degraded = [apply_degradation_spec(image, "gaussian_noise:25", rng)[0] for image in clean]

    def restore(pipe) -> torch.Tensor:
        pipe.set_progress_bar_config(disable=True)
        outputs = [pipe(image, generator=torch.Generator().manual_seed(0), output_type="pt").images[0].float().cpu()
                   for image in degraded]
        return torch.stack(outputs)

    reference = restore(SanaRestorationPipeline.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.bfloat16).to(device))
    rows = []
    for config in configs:
        mode = QUANTIZED[config]
        if mode == "none":
            continue
        with bnb_4bit_on_cpu() if mode == "nf4" and device == "cpu" else contextlib.nullcontext():
            pipe = SanaRestorationPipeline.from_pretrained(
                BUNDLED_MODEL_DIR, dtype=torch.bfloat16, quantization_config=pipeline_quantization_config(mode)
            )
        if config == "int8-pointwise":
            quantize_pointwise_convs(pipe.transformer.transformer)
        pipe.to(device)
        values = psnr(restore(pipe).clamp(0, 1), reference.clamp(0, 1))
        print(f"  fidelity {config}: PSNR vs bf16 per photo {[round(v, 2) for v in values.tolist()]}", flush=True)
        where = " (CPU: bnb layers, diffusers' GPU check lifted)" if mode == "nf4" and device == "cpu" else ""
        label = f"bundled restorer, 6 photos, noise 25, {device}{where}"
        rows += [
            dict(metric=f"fidelity: PSNR {config} vs bf16 output, mean ({label})", value=round(values.mean().item(), 2),
                 unit="dB", target=None, better="higher"),
            dict(metric=f"fidelity: PSNR {config} vs bf16 output, worst photo ({label})",
                 value=round(values.min().item(), 2), unit="dB", target=None, better="higher"),
        ]
    return rows


# ---------------------------------------------------------------------------------------------------- report


def summarize(args, stages: dict, configs: list[str]) -> list[dict]:
    """Rows for the runner and the printed table; the derived figures are labelled as such."""
    rows, scale, device = [], args.scale, args.device
    tag = f"{scale}, {device}"
    vae = stages.get(("bf16", "vae"))
    unit, per_unit = ("GB", 1e9) if scale == "real" else ("MB", 1e6)

    def gib(value: float) -> float:
        return round(value / per_unit, 3)

    for config in configs:
        if config in CUDA_ONLY:
            continue
        text, model = stages.get((config, "text_encoder")), stages.get((config, "transformer"))
        if config == "int8-pointwise" and text is None:
            text = stages.get(("int8", "text_encoder"))
        nf4_note = " [CPU: bnb layers, diffusers' GPU check lifted]" if QUANTIZED[config] == "nf4" and device == "cpu" else ""
        label = f"{config}, {tag}{nf4_note}"
        parts = {"text_encoder": text, "transformer": model, "vae": vae}
        for name, stage in parts.items():
            if stage is not None:
                rows.append(dict(metric=f"weights: {name} ({label})", value=gib(stage["weights"][name]), unit=unit,
                                 target=None, better="lower"))
        if text and model:
            both = text["weights"]["text_encoder"] + model["weights"]["transformer"]
            target = {"int8": 6.0, "int8-pointwise": 6.0, "nf4": 4.5}.get(config) if scale == "real" else None
            rows.append(dict(metric=f"weights: transformer + text encoder ({label})", value=gib(both), unit=unit,
                             target=target, better="lower"))
        parts_run = {name: stage for name, stage in parts.items() if stage is not None and "peak" in stage}
        for name, stage in parts_run.items():
            if name != "vae" or config == "bf16":
                rows.append(dict(metric=f"stage peak above baseline: {name} alone ({label})", value=gib(stage["peak"]),
                                 unit=unit, target=None, better="lower"))
        if len(parts_run) == 3:
            weights = sum(stage["weights"][name] for name, stage in parts.items())
            work = max(stage["peak"] - stage["weights"][name] for name, stage in parts.items())
            rows.append(dict(metric=f"derived restore peak, all weights resident: weights + largest stage work "
                                    f"({label})", value=gib(weights + work), unit=unit, target=None, better="lower"))
            rows.append(dict(metric=f"derived restore peak, one component resident at a time: largest stage peak "
                                    f"({label})", value=gib(max(stage["peak"] for stage in parts.values())),
                             unit=unit, target=None, better="lower"))
        for name in ("text_encoder", "transformer"):
            reference = stages.get(("bf16", name))
            if config == "bf16" or reference is None or name not in parts_run or "seconds" not in reference:
                continue
            if name == "text_encoder" and config == "int8-pointwise":  # the int8 text encoder, reported under int8
                continue
            rows.append(dict(metric=f"time: {name} forward / bf16 ({label})",
                             value=round(parts[name]["seconds"] / reference["seconds"], 3), unit="x", target=None,
                             better="lower"))
        train = stages.get((config, "train"))
        if train is not None:
            rows.append(dict(metric=f"train: LoRA r16 step peak above baseline, {_sizes(scale)['train']} px ({label})",
                             value=gib(train["peak"]), unit=unit, target=None, better="lower"))
            if config != "bf16" and ("bf16", "train") in stages:
                rows.append(dict(metric=f"train: step time / bf16 ({label})",
                                 value=round(train["seconds"] / stages[("bf16", "train")]["seconds"], 3), unit="x",
                                 target=None, better="lower"))
    for config in configs:
        whole = stages.get((config, "whole"))
        if whole is not None:
            rows.append(dict(metric=f"whole restore peak above baseline, {_sizes(scale)['restore']} px, "
                                    f"{args.steps} steps ({config}, {tag})", value=gib(whole["peak"]), unit=unit,
                             target=None, better="lower"))
            rows.append(dict(metric=f"whole restore weights ({config}, {tag})",
                             value=gib(sum(whole["weights"].values())), unit=unit, target=None, better="lower"))
            if config != "bf16" and ("bf16", "whole") in stages:
                rows.append(dict(metric=f"whole restore time / bf16 ({config}, {tag})",
                                 value=round(whole["seconds"] / stages[("bf16", "whole")]["seconds"], 3), unit="x",
                                 target=None, better="lower"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=None,
                        help="default: all that run on the device (offload configurations on CUDA only)")
    parser.add_argument("--folder", default=None,
                        help="the random pipeline folder: reused when it exists, else written (real scale: ~9 GB); "
                             "default: a temporary folder, deleted at the end")
    parser.add_argument("--whole", action=argparse.BooleanOptionalAction, default=None,
                        help="also a whole-pipeline restore per configuration (default: on CUDA only)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of the whole-pipeline runs (CFG on)")
    parser.add_argument("--stages", nargs="+", choices=["vae", "text_encoder", "transformer", "train", "whole"],
                        default=None, help="a subset of the stages (default: all that apply)")
    parser.add_argument("--weights-only", action="store_true",
                        help="load the text encoder and the transformer and count their weights; run nothing")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--subprocess", action=argparse.BooleanOptionalAction, default=None,
                        help="one process per stage, so that peaks do not mix (default: on at real scale; the tiny "
                             "smoke test runs the same stages in this process)")
    parser.add_argument("--nice", action=argparse.BooleanOptionalAction, default=True,
                        help="run the measuring subprocesses under nice -n 10 (default on)")
    parser.add_argument("--json", default=None, help="also write the stage measurements to this JSON file")
    parser.add_argument("--run-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_stage is not None:
        print(MARKER + json.dumps(run_stage(argparse.Namespace(**vars(args), config=args.run_config,
                                                               stage=args.run_stage))), flush=True)
        return 0

    cuda = args.device.startswith("cuda")
    if args.subprocess is None:
        args.subprocess = args.scale == "real"
    configs = args.configs or [config for config in CONFIGS if cuda or config not in CUDA_ONLY]
    for config in [c for c in configs if c in CUDA_ONLY and not cuda]:
        print(f"N/A {config}: model CPU offload moves each model to an accelerator while it runs; none here.")
    configs = [c for c in configs if cuda or c not in CUDA_ONLY]
    whole = args.whole if args.whole is not None else cuda

    temporary = args.folder is None
    args.folder = args.folder or tempfile.mkdtemp(prefix="bench-memory-")
    started = time.perf_counter()
    stages: dict = {}
    failures: list[str] = []
    try:
        if not os.path.isfile(os.path.join(args.folder, "model_index.json")):
            print(f"writing the random {args.scale} pipeline to {args.folder} ...", flush=True)
            write_random_pipeline(args.folder, args.scale)
        plan = [("bf16", "vae")]
        plan += [(c, "text_encoder") for c in configs if c in ("bf16", "int8", "nf4")]
        plan += [(c, "transformer") for c in configs if c not in CUDA_ONLY]
        if not args.skip_train:
            plan += [(c, "train") for c in configs if c in ("bf16", "int8", "nf4")]
        if whole:
            plan += [(c, "whole") for c in configs if c != "int8-pointwise"]
        if args.weights_only:
            plan = [(c, s) for c, s in plan if s in ("text_encoder", "transformer")]
        plan = [(c, s) for c, s in plan if args.stages is None or s in args.stages]
        for config, stage in plan:
            try:
                stages[(config, stage)] = _measure_stage(args, config, stage)
            except RuntimeError as error:  # reported, and the other stages still run
                failures.append(f"{config} {stage}: {error}")
                print(f"  FAILED {config} {stage}:\n{error}", flush=True)
    finally:
        if temporary:
            shutil.rmtree(args.folder, ignore_errors=True)
    rows = summarize(args, stages, configs)
    if not args.skip_fidelity:
        rows += measure_fidelity(configs, args.device)
    print(f"\nall measurements in {time.perf_counter() - started:.0f} s")
    print("\n| metric | value | unit | target |\n|---|---|---|---|")
    for row in rows:
        target = "" if row["target"] is None else f"<= {row['target']}"
        print(f"| {row['metric']} | {row['value']} | {row['unit']} | {target} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([{"config": c, "stage": s, **v} for (c, s), v in stages.items()], handle, indent=2)
    emit_results([{**row, "benchmark": "memory"} for row in rows])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
