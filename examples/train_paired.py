#!/usr/bin/env python
# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune SANA into an image restorer on (clean, degraded) image pairs, with 🤗 Accelerate.

    accelerate launch examples/train_paired.py \\
        --pretrained_model_name_or_path Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers \\
        --train_data_csv pairs.csv --resolution 512 --output_dir sana-restore

SANA's transformer is wrapped in a `ConcatConditionedTransformer`: the degraded image's latent is concatenated to the
noisy latent and projected back by a 1x1 convolution that starts as identity (step 0 *is* the pretrained SANA).
Training is flow matching in diffusers' convention, with the noise levels of the base's scheduler (SANA's shift):

    z = vae(clean) * sf,  z_c = vae(degraded) * sf            (or read from a latent cache)
    u ~ density(weighting_scheme),  sigma = scheduler.sigmas[u * num_train_timesteps]
    x_t = (1 - sigma) * z + sigma * noise
    loss = weight(sigma) * || model(x_t, z_c, text, sigma * 1000) - (noise - z) ||^2
         [+ w_pix * || vae.decode(x_t - sigma * model(...)) + f * r - clean ||^2      (--pixel_loss_weight)]

with `f` = `--fidelity` and `r = c - vae.decode(z_c)` what the VAE loses of the condition image `c` (the pipeline's
`fidelity` argument adds `f * r` back to its output). `--training_objective one_step` fixes sigma = 1, where one Euler
step gives x0 = noise - v: the model learns the expected clean latent, sampled with `num_inference_steps=1`.
`--pixel_loss psnr` replaces the pixel term's squared error by NAFNet's per-sample PSNR loss, the batch mean of
10 log10(MSE_b + (1/255)^2) (pixels in [0, 1]), so a small change to a clean image costs as much as a large error on a
noisy one. `--condition_residual` starts a one-step model from the condition (`ConcatConditionedTransformer`'s
`condition_residual`: it returns the condition latent until trained, and learns only the correction).
When the base pipeline has a degradation removal stage (trained by `train_degradation_removal.py`), every condition
image goes through it (frozen) before it is encoded, as at inference. `--direction degrade` trains the opposite task
(GenDeg): clean -> degraded, a `SanaDegradationPipeline` for making realistic training pairs.

`output_dir` ends with a complete pipeline (`SanaRestorationPipeline.from_pretrained(output_dir)`) that records the
sampling settings validation used as its defaults, a README.md model card and, with --push_to_hub, a Hub repo.
"""

import argparse
import collections
import importlib.util
import inspect
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from huggingface_hub import upload_folder
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, Gemma2Model

import diffusers
from diffusers import AutoencoderDC, DiffusionPipeline, SanaPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    EMAModel,
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    offload_models,
)
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from diffusers.utils.torch_utils import is_compiled_module

from diffusers_restore import (
    ConcatConditionedTransformer,
    RestorationGuidedFlowScheduler,
    SanaDegradationPipeline,
    SanaRestorationPipeline,
    degrade_prompt,
)
from diffusers_restore.data.degradations import GENERIC_PROMPT, parse_degradation_spec, severity
from diffusers_restore.data.latents import CachedLatentDataset, build_latent_cache, decode_latents, degrade_latents
from diffusers_restore.data.latents import encode_latents, vae_fingerprint
from diffusers_restore.data.paired_dataset import collate_fn, write_paired_csv
from diffusers_restore.data.streaming import StreamingPairDataset, expand_shard_pattern
from diffusers_restore.metrics import psnr, ssim
from diffusers_restore.models.degradation_removal import DegradationRemovalModel
from diffusers_restore.models.safe_weights import pickle_refusals_explained, weights_loading_kwargs
from diffusers_restore.pipelines.pipeline_sana_restoration import DEFAULT_NEGATIVE_PROMPT
from diffusers_restore.quantization import QUANTIZATION_MODES, quantization_unavailable, transformer_quantization_config
from diffusers_restore.training_utils import (
    ArgumentParser,
    EpochShuffleSampler,
    build_paired_dataset,
    check_finite_weights,
    check_output_arguments,
    check_pairs_csv,
    create_ema,
    ema_weights,
    gather_full_state_dict,
    is_sharded,
    load_ema_checkpoint,
    load_validation_pairs,
    log_validation_images,
    optimizer_step_if_finite,
    prepare_hub_repo,
    read_training_state,
    remove_unfinished_checkpoints,
    resolve_checkpoint,
    run_script,
    save_checkpoint,
    save_ema_checkpoint,
    skip_nonfinite_step,
    weights_to_check,
)


logger = get_logger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card_template.md"
# How a model of each --training_objective is sampled unless the --validation_* flags say otherwise; validation samples
# so, and the saved pipeline records it as its `sampling_defaults`, so that a plain `pipe(image)` samples as it did.
OBJECTIVE_SAMPLING = {
    "flow_matching": {"num_inference_steps": 20},
    "one_step": {"num_inference_steps": 1, "guidance_scale": 1.0},  # one Euler step from sigma = 1, no CFG
}
OBJECTIVE_DESCRIPTIONS = {
    "flow_matching": "It was trained with flow matching (velocity target `noise - latent`).",
    "one_step": (
        "It was trained as a one-step restorer: at noise level 1 only, where one Euler step gives the clean latent, "
        "so it predicts the expected clean image given the degraded one (the PSNR-optimal estimate, smooth rather than "
        "detailed where the input is ambiguous). Sample it with one step and no classifier-free guidance."
    ),
}
# Never uploaded with --push_to_hub: checkpoints (and unfinished .tmp folders), the latent cache, the dataset export.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "*.tmp", "*.tmp/**", "latent_cache/**", "dataset_export/**", ".lock"]
# Prompt embeddings kept on the device during training (repeated captions and degradation prompts are encoded once);
# at SANA scale one is 300 x 2304 values.
PROMPT_CACHE_SIZE = 128


def save_model_card(args, repo_id: str, validation: dict | None, train_dataset_size: int | None, settings: dict):
    """Write output_dir/README.md: `model_card_template.md` filled in, through diffusers' model card helpers."""
    base = args.pretrained_model_name_or_path
    base_is_hub_id = not os.path.isdir(base) and base.count("/") == 1
    if validation is None:
        validation_text = "No validation images were given (--validation_image)."
    else:
        grid = os.path.relpath(validation["grid"], args.output_dir)
        validation_text = f"Before | after | target:\n\n![validation]({grid})"
        if validation["psnr"] is not None:
            validation_text += f"\n\nValidation PSNR {validation['psnr']:.2f} dB, SSIM {validation['ssim']:.4f}."
    if args.train_data_shards or args.streaming:
        data = f"pairs streamed from `{os.path.basename(args.train_data_shards or args.dataset_name)}`"
    else:
        data = f"`{os.path.basename(args.train_data_csv or args.train_data_dir or args.dataset_name)}` "
        data += f"({train_dataset_size // args.repeats} examples" + f", {args.repeats} samples of each per epoch" * (
            args.repeats > 1) + ")"
    sampling = ", ".join(f"{name}={value!r}" for name, value in settings.pop("sampling defaults").items())
    objective = OBJECTIVE_DESCRIPTIONS[args.training_objective]
    if args.direction == "degrade":
        objective += " Its task is GenDeg's: a clean image and a degradation prompt in, a degraded image out."
    description = MODEL_CARD_TEMPLATE.read_text(encoding="utf-8").format(
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=f"[{base}](https://huggingface.co/{base})" if base_is_hub_id else f"`{base}`",
        pipeline_class="SanaDegradationPipeline" if args.direction == "degrade" else "SanaRestorationPipeline",
        objective_description=objective,
        prompt=(args.validation_prompt or [GENERIC_PROMPT])[0],
        max_sequence_length=args.max_sequence_length,
        sampling_defaults=sampling,
        validation=validation_text,
        data_description=data,
        degradations=args.degradation if not args.conditioning_image_column else "given by the dataset",
        hyperparameters="\n".join(f"| {key} | {value} |" for key, value in settings.items()),
    )
    model_card = load_or_create_model_card(
        repo_id_or_path=repo_id,
        token=args.hub_token,
        from_training=True,
        license="other",
        base_model=base if base_is_hub_id else None,
        model_description=description,
    )
    model_card.text = description  # the whole card: without the template's "TODO" sections and its proofread note
    model_card.data.pipeline_tag = "image-to-image"
    tags = ["image-restoration", "image-to-image", "sana", "diffusers-restore", "diffusers-training", "diffusers"]
    model_card = populate_model_card(model_card, tags=tags + ["lora"] * args.use_lora)
    model_card.save(os.path.join(args.output_dir, "README.md"))


@torch.no_grad()
def log_validation(
    pipeline, args, accelerator, validation_pairs, global_step, complex_human_instruction, is_final=False
):
    """Restore the validation images with the pipeline's recorded sampling defaults; log and save a before | after(s) |
    target grid and the mean PSNR/SSIM against the targets."""
    logger.info(f"Running validation on {len(validation_pairs)} image(s) at step {global_step}.")
    pipeline.set_progress_bar_config(disable=True)
    pipeline.transformer.eval()
    # its own generator: validation never touches the training random streams
    generator = torch.Generator(device="cpu").manual_seed(args.seed if args.seed is not None else 0)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    autocast = torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype is not None)

    rows, psnr_values, ssim_values = [], [], []
    for (image, target), prompt in zip(validation_pairs, args.validation_prompt, strict=True):
        with autocast:
            restored = [
                pipeline(
                    image,
                    prompt=prompt,
                    generator=generator,
                    max_sequence_length=args.max_sequence_length,
                    complex_human_instruction=complex_human_instruction,
                ).images[0]
                for _ in range(args.num_validation_images)
            ]
        rows.append([image, *restored] + ([target] if target is not None else []))
        if target is not None:
            psnr_values += [psnr(output, target).item() for output in restored]
            ssim_values += [ssim(output, target).item() for output in restored]
    pipeline.transformer.train()

    metrics = {"psnr": float(np.mean(psnr_values)) if psnr_values else None,
               "ssim": float(np.mean(ssim_values)) if ssim_values else None}
    grid_path = log_validation_images(accelerator, rows, metrics, args.output_dir, global_step, is_final,
                                      "before | after | target")
    return {"grid": grid_path, **metrics}


