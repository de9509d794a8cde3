#!/usr/bin/env python
"""Train a small `AutoencoderDC` on the project's training photos, for the bundled demo restorer to work in.

The real SANA autoencoder (DC-AE f32c32) cannot be downloaded on an offline machine, so the demo restorer works in the
latent space of a small autoencoder trained here, on CPU, in minutes. It is a plain diffusers `AutoencoderDC` (same
`vae.encode(x).latent` / `vae.decode(z).sample` interface and `scaling_factor` config as the real one), with a
smaller spatial compression: f4 with 16 latent channels by default (a 256 px crop becomes a 16 x 64 x 64 latent).

Data: random square crops of the photos in `--train_data_dir` (by default scikit-image's photos of
`diffusers_restore.sample_photos.TRAIN_PHOTOS`; the bundled build uses the training split of the project's photo
corpus), each also kept at smaller scales, with random flips and 90-degree rotations. The photos of
`--validation_data_dir` (default `sample_photos.VALIDATION_PHOTOS`) are only used for the evaluation: the round-trip
PSNR of their 256 px centre crops, which is the ceiling of any restorer that works in this latent space.

Loss: MSE on pixels in [-1, 1] (`--loss`; MSE is what PSNR measures and trained faster here than L1 or L1 + MSE).
There is no perceptual or adversarial term: the restorer's target is PSNR, and no pretrained perceptual network can
be loaded offline. Each residual branch starts at zero (`zero_init_residual_branches`), which made training several
times faster than diffusers' default initialisation at this size.

Output (`--output_dir`):
    vae/                 `AutoencoderDC.save_pretrained` (config.json + diffusion_pytorch_model.safetensors), with
                         `scaling_factor` = 1 / std of the latents of training crops (Stable Diffusion's convention).
    vae_metrics.json     validation PSNR per photo and mean, the PSNR curve, latent statistics, timings, the arguments.

Example (the defaults are the recommended configuration):

    python examples/train_autoencoder.py --output_dir ae_out --seed 0

The run is deterministic for a given `--seed` and `--num_threads` on a given machine and torch build (a different
thread count may change the floating-point summation order, hence the last bits of the weights). One thread is the
default: on a shared 2-core machine two threads waste most of their time waiting for each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers import AutoencoderDC
from diffusers.models.autoencoders.autoencoder_dc import EfficientViTBlock, ResBlock
from diffusers.optimization import get_scheduler

from diffusers_restore.data.paired_dataset import image_to_tensor
from diffusers_restore.image_io import find_images, load_rgb
from diffusers_restore.metrics import psnr
from diffusers_restore.sample_photos import TRAIN_PHOTOS, VALIDATION_PHOTOS, center_crop, load_photo


logger = logging.getLogger(__name__)

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
LOSSES = ("l1", "mse", "l1_mse")


def _int_list(text: str) -> tuple[int, ...]:
    """Parse "32,64,128" into (32, 64, 128)."""
    try:
        values = tuple(int(item) for item in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    return values


def _float_list(text: str) -> tuple[float, ...]:
    """Parse "1.0,0.5" into (1.0, 0.5)."""
    try:
        values = tuple(float(item) for item in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error
    return values


def _str_list(text: str) -> tuple[str, ...]:
    """Parse "ResBlock,EfficientViTBlock" into a tuple of names."""
    return tuple(item.strip() for item in text.split(","))


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; `input_args` replaces `sys.argv[1:]` (for tests).

    Raises:
        ValueError: an inconsistent architecture or a bad value, naming the argument.
    """
    parser = argparse.ArgumentParser(description="Train a small AutoencoderDC on the project's training photos.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where vae/ and vae_metrics.json are written.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the weights, the crops and their order.")
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads (fixed, for determinism).")

    # Data.
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Folder of training photos (searched recursively). Default: scikit-image's photos of "
        "diffusers_restore.sample_photos.TRAIN_PHOTOS.",
    )
    parser.add_argument(
        "--validation_data_dir",
        type=str,
        default=None,
        help="Folder of photos whose round-trip PSNR is reported (never trained on). Default: scikit-image's photos of "
        "diffusers_restore.sample_photos.VALIDATION_PHOTOS.",
    )
    parser.add_argument("--resolution", type=int, default=32, help="Side of the square training crops, in pixels.")
    parser.add_argument(
        "--photo_scales",
        type=_float_list,
        default=(1.0, 0.75, 0.5),
        help="Each training photo is also kept resized by these factors (mild scale augmentation), e.g. '1.0,0.5'.",
    )
    parser.add_argument(
        "--no_rotations", action="store_true", help="Only flip the crops horizontally (no vertical flips/rotations)."
    )

    # Architecture (AutoencoderDC).
    parser.add_argument("--latent_channels", type=int, default=16, help="Channels of the latent.")
    parser.add_argument(
        "--block_out_channels",
        type=_int_list,
        default=(32, 32, 64),
        help="Channels per stage, shared by encoder and decoder; n stages give a spatial factor of 2**(n-1). "
        "With 0 blocks in the first stage its entry is unused (the input goes straight to the second stage's width).",
    )
    parser.add_argument(
        "--block_types",
        type=_str_list,
        default=("ResBlock", "ResBlock", "ResBlock"),
        help=f"Block type per stage, from {BLOCK_TYPES}.",
    )
    parser.add_argument(
        "--encoder_layers_per_block",
        type=_int_list,
        default=(0, 1, 1),
        help="Blocks per encoder stage; 0 in the first stage makes the input a pixel-unshuffle (cheap full-res step).",
    )
    parser.add_argument(
        "--decoder_layers_per_block", type=_int_list, default=(0, 1, 1), help="Blocks per decoder stage."
    )
    parser.add_argument(
        "--no_zero_init_residuals",
        action="store_true",
        help="Keep diffusers' default initialisation instead of zeroing the scale of each residual branch's last norm.",
    )
    parser.add_argument(
        "--attention_head_dim", type=int, default=16, help="Head size of the EfficientViT (linear attention) blocks."
    )

    # Optimisation.
    parser.add_argument("--train_batch_size", type=int, default=16, help="Crops per step.")
    parser.add_argument("--max_train_steps", type=int, default=6000, help="Optimisation steps.")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="Peak AdamW learning rate.")
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        help='diffusers scheduler name: "constant", "constant_with_warmup", "linear", "cosine", ...',
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear warm-up steps.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.99)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    parser.add_argument("--loss", type=str, default="mse", help=f"Pixel loss, one of {LOSSES}.")

    # Evaluation and outputs.
    parser.add_argument(
        "--eval_resolution", type=int, default=256, help="Side of the validation centre crops used for the PSNR."
    )
    parser.add_argument(
        "--validation_steps", type=int, default=500, help="Evaluate the validation PSNR every N steps (0: only at the end)."
    )
    parser.add_argument(
        "--scaling_factor_crops", type=int, default=64, help="Training crops encoded to measure the latent std."
    )

    args = parser.parse_args(input_args)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming the argument for values AutoencoderDC or the loop cannot use."""
    channels = args.block_out_channels
    num_stages = len(channels)
    if num_stages < 1 or any(c <= 0 for c in channels):
        raise ValueError(f"--block_out_channels must be positive integers, got {channels}.")
    for name in ("block_types", "encoder_layers_per_block", "decoder_layers_per_block"):
        if len(getattr(args, name)) != num_stages:
            raise ValueError(
                f"--{name} needs one entry per stage of --block_out_channels ({num_stages}), got {getattr(args, name)}."
            )
    for block_type in args.block_types:
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"--block_types: unknown block {block_type!r}; choose from {BLOCK_TYPES}.")
    for name in ("encoder_layers_per_block", "decoder_layers_per_block"):
        layers = getattr(args, name)
        if any(n < 0 for n in layers) or any(n == 0 for n in layers[1:]):
            raise ValueError(f"--{name}: only the first stage may have 0 blocks, got {layers}.")
    if num_stages > 1 and (args.encoder_layers_per_block[0] == 0) != (args.decoder_layers_per_block[0] == 0):
        raise ValueError("--encoder_layers_per_block and --decoder_layers_per_block must both start with 0 or not.")
    if args.latent_channels <= 0 or channels[-1] % args.latent_channels != 0:
        raise ValueError(
            f"--latent_channels ({args.latent_channels}) must divide the last of --block_out_channels ({channels[-1]})."
        )
    first_used = 1 if args.encoder_layers_per_block[0] == 0 else 0  # a 0-block first stage never uses channels[0]
    for i in range(first_used, num_stages - 1):
        if (4 * channels[i]) % channels[i + 1] != 0 or (4 * channels[i + 1]) % channels[i] != 0:
            raise ValueError(
                f"--block_out_channels: neighbouring stages {channels[i]} -> {channels[i + 1]} must differ by a "
                "factor dividing 4 (pixel-(un)shuffle shortcuts)."
            )
    for block_type, c in zip(args.block_types, channels):
        if block_type == "EfficientViTBlock" and c % args.attention_head_dim != 0:
            raise ValueError(
                f"--attention_head_dim ({args.attention_head_dim}) must divide every EfficientViTBlock stage's "
                f"channels, got {c}."
            )
    factor = 2 ** (num_stages - 1)
    for name in ("resolution", "eval_resolution"):
        value = getattr(args, name)
        if value <= 0 or value % factor != 0:
            raise ValueError(f"--{name} ({value}) must be a positive multiple of the spatial factor {factor}.")
    if args.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {args.loss!r}.")
    if not args.photo_scales or any(not 0.0 < s <= 1.0 for s in args.photo_scales):
        raise ValueError(f"--photo_scales must be in (0, 1], got {args.photo_scales}.")
    for name in ("train_batch_size", "max_train_steps", "num_threads", "scaling_factor_crops"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.validation_steps < 0 or args.lr_warmup_steps < 0 or args.max_grad_norm < 0:
        raise ValueError("--validation_steps, --lr_warmup_steps and --max_grad_norm must not be negative.")


def build_autoencoder(args: argparse.Namespace) -> AutoencoderDC:
    """A randomly initialised `AutoencoderDC` from the architecture arguments (same layout for encoder and decoder).

    EfficientViT stages get the multi-scale (5 x 5) linear attention of the real DC-AE; ResBlock stages none. Every
    normalisation is RMSNorm (no batch statistics, so training and inference behave the same).
    """
    qkv_multiscales = tuple((5,) if block_type == "EfficientViTBlock" else () for block_type in args.block_types)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=args.latent_channels,
        attention_head_dim=args.attention_head_dim,
        encoder_block_types=tuple(args.block_types),
        decoder_block_types=tuple(args.block_types),
        encoder_block_out_channels=tuple(args.block_out_channels),
        decoder_block_out_channels=tuple(args.block_out_channels),
        encoder_layers_per_block=tuple(args.encoder_layers_per_block),
        decoder_layers_per_block=tuple(args.decoder_layers_per_block),
        encoder_qkv_multiscales=qkv_multiscales,
        decoder_qkv_multiscales=qkv_multiscales,
        upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=1.0,
    )


def zero_init_residual_branches(vae: AutoencoderDC) -> None:
    """Zero the scale of the last RMSNorm of every residual branch, so that each block starts as the identity.

    Every ResBlock and EfficientViTBlock of AutoencoderDC adds `norm(branch(x))` to its input; with the norm's scale
    at zero the network starts as its shortcut path (pixel-(un)shuffle averaging and the convolutions between
    stages), and each branch grows from zero as training needs it (the "zero-gamma" trick of Goyal et al., 2017).
    The decoder's output norm is not a residual branch and keeps its default scale of one.
    """
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResBlock):
                norms = [module.norm]
            elif isinstance(module, EfficientViTBlock):
                norms = [module.attn.norm_out, module.conv_out.norm]
            else:
                continue
            for norm in norms:
                norm.weight.zero_()


def load_photos(folder: str | None, default_names: tuple[str, ...]) -> list[tuple[str, Image.Image]]:
    """`(name, RGB image)` for every photo in `folder` (recursively, EXIF-orientated), or scikit-image's photos
    `default_names` when no folder is given."""
    if folder is None:
        return [(name, load_photo(name)) for name in default_names]
    if not os.path.isdir(folder):
        raise ValueError(f"photo folder '{folder}' does not exist.")
    paths = find_images(folder)
    if not paths:
        raise ValueError(f"photo folder '{folder}' holds no images.")
    return [(os.path.splitext(os.path.relpath(path, folder))[0], load_rgb(path)) for path in paths]


def load_training_photos(
    scales: tuple[float, ...], min_size: int, folder: str | None = None
) -> list[torch.Tensor]:
    """Every training photo at every scale in `scales`, as `(3, H, W)` tensors in [-1, 1].

    Downscaled copies (bicubic, antialiased) hold more detail per pixel, closer to the density of photos seen at inference.
    Copies smaller than `min_size` (the crop size) on a side are skipped.
    """
    photos = []
    for _, image in load_photos(folder, TRAIN_PHOTOS):
        for scale in scales:
            width, height = round(image.width * scale), round(image.height * scale)
            if min(width, height) < min_size:
                continue
            resized = image if scale == 1.0 else image.resize((width, height), Image.Resampling.BICUBIC)
            photos.append(image_to_tensor(resized))
    if not photos:
        raise ValueError(f"--resolution ({min_size}) is larger than every training photo at every scale.")
    return photos


def sample_crops(
    photos: list[torch.Tensor],
    batch_size: int,
    resolution: int,
    generator: torch.Generator,
    rotations: bool = True,
) -> torch.Tensor:
    """A batch `(batch_size, 3, resolution, resolution)` of random crops, photo chosen uniformly, randomly flipped.

    With `rotations`, each crop is also rotated by a random multiple of 90 degrees (with the horizontal flip this
    covers all 8 symmetries of the square).
    """
    crops = []
    photo_index = torch.randint(len(photos), (batch_size,), generator=generator)
    for index in photo_index.tolist():
        photo = photos[index]
        _, height, width = photo.shape
        top = int(torch.randint(height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(width - resolution + 1, (1,), generator=generator))
        crop = photo[:, top : top + resolution, left : left + resolution]
        if int(torch.randint(2, (1,), generator=generator)):
            crop = crop.flip(-1)
        if rotations:
            crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=generator)), dims=(-2, -1))
        crops.append(crop)
    return torch.stack(crops)


def pixel_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Scalar reconstruction loss between `(B, 3, H, W)` tensors: "l1", "mse" or their sum "l1_mse"."""
    if kind == "l1":
        return F.l1_loss(prediction, target)
    if kind == "mse":
        return F.mse_loss(prediction, target)
    return F.l1_loss(prediction, target) + F.mse_loss(prediction, target)


