#!/usr/bin/env python
# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Train the degradation removal stage of a two-stage restorer (DiffBIR, PASD), with 🤗 Accelerate.

    accelerate launch examples/train_degradation_removal.py \\
        --pretrained_model_name_or_path Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers \\
        --train_data_csv pairs.csv --resolution 512 --output_dir sana-restore-stage

A `SanaRestorationPipeline` may hold a pixel-space first stage, `degradation_removal` (a `DegradationRemovalModel`, a
small residual U-Net), which cleans the degraded image before it is encoded as the transformer's condition. This script
trains that stage alone, on the same pairs and degradations as `train_paired.py`:

    loss = mean | stage(degraded) - clean |      (--loss_type mse: the squared error), images in [0, 1]

A base pipeline without a stage gets a new one (`--block_out_channels`, `--layers_per_block`, `--noise_level_input`,
`--statistics_input`), which starts as the identity; a base with a stage trains it further. `output_dir` ends with the base pipeline holding
the trained stage, so the next step is `train_paired.py --pretrained_model_name_or_path output_dir`: the transformer is
then trained on the latents of the stage's outputs, as it will see them at inference.
"""

import argparse
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from huggingface_hub import upload_folder
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import diffusers
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.optimization import get_scheduler
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

from diffusers_restore import SanaRestorationPipeline
from diffusers_restore.data.degradations import parse_degradation_spec
from diffusers_restore.data.paired_dataset import collate_fn
from diffusers_restore.metrics import psnr, ssim
from diffusers_restore.models.degradation_removal import DegradationRemovalModel
from diffusers_restore.training_utils import (
    ArgumentParser,
    EpochShuffleSampler,
    build_paired_dataset,
    check_finite_weights,
    check_output_arguments,
    check_pairs_csv,
    create_ema,
    ema_weights,
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

HUB_IGNORE_PATTERNS = ["checkpoint-*", "*.tmp", "*.tmp/**", ".lock"]


def save_model_card(args, repo_id: str, stage, new_stage: bool, untrained_transformer: bool, validation, steps: int):
    """Write output_dir/README.md through diffusers' model card helpers."""
    base = args.pretrained_model_name_or_path
    config = ", ".join(f"`{key}={stage.config[key]}`" for key in ("block_out_channels", "layers_per_block",
                                                                    "noise_level_input", "statistics_input"))
    description = f"""# {repo_id.split("/")[-1]}

A `SanaRestorationPipeline` whose degradation removal stage (`DegradationRemovalModel`, {config}) was trained by the
`examples/train_degradation_removal.py` script of diffusers-restore: {steps} steps of the
{"L1" if args.loss_type == "l1" else "MSE"} loss between the stage's output and the clean image, on
`{os.path.basename(args.train_data_csv or args.train_data_dir)}` degraded by `{args.degradation}` ({args.resolution} px
crops), starting from {"a new stage (the identity)" if new_stage else "the stage of the base pipeline"}. The other
components are those of `{base}`, unchanged.
"""
    if untrained_transformer:
        description += """
The transformer is the text-to-image SANA's, wrapped but not trained for restoration yet (it ignores the image): train
it on top of this stage with `examples/train_paired.py --pretrained_model_name_or_path <this folder>` before use.
"""
    if validation is not None and validation["psnr"] is not None:
        description += f"""
## Validation

Before | stage | target: ![validation](validation.png)

The stage alone: PSNR {validation["psnr"]:.2f} dB, SSIM {validation["ssim"]:.4f} on the validation pairs.
"""
    model_card = load_or_create_model_card(repo_id_or_path=repo_id, token=args.hub_token, from_training=True,
                                           license="other",
                                           model_description=description)
    model_card.text = description  # the whole card: without the template's "TODO" sections and its proofread note
    model_card.data.pipeline_tag = "image-to-image"
    model_card = populate_model_card(model_card, tags=["image-restoration", "diffusers-restore", "diffusers-training"])
    model_card.save(os.path.join(args.output_dir, "README.md"))


