# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""``DCUpscaleDecoder``: a DC-AE decoder with one more upsampling stage, for 2x restoration from a 1x latent.

A restoration pipeline that enlarges an image (`pipe(image, upscale=2)`) can either resize the image first and encode
four times as many pixels, or encode the image at its own size and let the decoder produce the larger image. This
class is the second: the `AutoencoderDC` decoder (same blocks, initialised from a VAE's decoder weights by
`from_vae`) followed by an upsampling head::

    latents (B, C, h, w) -> DC-AE decoder blocks -> features F (B, c0, h * f', w * f')
      base     = bilinear_resize(decoder.conv_out(F), x upscale_factor)           the VAE's own decode, enlarged
      residual = conv_out(ResBlocks(pixel_shuffle(conv(F)) ...))                  learned detail, zero at initialisation
    image = base + residual, (B, 3, h * f * upscale_factor, w * f * upscale_factor) in [-1, 1]

so a new `DCUpscaleDecoder` decodes exactly as the VAE does, resized; training (`examples/train_decoder.py --upscale 2`)
teaches the head (and, unless frozen, the decoder blocks) the detail that resizing cannot create. The encoder stays
the VAE's, so latents of existing restorers decode unchanged.

`run_dc_decoder` is the one implementation of the DC-AE decoder's forward pass with gradient checkpointing (diffusers'
`AutoencoderDC` does not support it); the training script uses it for the plain VAE decoder too.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import AutoencoderDC, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_dc import Decoder, DCUpBlock2d
from diffusers.models.autoencoders.vae import DecoderOutput

from .safe_weights import SafeWeightsModelMixin


# The AutoencoderDC config entries that describe its decoder (copied by `DCUpscaleDecoder.from_vae`).
DECODER_CONFIG_KEYS = (
    "in_channels",
    "latent_channels",
    "attention_head_dim",
    "decoder_block_types",
    "decoder_block_out_channels",
    "decoder_layers_per_block",
    "decoder_qkv_multiscales",
    "upsample_block_type",
    "decoder_norm_types",
    "decoder_act_fns",
    "decoder_in_shortcut",
    "decoder_conv_act_fn",
    "scaling_factor",
)