def parse_args(input_args=None):
    parser = ArgumentParser(description="Fine-tune SANA into an image restorer on paired data.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="A SANA text-to-image checkpoint (Hub id or folder), or a pipeline folder written by this script or by "
        "train_degradation_removal.py (to continue training, e.g. at a higher resolution, or on top of its stage).",
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
    parser.add_argument("--train_data_dir", type=str, default=None, help="Clean images, degraded on the fly.")
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A 🤗 datasets dataset (Hub id or local folder) with image columns; needs `pip install datasets`.",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration name.")
    parser.add_argument("--image_column", type=str, default="image", help="--dataset_name column of clean images.")
    parser.add_argument(
        "--conditioning_image_column",
        type=str,
        default=None,
        help="--dataset_name column of degraded images; without it the clean image is degraded on the fly.",
    )
    parser.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="--dataset_name column of captions; without it the prompt describes the degradation.",
    )
    parser.add_argument(
        "--train_data_shards",
        type=str,
        default=None,
        help="WebDataset tar shards of pairs, e.g. 'pairs-{000000..000099}.tar' (`sana-restore make-pairs --shards N`),"
        " streamed and dealt to the processes (and dataloader workers) round-robin. Needs --max_train_steps.",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="Stream --dataset_name (`load_dataset(..., streaming=True)`) instead of exporting it to files first. "
        "Needs --max_train_steps.",
    )
    parser.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Pairs in each stream's shuffle buffer.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only this many training examples.")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="How many times to repeat the training data per epoch, each copy with its own crop, flip and degradation.",
    )
    parser.add_argument(
        "--degradation",
        type=str,
        default="random",
        help="How clean images are degraded on the fly: 'random' (1-3 of noise, JPEG, blur, resize, colour), a preset "
        "('realesrgan', 'realesrgan_light') or a spec such as 'gaussian_noise:25' or 'gaussian_noise|jpeg'.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Side of the square training crops, a multiple of 32 (SANA's DC-AE downsampling factor).",
    )
    parser.add_argument("--center_crop", action="store_true", help="Centre crops instead of random crops.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip pairs horizontally.")
    parser.add_argument(
        "--skip_bad_samples",
        action="store_true",
        help="Leave out the CSV rows whose files are missing or unreadable (logged) instead of refusing to start.",
    )
    parser.add_argument(
        "--allow_multiline_captions",
        action="store_true",
        help="Accept quoted captions that hold line breaks; without it a field spanning lines is refused (it is "
        "usually an unclosed quote swallowing the rows after it).",
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
        help="Encode every pair (latents and prompt embeddings) once before training, so that neither the VAE nor "
        "the text encoder runs during training. Freezes one crop and degradation draw per example.",
    )
    parser.add_argument(
        "--latent_cache_dir",
        type=str,
        default=None,
        help="Where --cache_latents writes its shards (default: <output_dir>/latent_cache).",
    )
    parser.add_argument(
        "--latent_cache_shard_size",
        type=int,
        default=1024,
        help="Pairs per latent cache shard; with several processes each encodes its share of the shards.",
    )
    # output, logging
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
    # training length, optimisation
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
    parser.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=0,
        help="A step whose loss or gradient is NaN or infinite stops the run (nothing non-finite is ever saved); with "
        "N > 0, up to N such steps are skipped first (logged; they update nothing but count as steps).",
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
        help="Timestep density (logit_normal, mode) or loss weighting (sigma_sqrt, cosmap), as in SD3's paper.",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit-normal density.")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Standard deviation of the logit-normal.")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the 'mode' density.")
    parser.add_argument(
        "--training_objective",
        type=str,
        default="flow_matching",
        choices=sorted(OBJECTIVE_SAMPLING),
        help="flow_matching: every noise level (sample with 20+ steps). one_step: sigma = 1 only, where one Euler step "
        "gives the clean-latent estimate, so the model regresses the expected clean image (sample with 1 step; "
        "usually a second run after flow matching).",
    )
    parser.add_argument(
        "--pixel_loss_weight",
        type=float,
        default=0.0,
        help="Add this weight times the pixel MSE between the clean image and the VAE decoding of the predicted clean "
        "latent (x0 = x_t - sigma v), backpropagated through the frozen decoder. Needs the clean pixels (not "
        "--cache_latents) and the VAE on the device (not --offload).",
    )
    parser.add_argument(
        "--pixel_loss",
        type=str,
        default="mse",
        choices=["mse", "psnr"],
        help="The pixel term's form: mse (the mean squared error) or psnr (NAFNet's per-sample PSNR loss, the batch "
        "mean of 10 log10(MSE_b + (1/255)^2), pixels in [0, 1]), which weighs every image's error by its own size.",
    )
    parser.add_argument(
        "--condition_residual",
        action="store_true",
        help="With --training_objective one_step: a base transformer without `condition_residual` gets it (the flag "
        "is saved in its config and SANA's output layer zeroed), so training starts from the condition and learns the "
        "correction; a base that has it trains further. Give it again to resume such a run.",
    )
    parser.add_argument(
        "--fidelity",
        type=float,
        default=0.0,
        help="In [0, 1], with --pixel_loss_weight: train for the pipeline's `fidelity` output, which adds fidelity x "
        "(condition image - its VAE round trip) back (recorded in the saved pipeline's sampling defaults). Meant for a "
        "base with a degradation removal stage.",
    )
    # conditioning
    parser.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Probability (per example) of training on the empty prompt, so that classifier-free guidance works.",
    )
    parser.add_argument(
        "--conditioning_dropout_prob",
        type=float,
        default=None,
        help="InstructPix2Pix's dropout: with probability q each the prompt, the degraded image, or both are dropped.",
    )
    parser.add_argument(
        "--condition_noise_max",
        type=float,
        default=0.0,
        help="Add N(0, sigma^2) noise, sigma ~ U[0, this], to the degraded latent (e.g. 0.12). 0 disables it.",
    )
    parser.add_argument(
        "--negative_sample_prob",
        type=float,
        default=0.0,
        help="SUPIR's negative-quality samples: with this probability (per example) the target is the degraded image "
        "and the prompt --negative_sample_prompt, so that CFG with that negative prompt pushes away from low quality.",
    )
    parser.add_argument(
        "--negative_sample_prompt",
        type=str,
        default=DEFAULT_NEGATIVE_PROMPT,
        help="The prompt of the negative-quality samples (default: the pipeline's default negative prompt).",
    )
    parser.add_argument(
        "--direction",
        choices=["restore", "degrade"],
        default="restore",
        help="restore: degraded -> clean. degrade: clean -> degraded (GenDeg), a SanaDegradationPipeline: the "
        "condition is the clean image, the target the degraded one, and the prompt names the degradation and the "
        "pair's measured severity (`degrade_prompt`).",
    )
    parser.add_argument("--max_sequence_length", type=int, default=300, help="Prompt tokens given to SANA.")
    parser.add_argument(
        "--complex_human_instruction",
        type=str,
        default=None,
        help="Text prepended to every prompt, as in SANA's pipeline: 'default' uses SanaPipeline's instruction, other "
        "text is split into lines on '\\n'. Off by default.",
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="Keep the VAE and the text encoder on the CPU; the VAE visits the device for each encode.",
    )
    # EMA, LoRA
    parser.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument(
        "--use_lora",
        action="store_true",
        help="Train LoRA adapters (and the condition projection) instead of all transformer weights.",
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATION_MODES,
        default="none",
        help="QLoRA: load the transformer's frozen base weights quantized, as `sana-restore restore --quantize` does: "
        "int8 = torchao int8 weight-only (CPU and GPU), nf4 = bitsandbytes 4-bit NormalFloat (GPU); with "
        "--mixed_precision bf16, what both are built for. The adapters and "
        "the condition projection train in float32; the saved pipeline merges them into the unquantized base. "
        "Needs --use_lora.",
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
    # checkpoints
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint-<step> folder every X steps.",
    )
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' or 'checkpoint-<step>' (inside output_dir), or the path of a checkpoint folder.",
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
        help=f"One prompt for all validation images or one each (default: '{GENERIC_PROMPT}').",
    )
    parser.add_argument("--validation_steps", type=int, default=100, help="Validate every X steps.")
    parser.add_argument("--num_validation_images", type=int, default=1, help="Restorations per validation image.")
    parser.add_argument(
        "--validation_inference_steps",
        type=int,
        default=None,
        help="`num_inference_steps` of validation (default: 20, or 1 with --training_objective one_step); recorded in "
        "the saved pipeline's sampling defaults, like the two flags below.",
    )
    parser.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=None,
        help="`guidance_scale` of validation (1.0 = no CFG; default: 1.0 with one_step, else the pipeline's default).",
    )
    parser.add_argument(
        "--validation_guidance_scale_start",
        type=float,
        default=None,
        help="`guidance_scale_start` of validation: the scale at the noisiest step, moving linearly in sigma to "
        "--validation_guidance_scale at the last (default: constant).",
    )
    # Hub
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (default: the logged-in one).")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Repo to push to (default: output_dir's name).")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")

    args = parser.parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what cannot work, before any model loads: one line naming the flag (or the data file and row), exit 2."""
    sources = [name for name in ("train_data_csv", "train_data_dir", "dataset_name", "train_data_shards")
               if getattr(args, name)]
    if len(sources) != 1:
        parser.error("give exactly one of --train_data_csv, --train_data_dir, --dataset_name, --train_data_shards.")
    streaming = args.train_data_shards or args.streaming
    if args.streaming and not args.dataset_name:
        parser.error("--streaming applies to --dataset_name (tar shards always stream).")
    if streaming and args.max_train_steps is None:
        parser.error("a stream has no end: give the run's length with --max_train_steps.")
    for flag in ("cache_latents", "max_train_samples", "skip_bad_samples"):
        if streaming and getattr(args, flag):
            parser.error(f"--{flag} needs a dataset with a length and random access, not a stream.")
    if args.dataset_name and importlib.util.find_spec("datasets") is None:
        parser.error("--dataset_name needs the `datasets` package: pip install datasets")
    for flag in ("train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps", "repeats",
                 "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "max_train_samples",
                 "latent_cache_shard_size", "num_validation_images", "validation_inference_steps", "rank"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.resolution < 32 or args.resolution % 32:
        parser.error(f"--resolution must be a positive multiple of 32 (SANA's DC-AE factor), got {args.resolution}.")
    try:
        parse_degradation_spec(args.degradation)
    except ValueError as error:
        parser.error(f"--degradation {args.degradation!r}: {error}")
    if args.use_lora and args.use_ema:
        parser.error("--use_ema is for full fine-tuning, not --use_lora.")
    if args.quantize != "none":
        if not args.use_lora:
            parser.error("--quantize freezes the transformer's base weights under LoRA adapters: it needs --use_lora.")
        has_gpu = torch.cuda.is_available() or torch.xpu.is_available() or torch.backends.mps.is_available()
        problem = quantization_unavailable(args.quantize, None if has_gpu else "cpu")
        if problem is not None:
            parser.error(f"--quantize {problem}.")
    if args.conditioning_dropout_prob is not None and args.proportion_empty_prompts > 0:
        parser.error("give --conditioning_dropout_prob or --proportion_empty_prompts, not both.")
    if args.pixel_loss_weight > 0 and (args.cache_latents or args.offload):
        parser.error("--pixel_loss_weight needs the clean pixels and the VAE on the device: not with "
                     "--cache_latents or --offload.")
    if (args.fidelity or args.pixel_loss != "mse") and not args.pixel_loss_weight > 0:
        parser.error("--fidelity and --pixel_loss change the pixel loss: they need --pixel_loss_weight > 0.")
    if args.condition_residual and (args.training_objective != "one_step" or args.use_lora):
        parser.error("--condition_residual is for a full --training_objective one_step run (its output layer starts "
                     "at zero, which LoRA would leave frozen).")
    if args.direction == "degrade" and (args.negative_sample_prob or args.fidelity):
        parser.error("--negative_sample_prob and --fidelity are for restorers, not --direction degrade.")
    if args.validation_image is None and (args.validation_target_image or args.validation_prompt):
        parser.error("--validation_target_image and --validation_prompt need --validation_image.")
    if args.validation_image is not None:
        if args.validation_target_image and len(args.validation_target_image) != len(args.validation_image):
            parser.error("give one --validation_target_image per --validation_image.")
        if args.direction == "degrade" and not args.validation_prompt:
            parser.error("--direction degrade: name the degradation to make with --validation_prompt.")
        prompts = args.validation_prompt or [GENERIC_PROMPT]
        if len(prompts) not in (1, len(args.validation_image)):
            parser.error("give one --validation_prompt for all --validation_image or one each.")
        args.validation_prompt = prompts * len(args.validation_image) if len(prompts) == 1 else prompts
        for path in args.validation_image + (args.validation_target_image or []):
            if not os.path.isfile(path):
                parser.error(f"validation image {path} is not a file.")
    problem = check_output_arguments(args)
    if problem is None and args.train_data_dir and not os.path.isdir(args.train_data_dir):
        problem = f"--train_data_dir {args.train_data_dir} is not a folder."
    if problem is None and args.train_data_csv:
        problem = check_pairs_csv(args.train_data_csv, args.skip_bad_samples, args.allow_multiline_captions)
    if problem is not None:
        parser.error(problem)


def export_hf_dataset(args) -> str:
    """Write a 🤗 datasets dataset's pairs as PNG files and a pairs CSV in <output_dir>/dataset_export (reused once
    complete: the CSV is written last), so that they go through `PairedDataset` like any CSV; return the CSV's path."""
    export_dir = os.path.join(args.output_dir, "dataset_export")
    csv_path = os.path.join(export_dir, "pairs.csv")
    if os.path.isfile(csv_path):
        return csv_path
    from datasets import load_dataset

    dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)["train"]
    check_columns(args, dataset.column_names)
    os.makedirs(export_dir, exist_ok=True)
    rows = []
    for index, row in enumerate(dataset):
        if args.max_train_samples is not None and index >= args.max_train_samples:
            break
        row[args.image_column].save(os.path.join(export_dir, f"{index:07d}.png"))
        degraded = ""
        if args.conditioning_image_column:
            degraded = f"{index:07d}_lq.png"
            row[args.conditioning_image_column].save(os.path.join(export_dir, degraded))
        rows.append((f"{index:07d}.png", degraded, row[args.caption_column] if args.caption_column else ""))
    write_paired_csv(csv_path, rows)
    return csv_path


