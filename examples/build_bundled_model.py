#!/usr/bin/env python
"""Rebuild the restorer bundled in the package (`diffusers_restore/bundled/sana-restore-tiny`) from scratch, offline.

    python examples/build_bundled_model.py                      # about 65 minutes on 2 CPU cores
    python examples/build_bundled_model.py --work_dir build     # keep the intermediate folders there

Four stages, each with the project's own scripts (the same ones users run):

1. `examples/train_autoencoder.py` trains a small `AutoencoderDC` (f4, 16 latent channels, ~0.29 M parameters) on
   the training photos of `diffusers_restore.sample_photos.TRAIN_PHOTOS`; the real DC-AE cannot be downloaded here.
2. A base `SanaPipeline` folder is assembled from that VAE, the offline kit's tokenizer and tiny Gemma-2 text
   encoder (`diffusers_restore.testing`), and a new small `SanaTransformer2DModel` (8 layers, hidden 128, patch 2,
   ~2.3 M parameters, random weights); its scheduler is SANA's (DPM-Solver, `flow_shift` 3).
3. `examples/train_paired.py` fine-tunes it into a (flow-matching) restorer on random 64 px crops of the training
   photos, degraded on the fly by gaussian noise (half of the samples), JPEG or down-up scaling, with EMA.
4. `examples/train_paired.py` again, from stage 3's pipeline, with `--training_objective one_step` and a pixel loss
   through the decoder, on a widened photo set (the colour photos, the same with their channels rotated, and the
   greyscale photos of `GREY_TRAIN_PHOTOS`). Its output folder (a complete `SanaRestorationPipeline` with the model
   card) is copied into the package. `--skip_flow_matching DIR` reruns this stage alone from a stage-3 folder.

The held-out photos (`HELD_OUT_PHOTOS`) are never trained on; evaluate on them with

    sana-restore evaluate --model src/diffusers_restore/bundled/sana-restore-tiny --images <held-out> ...

(the command the README's table comes from is in BENCHMARKS.md). Each stage is deterministic for a given seed and
thread count on a given machine and torch build; a different machine may change the last bits of the weights.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
DEFAULT_DESTINATION = os.path.join(REPO_ROOT, "src", "diffusers_restore", "bundled", "sana-restore-tiny")

# The restorer's transformer: SANA's block design at a size that trains on a CPU in about 40 minutes.
TRANSFORMER_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    num_layers=8,
    num_cross_attention_heads=4,
    cross_attention_head_dim=32,
    cross_attention_dim=128,
    mlp_ratio=2.5,
    patch_size=2,
    # latent pixels of the "native" size, which only sets the pipeline's automatic tile size (SANA without positional
    # embeddings has no size-dependent weights): 256 px at f4. Trained on 64 px crops, the model restores 256 px
    # crops better whole than in 64 px tiles (27.94 vs 27.87 dB on the held-out sigma-25 crops).
    sample_size=64,
)
# Training mixture: gaussian noise twice so that it is half of the samples (the main benchmark is sigma 25 noise).
DEGRADATION = "gaussian_noise|gaussian_noise|jpeg|downscale"
TRAIN_ARGS = [
    "--degradation", DEGRADATION,
    "--repeats", "64",
    "--resolution", "64",
    "--random_flip",
    "--train_batch_size", "16",
    "--max_train_steps", "6000",
    "--learning_rate", "5e-4",
    "--lr_scheduler", "cosine",
    "--lr_warmup_steps", "200",
    "--proportion_empty_prompts", "0.5",
    "--use_ema",
    "--ema_decay", "0.999",
    "--checkpointing_steps", "1000",
    "--checkpoints_total_limit", "1",
    "--validation_steps", "100000",
    "--report_to", "none",
]
# Stage 4: the same script again, from the stage-3 pipeline, as a one-step restorer (sigma = 1 only, so one Euler
# step gives the expected clean latent: the PSNR-optimal estimate) with a pixel loss through the frozen decoder.
ONE_STEP_ARGS = [
    "--training_objective", "one_step",
    "--pixel_loss_weight", "1.0",
    "--degradation", DEGRADATION,
    "--repeats", "64",
    "--resolution", "64",
    "--random_flip",
    "--train_batch_size", "16",
    "--max_train_steps", "2500",
    "--learning_rate", "5e-4",
    "--lr_scheduler", "cosine",
    "--lr_warmup_steps", "100",
    "--proportion_empty_prompts", "0.5",
    "--use_ema",
    "--ema_decay", "0.99",
    "--checkpointing_steps", "1000",
    "--checkpoints_total_limit", "1",
    "--validation_steps", "100000",
    "--report_to", "none",
]
# What the package ships from the training output folder (no checkpoints, logs or validation images).
SHIPPED = ("model_index.json", "README.md", "scheduler", "text_encoder", "tokenizer", "transformer", "vae")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=None, help="Intermediate folders (default: a temporary folder).")
    parser.add_argument("--destination", default=DEFAULT_DESTINATION, help="Where the finished pipeline goes.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=2, help="CPU threads of the restorer's training.")
    parser.add_argument("--skip_autoencoder", default=None, metavar="VAE_DIR",
                        help="Reuse an autoencoder trained before (a folder with config.json) instead of stage 1.")
    parser.add_argument("--skip_flow_matching", default=None, metavar="RESTORER_DIR",
                        help="Reuse a stage-3 (flow-matching) restorer folder instead of stages 1-3.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Override the step count of both training stages (for quick checks).")
    return parser.parse_args(input_args)


def _run(command: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def build_base_pipeline(vae_dir: str, output_dir: str, seed: int) -> str:
    """Assemble the base SANA folder that `train_paired.py --pretrained_model_name_or_path` starts from."""
    import torch
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel

    from diffusers_restore.testing import TINY_CAPTION_CHANNELS, get_tiny_components

    components = get_tiny_components(seed)  # tokenizer, text encoder and SANA's scheduler config
    vae = AutoencoderDC.from_pretrained(vae_dir)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        caption_channels=TINY_CAPTION_CHANNELS,
        **TRANSFORMER_CONFIG,
    )
    components.update(vae=vae, transformer=transformer)
    SanaPipeline(**components).save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def write_training_photos(folder: str, widened: bool = False) -> str:
    """The training photos as uncompressed BMP files: decoding a large PNG per sample (up to 50 ms) would otherwise
    cost more than the training step itself.

    `widened` (the one-step stage) adds each colour photo with its channels rotated (R, G, B) -> (B, R, G), for
    colours the six photos lack (blue skies), and the greyscale photos of `GREY_TRAIN_PHOTOS` (smooth backgrounds,
    fine textures). The held-out photos are never written.
    """
    import numpy as np
    from PIL import Image

    from diffusers_restore.sample_photos import GREY_TRAIN_PHOTOS, TRAIN_PHOTOS, load_photo

    os.makedirs(folder, exist_ok=True)
    for name in TRAIN_PHOTOS:
        photo = load_photo(name)
        photo.save(os.path.join(folder, f"{name}.bmp"))
        if widened:
            rotated = np.ascontiguousarray(np.asarray(photo)[..., [2, 0, 1]])
            Image.fromarray(rotated).save(os.path.join(folder, f"{name}_brg.bmp"))
    if widened:
        for name in GREY_TRAIN_PHOTOS:
            load_photo(name).save(os.path.join(folder, f"{name}.bmp"))
    return folder


BUNDLED_CARD_SECTION = """
## This model: the restorer bundled with diffusers-restore

