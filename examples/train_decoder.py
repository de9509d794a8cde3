#!/usr/bin/env python
# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune the decoder of a DC-AE (`AutoencoderDC`) for restoration, with accelerate.

A latent restorer's output is never exactly a clean image's latent, and the VAE decoder turns small latent errors into
blotches and small-scale artifacts. This script trains the decoder on degraded latents so that it decodes them into
clean images (`--upscale 1`), or trains a decoder with one more upsampling stage (`--upscale 2`,
`diffusers_restore.DCUpscaleDecoder`) that decodes a latent of an image into that image at twice the resolution.
The encoder is never trained, so restorers trained with the VAE keep working with the new decoder.

Training pairs are built on the fly from clean photos (a practitioner's recipe for decoder fine-tuning):

1. a photo whose short side is at least twice `--resolution` is downsampled 0.5x with an area filter (`--area_downsample`,
   on by default: it averages away noise and sensor artifacts);
2. a random `--resolution` crop is the HQ target;
3. the input is the HQ crop (`--upscale 1`) or the HQ crop downsampled 0.5x with the area filter (`--upscale 2`);
4. the input is VAE-encoded, and the scaled latent degraded (`--latent_degradation`):
   `noise`: `z + sigma * eps` with `sigma ~ U[0, --latent_noise_max]` per sample (a share `--clean_latent_prob` left
   clean); `restorer`: the latent noised to `sigma ~ U[0, --restorer_strength_max]` and denoised by a restoration
   pipeline (`--restorer`, the artifacts a diffusion model actually makes; slower); `none`: the clean latent;
5. the decoder's output is compared with the HQ crop: L1 (per sample weighted by the inverse of the original decoder's
   L1 with `--balance_noise_levels`) + `--perceptual_loss_weight` x a perceptual distance +
   (from `--gan_start_step`) `--gan_loss_weight` x an adaptive-weight hinge GAN loss with a small patch discriminator.

`--decoder_extra_layers` deepens the decoder before training (`diffusers_restore.grow_dc_decoder`: new residual blocks
that start as the identity); the saved VAE is still a plain `AutoencoderDC`.