@torch.no_grad()
def log_validation(stage, args, accelerator, validation_pairs, global_step, is_final=False):
    """Run the stage on the validation images; log and save a before | stage | target grid and PSNR/SSIM."""
    stage.eval()
    rows, psnr_values, ssim_values = [], [], []
    for image, target in validation_pairs:
        pixels = VaeImageProcessor.pil_to_numpy(image)
        pixels = VaeImageProcessor.numpy_to_pt(pixels).to(accelerator.device)
        with accelerator.autocast():
            cleaned = stage(pixels).float().clamp(0, 1)
        cleaned = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(cleaned.cpu()))[0]
        rows.append([image, cleaned] + ([target] if target is not None else []))
        if target is not None:
            psnr_values.append(psnr(cleaned, target).item())
            ssim_values.append(ssim(cleaned, target).item())
    stage.train()

    metrics = {"psnr": float(np.mean(psnr_values)) if psnr_values else None,
               "ssim": float(np.mean(ssim_values)) if ssim_values else None}
    log_validation_images(accelerator, rows, metrics, args.output_dir, global_step, is_final, "before | stage | target")
    return metrics


def parse_args(input_args=None):
    parser = ArgumentParser(description="Train the degradation removal stage of a SANA restoration pipeline.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="A SANA text-to-image checkpoint (Hub id or folder) or a SanaRestorationPipeline folder; its stage, if it "
        "has one, is trained further.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the weight files, e.g. 'bf16'.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are kept.")
    # the stage
    parser.add_argument(
        "--block_out_channels",
        type=str,
        default=None,
        help="A new stage's widths per resolution level, comma-separated (DegradationRemovalModel's default: "
        "48,96,192). With a base that has a stage, it must describe that stage.",
    )
    parser.add_argument(
        "--layers_per_block",
        type=int,
        default=None,
        help="A new stage's residual blocks per level (default: 2). With a base that has a stage, it must match it.",
    )
    parser.add_argument(
        "--noise_level_input",
        action="store_true",
        help="A new stage gets each image's estimated gaussian noise level as an extra input channel. With a base that "
        "has a stage, that stage must have it too.",
    )
    parser.add_argument(
        "--statistics_input",
        action="store_true",
        help="A new stage gets each image's estimated JPEG blockiness and fine-detail ratio as two extra input "
        "channels (they tell clean, compressed, blurred and resized photos apart). With a base that has a stage, that "
        "stage must have them too.",
    )
    parser.add_argument("--loss_type", type=str, default="l1", choices=["l1", "mse"], help="Pixel loss, in [0, 1].")
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
        "--degradation",
        type=str,
        default="random",
        help="How clean images are degraded on the fly: 'random', 'realesrgan', 'realesrgan_light' or a spec such as "
        "'gaussian_noise:25' or 'gaussian_noise|jpeg|downscale:2'.",
    )
    parser.add_argument("--resolution", type=int, default=512, help="Side of the square training crops (x32).")
    parser.add_argument("--center_crop", action="store_true", help="Centre crops instead of random crops.")
    parser.add_argument("--random_flip", action="store_true", help="Randomly flip pairs horizontally.")
    parser.add_argument("--repeats", type=int, default=1, help="Samples of each image per epoch.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Use only this many training examples.")
    parser.add_argument("--skip_bad_samples", action="store_true", help="Leave out bad CSV rows instead of stopping.")
    parser.add_argument("--allow_multiline_captions", action="store_true", help="Accept captions with line breaks.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Subprocesses for data loading.")
    # output, logging
    parser.add_argument("--output_dir", type=str, default="sana-restore-stage", help="Checkpoints and the pipeline.")
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder inside output_dir.")
    parser.add_argument("--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', ... or 'none'.")
    parser.add_argument("--tracker_project_name", type=str, default="train_degradation_removal")
    # training
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--scale_lr", action="store_true", help="Scale the learning rate by the total batch size.")
    parser.add_argument("--lr_scheduler", type=str, default="constant", help="diffusers' `get_scheduler` names.")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--lr_num_cycles", type=int, default=1, help="Hard resets of cosine_with_restarts.")
    parser.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=0,
        help="A NaN or infinite loss or gradient stops the run; with N > 0 up to N such steps are skipped first.",
    )
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights; it is what is saved.")
    parser.add_argument("--ema_decay", type=float, default=0.999)
    # checkpoints, validation, Hub
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every X steps.")
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints to store.")
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' or 'checkpoint-<step>' (inside output_dir), or the path of a checkpoint folder.",
    )
    parser.add_argument("--validation_image", type=str, nargs="+", default=None, help="Degraded validation images.")
    parser.add_argument("--validation_target_image", type=str, nargs="+", default=None, help="Their clean targets.")
    parser.add_argument("--validation_steps", type=int, default=500, help="Validate every X steps.")
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
    if bool(args.train_data_csv) == bool(args.train_data_dir):
        parser.error("give exactly one of --train_data_csv and --train_data_dir.")
    for flag in ("train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps", "repeats",
                 "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "max_train_samples",
                 "layers_per_block"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.resolution < 32 or args.resolution % 32:
        parser.error(f"--resolution must be a positive multiple of 32, got {args.resolution}.")
    if args.block_out_channels is not None:
        try:
            args.block_out_channels = tuple(int(width) for width in args.block_out_channels.split(","))
        except ValueError:
            args.block_out_channels = ()
        if not args.block_out_channels or min(args.block_out_channels) < 1:
            parser.error("--block_out_channels must be comma-separated positive widths such as 32,64,128.")
    try:
        parse_degradation_spec(args.degradation)
    except ValueError as error:
        parser.error(f"--degradation {args.degradation!r}: {error}")
    if args.validation_target_image and len(args.validation_target_image) != len(args.validation_image or []):
        parser.error("give one --validation_target_image per --validation_image.")
    for path in (args.validation_image or []) + (args.validation_target_image or []):
        if not os.path.isfile(path):
            parser.error(f"validation image {path} is not a file.")
    problem = check_output_arguments(args)
    if problem is None and args.train_data_dir and not os.path.isdir(args.train_data_dir):
        problem = f"--train_data_dir {args.train_data_dir} is not a folder."
    if problem is None and args.train_data_csv:
        problem = check_pairs_csv(args.train_data_csv, args.skip_bad_samples, args.allow_multiline_captions)
    if problem is not None:
        parser.error(problem)


def main(args):
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError(
            "You cannot use both --report_to=wandb and --hub_token due to a security risk of exposing your token."
            " Please use `hf auth login` to authenticate with the Hub."
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_info()
    else:
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is not None:
        set_seed(args.seed)
    data_seed = args.seed if args.seed is not None else 0

    repo_id = prepare_hub_repo(args, accelerator) if args.push_to_hub else None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        remove_unfinished_checkpoints(args.output_dir)

    # The whole base pipeline (saved at the end with the trained stage): a SANA text-to-image base is wrapped.
    base = args.pretrained_model_name_or_path
    load_kwargs = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    from_sana = DiffusionPipeline.load_config(base, revision=args.revision, cache_dir=args.cache_dir).get(
        "_class_name") == "SanaPipeline"
    if from_sana:
        pipeline = SanaRestorationPipeline.from_pretrained_sana(base, **load_kwargs)
    else:
        pipeline = SanaRestorationPipeline.from_pretrained(base, **load_kwargs)
    requested = {"block_out_channels": args.block_out_channels, "layers_per_block": args.layers_per_block,
                 "noise_level_input": args.noise_level_input or None,
                 "statistics_input": args.statistics_input or None}
    requested = {key: value for key, value in requested.items() if value is not None}
    stage = pipeline.degradation_removal
    new_stage = stage is None
    if new_stage:
        stage = DegradationRemovalModel(**requested)
    for key, value in requested.items():
        existing = stage.config.get(key)
        if (tuple(existing) if key == "block_out_channels" else existing) != value:
            raise ValueError(f"--{key} {value} contradicts the degradation removal stage of {base} ({key}={existing}): "
                             "leave it out to train that stage further.")
    logger.info(f"Training {'a new stage' if new_stage else 'the stage of the base pipeline'}: {dict(stage.config)}")
    stage.to(accelerator.device, dtype=torch.float32).requires_grad_(True).train()

    ema_model = None

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "degradation_removal"))
                weights.pop()
            if ema_model is not None:
                save_ema_checkpoint(ema_model, os.path.join(output_dir, "degradation_removal_ema"))

    def load_model_hook(models, input_dir):
        while models:
            loaded = DegradationRemovalModel.from_pretrained(input_dir, subfolder="degradation_removal",
                                                             use_safetensors=True)
            accelerator.unwrap_model(models.pop()).load_state_dict(loaded.state_dict())
        if ema_model is not None:
            load_ema_checkpoint(ema_model, os.path.join(input_dir, "degradation_removal_ema"), DegradationRemovalModel)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        stage.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    with accelerator.main_process_first():
        train_dataset = build_paired_dataset(args.train_data_csv or args.train_data_dir, args, seed=data_seed)
    sampler = EpochShuffleSampler(len(train_dataset), seed=data_seed)
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(data_seed),
    )

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
    stage, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        stage, optimizer, train_dataloader, lr_scheduler
    )
    if args.use_ema:
        ema_model = create_ema(accelerator.unwrap_model(stage), args.ema_decay)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if accelerator.is_main_process:
        tracker_config = {key: value for key, value in vars(args).items() if not isinstance(value, (list, tuple))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    global_step, first_epoch, resume_batches, skipped_steps = 0, 0, 0, 0
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            accelerator.print(f"No checkpoint in {args.output_dir}. Starting a new training run.")
        else:
            saved = read_training_state(checkpoint)
            if saved.get("trained_component") != "degradation_removal" or saved["use_ema"] != args.use_ema:
                raise ValueError(f"{checkpoint} was not written by this script with --use_ema={args.use_ema}.")
            accelerator.print(f"Resuming from checkpoint {checkpoint}")
            accelerator.load_state(checkpoint)
            global_step, skipped_steps = saved["global_step"], saved.get("skipped_steps", 0)
            first_epoch = global_step // num_update_steps_per_epoch
            resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    progress_bar = tqdm(range(0, args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    validation_pairs = []
    if args.validation_image:
        validation_pairs = load_validation_pairs(args.validation_image, args.validation_target_image)
    validation = None

    window_finite = True
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        stage.train()
        sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        epoch_loader = train_dataloader
        if epoch == first_epoch and resume_batches > 0:
            epoch_loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(stage):
                # the batch holds images in [-1, 1]; the stage and its loss work on [0, 1]
                degraded = batch["conditioning_pixel_values"].to(accelerator.device).float() / 2 + 0.5
                clean = batch["pixel_values"].to(accelerator.device).float() / 2 + 0.5
                error = stage(degraded).float() - clean
                loss = error.abs().mean() if args.loss_type == "l1" else error.pow(2).mean()
                accelerator.backward(loss)
                loss_value = loss.detach().item()
                window_finite = window_finite and math.isfinite(loss_value)
                grad_norm, step_is_finite = optimizer_step_if_finite(
                    accelerator, optimizer, lr_scheduler, stage.parameters(), args.max_grad_norm, window_finite
                )
                if accelerator.sync_gradients:
                    window_finite = True

            if accelerator.sync_gradients:
                if not step_is_finite:
                    skipped_steps = skip_nonfinite_step(accelerator, args, global_step, loss_value, grad_norm,
                                                        skipped_steps)
                elif ema_model is not None:
                    ema_model.step(accelerator.unwrap_model(stage).parameters())
                progress_bar.update(1)
                global_step += 1
                if global_step % args.checkpointing_steps == 0:
                    state = {"skipped_steps": skipped_steps, "trained_component": "degradation_removal",
                             "use_lora": False, "use_ema": args.use_ema}
                    weights = weights_to_check(accelerator.unwrap_model(stage), ema_model)
                    save_checkpoint(accelerator, args.output_dir, global_step, None, weights, state,
                                    args.checkpoints_total_limit)
                if validation_pairs and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                    model = accelerator.unwrap_model(stage)
                    with ema_weights(ema_model, model):
                        log_validation(model, args, accelerator, validation_pairs, global_step)

            logs = {"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "skipped_steps": skipped_steps}
            progress_bar.set_postfix(loss=loss_value, lr=logs["lr"])
            accelerator.log(logs, step=global_step)
            if global_step >= args.max_train_steps:
                break

    accelerator.wait_for_everyone()
    stage = accelerator.unwrap_model(stage)
    check_finite_weights(accelerator, weights_to_check(stage, ema_model), f"the final pipeline (step {global_step})")
    if ema_model is not None:
        ema_model.copy_to(stage.parameters())
    if accelerator.is_main_process:
        if validation_pairs:
            validation = log_validation(stage, args, accelerator, validation_pairs, global_step, is_final=True)
        pipeline.register_modules(degradation_removal=stage.to("cpu"))
        pipeline.save_pretrained(args.output_dir)
        save_model_card(args, repo_id or Path(args.output_dir).name, stage, new_stage, from_sana, validation,
                        global_step)
        if args.push_to_hub:
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                          ignore_patterns=HUB_IGNORE_PATTERNS, token=args.hub_token)
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args())