def psnr_uint8(restored: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB between two `(3, H, W)` images in [-1, 1], after rounding both to 8 bits (what a saved image holds)."""
    a, b = (((image.clamp(-1.0, 1.0) + 1.0) * 127.5).round().double()[None] for image in (restored, reference))
    return float(psnr(a, b, data_range=255.0)[0])


@torch.no_grad()
def evaluate_validation(vae: AutoencoderDC, resolution: int, photos: list[tuple[str, Image.Image]]) -> dict[str, float]:
    """Round-trip PSNR (encode -> decode, 8-bit) of each validation photo's `resolution` px centre crop, and the mean."""
    was_training = vae.training
    vae.eval()
    results = {}
    for name, photo in photos:
        image = image_to_tensor(center_crop(photo, resolution))[None]
        reconstruction = vae.decode(vae.encode(image).latent).sample
        results[name] = psnr_uint8(reconstruction[0], image[0])
    results["mean"] = float(np.mean([results[name] for name, _ in photos]))
    vae.train(was_training)
    return results


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderDC, photos: list[torch.Tensor], num_crops: int, resolution: int, seed: int
) -> dict[str, float]:
    """Mean and std of the (unscaled) latents of `num_crops` random training crops, and `scaling_factor` = 1 / std."""
    generator = torch.Generator().manual_seed(seed)
    was_training = vae.training
    vae.eval()
    latents = []
    for start in range(0, num_crops, 16):
        batch = sample_crops(photos, min(16, num_crops - start), resolution, generator)
        latents.append(vae.encode(batch).latent.flatten())
    vae.train(was_training)
    values = torch.cat(latents).double()
    std = values.std().item()
    if not math.isfinite(std) or std <= 0:
        raise RuntimeError(f"the latents have a degenerate standard deviation ({std}); training diverged.")
    return {"mean": values.mean().item(), "std": std, "scaling_factor": 1.0 / std}


