# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""``DegradationRemovalModel``: a small pixel-space network that removes degradations before the latent restorer.

Two-stage restorers (DiffBIR's "restoration module", PASD's "degradation removal module") first clean the degraded
image with a fidelity-trained network in pixel space, then let the generative model refine the result in its latent
space. The first stage is what keeps pixel accuracy: a latent model sees the image through the VAE, whose latent
cannot carry every pixel of detail or of noise, and is best at regenerating texture, not at subtracting noise.

Architecture: a residual U-Net that works at half resolution from the start (pixel-unshuffle, as SwinIR's and
NAFNet's fast variants do), so that its cost per input pixel is low, with three resolution levels for a receptive
field of about 100 px (enough to tell noise and JPEG blocks from texture)::

    x (B, 3, H, W) in [0, 1] -> reflect-pad to a multiple of 2 ** len(block_out_channels)
      -> pixel-unshuffle 2 -> 3x3 conv -> [ResBlocks, strided conv down] x levels -> ResBlocks
      -> [upsample (pixel-shuffle) + skip, ResBlocks] x levels -> 3x3 conv -> pixel-shuffle 2 -> residual r
    y = x + r, cropped back to H x W

The last convolution starts at zero, so an untrained model is the identity (it never makes an image worse before
training). The output is not clamped: values slightly outside [0, 1] are kept for the next stage, which clamps.

Noise level input (FFDNet's noise-level map, made blind), opt-in with `noise_level_input=True`: the image's gaussian
noise level is estimated (`estimate_noise_level`: Donoho's robust estimator on the finest diagonal Haar coefficients)
and given to the network as a constant extra input channel. A blind network must otherwise learn on its own to tell
noise from texture and from its absence; the estimate is a statistic the learned network is conditioned on, not a
filter, and the restoration stays the network's. The level is one number per image: pass it explicitly
(`noise_level=`) when processing an image in tiles, so that every tile sees the whole image's level.

Degradation statistics input, opt-in with `statistics_input=True`: two more image-level numbers that say what else the
degradation is, each a constant extra channel like the noise level: JPEG blockiness (`estimate_blockiness`: how much
larger the luma steps across the 8 x 8 block grid are than those inside blocks; about 0 for a camera photo, 0.2-0.6
at JPEG quality 40, 0.6-2 at quality 10) and the fine-detail ratio (`estimate_detail_ratio`: the finest Haar detail
over the next scale's; about 0.6-0.9 for a sharp photo, 0.4-0.55 after a 2x down-up, about 0.55 after a gaussian blur
of 1 px, above 1 with noise). With them a small network can tell a clean photo (leave it alone) from a soft or
compressed one by the whole image, not only by what its receptive field sees. `image_conditioning` computes every
conditioning input of an image once, for tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .safe_weights import SafeWeightsModelMixin


class _ResBlock(nn.Module):
    """`x + conv(act(conv(x)))`, 3x3 convolutions, no normalisation (pixel-accurate restorers avoid it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        # Each block starts as the identity: without normalisation, blocks that add full-size random residuals make
        # the activations grow with depth and training diverge at the learning rates a small network wants.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.conv2(self.act(self.conv1(hidden_states)))


def estimate_noise_level(images: torch.Tensor) -> torch.Tensor:
    """The gaussian noise standard deviation of each image, on the scale of its values: Donoho's robust estimator,
    `median(|HH|) / 0.6745`, on the finest diagonal Haar detail coefficients `HH = (a - b - c + d) / 2` of each 2x2
    block, averaged over channels. Image content barely reaches these coefficients, so on photographs the estimate
    follows the noise (a noise-free photo gives about 0).

    Args:
        images (`torch.Tensor` of shape `(batch, channels, height, width)`): images of at least 2 x 2 pixels.

    Returns:
        `torch.Tensor` of shape `(batch,)`, float32.
    """
    if images.ndim != 4 or images.shape[-2] < 2 or images.shape[-1] < 2:
        raise ValueError(f"`images` must have shape (batch, channels, height >= 2, width >= 2), got {tuple(images.shape)}.")
    height, width = (images.shape[-2] // 2) * 2, (images.shape[-1] // 2) * 2
    blocks = images[..., :height, :width].float()
    diagonal = (blocks[..., 0::2, 0::2] - blocks[..., 0::2, 1::2] - blocks[..., 1::2, 0::2] + blocks[..., 1::2, 1::2]) / 2
    return (diagonal.abs().flatten(2).median(dim=2).values / 0.6745).mean(dim=1)


def estimate_blockiness(images: torch.Tensor, block: int = 8) -> torch.Tensor:
    """JPEG blockiness of each image: the mean absolute luma step across the `block`-pixel grid (between columns
    `block * k - 1` and `block * k`, and the same for rows) divided by the mean step elsewhere, minus 1. About 0 for
    an uncompressed photo, larger the coarser the JPEG quantisation (the grid is the one JPEG uses when the image
    starts at its top-left pixel).

    Args:
        images (`torch.Tensor` of shape `(batch, channels, height, width)`): images of at least `block + 1` pixels
            per side, on any scale.

    Returns:
        `torch.Tensor` of shape `(batch,)`, float32.
    """
    if images.ndim != 4 or min(images.shape[-2:]) <= block:
        raise ValueError(f"`images` must have shape (batch, channels, height > {block}, width > {block}), got "
                         f"{tuple(images.shape)}.")
    luma = images.float().mean(dim=1)
    across_columns = (luma[..., :, 1:] - luma[..., :, :-1]).abs()
    across_rows = (luma[..., 1:, :] - luma[..., :-1, :]).abs()
    on_columns = torch.arange(across_columns.shape[-1], device=images.device) % block == block - 1
    on_rows = torch.arange(across_rows.shape[-2], device=images.device) % block == block - 1
    on_grid = across_columns[..., on_columns].mean(dim=(-1, -2)) + across_rows[..., on_rows, :].mean(dim=(-1, -2))
    off_grid = across_columns[..., ~on_columns].mean(dim=(-1, -2)) + across_rows[..., ~on_rows, :].mean(dim=(-1, -2))
    return on_grid / (off_grid + 1e-3) - 1.0


def _haar_detail(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean absolute Haar detail (the three orientations) of each image, and the 2 x 2 block means."""
    height, width = (images.shape[-2] // 2) * 2, (images.shape[-1] // 2) * 2
    blocks = images[..., :height, :width]
    a, b = blocks[..., 0::2, 0::2], blocks[..., 0::2, 1::2]
    c, d = blocks[..., 1::2, 0::2], blocks[..., 1::2, 1::2]
    detail = ((a - b + c - d).abs() + (a + b - c - d).abs() + (a - b - c + d).abs()) / 2
    return detail.mean(dim=(-1, -2, -3)), (a + b + c + d) / 4


def estimate_detail_ratio(images: torch.Tensor) -> torch.Tensor:
    """The finest-scale detail of each image relative to the next scale's: the mean absolute Haar detail
    coefficients of the image over those of its 2 x 2 block means. Blur and down-up resizing lower it, noise raises it.

    Args:
        images (`torch.Tensor` of shape `(batch, channels, height, width)`): images of at least 4 x 4 pixels.

    Returns:
        `torch.Tensor` of shape `(batch,)`, float32.
    """
    if images.ndim != 4 or min(images.shape[-2:]) < 4:
        raise ValueError(f"`images` must have shape (batch, channels, height >= 4, width >= 4), got {tuple(images.shape)}.")
    finest, means = _haar_detail(images.float())
    coarser, _ = _haar_detail(means)
    return finest / (coarser + 1e-4)


def estimate_degradation_statistics(images: torch.Tensor) -> torch.Tensor:
    """`(batch, 2)`: `estimate_blockiness` and `estimate_detail_ratio` of each image (images of at least 9 x 9 px)."""
    return torch.stack([estimate_blockiness(images), estimate_detail_ratio(images)], dim=1)


class DegradationRemovalModel(SafeWeightsModelMixin, ModelMixin, ConfigMixin):
    r"""
    Pixel-space degradation removal (the first stage of a two-stage restorer); see the module docstring.

    Args:
        in_channels (`int`, defaults to 3): Image channels (RGB).
        block_out_channels (`tuple[int]`, defaults to `(48, 96, 192)`): Width of each resolution level; level `i`
            works at `1 / 2 ** (i + 1)` of the input resolution.
        layers_per_block (`int`, defaults to 2): Residual blocks per level, on the way down and again on the way up
            (the deepest level has `2 * layers_per_block`).
        noise_level_input (`bool`, defaults to False): Give the network the image's noise level (estimated by
            `estimate_noise_level` unless passed to `forward`) as an extra constant input channel.
        noise_level_scale (`float`, defaults to 4.0): That channel's value is the noise level times this (levels up to
            about 0.2 on the [0, 1] scale become values up to about 0.8, the range of the image's own channels).
        statistics_input (`bool`, defaults to False): Give the network the image's degradation statistics
            (`estimate_degradation_statistics`: blockiness and fine-detail ratio, estimated unless passed to
            `forward`) as two more constant input channels, each clamped to [0, 4] and halved.

    Input and output: `(batch, in_channels, height, width)` images in [0, 1] (any height and width).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (48, 96, 192),
        layers_per_block: int = 2,
        noise_level_input: bool = False,
        noise_level_scale: float = 4.0,
        statistics_input: bool = False,
    ):
        super().__init__()
        if len(block_out_channels) < 1 or any(c < 1 for c in block_out_channels):
            raise ValueError(f"`block_out_channels` must be a non-empty list of positive widths, got {block_out_channels}.")
        if layers_per_block < 1:
            raise ValueError(f"`layers_per_block` must be >= 1, got {layers_per_block}.")
        widths = list(block_out_channels)
        extra_channels = int(noise_level_input) + 2 * int(statistics_input)
        self.conv_in = nn.Conv2d((in_channels + extra_channels) * 4, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for level, width in enumerate(widths):
            self.down_blocks.append(nn.Sequential(*[_ResBlock(width) for _ in range(layers_per_block)]))
            if level + 1 < len(widths):
                self.downsamplers.append(nn.Conv2d(width, widths[level + 1], 2, stride=2))
        self.mid_block = nn.Sequential(*[_ResBlock(widths[-1]) for _ in range(layers_per_block)])
        self.upsamplers = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths) - 1)):
            self.upsamplers.append(nn.Conv2d(widths[level + 1], widths[level] * 4, 1))  # then pixel-shuffle 2
            self.up_blocks.append(nn.Sequential(*[_ResBlock(widths[level]) for _ in range(layers_per_block)]))
        self.conv_out = nn.Conv2d(widths[0], in_channels * 4, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded internally to a multiple of this many pixels per side."""
        return 2 ** len(self.config.block_out_channels)

    def image_conditioning(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image-level inputs of this model estimated from whole images `(batch, in_channels, H, W)`:
        `{"noise_level": ..., "statistics": ...}` as configured (empty without them), to pass to `forward` for each
        tile of those images."""
        conditioning = {}
        if self.config.noise_level_input:
            conditioning["noise_level"] = estimate_noise_level(sample)
        if self.config.get("statistics_input", False):
            conditioning["statistics"] = estimate_degradation_statistics(sample)
        return conditioning

    def forward(
        self, sample: torch.Tensor, noise_level: torch.Tensor | None = None, statistics: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            sample (`torch.Tensor` of shape `(batch, in_channels, height, width)`): degraded images in [0, 1].
            noise_level (`torch.Tensor` of shape `(batch,)`, *optional*): With `noise_level_input`, each image's noise
                level on the [0, 1] scale; estimated from `sample` when not given (give it for tiles of a larger
                image: the whole image's level). Refused without `noise_level_input`.
            statistics (`torch.Tensor` of shape `(batch, 2)`, *optional*): With `statistics_input`, each image's
                `estimate_degradation_statistics`; estimated from `sample` when not given (give the whole image's
                for tiles). Refused without `statistics_input`.

        Returns:
            `torch.Tensor` of the same shape: the restored images (not clamped).
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`sample` must have shape (batch, {self.config.in_channels}, height, width), got {tuple(sample.shape)}."
            )
        height, width = sample.shape[-2:]
        multiple = self.size_multiple
        pad_bottom, pad_right = (-height) % multiple, (-width) % multiple
        padded = sample
        if pad_bottom or pad_right:
            mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"
            padded = F.pad(sample, (0, pad_right, 0, pad_bottom), mode=mode)

        network_input = padded
        if self.config.noise_level_input:
            if noise_level is None:
                noise_level = estimate_noise_level(sample)
            elif noise_level.shape != (sample.shape[0],):
                raise ValueError(f"`noise_level` must have shape ({sample.shape[0]},), got {tuple(noise_level.shape)}.")
            level = (noise_level.to(padded.device, padded.dtype) * self.config.noise_level_scale)[:, None, None, None]
            network_input = torch.cat([padded, level.expand(-1, 1, *padded.shape[-2:])], dim=1)
        elif noise_level is not None:
            raise ValueError("`noise_level` was given to a DegradationRemovalModel without `noise_level_input`.")
        if self.config.get("statistics_input", False):
            if statistics is None:
                statistics = estimate_degradation_statistics(sample)
            elif statistics.shape != (sample.shape[0], 2):
                raise ValueError(f"`statistics` must have shape ({sample.shape[0]}, 2), got {tuple(statistics.shape)}.")
            values = (statistics.to(padded.device, padded.dtype).clamp(0.0, 4.0) / 2)[:, :, None, None]
            network_input = torch.cat([network_input, values.expand(-1, -1, *padded.shape[-2:])], dim=1)
        elif statistics is not None:
            raise ValueError("`statistics` was given to a DegradationRemovalModel without `statistics_input`.")
        hidden_states = self.conv_in(F.pixel_unshuffle(network_input, 2))
        skips = []
        for level, block in enumerate(self.down_blocks):
            hidden_states = block(hidden_states)
            if level < len(self.downsamplers):
                skips.append(hidden_states)
                hidden_states = self.downsamplers[level](hidden_states)
        hidden_states = self.mid_block(hidden_states)
        for upsampler, block in zip(self.upsamplers, self.up_blocks):
            hidden_states = F.pixel_shuffle(upsampler(hidden_states), 2) + skips.pop()
            hidden_states = block(hidden_states)
        residual = F.pixel_shuffle(self.conv_out(hidden_states), 2)
        return (padded + residual)[:, :, :height, :width]
