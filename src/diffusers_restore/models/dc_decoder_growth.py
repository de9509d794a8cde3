# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Give an `AutoencoderDC` a deeper decoder that starts out decoding exactly as the original one.

A decoder fine-tuned to clean up degraded latents (`examples/train_decoder.py`) may need more capacity than the
autoencoder was built with: removing latent noise takes a receptive field and depth that a decoder trained only on
clean latents never needed. `grow_dc_decoder` appends residual blocks to the decoder's stages::

    stage i (width c_i):  [upsample] -> block_1 ... block_n            (the original decoder)
                          [upsample] -> block_1 ... block_n -> new_1 ... new_k   (grown: `extra_layers[i] = k`)

Every new block is a residual block whose branch ends in a normalisation layer; that layer's weight and bias start at
zero, so each new block is the identity and the grown decoder's output equals the original's (bit for bit in float32)
until training changes it. Gradients still reach the zeroed weights (the normalised features multiply them), so the
new blocks learn from the first step, as a zero-initialised last layer does.

The result is a plain diffusers `AutoencoderDC`: the encoder and its latent space are untouched, only
`decoder_layers_per_block` in its config grows, so it saves and loads with `AutoencoderDC.from_pretrained` and restorers
trained with the original autoencoder keep working with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffusers import AutoencoderDC


def _as_per_stage(value, stages: int) -> list:
    if isinstance(value, (str, int)):
        return [value] * stages
    return list(value)


def _zero_affine(norm: nn.Module) -> None:
    """Zero a normalisation layer's scale and shift, so a residual branch ending in it adds nothing."""
    found = False
    for name in ("weight", "bias"):
        parameter = getattr(norm, name, None)
        if isinstance(parameter, torch.Tensor):
            with torch.no_grad():
                parameter.zero_()
            found = found or name == "weight"
    if not found:
        raise ValueError(f"Cannot start a new decoder block as the identity: its {type(norm).__name__} has no scale.")


def _make_identity(block: nn.Module) -> None:
    """Start a new DC-AE decoder block (`ResBlock` or `EfficientViTBlock`) as the identity."""
    if hasattr(block, "conv1") and hasattr(block, "norm"):  # ResBlock: x + norm(conv2(act(conv1(x))))
        _zero_affine(block.norm)
    elif hasattr(block, "attn") and hasattr(block, "conv_out"):  # EfficientViTBlock: attention, then GLUMBConv
        if not (getattr(block.attn, "residual_connection", False) and getattr(block.conv_out, "residual_connection", False)):
            raise ValueError("Cannot start a new EfficientViTBlock as the identity: it has no residual connections.")
        _zero_affine(block.attn.norm_out)
        _zero_affine(block.conv_out.norm)
    else:
        raise ValueError(f"Cannot start a new decoder block of type {type(block).__name__} as the identity.")


def grow_dc_decoder(vae: AutoencoderDC, extra_layers: Sequence[int]) -> AutoencoderDC:
    """A copy of `vae` whose decoder has `extra_layers[i]` more blocks at stage `i`, decoding exactly as `vae` does.

    Args:
        vae: the autoencoder to grow (left unchanged).
        extra_layers: one count per decoder stage, in the order of `decoder_block_out_channels` (stage 0 is the
            full-resolution one, the last stage works at the latent's resolution). A stage that has no blocks cannot
            grow: its upsampling happens elsewhere in the DC-AE decoder, so adding a block would change its structure.

    Returns:
        `AutoencoderDC`: a new autoencoder (same device and dtype) with the same encoder weights, the original decoder
        weights, and new identity blocks; its config's `decoder_layers_per_block` is the sum.

    Raises:
        ValueError: `extra_layers` has the wrong length, a negative count, or grows a stage that has no blocks.
    """
    config = dict(vae.config)
    stages = len(config["decoder_block_out_channels"])
    extra = [int(count) for count in extra_layers]
    if len(extra) != stages:
        raise ValueError(f"extra_layers needs one count per decoder stage ({stages}), got {len(extra)}: {extra}.")
    if any(count < 0 for count in extra):
        raise ValueError(f"extra_layers must be >= 0, got {extra}.")
    layers = _as_per_stage(config["decoder_layers_per_block"], stages)
    empty = [index for index, (count, added) in enumerate(zip(layers, extra)) if added and count == 0]
    if empty:
        raise ValueError(
            f"Decoder stage(s) {empty} have no blocks (decoder_layers_per_block {layers}); only stages that already have "
            "blocks can grow."
        )
    config["decoder_layers_per_block"] = [count + added for count, added in zip(layers, extra)]
    config = {key: value for key, value in config.items() if not key.startswith("_")}

    parameter = next(vae.parameters())
    grown = AutoencoderDC.from_config(config).to(device=parameter.device, dtype=parameter.dtype)
    missing, unexpected = grown.load_state_dict(vae.state_dict(), strict=False)
    # The new blocks follow the original ones in each stage's nn.Sequential, so every original key is kept.
    new_blocks = {}
    for stage, (count, added) in enumerate(zip(layers, extra)):
        sequence = grown.decoder.up_blocks[stage]
        for position in range(len(sequence) - added, len(sequence)):
            new_blocks[f"decoder.up_blocks.{stage}.{position}."] = sequence[position]
    unexplained = [key for key in missing if not any(key.startswith(prefix) for prefix in new_blocks)]
    if unexpected or unexplained:
        raise RuntimeError(
            f"Growing the decoder did not keep its weights (unexpected {list(unexpected)[:3]}, missing "
            f"{unexplained[:3]}); this AutoencoderDC version lays out its decoder differently."
        )
    for block in new_blocks.values():
        _make_identity(block)
    grown.train(vae.training)
    return grown