def run_dc_decoder(
    decoder: Decoder,
    latents: torch.Tensor,
    checkpoint: Callable[..., torch.Tensor] | None = None,
    return_features: bool = False,
) -> torch.Tensor:
    """The forward pass of diffusers' DC-AE `Decoder`, block by block, optionally with gradient checkpointing.

    Args:
        decoder: an `AutoencoderDC`'s `decoder`.
        latents (`torch.Tensor` of shape `(batch, latent_channels, h, w)`): unscaled latents (what `vae.decode` takes).
        checkpoint: `checkpoint(module, *inputs)` runs a module with activation checkpointing (for example
            `ModelMixin._gradient_checkpointing_func`); `None` runs every block normally.
        return_features: stop before `conv_out` and return the last features instead of the image.

    Returns:
        `torch.Tensor`: the decoded image `(batch, 3, h * f, w * f)` in about [-1, 1], or the features before `conv_out`.
    """

    def run(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if checkpoint is not None and torch.is_grad_enabled():
            return checkpoint(module, hidden_states)
        return module(hidden_states)

    hidden_states = run(decoder.conv_in, latents)
    if decoder.in_shortcut:
        hidden_states = hidden_states + latents.repeat_interleave(decoder.in_shortcut_repeats, dim=1)
    for up_block in reversed(decoder.up_blocks):
        hidden_states = run(up_block, hidden_states)
    hidden_states = decoder.norm_out(hidden_states.movedim(1, -1)).movedim(-1, 1)
    hidden_states = decoder.conv_act(hidden_states)
    if return_features:
        return hidden_states
    return run(decoder.conv_out, hidden_states)


class _HeadBlock(nn.Module):
    """`x + conv(silu(conv(x)))` with 3x3 convolutions; the second starts at zero, so a new block is the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.conv2(F.silu(self.conv1(hidden_states)))


class DCUpscaleDecoder(SafeWeightsModelMixin, ModelMixin, ConfigMixin):
    r"""
    A DC-AE decoder whose output is `upscale_factor` times larger than the VAE's; see the module docstring.

    The decoder arguments are those of [`AutoencoderDC`] (its `decoder_*` entries, `in_channels`, `latent_channels`,
    `attention_head_dim`, `upsample_block_type`, `decoder_in_shortcut`, `decoder_conv_act_fn`, `scaling_factor`); build one from a VAE with
    [`DCUpscaleDecoder.from_vae`], which copies them and the decoder's weights.

    Args:
        upscale_factor (`int`, defaults to 2): How much larger the output is than the VAE's decode (a power of 2).
        head_channels (`int`, defaults to 64): Width of the upsampling head.
        head_layers (`int`, defaults to 2): Residual blocks of the head at the output resolution.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 32,
        attention_head_dim: int = 32,
        decoder_block_types: str | tuple[str, ...] = "ResBlock",
        decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024),
        decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3),
        decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,)),
        upsample_block_type: str = "pixel_shuffle",
        decoder_norm_types: str | tuple[str, ...] = "rms_norm",
        decoder_act_fns: str | tuple[str, ...] = "silu",
        decoder_in_shortcut: bool = True,
        decoder_conv_act_fn: str = "relu",
        scaling_factor: float = 1.0,
        upscale_factor: int = 2,
        head_channels: int = 64,
        head_layers: int = 2,
    ):
        super().__init__()
        if not isinstance(upscale_factor, int) or upscale_factor < 2 or upscale_factor & (upscale_factor - 1):
            raise ValueError(f"`upscale_factor` must be a power of 2 >= 2, got {upscale_factor!r}.")
        if head_channels < 1 or head_layers < 0:
            raise ValueError(f"`head_channels` must be >= 1 and `head_layers` >= 0, got {head_channels}, {head_layers}.")
        self.decoder = Decoder(
            in_channels=in_channels,
            latent_channels=latent_channels,
            attention_head_dim=attention_head_dim,
            block_type=decoder_block_types,
            block_out_channels=decoder_block_out_channels,
            layers_per_block=decoder_layers_per_block,
            qkv_multiscales=decoder_qkv_multiscales,
            norm_type=decoder_norm_types,
            act_fn=decoder_act_fns,
            upsample_block_type=upsample_block_type,
            in_shortcut=decoder_in_shortcut,
            conv_act_fn=decoder_conv_act_fn,
        )
        # the decoder's last features are at the VAE's output resolution, or half of it when its conv_out upsamples
        feature_channels = self.decoder.norm_out.weight.shape[0]
        feature_factor = upscale_factor * (2 if isinstance(self.decoder.conv_out, DCUpBlock2d) else 1)
        self.head_in = nn.Conv2d(feature_channels, head_channels, 3, padding=1)
        self.head_upsamplers = nn.ModuleList(
            nn.Conv2d(head_channels, head_channels * 4, 3, padding=1) for _ in range(int(math.log2(feature_factor)))
        )
        self.head_blocks = nn.Sequential(*[_HeadBlock(head_channels) for _ in range(head_layers)])
        self.head_out = nn.Conv2d(head_channels, in_channels, 3, padding=1)
        nn.init.zeros_(self.head_out.weight)
        nn.init.zeros_(self.head_out.bias)
        self.gradient_checkpointing = False

    @classmethod
    def from_vae(cls, vae: AutoencoderDC, upscale_factor: int = 2, **head_kwargs) -> "DCUpscaleDecoder":
        """A new upscaling decoder with `vae`'s decoder architecture and weights (its output is then the VAE's decode,
        bilinearly enlarged by `upscale_factor`, until the head is trained). `head_kwargs`: `head_channels`,
        `head_layers`."""
        if not isinstance(vae, AutoencoderDC):
            raise TypeError(f"`vae` must be an AutoencoderDC, got {type(vae).__name__}.")
        config = {key: vae.config[key] for key in DECODER_CONFIG_KEYS}
        model = cls(**config, upscale_factor=upscale_factor, **head_kwargs)
        model.decoder.load_state_dict(vae.decoder.state_dict())
        model.to(vae.device)
        return model if vae.dtype == model.dtype else model.to(dtype=vae.dtype)

    @property
    def spatial_compression_ratio(self) -> int:
        """Output pixels per latent pixel along each side (the VAE's factor times `upscale_factor`)."""
        return 2 ** (len(self.config.decoder_block_out_channels) - 1) * self.config.upscale_factor

    def _checkpoint(self) -> Callable[..., torch.Tensor] | None:
        return self._gradient_checkpointing_func if self.gradient_checkpointing else None

    def forward(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """
        Args:
            latents (`torch.Tensor` of shape `(batch, latent_channels, h, w)`): unscaled latents, as `vae.decode`
                takes them (divide a diffusion model's latents by `scaling_factor` first).
            return_dict: return a `DecoderOutput` (else a one-element tuple).

        Returns:
            `DecoderOutput` whose `sample` has shape `(batch, 3, h * r, w * r)`, `r = spatial_compression_ratio`,
            values in about [-1, 1].
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"`latents` must have shape (batch, {self.config.latent_channels}, height, width), got "
                f"{tuple(latents.shape)}."
            )
        checkpoint = self._checkpoint()
        features = run_dc_decoder(self.decoder, latents, checkpoint=checkpoint, return_features=True)
        base = self.decoder.conv_out(features)
        base = F.interpolate(base, scale_factor=self.config.upscale_factor, mode="bilinear", align_corners=False)
        hidden_states = self.head_in(features)
        for upsampler in self.head_upsamplers:
            hidden_states = F.pixel_shuffle(F.silu(upsampler(hidden_states)), 2)
        if checkpoint is not None and torch.is_grad_enabled():
            hidden_states = checkpoint(self.head_blocks, hidden_states)
        else:
            hidden_states = self.head_blocks(hidden_states)
        image = base + self.head_out(hidden_states)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Same as `forward` (the name `AutoencoderDC` uses)."""
        return self.forward(latents, return_dict=return_dict)
