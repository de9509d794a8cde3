"""examples/train_paired.py: does it learn, and what does a training step cost beyond the model's own work?

    python benchmarks/bench_train.py --scale tiny                 # a few minutes on 2 CPU cores
    python benchmarks/bench_train.py --scale real --device cuda   # overhead at SANA 1.6B size (random weights)
    python benchmarks/bench_train.py --scale tiny --skip-learning # overhead only

Both parts run the real training script in this process (`main(parse_args([...]))`), on models built offline.

1. Learning check (tiny scale only). A small SANA (the tiny kit's tokenizer, Gemma-2 and untrained DC-AE, with a
   4-layer, hidden-64 transformer; the VAE's scaling_factor set to 1 / std of its latents on the training photos)
   is fine-tuned on three of scikit-image's photos (`CHECK_TRAIN_PHOTOS`, at three scales; random 64 px crops,
   degraded on the fly with gaussian noise sigma 50), then restores the centre crops of three others
   (`CHECK_PHOTOS`, never seen by this run), degraded the same way (fixed seeds). Reported:
   * loss ratio: mean training loss over the last 10% of the steps / over the first 10% (read back from the
     TensorBoard log); target <= 0.8;
   * latent MSE ratio: MSE(restored latent, clean latent) / MSE(degraded latent, clean latent), averaged over the
     check photos; target < 1, i.e. the restored latents end closer to the clean ones than the degraded input.
     The restored latent is the mean of 4 restorations with different noise: a sampler draws from
     p(clean | degraded), and one draw's squared error is about twice that of the posterior mean, the
     minimum-MSE answer. The single-draw ratio and the untrained restorer's (step 0, which ignores the condition)
     are printed too. The tiny VAE is untrained, so its decoded pixels say nothing; latent space is where the
     model works.
2. Training-step overhead: step time / (forward + backward time), training on cached latents and prompt embeddings
   (`--cache_latents`) with EMA, the recipe's configuration. The transformer's forward and `accelerator.backward`
   are timed from inside the run; the step time is the median interval between consecutive forwards (steady state),
   so data loading, timestep and noise sampling, the optimizer, EMA and logging all count as overhead. At tiny size
   the model takes a millisecond or two and the ratio mostly shows the fixed per-step cost (printed in ms too); the
   meaningful figure is the real-size one. `--scale real` uses SANA 1.6B's widths (hidden 2240, caption 2304,
   32 latent channels) with all 20 layers on CUDA, and 2 of them on CPU (a 1.6B full fine-tune does not fit a small
   CPU machine; fewer layers make the overhead look larger, not smaller). Target <= 1.10 at real size.
3. Training throughput (real scale): samples/s and model TFLOP/s (6 x parameters x tokens per sample) at SANA
   1024 px's and 512 px's token counts (32 x 32 and 16 x 16 latents; batch 4 and 16 on a GPU), and on a GPU the MFU
   against its dense bf16 peak (`PEAK_BF16_FLOPS`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from run_all import emit_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The learning check's own split of scikit-image's photos (diffusers_restore.sample_photos): trained on the first,
# checked on the second, which this run never sees.
CHECK_TRAIN_PHOTOS = ("astronaut", "hubble_deep_field", "motorcycle_left")
CHECK_PHOTOS = ("chelsea", "coffee", "rocket")
DEGRADATION = "gaussian_noise:50"
RESOLUTION = 64
# A sampler draws from p(clean | degraded): one sample's squared error is about twice the posterior mean's. The mean
# of several samples estimates the posterior mean, the minimum-MSE restoration.
POSTERIOR_SAMPLES = 4
# The tiny kit's transformer (1 layer, hidden 8) is too small to learn denoising; this one is still tiny.
LEARNING_TRANSFORMER = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    num_layers=4,
    num_cross_attention_heads=4,
    cross_attention_head_dim=16,
    cross_attention_dim=64,
)


def load_training_script():
    path = os.path.join(REPO_ROOT, "examples", "train_paired.py")
    spec = importlib.util.spec_from_file_location("train_paired", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------------------------- models


def save_base_pipeline(path: str, scale: str, device: str, unit_variance_images: list | None = None) -> str:
    """A base SanaPipeline folder to fine-tune: the tiny kit with a 4-layer hidden-64 transformer (tiny), or SANA
    1.6B widths with a small VAE and a 1-layer Gemma-2 of Gemma-2-2B's width (real; random weights).

    `unit_variance_images` (PIL images): set the VAE's `scaling_factor` to 1 / std of their latents, the convention
    of Stable Diffusion and of the real DC-AE (whose 0.41407 was measured that way on its own latents). The kit's
    untrained VAE keeps the real DC-AE's value, which leaves its latents at std ~0.47, far from the unit variance that
    flow matching's noise schedule (and SANA's shift 3) assume.
    """
    from diffusers import SanaPipeline, SanaTransformer2DModel

    from diffusers_restore.testing import (
        get_tiny_components,
        get_tiny_transformer,
        get_tiny_vae,
        real_sana_transformer_config,
    )

    components = get_tiny_components(seed=0)
    if scale == "tiny":
        components["transformer"] = get_tiny_transformer(seed=0, **LEARNING_TRANSFORMER)
    else:
        from transformers import Gemma2Config, Gemma2Model

        config = real_sana_transformer_config()
        if device == "cpu":
            config["num_layers"] = 2
        torch.manual_seed(0)
        components["transformer"] = SanaTransformer2DModel(**config)
        gemma = components["text_encoder"].config.to_dict()
        gemma.update(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                     head_dim=256)
        components["text_encoder"] = Gemma2Model(Gemma2Config(**gemma)).eval()
        # f4 with SANA's 32 latent channels: a 128 px crop is a 32 x 32 latent
        components["vae"] = get_tiny_vae(0, latent_channels=32, encoder_block_out_channels=(32, 32, 32),
                                         decoder_block_out_channels=(32, 32, 32))
    if unit_variance_images is not None:
        pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                              for image in unit_variance_images])
        with torch.no_grad():
            std = components["vae"].encode(pixels).latent.std().item()
        components["vae"].register_to_config(scaling_factor=1.0 / std)
        print(f"  VAE scaling_factor 1 / {std:.4f} (unit-variance latents on the training photos)")
    SanaPipeline(**components).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------- data


def write_photo_data(root: str) -> tuple[str, list[dict]]:
    """Training photos (short side 2 x RESOLUTION) in a folder; check (clean, degraded) centre crops."""
    from diffusers_restore.data.degradations import apply_degradation_spec
    from diffusers_restore.sample_photos import center_crop, load_photo

    def at_training_scale(image):
        scale = 2 * RESOLUTION / min(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)), resample=3)  # bicubic

    train_dir = os.path.join(root, "train")
    os.makedirs(train_dir, exist_ok=True)
    for name in CHECK_TRAIN_PHOTOS:  # each photo at the check scale and enlarged 1.5x and 2x, for more varied crops
        photo = at_training_scale(load_photo(name))
        for factor in (1.0, 1.5, 2.0):
            size = (round(photo.width * factor), round(photo.height * factor))
            photo.resize(size, resample=3).save(os.path.join(train_dir, f"{name}-x{factor:g}.png"))
    held_out = []
    for number, name in enumerate(CHECK_PHOTOS):
        clean = center_crop(at_training_scale(load_photo(name)), RESOLUTION)
        degraded, _ = apply_degradation_spec(clean, DEGRADATION, rng=1000 + number)
        held_out.append({"name": name, "clean": clean, "degraded": degraded})
    return train_dir, held_out


# ------------------------------------------------------------------------------------------ learning check


def read_losses(log_dir: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step = {}
    for folder, _, files in os.walk(log_dir):
        for name in files:
            if name.startswith("events.out.tfevents"):
                accumulator = EventAccumulator(os.path.join(folder, name))
                accumulator.Reload()
                if "loss" in accumulator.Tags()["scalars"]:
                    for event in accumulator.Scalars("loss"):
                        by_step[event.step] = event.value
    return [by_step[step] for step in sorted(by_step)]


@torch.no_grad()
def latent_mse_ratios(pipe, held_out: list[dict], device: str, samples: int) -> dict[str, float]:
    """Per held-out photo: MSE(restored latent, clean latent) / MSE(degraded latent, clean latent), where the
    restored latent is the mean of `samples` restorations (different noise) of the degraded photo."""
    from diffusers_restore.data.latents import encode_latents

    ratios = {}
    for number, pair in enumerate(held_out):
        pixels = [torch.from_numpy(np.asarray(pair[key], dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                  for key in ("clean", "degraded")]
        clean, degraded = encode_latents(pipe.vae, torch.stack(pixels).to(device)).float()
        restored = pipe(
            pair["degraded"],
            prompt="Remove gaussian noise from this image",  # what the training prompts say
            num_inference_steps=20,
            guidance_scale=1.0,
            color_fix=None,
            output_type="latent",
            max_sequence_length=16,
            num_images_per_prompt=samples,
            generator=[torch.Generator().manual_seed(1000 * number + k) for k in range(samples)],
        ).images.float().mean(dim=0)
        ratios[pair["name"]] = (
            torch.mean((restored - clean) ** 2).item() / torch.mean((degraded - clean) ** 2).item()
        )
    return ratios


def load_restorer(path: str, device: str, untrained: bool = False):
    from diffusers_restore import SanaRestorationPipeline

    load = SanaRestorationPipeline.from_pretrained_sana if untrained else SanaRestorationPipeline.from_pretrained
    pipe = load(path)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def learning_check(train_paired, root: str, steps: int, device: str) -> list[dict]:
    from PIL import Image

    from diffusers_restore.sample_photos import center_crop

    train_dir, held_out = write_photo_data(root)
    crops = [center_crop(Image.open(os.path.join(train_dir, name)).convert("RGB"), 2 * RESOLUTION)
             for name in sorted(os.listdir(train_dir)) if name.endswith("-x1.png")]
    base = save_base_pipeline(os.path.join(root, "base-learning"), "tiny", device, unit_variance_images=crops)
    output_dir = os.path.join(root, "restorer")
    args = [
        "--pretrained_model_name_or_path", base,
        "--train_data_dir", train_dir,
        "--degradation", DEGRADATION,
        "--resolution", str(RESOLUTION),
        "--random_flip",
        "--train_batch_size", "8",
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "50",
        "--use_ema",
        "--ema_decay", "0.995",
        "--max_sequence_length", "16",
        "--checkpointing_steps", str(10 * steps),
        "--report_to", "tensorboard",
        "--seed", "0",
        "--output_dir", output_dir,
    ]
    print("learning check: python examples/train_paired.py " + " ".join(args), flush=True)
    start = time.perf_counter()
    train_paired.main(train_paired.parse_args(args))
    reset_accelerate()
    train_seconds = time.perf_counter() - start

    losses = read_losses(os.path.join(output_dir, "logs"))
    window = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    print(f"  {steps} steps in {train_seconds:.0f} s; loss {first:.4f} (first {window} steps) -> {last:.4f} "
          f"(last {window}): ratio {last / first:.3f}")

    restorer, untrained = load_restorer(output_dir, device), load_restorer(base, device, untrained=True)
    results = {
        "one sample": latent_mse_ratios(restorer, held_out, device, samples=1),
        f"mean of {POSTERIOR_SAMPLES} samples": latent_mse_ratios(restorer, held_out, device, POSTERIOR_SAMPLES),
        "untrained, one sample": latent_mse_ratios(untrained, held_out, device, samples=1),
    }
    print("  MSE(restored latent, clean latent) / MSE(degraded latent, clean latent):")
    for label, ratios in results.items():
        values = ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items())
        print(f"    {label:24s} {values}  (mean {statistics.mean(ratios.values()):.3f})")
    mean = {label: statistics.mean(ratios.values()) for label, ratios in results.items()}
    return [
        {"metric": "loss last/first 10%", "value": last / first, "unit": "", "target": 0.8, "better": "lower"},
        {"metric": f"held-out latent MSE restored/degraded, mean of {POSTERIOR_SAMPLES} samples",
         "value": mean[f"mean of {POSTERIOR_SAMPLES} samples"], "unit": "", "target": 1.0, "better": "lower"},
        {"metric": "held-out latent MSE restored/degraded, one sample", "value": mean["one sample"], "unit": "",
         "target": None, "better": "lower"},
        {"metric": "held-out latent MSE restored/degraded, untrained", "value": mean["untrained, one sample"],
         "unit": "", "target": None, "better": "lower"},
        {"metric": "learning-check training time", "value": train_seconds, "unit": "s", "target": None,
         "better": "lower"},
    ]


# ------------------------------------------------------------------------------------------------- overhead


class StepTimer:
    """Times the transformer's forward and `Accelerator.backward` inside a training run (patched for its duration)."""

    def __init__(self, device: str):
        self.device = device
        self.forward_starts: list[float] = []
        self.forward_seconds: list[float] = []
        self.backward_seconds: list[float] = []
        self.parameters = 0  # the trained transformer's parameter count (for the model-FLOPs estimate)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def patch(self):
        from accelerate import Accelerator

        from diffusers_restore import ConcatConditionedTransformer

        forward, backward = ConcatConditionedTransformer.forward, Accelerator.backward
        timer = self

        def timed_forward(module, *args, **kwargs):
            if not torch.is_grad_enabled():  # validation or checks: not a training step
                return forward(module, *args, **kwargs)
            if not timer.parameters:
                timer.parameters = sum(parameter.numel() for parameter in module.parameters())
            timer._sync()
            start = time.perf_counter()
            timer.forward_starts.append(start)
            output = forward(module, *args, **kwargs)
            timer._sync()
            timer.forward_seconds.append(time.perf_counter() - start)
            return output

        def timed_backward(accelerator, loss, **kwargs):
            timer._sync()
            start = time.perf_counter()
            backward(accelerator, loss, **kwargs)
            timer._sync()
            timer.backward_seconds.append(time.perf_counter() - start)

        ConcatConditionedTransformer.forward, Accelerator.backward = timed_forward, timed_backward
        try:
            yield self
        finally:
            ConcatConditionedTransformer.forward, Accelerator.backward = forward, backward