def check_columns(args, columns: list[str]) -> None:
    for flag in ("image_column", "conditioning_image_column", "caption_column"):
        if getattr(args, flag) is not None and getattr(args, flag) not in columns:
            raise ValueError(f"--{flag} '{getattr(args, flag)}' is not a column of {args.dataset_name} ({columns}).")


def degrade_direction_item(item: dict) -> dict:
    """A pair turned around for --direction degrade: the clean image is the condition, the degraded one the target,
    and the prompt names the degradations applied (a pre-generated pair's caption, else "degradation") with the pair's
    measured severity (GenDeg's mu/sigma bins)."""

    def as_uint8(pixels: torch.Tensor) -> np.ndarray:
        return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()

    measured = severity(as_uint8(item["pixel_values"]), as_uint8(item["conditioning_pixel_values"]))
    names = [record.get("name", "degradation") for record in json.loads(item.get("degradation") or "[]")]
    names = names or [item["prompt"] if item["prompt"] not in ("", GENERIC_PROMPT) else "degradation"]
    return {
        **item,
        "pixel_values": item["conditioning_pixel_values"],
        "conditioning_pixel_values": item["pixel_values"],
        "prompt": degrade_prompt(names, measured["mu_bin"], measured["sigma_bin"]),
    }


def degrade_direction_collate(items: list[dict]) -> dict:
    """`collate_fn` of a stream read in the degrade direction."""
    return collate_fn([degrade_direction_item(item) for item in items])


