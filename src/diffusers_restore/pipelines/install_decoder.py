# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Put a decoder trained by `examples/train_decoder.py` into a restoration pipeline folder.

`install_decoder(pipeline_dir, decoder, output_dir)` writes a *new* pipeline folder (the inputs are never modified):
a copy of `pipeline_dir` whose `vae` is replaced by a fine-tuned `AutoencoderDC` (`--upscale 1` output), or which
gains an `upscale_decoder` component (a `DCUpscaleDecoder`, `--upscale 2` output). The result loads with
`SanaRestorationPipeline.from_pretrained` unchanged, and its model card says which decoder it carries.

A replacement VAE must have the pipeline VAE's encoder, weight for weight, and the same latent space and number of
decoder stages: the restorer was trained on that encoder's latents, and only the decoder may change (its depth too:
`train_decoder.py --decoder_extra_layers` grows it). An upscale decoder must read the pipeline VAE's latents (same latent
channels and scaling factor).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file

from ..image_io import read_json
from ..models.upscale_decoder import DCUpscaleDecoder

__all__ = ["install_decoder"]

_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path} does not exist.")
    try:
        value = read_json(path)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: {path} does not hold a JSON object.")
    return value


def _find_decoder(decoder: str) -> tuple[str, str]:
    """`(folder, class name)` of the decoder to install: `decoder` itself when it is a model folder, else its `vae` or
    `upscale_decoder` subfolder (a train_decoder.py output folder)."""
    candidates = [decoder, os.path.join(decoder, "vae"), os.path.join(decoder, "upscale_decoder")]
    for folder in candidates:
        config_path = os.path.join(folder, "config.json")
        if os.path.isfile(config_path):
            class_name = _read_json(config_path, "decoder").get("_class_name")
            if class_name in ("AutoencoderDC", DCUpscaleDecoder.__name__):
                if not os.path.isfile(os.path.join(folder, _WEIGHTS)):
                    raise ValueError(f"decoder: {folder} has no {_WEIGHTS} (weights load from safetensors only).")
                return folder, class_name
    raise ValueError(
        f"decoder: {decoder} is neither an AutoencoderDC or DCUpscaleDecoder folder nor a folder written by "
        "examples/train_decoder.py (with vae/ or upscale_decoder/ inside)."
    )


def _check_same_encoder(pipeline_vae: str, new_vae: str, old_config: dict, new_config: dict) -> None:
    # The decoder may differ (e.g. grown by `train_decoder.py --decoder_extra_layers`); what reads or makes latents
    # may not, and the decoder keeps the encoder's number of stages (so the same image size comes out).
    differing = sorted(
        key for key in set(old_config) | set(new_config)
        if not key.startswith(("_", "decoder_")) and key != "upsample_block_type" and old_config.get(key) != new_config.get(key)
    )
    if differing:
        raise ValueError(
            f"The VAE in {new_vae} differs from the pipeline's ({pipeline_vae}) in {', '.join(differing)}: only the "
            "decoder may change."
        )
    stages = len(old_config.get("decoder_block_out_channels") or ()), len(new_config.get("decoder_block_out_channels") or ())
    if stages[0] != stages[1]:
        raise ValueError(
            f"The VAE in {new_vae} has a decoder of {stages[1]} stages, the pipeline's ({pipeline_vae}) {stages[0]}: it "
            "would decode to another size."
        )
    old, new = load_file(os.path.join(pipeline_vae, _WEIGHTS)), load_file(os.path.join(new_vae, _WEIGHTS))
    old_encoder = {key: value for key, value in old.items() if key.startswith("encoder.")}
    new_encoder = {key: value for key, value in new.items() if key.startswith("encoder.")}
    if old_encoder.keys() != new_encoder.keys() or not all(
        old_encoder[key].shape == new_encoder[key].shape and torch.equal(old_encoder[key], new_encoder[key])
        for key in old_encoder
    ):
        raise ValueError(
            f"The VAE in {new_vae} has another encoder than the pipeline's ({pipeline_vae}): the restorer was trained "
            "on its VAE's latents, so only the decoder may change. Train the decoder from this pipeline "
            "(examples/train_decoder.py --pretrained_model_name_or_path PIPELINE)."
        )


def _check_latent_space(pipeline_vae_config: dict, decoder_config: dict, decoder_dir: str) -> None:
    for key in ("latent_channels", "scaling_factor", "decoder_block_out_channels"):
        if pipeline_vae_config.get(key) != decoder_config.get(key):
            raise ValueError(
                f"The upscale decoder in {decoder_dir} was made for another VAE: its {key} is "
                f"{decoder_config.get(key)!r}, the pipeline VAE's is {pipeline_vae_config.get(key)!r}."
            )