# Dense bf16 peak of the GPUs a session may be lent (vendor figures, FLOP/s), for the MFU estimate.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def overhead(train_paired, root: str, base: str, scale: str, device: str, steps: int,
             latent_size: int | None = None) -> list[dict]:
    """Train `steps` steps on cached latents and report the step overhead and the throughput. `latent_size`: the
    latent's side in tokens (default: 16 at tiny scale; 32 at real scale, SANA 1024 px's token count; 16 is SANA
    512 px's); the test kit's VAE encodes 4 px per token."""
    from diffusers_restore.sample_photos import TRAIN_PHOTOS, load_photo

    data_dir = os.path.join(root, "overhead-data")
    os.makedirs(data_dir, exist_ok=True)
    if latent_size is None:
        latent_size = RESOLUTION // 4 if scale == "tiny" else 32
    resolution = 4 * latent_size
    for name in TRAIN_PHOTOS:
        photo = load_photo(name)
        scale_factor = 2 * resolution / min(photo.size)
        photo.resize((round(photo.width * scale_factor), round(photo.height * scale_factor))).save(
            os.path.join(data_dir, f"{name}.png")
        )
    batch_size = 8 if scale == "tiny" else (4 if device != "cpu" else 1)  # real: the recipe's batch of 4 on a GPU
    if scale == "real" and device != "cpu" and latent_size <= 16:
        batch_size = 16  # 512 px: the batch a 1.6B fine-tune uses on one GPU
    args = [
        "--pretrained_model_name_or_path", base,
        "--train_data_dir", data_dir,
        "--degradation", DEGRADATION,
        "--resolution", str(resolution),
        "--cache_latents",
        "--train_batch_size", str(batch_size),
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-5",
        "--use_ema",
        "--proportion_empty_prompts", "0.1",
        "--max_sequence_length", "300" if scale == "real" else "16",
        "--checkpointing_steps", str(10 * steps),
        "--report_to", "none",
        "--seed", "0",
        "--output_dir", os.path.join(root, f"overhead-run-{latent_size}"),
    ]
    if device.startswith("cuda"):
        args += ["--mixed_precision", "bf16", "--gradient_checkpointing"]
    print("overhead: python examples/train_paired.py " + " ".join(args), flush=True)
    with StepTimer(device).patch() as timer:
        train_paired.main(train_paired.parse_args(args))
    reset_accelerate()

    warmup = min(5, steps // 4)
    intervals = np.diff(timer.forward_starts)[warmup:]
    model_seconds = (np.asarray(timer.forward_seconds) + np.asarray(timer.backward_seconds))[warmup:-1]
    step = float(np.median(intervals))
    model = float(np.median(model_seconds))
    print(f"  step {step * 1e3:.1f} ms, forward+backward {model * 1e3:.1f} ms (medians over {len(intervals)} steps): "
          f"overhead ratio {step / model:.3f}, {1e3 * (step - model):.1f} ms per step outside the model")
    # Model FLOPs of a training step: 6 x parameters x tokens (forward 2, backward 4; SANA's linear attention adds
    # no term quadratic in the tokens). MFU = those FLOPs per second / the device's dense bf16 peak.
    tokens = latent_size * latent_size
    model_flops = 6.0 * timer.parameters * tokens * batch_size / step
    peak = peak_flops(device)
    label = f"{latent_size} x {latent_size} latent [{scale}, {device}]"
    throughput = [
        {"metric": f"training samples/s, batch {batch_size}, {label}", "value": batch_size / step,
         "unit": "samples/s", "target": None, "better": "higher"},
        {"metric": f"training model TFLOP/s (6 N T), {label}", "value": model_flops / 1e12, "unit": "TFLOP/s",
         "target": None, "better": "higher"},
    ]
    if peak is not None:
        throughput.append({"metric": f"training MFU, {label}", "value": model_flops / peak, "unit": "",
                           "target": None, "better": "higher"})
    if latent_size != (RESOLUTION // 4 if scale == "tiny" else 32):  # the extra throughput run: no overhead rows
        return throughput
    return throughput + [
        {"metric": f"step time / (forward+backward) [{scale}]", "value": step / model, "unit": "",
         "target": 1.10 if scale == "real" else None, "better": "lower"},
        {"metric": f"time per step outside forward+backward [{scale}]", "value": 1e3 * (step - model), "unit": "ms",
         "target": None, "better": "lower"},
        {"metric": f"forward+backward per step [{scale}]", "value": 1e3 * model, "unit": "ms", "target": None,
         "better": "lower"},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of the learning check")
    parser.add_argument("--overhead-steps", type=int, default=None, help="steps of the overhead run")
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--workdir", default=None, help="keep the models and data here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)

    train_paired = load_training_script()
    rows = []
    workdir = contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="bench-")
    with workdir as root:
        base = save_base_pipeline(os.path.join(root, "base"), args.scale, args.device)
        if args.scale == "tiny" and not args.skip_learning:
            rows += learning_check(train_paired, root, args.steps, args.device)
        overhead_steps = args.overhead_steps or (40 if args.scale == "tiny" or args.device != "cpu" else 8)
        rows += overhead(train_paired, root, base, args.scale, args.device, overhead_steps)
        if args.scale == "real":  # SANA 512 px's token count: the throughput of the first fine-tuning stage
            rows += overhead(train_paired, root, base, args.scale, args.device, overhead_steps, latent_size=16)
    emit_results([{**row, "benchmark": "train"} for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