A working demonstration, not a SANA fine-tune: {transformer_parameters:,} transformer parameters (SANA's block design,
{num_layers} layers, hidden {hidden}, patch {patch_size}, trained from random initialisation) in the latent space of a
{vae_parameters:,}-parameter
f4 `AutoencoderDC` trained by `examples/train_autoencoder.py`; the tokenizer and the 1-layer Gemma-2 text encoder are
the offline test kit's (random weights, so prompts carry almost no information). Everything was trained on a CPU on
scikit-image photos: the autoencoder and the first stage on six colour photos ({train_photos}), the one-step stage
also on their channel-rotated copies and seven greyscale photos ({grey_photos}); {held_out} are held out for
evaluation and never trained on. `train_paired.py` ran twice: {flow_matching_steps} steps of flow matching from random
weights, then the {one_step_steps} steps described above (`--training_objective one_step` with a pixel loss), which
make it a one-step restorer. Rebuild it with `python examples/build_bundled_model.py`.

It is a one-step restorer, and its folder records how to sample it (`sampling_defaults` in model_index.json), so
the plain call is the right one:

```python
from diffusers_restore import SanaRestorationPipeline
from diffusers_restore.cli_common import BUNDLED_MODEL_DIR

pipe = SanaRestorationPipeline.from_pretrained(BUNDLED_MODEL_DIR)
restored = pipe(degraded).images[0]   # the recorded sampling defaults: {call_kwargs}
```

Its measured quality (held-out photos, against a blur and non-local means) is in the package's README.