def install_decoder(pipeline_dir: str, decoder: str, output_dir: str, overwrite: bool = False) -> str:
    """Write a copy of the restoration pipeline folder `pipeline_dir` that carries the decoder in `decoder`.

    Args:
        pipeline_dir: a local `SanaRestorationPipeline` folder (never modified).
        decoder: a folder written by `examples/train_decoder.py` (holding `vae/` or `upscale_decoder/`), or an
            `AutoencoderDC` / `DCUpscaleDecoder` model folder.
        output_dir: the new pipeline folder; it must not exist unless `overwrite` (and may never be one of the inputs).
        overwrite: replace an existing `output_dir` (only once the new folder is complete).

    Returns:
        `output_dir`. An `AutoencoderDC` replaces the pipeline's `vae` (its encoder must be identical); a
        `DCUpscaleDecoder` becomes the `upscale_decoder` component, used by `pipe(image, upscale=2)`.

    Raises:
        ValueError: naming the problem (not a pipeline, not a decoder, another encoder or latent space, output folder
            exists or is an input).
    """
    model_index = _read_json(os.path.join(pipeline_dir, "model_index.json"), "pipeline")
    if model_index.get("_class_name") != "SanaRestorationPipeline":
        raise ValueError(
            f"pipeline: {pipeline_dir} holds a {model_index.get('_class_name')}, not a SanaRestorationPipeline."
        )
    decoder_dir, class_name = _find_decoder(decoder)
    output = os.path.abspath(output_dir)
    for source in (pipeline_dir, decoder, decoder_dir):
        source = os.path.abspath(source)
        if output == source or output.startswith(source + os.sep) or source.startswith(output + os.sep):
            raise ValueError(f"output_dir {output_dir} overlaps an input ({source}); choose a new folder.")
    if os.path.exists(output) and not overwrite:
        raise ValueError(f"output_dir {output_dir} exists; pass overwrite=True (--overwrite) to replace it.")

    pipeline_vae = os.path.join(pipeline_dir, "vae")
    pipeline_vae_config = _read_json(os.path.join(pipeline_vae, "config.json"), "pipeline VAE")
    decoder_config = _read_json(os.path.join(decoder_dir, "config.json"), "decoder")
    if class_name == "AutoencoderDC":
        _check_same_encoder(pipeline_vae, decoder_dir, pipeline_vae_config, decoder_config)
        component, description = "vae", "a fine-tuned VAE decoder (same encoder)"
        layers = decoder_config.get("decoder_layers_per_block")
        if layers != pipeline_vae_config.get("decoder_layers_per_block"):
            description = (f"a fine-tuned, deeper VAE decoder (same encoder; decoder_layers_per_block {layers}, was "
                           f"{pipeline_vae_config.get('decoder_layers_per_block')})")
    else:
        _check_latent_space(pipeline_vae_config, decoder_config, decoder_dir)
        component, description = "upscale_decoder", "an upscale decoder (`pipe(image, upscale=2)` decodes with it)"

    staging = output.rstrip(os.sep) + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(pipeline_dir, staging, ignore=shutil.ignore_patterns("checkpoint-*", "*.tmp", "logs"))
    shutil.rmtree(os.path.join(staging, component), ignore_errors=True)
    shutil.copytree(decoder_dir, os.path.join(staging, component))
    if component == "upscale_decoder":
        model_index["upscale_decoder"] = [DCUpscaleDecoder.__module__, DCUpscaleDecoder.__name__]
        with open(os.path.join(staging, "model_index.json"), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(model_index, indent=2, sort_keys=True) + "\n")

    card_path = os.path.join(staging, "README.md")
    section = f"\n## Decoder\n\nThis pipeline carries {description}: `{component}/`, from `{decoder}`"
    metrics_path = os.path.join(decoder, "decoder_metrics.json")
    if os.path.isfile(metrics_path):
        final = _read_json(metrics_path, "decoder metrics").get("final") or {}
        if final:
            section += " (validation PSNR of decode(latent + sigma noise): " + ", ".join(
                f"sigma {key.removeprefix('psnr_sigma_')}: {value:.2f} dB" for key, value in final.items()
                if key.startswith("psnr")
            ) + ")"
    section += ".\n"
    with open(card_path, "a", encoding="utf-8") as handle:
        handle.write(section)

    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(staging, output)
    return output_dir