Perceptual distance (`--perceptual_network`): `vae_encoder` (default) compares the frozen VAE encoder's features of the
output and of the target, block by block, each normalised by the target's mean feature magnitude; it needs no
download and sees exactly the image statistics the latent space was built on. `lpips` uses LPIPS when its backbone
weights are present locally (`--lpips_backbone_weights`, or torchvision's cache); nothing is downloaded.

Outputs in `--output_dir`:

* `--upscale 1`: `vae/`, a plain diffusers `AutoencoderDC` folder (the base encoder, the fine-tuned decoder). Put it
  into a restoration pipeline with `sana-restore install-decoder PIPELINE output_dir -o NEW_PIPELINE` (or
  `diffusers_restore.install_decoder`); the result loads with `SanaRestorationPipeline.from_pretrained` unchanged.
* `--upscale 2`: `upscale_decoder/`, a `DCUpscaleDecoder` folder; `install-decoder` adds it to a pipeline as its
  `upscale_decoder` component, which `pipe(image, upscale=2)` then uses.
* `README.md` (model card), `decoder_metrics.json` (validation PSNR/SSIM at the end), `checkpoint-<step>/` folders
  (resumable; never written with a NaN or infinite weight), `logs/` (tensorboard: losses, validation grids).

Example:

    accelerate launch examples/train_decoder.py --pretrained_model_name_or_path org/sana-restore \\
        --train_data_dir photos/ --validation_data_dir val_photos/ --output_dir robust-decoder \\
        --resolution 256 --upscale 1 --latent_noise_max 0.12 --perceptual_loss_weight 0.1 \\
        --max_train_steps 5000 --use_ema --gradient_checkpointing --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from huggingface_hub import ModelCard, ModelCardData, upload_folder
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

import diffusers
from diffusers import AutoencoderDC
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid

from diffusers_restore.data.degradations import area_downsample_pair
from diffusers_restore.data.latents import degrade_latents
from diffusers_restore.data.paired_dataset import image_to_tensor
from diffusers_restore.image_io import find_images, load_rgb
from diffusers_restore.metrics import MetricUnavailable, load_lpips_model, psnr, ssim
from diffusers_restore.models.dc_decoder_growth import grow_dc_decoder
from diffusers_restore.models.upscale_decoder import DCUpscaleDecoder, run_dc_decoder
from diffusers_restore.models.vae_latents import encode_latents, unscale_latents
from diffusers_restore.training_utils import (
    EpochShuffleSampler,
    NonFiniteError,
    all_processes_finite,
    check_resume_argument,
    ema_weights,
    prepare_hub_repo,
    read_training_state,
    remove_unfinished_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    weights_to_check,
)


logger = get_logger(__name__)

LATENT_DEGRADATIONS = ("noise", "restorer", "none")
PERCEPTUAL_NETWORKS = ("vae_encoder", "lpips")
# The noise levels of the robustness report (scaled latent space), as in BENCHMARKS.md.
VALIDATION_NOISE_LEVELS = (0.0, 0.03, 0.06, 0.12)
HUB_IGNORE_PATTERNS = ["checkpoint-*", "*.tmp", "*.tmp/**"]


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune a DC-AE decoder on degraded latents, or train a 2x one.")
    # model
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="A pipeline folder or Hub repo with a `vae` subfolder (restoration or SANA pipeline), or "
                             "an AutoencoderDC folder or repo.")
    parser.add_argument("--vae_subfolder", type=str, default=None,
                        help="Subfolder of the VAE; default: `vae` when the model is a pipeline (has model_index.json), "
                             "else none.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--upscale", type=int, default=1, choices=(1, 2),
                        help="1: fine-tune the VAE's decoder (same resolution); 2: train a DCUpscaleDecoder.")
    parser.add_argument("--decoder_extra_layers", type=str, default=None,
                        help="Deepen the decoder before training: comma-separated extra residual blocks per decoder "
                             "stage, in the order of the VAE's decoder_block_out_channels (e.g. 0,0,4 adds four at the "
                             "latent's resolution). New blocks start as the identity, so training starts from the "
                             "VAE's own decode; the saved VAE is a plain AutoencoderDC with a larger "
                             "decoder_layers_per_block.")
    parser.add_argument("--upscale_decoder_head_channels", type=int, default=64,
                        help="--upscale 2: width of the new upsampling head.")
    parser.add_argument("--upscale_decoder_head_layers", type=int, default=2,
                        help="--upscale 2: residual blocks of the head.")
    # data
    parser.add_argument("--train_data_dir", type=str, required=True, help="Folder of clean photos (searched recursively).")
    parser.add_argument("--validation_data_dir", type=str, default=None,
                        help="Folder of clean photos for validation grids and metrics (centre crops).")
    parser.add_argument("--num_validation_images", type=int, default=4, help="Validation photos used (at most).")
    parser.add_argument("--resolution", type=int, default=256, help="Side of the HQ crops (the decoder's output).")
    parser.add_argument("--area_downsample", action=argparse.BooleanOptionalAction, default=True,
                        help="Halve photos whose short side is at least 2x --resolution by area averaging before "
                             "cropping (cleaner targets).")
    parser.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    parser.add_argument("--repeats", type=int, default=1, help="Crops per photo per epoch.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    # latent degradation
    parser.add_argument("--latent_degradation", type=str, default="noise", choices=LATENT_DEGRADATIONS,
                        help="How the input latent is degraded (see the module docstring).")
    parser.add_argument("--latent_noise_max", type=float, default=0.12,
                        help="`noise`: the latent noise sigma is drawn from U[0, this], in the scaled latent space.")
    parser.add_argument("--clean_latent_prob", type=float, default=0.0,
                        help="`noise`: probability that a sample's latent is left clean (sigma 0), so the decoder "
                             "keeps decoding clean latents as well as before.")
    parser.add_argument("--restorer", type=str, default=None,
                        help="`restorer`: the restoration pipeline (default: --pretrained_model_name_or_path).")
    parser.add_argument("--restorer_strength_max", type=float, default=0.5,
                        help="`restorer`: the latent is noised to sigma ~ U[0, this] (the pipeline's `strength`).")
    # losses
    parser.add_argument("--perceptual_loss_weight", type=float, default=0.1, help="0 disables the perceptual loss.")
    parser.add_argument("--balance_noise_levels", action="store_true",
                        help="Weight each sample's L1 by the inverse of the original decoder's L1 on the same input "
                             "(weights normalised to mean 1), so every noise level counts by its relative (dB) gain: "
                             "without it the noisiest samples' large errors dominate and clean latents decode worse. "
                             "Keeps a frozen copy of the original decoder (one more forward pass per step).")
    parser.add_argument("--perceptual_network", type=str, default="vae_encoder", choices=PERCEPTUAL_NETWORKS)
    parser.add_argument("--lpips_backbone_weights", type=str, default=None,
                        help="--perceptual_network lpips: a .safetensors torchvision AlexNet state dict (else "
                             "torchvision's cache).")
    parser.add_argument("--gan_loss_weight", type=float, default=0.0,
                        help="Weight of the adversarial loss (multiplied by the adaptive weight); 0 disables the GAN.")
    parser.add_argument("--gan_start_step", type=int, default=0,
                        help="Optimisation step from which the discriminator is trained and the GAN loss applies.")
    parser.add_argument("--discriminator_learning_rate", type=float, default=None,
                        help="Default: --learning_rate.")
    # optimisation
    parser.add_argument("--output_dir", type=str, default="sana-restore-decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=4, help="Per device.")
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute the decoder's activations in the backward pass (less memory, ~30% slower).")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--scale_lr", action="store_true",
                        help="Scale the learning rate by the number of processes, accumulation steps and batch size.")
    parser.add_argument("--lr_scheduler", type=str, default="constant",
                        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", '
                             '"constant_with_warmup".')
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the trained weights; it is what is saved.")
    parser.add_argument("--ema_decay", type=float, default=0.999)
    # checkpoints, validation, logging, Hub
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None,
                        help='"latest" or a checkpoint-<step> folder of --output_dir.')
    parser.add_argument("--validation_steps", type=int, default=500)
    parser.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb" or "none".')
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--hub_token", type=str, default=None)
    args = parser.parse_args(input_args)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    positive = ["resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                "checkpointing_steps", "validation_steps", "repeats", "upscale_decoder_head_channels"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.upscale == 2 and args.resolution % 2:
        raise ValueError(f"--upscale 2 needs an even --resolution (the input is half of it), got {args.resolution}.")
    if not 0.0 <= args.latent_noise_max <= 10.0:
        raise ValueError(f"--latent_noise_max must be in [0, 10], got {args.latent_noise_max}.")
    if args.balance_noise_levels and args.upscale != 1:
        raise ValueError("--balance_noise_levels needs --upscale 1 (it weighs by the original decoder's error).")
    if not 0.0 <= args.clean_latent_prob <= 1.0:
        raise ValueError(f"--clean_latent_prob must be in [0, 1], got {args.clean_latent_prob}.")
    if not 0.0 < args.restorer_strength_max <= 1.0:
        raise ValueError(f"--restorer_strength_max must be in (0, 1], got {args.restorer_strength_max}.")
    for name in ("perceptual_loss_weight", "gan_loss_weight", "learning_rate", "ema_decay", "gan_start_step"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{name} must be a finite number >= 0, got {value}.")
    if args.ema_decay >= 1.0:
        raise ValueError(f"--ema_decay must be < 1, got {args.ema_decay}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir} is not a folder.")
    if args.validation_data_dir is not None and not os.path.isdir(args.validation_data_dir):
        raise ValueError(f"--validation_data_dir {args.validation_data_dir} is not a folder.")
    if args.decoder_extra_layers is not None:
        try:
            args.decoder_extra_layers = [int(count) for count in args.decoder_extra_layers.split(",")]
        except ValueError:
            raise ValueError(
                f"--decoder_extra_layers must be comma-separated integers (one per decoder stage), got "
                f"{args.decoder_extra_layers!r}."
            ) from None
    check_resume_argument(args.resume_from_checkpoint)
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token."
            " Please use `hf auth login` to authenticate with the Hub."
        )


# ----------------------------------------------------------------------------------------------------------- data


class DecoderPairs(Dataset):
    """HQ crops and the decoder's input images, drawn from clean photos (see the module docstring).

    Sample `i` of epoch `e` depends only on (seed, e, i), so a resumed run sees the same pairs. Items:
    `{"target": (3, R, R), "input": (3, R / upscale, R / upscale)}`, both in [-1, 1].
    """

    def __init__(self, paths: list[str], resolution: int, upscale: int, area_downsample: bool, random_flip: bool,
                 repeats: int, seed: int):
        self.paths, self.resolution, self.upscale = paths, resolution, upscale
        self.area_downsample, self.random_flip = area_downsample, random_flip
        self.repeats, self.seed, self.epoch = repeats, seed, 0
        self.photos: dict[int, Image.Image] = {}
        too_small = []
        for path in paths:
            with Image.open(path) as image:
                if min(image.size) < resolution:
                    too_small.append(f"{path} ({image.width}x{image.height})")
        if too_small:
            raise ValueError(
                f"{len(too_small)} photo(s) in --train_data_dir are smaller than --resolution {resolution}: "
                + "; ".join(too_small[:5]) + ". Remove them or lower --resolution."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def _photo(self, index: int) -> Image.Image:
        if index not in self.photos:  # decoded once per worker (photo corpora are small; large ones stream anyway)
            self.photos[index] = load_rgb(self.paths[index])
        return self.photos[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        photo = self._photo(index % len(self.paths))
        size = self.resolution
        if self.area_downsample and min(photo.size) >= 2 * size:
            target, _, _ = area_downsample_pair(photo, crop=size, rng=rng)
        else:
            left = int(rng.integers(0, photo.width - size + 1))
            top = int(rng.integers(0, photo.height - size + 1))
            target = photo.crop((left, top, left + size, top + size))
        if self.random_flip and rng.random() < 0.5:
            target = target.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        source = target if self.upscale == 1 else target.resize((size // 2, size // 2), Image.Resampling.BOX)
        return {"target": image_to_tensor(target), "input": image_to_tensor(source)}


def load_validation_images(
    folder: str | None, count: int, resolution: int, multiple: int
) -> list[tuple[str, Image.Image]]:
    """Up to `count` centre crops (`resolution` px, or the largest square a smaller photo holds, rounded down to a
    multiple of `multiple`: whole latent pixels, also for the half-size input of --upscale 2) of the photos in
    `folder`, sorted by path."""
    if folder is None:
        return []
    crops = []
    for path in find_images(folder)[:count]:
        photo = load_rgb(path)
        side = min(resolution, min(photo.size)) // multiple * multiple
        if side < multiple:
            logger.warning(f"Validation photo {path} is smaller than {multiple} px; skipped.")
            continue
        left, top = (photo.width - side) // 2, (photo.height - side) // 2
        crops.append((os.path.basename(path), photo.crop((left, top, left + side, top + side))))
    return crops


# ----------------------------------------------------------------------------------------------------------- model


class CheckpointedDCDecoder(nn.Module):
    """An `AutoencoderDC`'s decoder as a module of its own (what `--upscale 1` trains and accelerate wraps), run by
    `run_dc_decoder` with optional gradient checkpointing (diffusers' AutoencoderDC has none)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.gradient_checkpointing = False

    @staticmethod
    def _checkpoint(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(module.__call__, *inputs, use_reentrant=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return run_dc_decoder(self.decoder, latents, checkpoint=self._checkpoint if self.gradient_checkpointing else None)

    @property
    def last_layer(self) -> torch.Tensor:
        conv_out = self.decoder.conv_out
        return conv_out.weight if isinstance(conv_out, nn.Conv2d) else conv_out.conv.weight


class UpscaleDecoderForTraining(nn.Module):
    """A `DCUpscaleDecoder` with the same interface as `CheckpointedDCDecoder` (image tensor out)."""

    def __init__(self, decoder: DCUpscaleDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents).sample

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.head_out.weight


class PatchDiscriminator(nn.Module):
    """A small PatchGAN discriminator (strided 4x4 convolutions, GroupNorm, LeakyReLU, then two 3x3 convolutions)
    giving one logit per patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, layers):
            wider = min(channels * 2**index, channels * 8)
            blocks += [nn.Conv2d(width, wider, 4, stride=2, padding=1), nn.GroupNorm(8, wider), nn.LeakyReLU(0.2)]
            width = wider
        blocks += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.LeakyReLU(0.2),
                   nn.Conv2d(width, 1, 3, padding=1)]
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def encoder_features(encoder: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The DC-AE encoder's features after its input convolution and after each down block."""
    hidden_states = encoder.conv_in(images)
    features = [hidden_states]
    for block in encoder.down_blocks:
        hidden_states = block(hidden_states)
        features.append(hidden_states)
    return features


def vae_encoder_distance(encoder: nn.Module, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the encoder's blocks of `mean|f(prediction) - f(target)| / mean|f(target)|` (a scalar)."""
    with torch.no_grad():
        target_features = encoder_features(encoder, target)
    terms = [
        (predicted - reference).abs().mean() / reference.abs().mean().clamp_min(1e-6)
        for predicted, reference in zip(encoder_features(encoder, prediction), target_features)
    ]
    return torch.stack(terms).mean()


def balanced_l1(prediction: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L1 of `prediction` `(B, 3, H, W)` against `target`, each sample weighted by the inverse of the L1 of `reference`
    (the original decoder's output for the same input), the weights normalised to mean 1 over the batch.

    A sample the original decoder already gets nearly right (a clean latent) then counts as much, per dB of change, as
    a very noisy one; with a plain mean the noisy samples' large errors dominate the gradient. Equals the plain L1 when
    all reference errors are equal."""
    weights = 1.0 / (reference - target).abs().flatten(1).mean(1).clamp_min(1e-4)
    weights = weights / weights.mean()
    return (weights * (prediction - target).abs().flatten(1).mean(1)).mean()


def adaptive_gan_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor):
    """VQGAN's balance: `|grad of the reconstruction loss| / |grad of the GAN loss|` at the decoder's last layer,
    clamped to [0, 1e4] and detached."""
    reconstruction_grads = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    generator_grads = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grads.norm() / (generator_grads.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


def degrade_input_latents(args, latents: torch.Tensor, inputs: torch.Tensor, generator: torch.Generator, restorer):
    """Scaled latents `(B, C, h, w)` degraded as --latent_degradation says; `inputs` are the encoded images in [-1, 1].
    Returns the degraded latents and the per-sample sigma (or strength)."""
    batch = latents.shape[0]
    if args.latent_degradation == "none":
        return latents, torch.zeros(batch)
    if args.latent_degradation == "noise":
        noisy, sigmas = degrade_latents(latents, args.latent_noise_max, generator, return_sigmas=True)
        if args.clean_latent_prob > 0:
            clean = torch.rand(batch, generator=generator) < args.clean_latent_prob
            noisy = torch.where(clean.to(latents.device).view(-1, *(1,) * (latents.ndim - 1)), latents, noisy)
            sigmas = torch.where(clean, torch.zeros_like(sigmas), sigmas)
        return noisy, sigmas
    strength = torch.rand(batch, generator=generator) * args.restorer_strength_max
    degraded = []
    for index in range(batch):
        image = ((inputs[index : index + 1].float() + 1) / 2).clamp(0, 1)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        # strength 0 would skip every step: a tiny strength is one short step from the clean latent
        output = restorer(image, strength=max(float(strength[index]), 1e-3), output_type="latent",
                          generator=torch.Generator().manual_seed(seed))
        degraded.append(output.images.to(latents))
    return torch.cat(degraded)[..., : latents.shape[-2], : latents.shape[-1]], strength


# ----------------------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate_decoder(vae: AutoencoderDC, decode, photos, upscale: int, device, noise_levels=VALIDATION_NOISE_LEVELS,
                     seed: int = 0) -> tuple[dict[str, float], list[Image.Image]]:
    """PSNR/SSIM of `decode(encode(input) + sigma * noise)` against the HQ crop for each sigma (scaled latent space),
    over the validation crops; also one grid per photo (columns: input, decoded at each sigma, target)."""
    metrics: dict[str, list[float]] = {}
    grids = []
    generator = torch.Generator().manual_seed(seed)
    for _, photo in photos:
        target = image_to_tensor(photo)[None].to(device)
        source = target if upscale == 1 else F.avg_pool2d(target, 2)
        latents = encode_latents(vae, source)
        row = [photo.resize((source.shape[-1], source.shape[-2]), Image.Resampling.BOX) if upscale == 2 else photo]
        for sigma in noise_levels:
            noisy = latents + sigma * torch.randn(latents.shape, generator=generator).to(latents)
            decoded = ((decode(unscale_latents(vae, noisy)).float() + 1) / 2).clamp(0, 1)[..., : target.shape[-2], : target.shape[-1]]
            reference = (target + 1) / 2
            metrics.setdefault(f"psnr_sigma_{sigma:g}", []).append(float(psnr(decoded, reference)))
            metrics.setdefault(f"ssim_sigma_{sigma:g}", []).append(float(ssim(decoded, reference)))
            row.append(Image.fromarray((decoded[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)))
        row.append(photo)
        size = photo.size
        grids.append(make_image_grid([image.resize(size, Image.Resampling.NEAREST) for image in row], 1, len(row)))
    return {key: float(np.mean(values)) for key, values in metrics.items()}, grids


def log_validation(accelerator, vae, decode, photos, args, step: int) -> dict[str, float]:
    metrics, grids = evaluate_decoder(vae, decode, photos, args.upscale, accelerator.device)
    logger.info(f"Validation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(grid) for grid in grids]), step, dataformats="NHWC"
            )
    accelerator.log({f"validation/{key}": value for key, value in metrics.items()}, step=step)
    if accelerator.is_main_process and grids:
        folder = os.path.join(args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        for (name, _), grid in zip(photos, grids):
            grid.save(os.path.join(folder, f"step_{step:06d}_{os.path.splitext(name)[0]}.png"))
    return metrics


# ----------------------------------------------------------------------------------------------------------- card


def save_model_card(args, repo_id: str, base_metrics: dict, final_metrics: dict, num_photos: int) -> None:
    what = (
        "a fine-tuned decoder for `AutoencoderDC` (same encoder), robust to degraded latents"
        if args.upscale == 1
        else "a `DCUpscaleDecoder`: the VAE's decoder with one more 2x upsampling stage"
    )
    rows = ""
    if final_metrics:
        rows = "| latent noise sigma | " + " | ".join(
            key.replace("psnr_sigma_", "") for key in final_metrics if key.startswith("psnr")
        ) + " |\n|---|" + "---|" * sum(key.startswith("psnr") for key in final_metrics) + "\n"
        for label, metrics in (("base decoder", base_metrics), ("this decoder", final_metrics)):
            if metrics:
                rows += f"| {label}, PSNR dB / SSIM | " + " | ".join(
                    f"{metrics[key]:.2f} / {metrics[key.replace('psnr', 'ssim')]:.4f}"
                    for key in metrics if key.startswith("psnr")
                ) + " |\n"
    degradation = {
        "noise": f"gaussian noise in the scaled latent space, sigma ~ U[0, {args.latent_noise_max}]",
        "restorer": f"noised to sigma ~ U[0, {args.restorer_strength_max}] and denoised by {args.restorer}",
        "none": "none (clean latents)",
    }[args.latent_degradation]
    usage = (
        "sana-restore install-decoder PIPELINE_DIR this_folder -o PIPELINE_WITH_THIS_DECODER"
    )
    body = f"""# {repo_id}

{what}, trained from `{args.pretrained_model_name_or_path}` with `examples/train_decoder.py` of diffusers-restore.

## Training

- photos: {num_photos} from `{args.train_data_dir}`, {args.resolution} px HQ crops{' (photos halved by area averaging first when large enough)' if args.area_downsample else ''}
- input: the HQ crop{' downsampled 0.5x (area filter)' if args.upscale == 2 else ''}, VAE-encoded; latent degradation: {degradation}
{f"- decoder deepened by {args.decoder_extra_layers} residual blocks per stage (identity at the start)" + chr(10) if args.decoder_extra_layers else ''}{f"- clean latents: {args.clean_latent_prob:g} of the samples" + chr(10) if args.clean_latent_prob > 0 else ''}- loss: {'L1 weighted by the inverse of the original decoder' + chr(39) + 's L1 per sample' if args.balance_noise_levels else 'L1'} + {args.perceptual_loss_weight} x perceptual ({args.perceptual_network}){f' + {args.gan_loss_weight} x adaptive hinge GAN from step {args.gan_start_step}' if args.gan_loss_weight > 0 else ''}
- {args.max_train_steps} steps, batch {args.train_batch_size}, learning rate {args.learning_rate}{', EMA ' + str(args.ema_decay) if args.use_ema else ''}

## Validation

PSNR / SSIM of decode(encode(input) + sigma * noise) against the HQ crop, on {args.validation_data_dir or 'no validation photos'}:

{rows or '(no validation photos were given)'}

## Use

```bash
{usage}
```

The result is a restoration pipeline folder that loads with `SanaRestorationPipeline.from_pretrained` unchanged
{'(its `vae` carries this decoder)' if args.upscale == 1 else '(its `upscale_decoder` is this model; `pipe(image, upscale=2)` uses it)'}.
"""
    card = ModelCard.from_template(
        ModelCardData(library_name="diffusers", tags=["diffusers", "diffusers-restore", "autoencoder", "decoder"]),
        template_str="---\n{{ card_data }}\n---\n" + body,
    )
    card.save(os.path.join(args.output_dir, "README.md"))


# ----------------------------------------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict:
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_info()
    else:
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    repo_id = prepare_hub_repo(args, accelerator) if args.push_to_hub else None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_unfinished_checkpoints(args.output_dir)

    # ------------------------------------------------------------------ models
    subfolder = args.vae_subfolder
    if subfolder is None:
        is_pipeline = os.path.isfile(os.path.join(args.pretrained_model_name_or_path, "model_index.json"))
        if not is_pipeline and not os.path.isdir(args.pretrained_model_name_or_path):
            from huggingface_hub import file_exists

            is_pipeline = file_exists(args.pretrained_model_name_or_path, "model_index.json", revision=args.revision)
        subfolder = "vae" if is_pipeline else None
    vae = AutoencoderDC.from_pretrained(
        args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision, variant=args.variant,
        cache_dir=args.cache_dir, use_safetensors=True,
    )
    reference_decoder = None  # the original decoder, frozen (--balance_noise_levels)
    if args.balance_noise_levels:
        reference_decoder = copy.deepcopy(vae.decoder).requires_grad_(False).eval().to(accelerator.device)
    if args.decoder_extra_layers is not None:
        vae = grow_dc_decoder(vae, args.decoder_extra_layers)
        logger.info(f"Decoder grown to decoder_layers_per_block {vae.config.decoder_layers_per_block}.")
    vae.requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32)
    vae.eval()
    vae_factor = vae.spatial_compression_ratio
    if (args.resolution // args.upscale) % vae_factor:
        raise ValueError(
            f"--resolution {args.resolution}: the encoded crops ({args.resolution // args.upscale} px) must be a multiple "
            f"of the VAE's factor {vae_factor}."
        )
    if args.upscale == 1:
        model = CheckpointedDCDecoder(vae.decoder)
        model.decoder.requires_grad_(True)
        model.gradient_checkpointing = args.gradient_checkpointing
    else:
        upscale_decoder = DCUpscaleDecoder.from_vae(
            vae, upscale_factor=2, head_channels=args.upscale_decoder_head_channels,
            head_layers=args.upscale_decoder_head_layers,
        )
        upscale_decoder.requires_grad_(True)
        if args.gradient_checkpointing:
            upscale_decoder.enable_gradient_checkpointing()
        model = UpscaleDecoderForTraining(upscale_decoder)
    model.train()
    encoder = vae.encoder  # frozen: latents and the perceptual distance (--upscale 1 trains only the decoder)

    lpips_model = None
    if args.perceptual_loss_weight > 0 and args.perceptual_network == "lpips":
        try:
            lpips_model = load_lpips_model("alex", args.lpips_backbone_weights, device=accelerator.device)
        except MetricUnavailable as error:
            raise ValueError(f"--perceptual_network lpips: {error} Or use --perceptual_network vae_encoder.") from error

    restorer = None
    if args.latent_degradation == "restorer":
        from diffusers_restore import SanaRestorationPipeline

        restorer = SanaRestorationPipeline.from_pretrained(args.restorer or args.pretrained_model_name_or_path)
        restorer.to(accelerator.device)
        restorer.set_progress_bar_config(disable=True)
        multiple = restorer.size_multiple
        size = args.resolution // args.upscale
        if size % multiple:
            raise ValueError(f"--latent_degradation restorer: the encoded crops ({size} px) must be a multiple of the "
                             f"restorer's size multiple {multiple} px.")

    discriminator = PatchDiscriminator().to(accelerator.device) if args.gan_loss_weight > 0 else None

    ema_model = EMAModel(model.parameters(), decay=args.ema_decay) if args.use_ema else None
    if ema_model is not None:
        ema_model.to(accelerator.device)

    # ------------------------------------------------------------------ data
    paths = find_images(args.train_data_dir)
    if not paths:
        raise ValueError(f"--train_data_dir {args.train_data_dir} holds no images.")
    dataset = DecoderPairs(paths, args.resolution, args.upscale, args.area_downsample, args.random_flip, args.repeats,
                           args.seed)
    sampler = EpochShuffleSampler(len(dataset), args.seed)
    dataloader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                            num_workers=args.dataloader_num_workers)
    if len(dataloader) == 0:
        raise ValueError(f"{len(dataset)} crops per epoch is fewer than one batch of {args.train_batch_size}: raise "
                         "--repeats or add photos.")
    validation_photos = load_validation_images(
        args.validation_data_dir, args.num_validation_images, args.resolution, 2 * vae_factor
    )

    # ------------------------------------------------------------------ optimisation
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    prepared = [model, optimizer, dataloader, lr_scheduler]
    discriminator_optimizer = None
    if discriminator is not None:
        discriminator_optimizer = torch.optim.AdamW(
            discriminator.parameters(), lr=args.discriminator_learning_rate or learning_rate, betas=(0.5, 0.9)
        )
        prepared += [discriminator, discriminator_optimizer]
    prepared = accelerator.prepare(*prepared)
    model, optimizer, dataloader, lr_scheduler = prepared[:4]
    if discriminator is not None:
        discriminator, discriminator_optimizer = prepared[4:]

    def unwrap(module: nn.Module) -> nn.Module:
        return accelerator.unwrap_model(module)

    # EMA weights travel in checkpoints as safetensors (accelerate would pickle a registered EMAModel).
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process and ema_model is not None:
            names = [name for name, _ in unwrap(model).named_parameters()]
            save_file({name: shadow.detach().contiguous().cpu() for name, shadow in zip(names, ema_model.shadow_params)},
                      os.path.join(output_dir, "ema.safetensors"))
            with open(os.path.join(output_dir, "ema.json"), "w", encoding="utf-8") as handle:
                json.dump({"optimization_step": ema_model.optimization_step, "decay": ema_model.decay}, handle)

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            shadows = load_file(os.path.join(input_dir, "ema.safetensors"))
            names = [name for name, _ in unwrap(model).named_parameters()]
            for name, shadow in zip(names, ema_model.shadow_params):
                shadow.copy_(shadows[name].to(shadow))
            with open(os.path.join(input_dir, "ema.json"), encoding="utf-8") as handle:
                ema_model.optimization_step = json.load(handle)["optimization_step"]

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_decoder", config=tracker_config)

    # ------------------------------------------------------------------ resume
    global_step = 0
    generator = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index)
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info(f"No checkpoint in {args.output_dir}. Starting a new training run.")
        else:
            state = read_training_state(checkpoint)
            written = (state.get("upscale"), state.get("use_ema"), state.get("decoder_extra_layers"))
            if written != (args.upscale, args.use_ema, args.decoder_extra_layers):
                raise ValueError(
                    f"{checkpoint} was written with --upscale {written[0]}, use_ema {written[1]} and "
                    f"--decoder_extra_layers {written[2]}; this run has --upscale {args.upscale}, use_ema "
                    f"{args.use_ema}, --decoder_extra_layers {args.decoder_extra_layers}."
                )
            accelerator.load_state(checkpoint)
            generator.set_state(
                load_file(os.path.join(checkpoint, f"training_generator_{accelerator.process_index}.safetensors"))["state"]
            )
            global_step = state["global_step"]
            logger.info(f"Resumed from {checkpoint} (step {global_step}).")

    def decode_for_validation(latents: torch.Tensor) -> torch.Tensor:
        return unwrap(model)(latents)

    base_metrics = {}
    if validation_photos and accelerator.is_main_process and global_step == 0:
        # the base decoder (resized for --upscale 2, as a new DCUpscaleDecoder decodes) is the reference
        base_metrics, _ = evaluate_decoder(vae, decode_for_validation, validation_photos, args.upscale,
                                           accelerator.device)
        logger.info("Base decoder: " + ", ".join(f"{k} {v:.4f}" for k, v in base_metrics.items()))
        with open(os.path.join(args.output_dir, "base_decoder_metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(base_metrics, handle, indent=2)
    elif accelerator.is_main_process and os.path.isfile(os.path.join(args.output_dir, "base_decoder_metrics.json")):
        with open(os.path.join(args.output_dir, "base_decoder_metrics.json"), encoding="utf-8") as handle:
            base_metrics = json.load(handle)

    # ------------------------------------------------------------------ training loop
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    last_checkpoint = None
    final_metrics: dict = {}
    epoch = first_epoch
    while global_step < args.max_train_steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        # reaches the sampler the loader really uses (accelerate's load_state may have replaced it) and the dataset
        epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                target = batch["target"].float()
                with torch.no_grad():
                    latents = encode_latents(vae, batch["input"].float())
                    degraded, _ = degrade_input_latents(args, latents, batch["input"], generator, restorer)
                with accelerator.autocast():
                    prediction = model(unscale_latents(vae, degraded)).float()
                prediction = prediction[..., : target.shape[-2], : target.shape[-1]]
                if reference_decoder is None:
                    reconstruction = F.l1_loss(prediction, target)
                else:
                    with torch.no_grad(), accelerator.autocast():
                        reference = run_dc_decoder(reference_decoder, unscale_latents(vae, degraded)).float()
                    reference = reference[..., : target.shape[-2], : target.shape[-1]]
                    reconstruction = balanced_l1(prediction, target, reference)
                perceptual = torch.zeros((), device=prediction.device)
                if args.perceptual_loss_weight > 0:
                    if lpips_model is not None:
                        perceptual = lpips_model(prediction.clamp(-1, 1), target).mean()
                    else:
                        perceptual = vae_encoder_distance(encoder, prediction, target)
                loss = reconstruction + args.perceptual_loss_weight * perceptual
                gan_active = discriminator is not None and global_step >= args.gan_start_step
                generator_loss = torch.zeros((), device=prediction.device)
                if gan_active:
                    critic = unwrap(discriminator)
                    critic.requires_grad_(False)
                    generator_loss = -critic(prediction).mean()
                    critic.requires_grad_(True)
                    weight = adaptive_gan_weight(loss, generator_loss, unwrap(model).last_layer)
                    loss = loss + args.gan_loss_weight * weight * generator_loss
                losses_finite = bool(torch.isfinite(loss))
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                if not all_processes_finite(accelerator, losses_finite, grad_norm):
                    raise NonFiniteError(
                        f"Training diverged at step {global_step + 1} (loss {loss.item():.4g}); nothing was written for "
                        f"it. Last checkpoint: {last_checkpoint or 'none'}. Lower --learning_rate or --gan_loss_weight."
                    )
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                discriminator_loss = torch.zeros(())
                if gan_active:
                    real_logits = discriminator(target)
                    fake_logits = discriminator(prediction.detach())
                    discriminator_loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
                    accelerator.backward(discriminator_loss)
                    discriminator_optimizer.step()
                    discriminator_optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                if ema_model is not None:
                    ema_model.step(model.parameters())
                global_step += 1
                progress_bar.update(1)
                logs = {"loss": loss.item(), "l1": reconstruction.item(), "perceptual": perceptual.item(),
                        "lr": lr_scheduler.get_last_lr()[0]}
                if gan_active:
                    logs.update(generator_loss=generator_loss.item(), discriminator_loss=discriminator_loss.item())
                progress_bar.set_postfix(loss=f"{logs['loss']:.4g}")
                accelerator.log(logs, step=global_step)
                if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                    last_checkpoint = save_checkpoint(
                        accelerator, args.output_dir, global_step, generator, weights_to_check(unwrap(model), ema_model),
                        {"upscale": args.upscale, "use_ema": args.use_ema, "decoder_extra_layers": args.decoder_extra_layers},
                        args.checkpoints_total_limit,
                    )
                if validation_photos and accelerator.is_main_process and global_step % args.validation_steps == 0:
                    model.eval()
                    with ema_weights(ema_model, unwrap(model)):
                        final_metrics = log_validation(
                            accelerator, vae, decode_for_validation, validation_photos, args, global_step
                        )
                    model.train()
                if global_step >= args.max_train_steps:
                    break
        epoch += 1

    # ------------------------------------------------------------------ save
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = unwrap(model)
        if ema_model is not None:
            ema_model.copy_to(trained.parameters())
        bad = [name for name, tensor in trained.named_parameters() if not torch.isfinite(tensor).all()]
        if bad:
            raise NonFiniteError(f"Not writing the final decoder: {len(bad)} weight tensor(s) hold NaN or inf "
                                 f"(e.g. {', '.join(bad[:3])}).")
        trained.eval()
        if validation_photos and global_step % args.validation_steps:  # else validated at this step already
            final_metrics = log_validation(accelerator, vae, decode_for_validation, validation_photos, args,
                                           global_step)
        if args.upscale == 1:
            vae.decoder.load_state_dict(trained.decoder.state_dict())
            vae.save_pretrained(os.path.join(args.output_dir, "vae"), safe_serialization=True)
        else:
            trained.decoder.save_pretrained(os.path.join(args.output_dir, "upscale_decoder"), safe_serialization=True)
        with open(os.path.join(args.output_dir, "decoder_metrics.json"), "w", encoding="utf-8") as handle:
            json.dump({"base": base_metrics, "final": final_metrics, "upscale": args.upscale}, handle, indent=2)
        save_model_card(args, repo_id or Path(args.output_dir).name, base_metrics, final_metrics, len(paths))
        if args.push_to_hub:
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                          ignore_patterns=HUB_IGNORE_PATTERNS, token=args.hub_token)
    accelerator.end_training()
    return {"base": base_metrics, "final": final_metrics}


if __name__ == "__main__":
    main(parse_args())