Licence: no pretrained weights went into this model, so it is under the package's Apache-2.0 licence; the training
photos are scikit-image's (BSD-3-Clause).
"""


def finalise_bundled_folder(folder: str) -> None:
    """Make the shipped folder self-describing: no local paths in its configs or card, and a card section saying what
    this small model is and how to sample it."""
    import json

    from diffusers_restore.sample_photos import GREY_TRAIN_PHOTOS, HELD_OUT_PHOTOS, TRAIN_PHOTOS

    for root, _, names in os.walk(folder):
        for name in names:
            if name == "config.json":
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as handle:
                    config = json.load(handle)
                config.pop("_name_or_path", None)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    from safetensors.torch import load_file

    def parameters(subfolder: str) -> int:
        weights = load_file(os.path.join(folder, subfolder, "diffusion_pytorch_model.safetensors"))
        return sum(tensor.numel() for tensor in weights.values())

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        sampling_defaults = json.load(handle).get("sampling_defaults") or {}
    card_path = os.path.join(folder, "README.md")
    with open(card_path, encoding="utf-8") as handle:
        card = handle.read()
    # the base model is a local folder of the build (stage 3's output): no path in the shipped card
    card = re.sub(r"SANA \(`[^`]*`\)", "a small SANA-architecture model (see below)", card)
    # the title and the usage snippet named the training output folder
    title = re.search(r"^# (.+)$", card, flags=re.M).group(1)
    card = re.sub(r"^# .+$", "# sana-restore-tiny", card, count=1, flags=re.M)
    card = card.replace(f'from_pretrained("{title}"', 'from_pretrained("sana-restore-tiny"')
    # the base model is this build's own stage 3, so the licence is the package's, not an inherited one
    card = re.sub(r"^license: .+$", "license: apache-2.0", card, count=1, flags=re.M)
    card = re.sub(r"(## Licence\n\n).+?\n", r"\1Apache-2.0, like the package (see the last section).\n", card,
                  count=1, flags=re.S)
    card += BUNDLED_CARD_SECTION.format(
        transformer_parameters=parameters("transformer"),
        num_layers=TRANSFORMER_CONFIG["num_layers"],
        hidden=TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"],
        patch_size=TRANSFORMER_CONFIG["patch_size"],
        vae_parameters=parameters("vae"),
        train_photos=", ".join(TRAIN_PHOTOS),
        grey_photos=", ".join(GREY_TRAIN_PHOTOS),
        held_out=", ".join(HELD_OUT_PHOTOS),
        flow_matching_steps=TRAIN_ARGS[TRAIN_ARGS.index("--max_train_steps") + 1],
        one_step_steps=ONE_STEP_ARGS[ONE_STEP_ARGS.index("--max_train_steps") + 1],
        call_kwargs=", ".join(f"{key}={value}" for key, value in sampling_defaults.items()),
    )
    with open(card_path, "w", encoding="utf-8") as handle:
        handle.write(card)


def main(args: argparse.Namespace) -> str:
    start = time.time()
    work = args.work_dir or tempfile.mkdtemp(prefix="bundled-build-")
    os.makedirs(work, exist_ok=True)

    def train(pretrained: str, photos: str, output_dir: str, recipe: list[str]) -> str:
        recipe = list(recipe)
        if args.max_train_steps is not None:
            recipe[recipe.index("--max_train_steps") + 1] = str(args.max_train_steps)
        _run([sys.executable, os.path.join(HERE, "train_paired.py"), "--pretrained_model_name_or_path", pretrained,
              "--train_data_dir", photos, "--output_dir", output_dir, "--seed", str(args.seed), *recipe],
             threads=args.num_threads)
        return output_dir

    flow_matching = args.skip_flow_matching
    if flow_matching is None:
        vae_dir = args.skip_autoencoder
        if vae_dir is None:
            _run([sys.executable, os.path.join(HERE, "train_autoencoder.py"), "--output_dir",
                  os.path.join(work, "ae"), "--seed", str(args.seed), "--num_threads", "1"], threads=1)
            vae_dir = os.path.join(work, "ae", "vae")
        base = build_base_pipeline(vae_dir, os.path.join(work, "base"), args.seed)
        photos = write_training_photos(os.path.join(work, "train_photos"))
        flow_matching = train(base, photos, os.path.join(work, "restorer"), TRAIN_ARGS)
    widened = write_training_photos(os.path.join(work, "train_photos_widened"), widened=True)
    restorer = train(flow_matching, widened, os.path.join(work, "restorer-one-step"), ONE_STEP_ARGS)

    install(restorer, args.destination)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.destination) for f in files)
    print(f"bundled restorer written to {args.destination} ({size / 2**20:.2f} MiB) in {time.time() - start:.0f} s")
    return args.destination


def install(restorer: str, destination: str) -> None:
    """Copy what the package ships from a training output folder to `destination` and finalise it. The old folder is
    replaced only once the new one is complete (a failed build leaves it in place)."""
    staging = destination.rstrip(os.sep) + ".new"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name in SHIPPED:
        source = os.path.join(restorer, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, os.path.join(staging, name))
    finalise_bundled_folder(staging)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)


if __name__ == "__main__":
    main(parse_args())
