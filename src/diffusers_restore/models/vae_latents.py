# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""The latent space of a diffusers autoencoder, as the restorer sees it: scaled latents in and out.

Diffusion models work on *scaled* latents, ``z = (vae.encode(x) - shift_factor) * scaling_factor``, so that they have
roughly unit variance; decoding undoes the scaling first. ``AutoencoderDC`` (SANA's DC-AE) is deterministic and
returns ``EncoderOutput.latent`` with no shift factor; KL autoencoders (SD, SD3, Flux) return a latent distribution,
read here at its mode, and SD3/Flux VAEs define a ``shift_factor``.

These helpers are the one implementation of that convention, used by the pipeline (encode the degraded image, decode
the result), by the training script (targets and pixel losses) and by the latent cache.
"""

from __future__ import annotations

import torch

__all__ = ["decode_latents", "encode_latents", "unscale_latents", "vae_spatial_factor"]


def _config_value(vae: torch.nn.Module, key: str):
    config = vae.config
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def encode_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of images: ``(z - shift_factor) * scaling_factor`` with ``z = vae.encode(pixels).latent``
    (AutoencoderDC) or ``.latent_dist.mode()`` (KL autoencoders); the shift is 0 unless the VAE config defines one.

    Args:
        vae: a diffusers autoencoder whose config has `scaling_factor`.
        pixels: `(batch, 3, H, W)` images in [-1, 1] on the VAE's device (any float dtype; cast to the VAE's
            `dtype`).

    Returns:
        `(batch, C, H / f, W / f)` float32 latents (the shift and scale are applied in float32).
    """
    output = vae.encode(pixels.to(getattr(vae, "dtype", pixels.dtype)))
    if hasattr(output, "latent"):
        latents = output.latent
    elif hasattr(output, "latent_dist"):
        latents = output.latent_dist.mode()
    elif isinstance(output, (tuple, list)):
        latents = output[0].mode() if hasattr(output[0], "mode") else output[0]
    else:
        raise TypeError(f"cannot find latents in the output of {type(vae).__name__}.encode ({type(output).__name__}).")
    scaling = _config_value(vae, "scaling_factor")
    if scaling is None:
        raise ValueError(f"{type(vae).__name__}.config has no scaling_factor.")
    shift = _config_value(vae, "shift_factor") or 0.0
    return (latents.float() - shift) * scaling


def unscale_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents back to what the VAE's decoder takes: ``latents / scaling_factor + shift_factor`` (the shift is
    0 unless the VAE config defines one). Any decoder of that VAE's latent space (e.g. a `DCUpscaleDecoder`) takes
    these."""
    shift = _config_value(vae, "shift_factor") or 0.0
    return latents / _config_value(vae, "scaling_factor") + shift


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encode_latents`: images in [-1, 1] (not clamped) from scaled latents, decoding
    :func:`unscale_latents` in the VAE's dtype. Differentiable with respect to `latents`.

    Args:
        vae: a diffusers autoencoder whose config has `scaling_factor`.
        latents: `(batch, C, h, w)` scaled latents on the VAE's device.

    Returns:
        `(batch, 3, h * f, w * f)` float32 images.
    """
    return vae.decode(unscale_latents(vae, latents).to(vae.dtype), return_dict=False)[0].float()


def vae_spatial_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent pixel along each side: `spatial_compression_ratio` (AutoencoderDC) or
    `2 ** (len(block_out_channels) - 1)` (KL autoencoders)."""
    factor = getattr(vae, "spatial_compression_ratio", None)
    if factor is None:
        blocks = _config_value(vae, "encoder_block_out_channels") or _config_value(vae, "block_out_channels")
        factor = 2 ** (len(blocks) - 1)
    return int(factor)