def directory_size_bytes(path: str) -> int:
    """Total size of the files under `path`."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, measure the scaling factor, save `vae/` and `vae_metrics.json`; returns the metrics dictionary."""
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    torch.set_num_threads(args.num_threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)

    vae = build_autoencoder(args)
    if not args.no_zero_init_residuals:
        zero_init_residual_branches(vae)
    vae.train()
    num_parameters = sum(p.numel() for p in vae.parameters())
    logger.info(
        "AutoencoderDC: %d parameters, spatial factor %d, %d latent channels",
        num_parameters,
        vae.spatial_compression_ratio,
        args.latent_channels,
    )

    photos = load_training_photos(args.photo_scales, args.resolution, args.train_data_dir)
    validation_photos = load_photos(args.validation_data_dir, VALIDATION_PHOTOS)
    generator = torch.Generator().manual_seed(args.seed)

    optimizer = torch.optim.AdamW(
        vae.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )

    curve = []
    start_time = time.perf_counter()
    start_cpu = time.process_time()
    eval_seconds = 0.0
    running_loss = 0.0
    for step in range(1, args.max_train_steps + 1):
        batch = sample_crops(photos, args.train_batch_size, args.resolution, generator, not args.no_rotations)
        reconstruction = vae(batch).sample
        loss = pixel_loss(reconstruction, batch, args.loss)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {loss.item()} at step {step}; lower --learning_rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        running_loss += loss.item()

        if args.validation_steps and step % args.validation_steps == 0 and step < args.max_train_steps:
            eval_start = time.perf_counter()
            validation = evaluate_validation(vae, args.eval_resolution, validation_photos)
            eval_seconds += time.perf_counter() - eval_start
            train_seconds = time.perf_counter() - start_time - eval_seconds
            curve.append({"step": step, "train_seconds": round(train_seconds, 1), "psnr_mean": validation["mean"]})
            logger.info(
                "step %d/%d  loss %.5f  validation PSNR %.2f dB  (%.0f s of training, %.0f s CPU in all)",
                step,
                args.max_train_steps,
                running_loss / args.validation_steps,
                validation["mean"],
                train_seconds,
                time.process_time() - start_cpu,
            )
            running_loss = 0.0

    train_seconds = time.perf_counter() - start_time - eval_seconds
    cpu_seconds = time.process_time() - start_cpu
    vae.eval()
    validation = evaluate_validation(vae, args.eval_resolution, validation_photos)
    curve.append(
        {"step": args.max_train_steps, "train_seconds": round(train_seconds, 1), "psnr_mean": validation["mean"]}
    )

    stats = latent_statistics(vae, photos, args.scaling_factor_crops, args.resolution, args.seed + 1)
    vae.register_to_config(scaling_factor=stats["scaling_factor"])

    vae_dir = os.path.join(args.output_dir, "vae")
    vae.save_pretrained(vae_dir, safe_serialization=True)

    metrics = {
        "validation_psnr": validation,
        "eval_resolution": args.eval_resolution,
        "curve": curve,
        "latent_mean": stats["mean"],
        "latent_std": stats["std"],
        "scaling_factor": stats["scaling_factor"],
        "spatial_compression_ratio": vae.spatial_compression_ratio,
        "num_parameters": num_parameters,
        "vae_dir_bytes": directory_size_bytes(vae_dir),
        "train_seconds": round(train_seconds, 1),
        "cpu_seconds_incl_eval": round(cpu_seconds, 1),
        "args": {key: list(value) if isinstance(value, tuple) else value for key, value in vars(args).items()},
    }
    with open(os.path.join(args.output_dir, "vae_metrics.json"), "w") as file:
        json.dump(metrics, file, indent=2)

    per_photo = ", ".join(f"{name} {validation[name]:.2f}" for name, _ in validation_photos)
    print(
        f"validation round-trip PSNR ({args.eval_resolution} px centre crops): mean {validation['mean']:.2f} dB "
        f"({per_photo}); scaling_factor {stats['scaling_factor']:.5f}; {num_parameters} parameters; "
        f"trained {train_seconds:.0f} s; saved {vae_dir}"
    )
    return metrics


if __name__ == "__main__":
    main(parse_args())