class DegradeDirection(torch.utils.data.Dataset):
    """A pairs dataset read in the degrade direction (`degrade_direction_item`); other attributes are the dataset's."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return degrade_direction_item(self.dataset[index])

    def __getattr__(self, name):  # set_epoch, resolution, seed, source, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def main(args):
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token."
            " Please use `hf auth login` to authenticate with the Hub."
        )
    if torch.backends.mps.is_available() and args.mixed_precision == "bf16":
        raise ValueError("Mixed precision training with bfloat16 is not supported on MPS. Use fp16 or fp32.")

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
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
    data_seed = args.seed if args.seed is not None else 0  # the data order must be the same on every process

    repo_id = prepare_hub_repo(args, accelerator) if args.push_to_hub else None  # fails now rather than after training
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_unfinished_checkpoints(args.output_dir)

    # Load the scheduler, the tokenizer and the models (weights as the pipeline loads them: safetensors first, a pickle
    # only through torch's weights-only loader).
    load_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    base = args.pretrained_model_name_or_path
    weights_kwargs = weights_loading_kwargs(base, {**load_kwargs, "variant": args.variant})
    # SANA ships a DPM-Solver config whose `flow_shift` becomes the flow-matching scheduler's `shift`; its training
    # noise levels (diffusers' `noise_scheduler_copy.sigmas`) are kept apart from the validation's set_timesteps.
    noise_scheduler = RestorationGuidedFlowScheduler.from_sana_config(
        RestorationGuidedFlowScheduler.load_config(base, subfolder="scheduler", **load_kwargs)
    )
    train_sigmas = noise_scheduler.sigmas.clone().to(accelerator.device)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **load_kwargs)
    with pickle_refusals_explained(base):
        text_encoder = Gemma2Model.from_pretrained(base, subfolder="text_encoder", **weights_kwargs)
        vae = AutoencoderDC.from_pretrained(base, subfolder="vae", **weights_kwargs)
    # a plain SanaTransformer2DModel is wrapped (identity projection); a restoration transformer loads as it is. A
    # quantized base keeps its unquantized layers in the autocast dtype (it cannot be cast after loading).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    quantized = {}
    if args.quantize != "none":
        quantized = {"quantization_config": transformer_quantization_config(args.quantize, weight_dtype),
                     "dtype": weight_dtype}
    transformer = ConcatConditionedTransformer.from_pretrained(base, subfolder="transformer", **weights_kwargs,
                                                               **quantized)
    if args.condition_residual and not transformer.config.get("condition_residual", False):
        transformer.enable_condition_residual()
    model_index = DiffusionPipeline.load_config(base, **load_kwargs)
    if model_index.get("direction", args.direction) != args.direction:
        raise ValueError(f"{base} was trained to {model_index['direction']} images, not --direction {args.direction}.")
    stage = None  # the base pipeline's degradation removal stage: cleans the condition images, frozen
    if (model_index.get("degradation_removal") or [None, None])[1] is not None:
        if args.direction == "degrade":
            raise ValueError(f"{base} has a degradation removal stage, which would clean the clean condition images of "
                             "--direction degrade.")
        if args.cache_latents and args.negative_sample_prob > 0:
            raise ValueError("--negative_sample_prob targets the degraded images' own latents, but with a degradation "
                             "removal stage the latent cache holds the cleaned ones: drop --cache_latents.")
        stage = DegradationRemovalModel.from_pretrained(base, subfolder="degradation_removal", **weights_kwargs)
        logger.info("The base pipeline has a degradation removal stage: condition images are encoded through it.")
    condition_models = [vae] + ([stage] if stage is not None else [])  # what turns a condition image into a latent

    # Only the transformer trains. SANA keeps the DC-AE in float32; Gemma-2 is made for bfloat16 (float16 overflows).
    frozen_device = "cpu" if args.offload else accelerator.device
    original_dtypes = {"text_encoder": text_encoder.dtype, "vae": vae.dtype}
    vae.requires_grad_(False).to(frozen_device, dtype=torch.float32)
    text_encoder_dtype = torch.float32 if weight_dtype == torch.float32 else torch.bfloat16
    text_encoder.requires_grad_(False).to(frozen_device, dtype=text_encoder_dtype)
    if stage is not None:
        stage.requires_grad_(False).eval().to(frozen_device)
    # full fine-tuning trains float32 weights under autocast; LoRA keeps the frozen base in the autocast dtype (a
    # quantized one is already in it)
    if quantized:
        transformer.to(accelerator.device)
    else:
        transformer.to(accelerator.device, dtype=weight_dtype if args.use_lora else torch.float32)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.use_lora:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        target_modules = [name.strip() for name in args.lora_layers.split(",") if name.strip()]
        transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                           init_lora_weights="gaussian", target_modules=target_modules))
        cast_training_params(transformer, dtype=torch.float32)  # the adapters and the (new) condition projection
    else:
        transformer.requires_grad_(True)
    transformer.train()
    trainable_params = [parameter for parameter in transformer.parameters() if parameter.requires_grad]

    # One pipeline for prompt encoding, validation and saving; it records how the model is meant to be sampled.
    pipeline_cls = SanaDegradationPipeline if args.direction == "degrade" else SanaRestorationPipeline
    pipeline = pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                            scheduler=noise_scheduler, degradation_removal=stage)
    sampling = {"guidance_scale": pipeline.sampling_defaults["guidance_scale"]}  # the built-in default, recorded
    sampling.update(OBJECTIVE_SAMPLING[args.training_objective])
    for name, value in (("num_inference_steps", args.validation_inference_steps),
                        ("guidance_scale", args.validation_guidance_scale),
                        ("guidance_scale_start", args.validation_guidance_scale_start),
                        ("fidelity", args.fidelity or None)):
        if value is not None:
            sampling[name] = value
    if args.direction == "degrade":
        sampling["restoration_guidance"] = 0.0  # no pull toward the (clean) input
    pipeline.set_sampling_defaults(**sampling)
    complex_human_instruction = None
    if args.complex_human_instruction == "default":
        complex_human_instruction = inspect.signature(SanaPipeline.__call__).parameters[
            "complex_human_instruction"].default
    elif args.complex_human_instruction:
        complex_human_instruction = args.complex_human_instruction.split("\\n")

    prompt_cache = collections.OrderedDict()  # prompt -> (embeddings, mask) on the training device, least recent first

    @torch.no_grad()
    def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, L, D)` embeddings and `(B, L)` masks; the text encoder runs where it lives, only for new prompts."""
        new = [prompt for prompt in dict.fromkeys(prompts) if prompt not in prompt_cache]
        if new:
            embeds, masks, _, _ = pipeline.encode_prompt(
                new, do_classifier_free_guidance=False, device=text_encoder.device,
                max_sequence_length=args.max_sequence_length, complex_human_instruction=complex_human_instruction,
            )
            prompt_cache.update(zip(new, zip(embeds.to(accelerator.device), masks.to(accelerator.device))))
        rows = [prompt_cache[prompt] for prompt in prompts]
        for prompt in prompts:
            prompt_cache.move_to_end(prompt)
        while len(prompt_cache) > PROMPT_CACHE_SIZE:
            prompt_cache.popitem(last=False)
        return torch.stack([row[0] for row in rows]), torch.stack([row[1] for row in rows])

    def clean_conditions(pixels: torch.Tensor) -> torch.Tensor:
        """Degraded images in [-1, 1] through the frozen stage, as the pipeline does at inference."""
        return stage(pixels.float() / 2 + 0.5).clamp(0, 1) * 2 - 1

    def unwrap_model(model):
        model = accelerator.unwrap_model(model)
        return model._orig_mod if is_compiled_module(model) else model

    # EMA: diffusers' EMAModel, built after `prepare` (under FSDP2 each shadow is then a shard beside its parameter's),
    # except under DeepSpeed, whose ZeRO-3 partitions the parameters in `prepare`.
    ema_model = None
    if args.use_ema and accelerator.distributed_type == DistributedType.DEEPSPEED:
        ema_model = EMAModel(transformer.parameters(), decay=args.ema_decay, model_cls=ConcatConditionedTransformer,
                             model_config=transformer.config)
        ema_model.to(accelerator.device)

    # FSDP and DeepSpeed checkpoint the model in their own (sharded) format; otherwise in diffusers' format.
    native_model_checkpoints = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save_lora(model, folder: str) -> None:
        """The adapter and the trained condition projection, in a folder that `load_lora_weights` loads."""
        if not quantized:
            model.save_lora_adapter(folder)  # + condition_projection.safetensors
            return
        # diffusers' save_lora_adapter casts the model, which a quantized one refuses: the pipeline's file instead,
        # as diffusers' QLoRA scripts save (projection included, as `transformer.projection.weight`)
        from peft.utils import get_peft_model_state_dict

        SanaRestorationPipeline.save_lora_weights(
            folder, transformer_lora_layers=get_peft_model_state_dict(model), condition_projection=model.projection,
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())

    def save_model_hook(models, weights, output_dir):
        if ema_model is not None:  # on every process: gathering a sharded EMA is a collective
            save_ema_checkpoint(ema_model, os.path.join(output_dir, "transformer_ema"), accelerator.is_main_process)
        if accelerator.is_main_process and not native_model_checkpoints:
            for model in models:
                if args.use_lora:
                    save_lora(unwrap_model(model), os.path.join(output_dir, "transformer_lora"))
                else:
                    unwrap_model(model).save_pretrained(os.path.join(output_dir, "transformer"))
                weights.pop()  # saved above: accelerate must not save it again

    def load_model_hook(models, input_dir):
        while models and not native_model_checkpoints:
            model = unwrap_model(models.pop())  # popped: accelerate skips it, so it is loaded here, in place
            if args.use_lora:
                from peft import set_peft_model_state_dict

                state_dict = load_file(os.path.join(input_dir, "transformer_lora", "pytorch_lora_weights.safetensors"))
                projection = os.path.join(input_dir, "transformer_lora", "condition_projection.safetensors")
                if os.path.isfile(projection):
                    projection = load_file(projection)["projection.weight"]
                else:  # the pipeline's file of a quantized base (see save_lora)
                    state_dict = {key.removeprefix("transformer."): value for key, value in state_dict.items()}
                    projection = state_dict.pop("projection.weight")
                result = set_peft_model_state_dict(model, state_dict, adapter_name="default")
                if result.unexpected_keys or any("lora_" in key for key in result.missing_keys):
                    raise ValueError(f"{input_dir} holds other LoRA layers: resume with its --rank and --lora_layers.")
                model.projection.weight.data.copy_(projection)
            else:
                loaded = ConcatConditionedTransformer.from_pretrained(input_dir, subfolder="transformer",
                                                                      use_safetensors=True)
                if loaded.config.get("condition_residual", False) != model.config.get("condition_residual", False):
                    raise ValueError(f"{input_dir} was trained with{'' if loaded.config.condition_residual else 'out'} "
                                     "--condition_residual: resume it the same way.")
                model.load_state_dict(loaded.state_dict())
        if ema_model is not None:
            load_ema_checkpoint(ema_model, os.path.join(input_dir, "transformer_ema"), ConcatConditionedTransformer)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer_class = torch.optim.AdamW
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    optimizer = optimizer_class(
        trainable_params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Dataset and DataLoader.
    streaming = bool(args.train_data_shards or args.streaming)
    if streaming:
        stream_kwargs = dict(
            resolution=args.resolution, degradation=args.degradation, seed=data_seed, random_flip=args.random_flip,
            center_crop=args.center_crop, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes, shuffle_buffer=args.shuffle_buffer_size,
            batch_size=args.train_batch_size,
        )
        if args.train_data_shards:
            train_dataset = StreamingPairDataset(shards=expand_shard_pattern(args.train_data_shards), **stream_kwargs)
            train_dataset.check_readers(args.dataloader_num_workers)
        else:
            from datasets import load_dataset

            stream = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train",
                                  streaming=True)
            if stream.column_names:  # unknown until read for some streams
                check_columns(args, stream.column_names)
            train_dataset = StreamingPairDataset(
                hf_dataset=stream, image_column=args.image_column, caption_column=args.caption_column,
                conditioning_image_column=args.conditioning_image_column, **stream_kwargs,
            )
    else:
        with accelerator.main_process_first():
            data = args.train_data_csv or args.train_data_dir or export_hf_dataset(args)
            train_dataset = build_paired_dataset(data, args, seed=data_seed)
    collate = collate_fn
    if args.direction == "degrade":  # clean -> degraded: swapped images, degradation-and-severity prompts
        if streaming:
            collate = degrade_direction_collate
        else:
            train_dataset = DegradeDirection(train_dataset)
    if args.cache_latents:
        # every process encodes its share of the latent shards; the main one merges them and encodes the prompts
        cache_dir = args.latent_cache_dir or os.path.join(args.output_dir, "latent_cache")
        cache_identity = {"text_encoder": text_encoder.config._name_or_path,
                          "max_sequence_length": args.max_sequence_length,
                          "complex_human_instruction": complex_human_instruction, "direction": args.direction}
        if stage is not None:  # the stage the conditions went through
            cache_identity["degradation_removal"] = vae_fingerprint(stage)
        with offload_models(text_encoder, *condition_models, device=accelerator.device, offload=args.offload):
            build_latent_cache(
                train_dataset, vae, cache_dir, batch_size=args.train_batch_size,
                shard_size=args.latent_cache_shard_size, encode_prompt_fn=encode_prompts,
                dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32,
                device=accelerator.device, num_workers=args.dataloader_num_workers,
                condition_transform=clean_conditions if stage is not None else None, extra_metadata=cache_identity,
                process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                wait_for_everyone=accelerator.wait_for_everyone,
            )
        train_dataset = CachedLatentDataset(cache_dir, vae=vae, resolution=args.resolution, load_prompt_embeds=True)
        collate = None  # cached items batch with torch's default
        for module in (vae, text_encoder, stage):  # needed again only for "" and validation
            if module is not None:
                module.to("cpu")
    # a stream splits itself across processes (never through accelerate's sharding)
    sampler = None if streaming else EpochShuffleSampler(len(train_dataset), seed=data_seed)
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(data_seed),  # worker seeds never draw from the global RNG
    )

    # Scheduler and math around the number of training steps (diffusers' arithmetic).
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
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    else:
        transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            transformer, optimizer, train_dataloader, lr_scheduler
        )
    if args.use_ema and ema_model is None:
        if accelerator.distributed_type == DistributedType.FSDP and not is_sharded(unwrap_model(transformer)):
            raise ValueError("--use_ema under FSDP needs FSDP2 per-parameter shards: set `fsdp_version: 2` in the "
                             "accelerate config (examples/accelerate_configs/fsdp.yaml).")
        ema_model = create_ema(unwrap_model(transformer), args.ema_decay)

    # a stream has no epochs: one pass of the loop runs to --max_train_steps
    num_update_steps_per_epoch = (
        args.max_train_steps if streaming else math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        tracker_config = {key: value for key, value in vars(args).items() if not isinstance(value, (list, tuple))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {'streamed' if streaming else len(train_dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Trainable parameters = {sum(parameter.numel() for parameter in trainable_params):,}")
    # Noise, timesteps, dropout and latent noise come from this generator (one stream per process), saved in every
    # checkpoint: a resumed run draws exactly what the uninterrupted run would have drawn.
    generator = torch.Generator(device=accelerator.device).manual_seed(
        (args.seed if args.seed is not None else torch.initial_seed()) % 2**62 + accelerator.process_index
    )

    global_step, first_epoch, resume_batches, skipped_steps = 0, 0, 0, 0
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {args.output_dir}. Starting a new training run.")
        else:
            saved = read_training_state(checkpoint)
            if saved.get("trained_component", "transformer") != "transformer":
                raise ValueError(f"{checkpoint} trains the {saved['trained_component']}, not the transformer.")
            if (saved["use_lora"], saved["use_ema"]) != (args.use_lora, args.use_ema):
                raise ValueError(f"{checkpoint} was written with --use_lora={saved['use_lora']} "
                                 f"--use_ema={saved['use_ema']}; resume it with the same flags.")
            accelerator.print(f"Resuming from checkpoint {checkpoint}")
            accelerator.load_state(checkpoint)  # optimizer, scheduler and RNG states: torch.load(weights_only=True)
            generator_file = os.path.join(checkpoint, f"training_generator_{accelerator.process_index}.safetensors")
            if os.path.isfile(generator_file):
                generator.set_state(load_file(generator_file)["state"])
            else:
                logger.warning(f"{generator_file} is missing (another number of processes?): noise is not resumed.")
            global_step, skipped_steps = saved["global_step"], saved.get("skipped_steps", 0)
            first_epoch = global_step // num_update_steps_per_epoch
            resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
            if streaming:  # each reader skips the pairs it had given (read, not decoded)
                train_dataset.consumed_batches = global_step * args.gradient_accumulation_steps
                first_epoch, resume_batches = 0, 0

    progress_bar = tqdm(range(0, args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    validation_pairs = []
    if args.validation_image:
        validation_pairs = load_validation_pairs(args.validation_image, args.validation_target_image)
    validation = None
    model_dtype = weight_dtype if args.use_lora else torch.float32
    timestep_scale = unwrap_model(transformer).config.timestep_scale
    if args.cache_latents:
        empty_embeds, empty_mask = encode_prompts([""])
        if args.negative_sample_prob > 0:
            negative_embeds, negative_mask = encode_prompts([args.negative_sample_prompt])

    window_finite = True  # every loss of the current accumulation window was finite
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:  # resumed at the end: nothing more to train
            break
        transformer.train()
        epoch_loader = train_dataloader
        if not streaming:
            sampler.set_epoch(epoch)
            if hasattr(train_dataset, "set_epoch"):  # a latent cache is fixed
                train_dataset.set_epoch(epoch)
            if epoch == first_epoch and resume_batches > 0:
                epoch_loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            epoch_loader.set_epoch(epoch)

        for batch in epoch_loader:
            with accelerator.accumulate(transformer):
                # 1. latents of the clean and the degraded image (as at inference: cleaned by the stage first)
                if args.cache_latents:
                    latents = batch["latents"].to(accelerator.device, torch.float32)
                    condition_latents = batch["conditioning_latents"].to(accelerator.device, torch.float32)
                else:
                    with torch.no_grad(), offload_models(*condition_models, device=accelerator.device,
                                                         offload=args.offload):
                        conditions = batch["conditioning_pixel_values"].to(accelerator.device)
                        if stage is not None:
                            conditions = clean_conditions(conditions)
                        pixels = torch.cat([batch["pixel_values"].to(accelerator.device), conditions])
                        latents, condition_latents = encode_latents(vae, pixels.to(vae.dtype)).float().chunk(2)
                        if args.fidelity > 0:  # r: what the VAE loses of the (cleaned) condition image
                            residual = conditions.float() - decode_latents(vae, condition_latents)
                bsz = latents.shape[0]

                # 2. negative-quality samples (target: the degraded image as given), prompt and image dropout, latent
                #    noise on the condition
                negative = torch.zeros(bsz, dtype=torch.bool, device=accelerator.device)
                if args.negative_sample_prob > 0:
                    draw = torch.rand(bsz, device=accelerator.device, generator=generator)
                    negative = draw < args.negative_sample_prob
                if negative.any():
                    degraded_latents = condition_latents
                    if args.cache_latents:
                        degraded_latents = batch["conditioning_latents"].to(accelerator.device, torch.float32)
                    elif stage is not None:
                        with torch.no_grad(), offload_models(vae, device=accelerator.device, offload=args.offload):
                            degraded = batch["conditioning_pixel_values"].to(accelerator.device, vae.dtype)
                            degraded_latents = encode_latents(vae, degraded).float()
                    latents = torch.where(negative[:, None, None, None], degraded_latents, latents)
                keep_image = torch.ones(bsz, device=accelerator.device)
                drop_prompt = torch.zeros(bsz, dtype=torch.bool, device=accelerator.device)
                if args.conditioning_dropout_prob:  # InstructPix2Pix: prompt, image, or both, with probability q each
                    q = args.conditioning_dropout_prob
                    draw = torch.rand(bsz, device=accelerator.device, generator=generator)
                    drop_prompt = draw < 2 * q
                    keep_image = 1.0 - ((draw >= q) & (draw < 3 * q)).float()
                elif args.proportion_empty_prompts > 0:
                    draw = torch.rand(bsz, device=accelerator.device, generator=generator)
                    drop_prompt = draw < args.proportion_empty_prompts
                drop_prompt = drop_prompt & ~negative  # a negative sample always carries its prompt
                if args.condition_noise_max > 0:
                    condition_latents = degrade_latents(condition_latents, max_sigma=args.condition_noise_max,
                                                        generator=generator)
                condition_latents = condition_latents * keep_image[:, None, None, None]

                # 3. text embeddings
                if args.cache_latents:
                    prompt_embeds = batch["prompt_embeds"].to(accelerator.device)
                    prompt_attention_mask = batch["prompt_attention_mask"].to(accelerator.device)
                    prompt_embeds = torch.where(drop_prompt[:, None, None], empty_embeds, prompt_embeds)
                    prompt_attention_mask = torch.where(drop_prompt[:, None], empty_mask, prompt_attention_mask)
                    if negative.any():
                        prompt_embeds = torch.where(negative[:, None, None], negative_embeds, prompt_embeds)
                        prompt_attention_mask = torch.where(negative[:, None], negative_mask, prompt_attention_mask)
                else:
                    prompts = [
                        args.negative_sample_prompt if is_negative else "" if dropped else prompt
                        for prompt, dropped, is_negative in zip(batch["prompt"], drop_prompt.tolist(),
                                                                negative.tolist())
                    ]
                    prompt_embeds, prompt_attention_mask = encode_prompts(prompts)

                # 4. flow matching: sigma from the timestep density on the scheduler's (shifted) noise levels
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
                    sigmas = train_sigmas[(u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)]
                noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype, generator=generator)
                sigmas = sigmas.view(bsz, 1, 1, 1)
                noisy_latents = (1.0 - sigmas) * latents + sigmas * noise
                model_pred = transformer(
                    noisy_latents.to(model_dtype),
                    condition_latents=condition_latents.to(model_dtype),
                    encoder_hidden_states=prompt_embeds.to(model_dtype),
                    timestep=sigmas.flatten() * num_train_timesteps * timestep_scale,
                    encoder_attention_mask=prompt_attention_mask,
                    return_dict=False,
                )[0].float()
                weighting = compute_loss_weighting_for_sd3(
                    weighting_scheme="none" if args.training_objective == "one_step" else args.weighting_scheme,
                    sigmas=sigmas,
                )
                loss = (weighting.float() * (model_pred - (noise - latents)) ** 2).reshape(bsz, -1).mean(1).mean()

                # 5. the pixel loss through the frozen decoder: decode(x0) + fidelity * r is the pipeline's output
                if args.pixel_loss_weight > 0:
                    target_pixels = torch.where(
                        negative[:, None, None, None], batch["conditioning_pixel_values"].to(accelerator.device),
                        batch["pixel_values"].to(accelerator.device),
                    ).float()
                    if args.fidelity > 0:  # a dropped image has no residual to add back either
                        target_pixels = target_pixels - args.fidelity * residual * keep_image[:, None, None, None]
                    pred_original_sample = noisy_latents - sigmas * model_pred
                    pixel_error = decode_latents(vae, pred_original_sample) - target_pixels
                    if args.pixel_loss == "psnr":  # the error in [0, 1] is half the error in [-1, 1]
                        squared_error = (pixel_error / 2).pow(2).flatten(1).mean(1)
                        pixel_loss = 10 * torch.log10(squared_error + (1 / 255) ** 2).mean()
                    else:
                        pixel_loss = pixel_error.pow(2).mean()
                    loss = loss + args.pixel_loss_weight * pixel_loss

                accelerator.backward(loss)
                loss_value = loss.detach().item()
                window_finite = window_finite and math.isfinite(loss_value)
                grad_norm, step_is_finite = optimizer_step_if_finite(
                    accelerator, optimizer, lr_scheduler, trainable_params, args.max_grad_norm, window_finite
                )
                if accelerator.sync_gradients:
                    window_finite = True

            if accelerator.sync_gradients:
                if not step_is_finite:
                    skipped_steps = skip_nonfinite_step(accelerator, args, global_step, loss_value, grad_norm,
                                                        skipped_steps)
                elif ema_model is not None:
                    ema_model.step(unwrap_model(transformer).parameters())
                progress_bar.update(1)
                global_step += 1

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, global_step, generator,
                                    weights_to_check(unwrap_model(transformer), ema_model),
                                    {"skipped_steps": skipped_steps, "trained_component": "transformer",
                                     "use_lora": args.use_lora, "use_ema": args.use_ema},
                                    args.checkpoints_total_limit)
                if validation_pairs and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    with ema_weights(ema_model, unwrap_model(transformer)), offload_models(
                        text_encoder, *condition_models, device=accelerator.device,
                        offload=args.offload or args.cache_latents,
                    ):
                        validation = log_validation(pipeline, args, accelerator, validation_pairs, global_step,
                                                    complex_human_instruction)

            logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "skipped_steps": skipped_steps}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            progress_bar.set_postfix(loss=loss_value, lr=logs["lr"])
            accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break

    # Save the pipeline: the trained (EMA) weights, checked for NaN / inf first; the frozen components as shipped.
    accelerator.wait_for_everyone()
    transformer = unwrap_model(transformer)
    final = f"the final pipeline (step {global_step})"
    check_finite_weights(accelerator, weights_to_check(transformer, ema_model), final)
    if ema_model is not None:
        ema_model.copy_to(transformer.parameters())
    full_state_dict = None
    if native_model_checkpoints:  # every process takes part in gathering the shards
        full_state_dict = gather_full_state_dict(transformer) if is_sharded(transformer) else (
            accelerator.get_state_dict(transformer))
    if accelerator.is_main_process:
        if full_state_dict is not None:
            transformer = ConcatConditionedTransformer.from_config(transformer.config)
            transformer.load_state_dict(full_state_dict)
        if transformer.dtype != torch.float32 and not quantized:  # a LoRA run's frozen base
            transformer.to(dtype=torch.float32)
        if args.use_lora:  # the adapter on its own (small, for sharing), then merged into the saved pipeline
            save_lora(transformer, os.path.join(args.output_dir, "transformer_lora"))
            if quantized:  # merged into the unquantized base instead
                transformer = ConcatConditionedTransformer.from_pretrained(base, subfolder="transformer",
                                                                           **weights_kwargs).to(torch.float32)
                transformer.load_lora_adapter(os.path.join(args.output_dir, "transformer_lora"), adapter_name="default")
            transformer.fuse_lora()
            transformer.unload_lora()
        pipeline.register_modules(transformer=transformer)
        if validation_pairs:
            with offload_models(text_encoder, *condition_models, device=accelerator.device,
                                offload=args.offload or args.cache_latents):
                validation = log_validation(pipeline, args, accelerator, validation_pairs, global_step,
                                            complex_human_instruction, is_final=True)
        if text_encoder.dtype != original_dtypes["text_encoder"]:
            pipeline.register_modules(text_encoder=Gemma2Model.from_pretrained(base, subfolder="text_encoder",
                                                                               **weights_kwargs))
        if vae.dtype != original_dtypes["vae"]:
            pipeline.register_modules(vae=AutoencoderDC.from_pretrained(base, subfolder="vae", **weights_kwargs))
        pipeline.save_pretrained(args.output_dir)

        save_model_card(
            args,
            repo_id or Path(args.output_dir).name,
            validation,
            None if streaming else len(train_dataset),
            {
                "training steps": global_step,
                "resolution": f"{args.resolution} px",
                "total batch size": total_batch_size,
                "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler}, warmup {args.lr_warmup_steps})",
                "optimizer": "AdamW 8-bit" if args.use_8bit_adam else "AdamW",
                "mixed precision": accelerator.mixed_precision,
                "training mode": (f"LoRA rank {args.rank} on {args.lora_layers}" if args.use_lora else "full")
                + (f", over an {args.quantize} base (QLoRA)" if quantized else ""),
                "EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
                "objective": f"{args.training_objective}, timestep density {args.weighting_scheme}, shift "
                f"{noise_scheduler.config.shift:g}",
                "pixel loss weight": args.pixel_loss_weight,
                "pixel loss": args.pixel_loss,
                "fidelity": args.fidelity,
                "empty-prompt rate": args.conditioning_dropout_prob or args.proportion_empty_prompts,
                "negative-quality samples": args.negative_sample_prob,
                "latent condition noise (max sigma)": args.condition_noise_max,
                "condition images": "as given" if stage is None else "cleaned by the base's degradation removal stage",
                "sampling defaults": pipeline.config.sampling_defaults,
            },
        )
        if args.push_to_hub:
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=HUB_IGNORE_PATTERNS,
                token=args.hub_token,
            )
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args())
