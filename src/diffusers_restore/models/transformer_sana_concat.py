# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""``ConcatConditionedTransformer``: SANA conditioned on a degraded image by channel concatenation.

The degraded image's latent ``z_cond`` is concatenated to the noisy latent ``x_t`` on the channel axis, and a 1x1
convolution projects the result back to SANA's latent width before SANA runs unchanged::

    input  = concat([x_t, z_cond], dim=1)      # [B, C + C_cond, H, W]
    x_proj = projection(input)                   # Conv2d(C + C_cond, C, 1, bias=False)
    v      = sana(x_proj, text, t)               # [B, C, H, W], the flow-matching velocity

The projection starts as identity on the noisy channels and zero on the condition channels, so at initialisation the
wrapper *is* the wrapped SANA for any condition, and fine-tuning starts from the pretrained text-to-image model (the
channel-space twin of InstructPix2Pix's zero-initialised ``conv_in`` expansion).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from diffusers import ConfigMixin, ModelMixin, SanaTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import logging

logger = logging.get_logger(__name__)

# Every constructor argument of SanaTransformer2DModel, in order. The wrapper's config repeats them so that one
# config.json fully describes the wrapped model (a `**kwargs` signature would lose them on reload).
SANA_CONFIG_KEYS = (
    "in_channels",
    "out_channels",
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "num_cross_attention_heads",
    "cross_attention_head_dim",
    "cross_attention_dim",
    "caption_channels",
    "mlp_ratio",
    "dropout",
    "attention_bias",
    "sample_size",
    "patch_size",
    "norm_elementwise_affine",
    "norm_eps",
    "interpolation_scale",
    "guidance_embeds",
    "guidance_embeds_scale",
    "qk_norm",
    "timestep_scale",
)


class ConcatConditionedTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A [`SanaTransformer2DModel`] that takes a condition latent (the degraded image) concatenated to its input.

    The SANA arguments have the meaning and defaults of [`SanaTransformer2DModel`] (the defaults describe SANA 1.6B);
    the wrapped model is available as `self.transformer`.

    Args:
        condition_channels (`int`, *optional*):
            Channels of the condition latent. Defaults to `in_channels` (the degraded image encoded by the same VAE).

    Weights are stored as `transformer.*` (SANA's own state dict, untouched) and `projection.weight`
    (`[in_channels, in_channels + condition_channels, 1, 1]`).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SanaTransformerBlock", "PatchEmbed", "SanaModulatedNorm"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm", "projection"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 32,
        out_channels: int | None = 32,
        num_attention_heads: int = 70,
        attention_head_dim: int = 32,
        num_layers: int = 20,
        num_cross_attention_heads: int | None = 20,
        cross_attention_head_dim: int | None = 112,
        cross_attention_dim: int | None = 2240,
        caption_channels: int = 2304,
        mlp_ratio: float = 2.5,
        dropout: float = 0.0,
        attention_bias: bool = False,
        sample_size: int = 32,
        patch_size: int = 1,
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        guidance_embeds: bool = False,
        guidance_embeds_scale: float = 0.1,
        qk_norm: str | None = None,
        timestep_scale: float = 1.0,
        condition_channels: int | None = None,
    ) -> None:
        super().__init__()
        if condition_channels is None:
            condition_channels = in_channels
            # keep the config explicit so a saved folder says what it was trained with
            self.register_to_config(condition_channels=condition_channels)
        if condition_channels < 1:
            raise ValueError(f"`condition_channels` must be a positive integer, got {condition_channels}.")

        self.transformer = SanaTransformer2DModel(
            in_channels=in_channels,
            out_channels=out_channels,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_layers=num_layers,
            num_cross_attention_heads=num_cross_attention_heads,
            cross_attention_head_dim=cross_attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            caption_channels=caption_channels,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            guidance_embeds=guidance_embeds,
            guidance_embeds_scale=guidance_embeds_scale,
            qk_norm=qk_norm,
            timestep_scale=timestep_scale,
        )
        self.projection = nn.Conv2d(in_channels + condition_channels, in_channels, kernel_size=1, bias=False)
        self.reset_projection()
        # set by `fuse_projection`: (SANA's original patch-embedding conv, the fused conv)
        self._fused_patch_embed: tuple[nn.Conv2d, nn.Conv2d] | None = None

    # ------------------------------------------------------------------ construction helpers

    @torch.no_grad()
    def reset_projection(self) -> None:
        """Re-initialise the projection: identity on the noisy channels, zero on the condition channels."""
        weight = torch.zeros_like(self.projection.weight)
        channels = self.config.in_channels
        weight[:, :channels, 0, 0] = torch.eye(channels, dtype=weight.dtype, device=weight.device)
        self.projection.weight.copy_(weight)

    @classmethod
    def from_transformer(
        cls, transformer: SanaTransformer2DModel, condition_channels: int | None = None
    ) -> "ConcatConditionedTransformer":
        """Wrap a (pretrained) [`SanaTransformer2DModel`] without copying its weights.

        The returned model holds `transformer` itself (same parameters, same storage), plus a new identity/zero
        projection on `transformer`'s device and dtype, so its output equals `transformer`'s for any condition.

        Args:
            transformer (`SanaTransformer2DModel`): the model to wrap.
            condition_channels (`int`, *optional*): channels of the condition latent; defaults to
                `transformer.config.in_channels`.
        """
        if not isinstance(transformer, SanaTransformer2DModel):
            raise ValueError(
                f"`transformer` must be a diffusers SanaTransformer2DModel, got {type(transformer).__name__}."
            )
        sana_config = {key: transformer.config[key] for key in SANA_CONFIG_KEYS if key in transformer.config}
        # Build the wrapper's SANA on the meta device (no memory, no random init), then put the real one in place.
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = cls(**sana_config, condition_channels=condition_channels)
        model.transformer = transformer
        parameter = next(transformer.parameters())
        channels = model.config.in_channels
        model.projection = nn.Conv2d(
            channels + model.config.condition_channels, channels, kernel_size=1, bias=False
        ).to(device=parameter.device, dtype=parameter.dtype)
        model.reset_projection()
        model.train(transformer.training)
        if getattr(transformer.config, "_name_or_path", None):
            model.register_to_config(_name_or_path=transformer.config._name_or_path)
        return model

    @classmethod
    def from_sana_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        condition_channels: int | None = None,
        **kwargs: Any,
    ) -> "ConcatConditionedTransformer":
        """Load a plain SANA transformer (a folder or Hub repo holding a `SanaTransformer2DModel`) into the wrapper.

        `kwargs` go to `SanaTransformer2DModel.from_pretrained` (`subfolder="transformer"` for a pipeline repo,
        `torch_dtype`, `revision`, `variant`, ...). Example::

            model = ConcatConditionedTransformer.from_sana_pretrained(
                "Efficient-Large-Model/Sana_1600M_1024px_diffusers", subfolder="transformer", torch_dtype=torch.bfloat16
            )
        """
        transformer = SanaTransformer2DModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_transformer(transformer, condition_channels=condition_channels)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a saved `ConcatConditionedTransformer` (see `ModelMixin.from_pretrained` for the arguments).

        A folder that holds a plain `SanaTransformer2DModel` is recognised from its config and wrapped with
        [`~ConcatConditionedTransformer.from_sana_pretrained`] (identity projection), instead of being loaded with
        mismatched weight names.
        """
        config_kwargs = {
            key: kwargs[key]
            for key in ("subfolder", "cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
            if key in kwargs
        }
        config = cls.load_config(pretrained_model_name_or_path, **config_kwargs)
        if config.get("_class_name") == SanaTransformer2DModel.__name__:
            logger.info(
                f"{pretrained_model_name_or_path} holds a plain SanaTransformer2DModel: wrapping it with an identity "
                "condition projection (ConcatConditionedTransformer.from_sana_pretrained)."
            )
            condition_channels = kwargs.pop("condition_channels", None)
            return cls.from_sana_pretrained(pretrained_model_name_or_path, condition_channels, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------ inference-time fusion

    @property
    def is_projection_fused(self) -> bool:
        return self._fused_patch_embed is not None

    @torch.no_grad()
    def fuse_projection(self) -> None:
        """Fold the 1x1 projection into SANA's patch-embedding convolution (inference only).

        Both are linear in the input channels, so `patch_embed(projection(x)) == fused(x)` with
        `fused.weight[o, k] = sum_c patch_embed.weight[o, c] * projection.weight[c, k]` (for every kernel position,
        so any `patch_size` works). Saves one full pass over the latents per step. Undo with `unfuse_projection()`.
        """
        if self.is_projection_fused:
            return
        patch_conv = self.transformer.patch_embed.proj
        projection = self.projection.weight[:, :, 0, 0]  # [C, C + C_cond]
        fused_weight = torch.einsum("ocij,ck->okij", patch_conv.weight.float(), projection.float())
        fused = nn.Conv2d(
            projection.shape[1],
            patch_conv.out_channels,
            kernel_size=patch_conv.kernel_size,
            stride=patch_conv.stride,
            bias=patch_conv.bias is not None,
        ).to(device=patch_conv.weight.device, dtype=patch_conv.weight.dtype)
        fused.weight.copy_(fused_weight.to(patch_conv.weight.dtype))
        if patch_conv.bias is not None:
            fused.bias.copy_(patch_conv.bias)
        fused.requires_grad_(False)
        self.transformer.patch_embed.proj = fused
        self._fused_patch_embed = (patch_conv, fused)

    def unfuse_projection(self) -> None:
        """Restore the separate projection and SANA's original patch embedding after `fuse_projection()`."""
        if self._fused_patch_embed is None:
            return
        self.transformer.patch_embed.proj = self._fused_patch_embed[0]
        self._fused_patch_embed = None

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`ModelMixin.save_pretrained`; refuses a fused model, whose weights no longer match its config."""
        if self.is_projection_fused:
            raise ValueError("The projection is fused into SANA's patch embedding: call `unfuse_projection()` first.")
        super().save_pretrained(save_directory, *args, **kwargs)

    # ------------------------------------------------------------------ LoRA

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """`PeftAdapterMixin.add_adapter`, keeping the condition projection trainable.

        The projection is new (it did not exist in the text-to-image model), so a LoRA fine-tune must train it fully,
        as diffusers' control LoRA scripts do with their expanded input layer. Save it beside the adapter with
        [`~ConcatConditionedTransformer.save_lora_adapter`].
        """
        super().add_adapter(adapter_config, adapter_name=adapter_name)
        self.projection.requires_grad_(True)

    def save_lora_adapter(self, save_directory: str | os.PathLike, adapter_name: str = "default", **kwargs) -> None:
        """Save the LoRA adapter (`pytorch_lora_weights.safetensors`) and the projection
        (`condition_projection.safetensors`), which is fully trained in LoRA runs."""
        from safetensors.torch import save_file

        super().save_lora_adapter(save_directory, adapter_name=adapter_name, **kwargs)
        weight = self.projection.weight.detach().to("cpu").contiguous()
        save_file({"projection.weight": weight}, os.path.join(save_directory, "condition_projection.safetensors"))

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix: str | None = None, **kwargs) -> None:
        """Load a LoRA adapter saved by `save_lora_adapter`, with its `condition_projection.safetensors` if present.

        `prefix` defaults to `None` (diffusers' `PeftAdapterMixin` defaults to `"transformer"`): `save_lora_adapter`
        writes keys relative to this wrapper, which already start with `transformer.` (the wrapped SANA), so the
        diffusers default would strip that and find no module. Pass `prefix="transformer"` for a pipeline LoRA file
        (`SanaRestorationPipeline.save_lora_weights`), whose keys carry the pipeline's component name in front.
        """
        from safetensors.torch import load_file

        kwargs.setdefault("use_safetensors", True)  # never unpickle adapter files
        super().load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix=prefix, **kwargs)
        if isinstance(pretrained_model_name_or_path_or_dict, (str, os.PathLike)):
            path = os.path.join(pretrained_model_name_or_path_or_dict, "condition_projection.safetensors")
            if os.path.isfile(path):
                weight = load_file(path)["projection.weight"]
                if weight.shape != self.projection.weight.shape:
                    raise ValueError(
                        f"{path} holds a projection of shape {tuple(weight.shape)}, but this model's projection is "
                        f"{tuple(self.projection.weight.shape)}."
                    )
                with torch.no_grad():
                    self.projection.weight.copy_(weight)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        condition_latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, height, width)`): the noisy latent `x_t`.
            condition_latents (`torch.Tensor` of shape `(batch, condition_channels, height, width)`): the degraded
                image's latent (scaled like the noisy latent). A batch of 1 is broadcast to `batch`.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, sequence_length, caption_channels)`): text features.
            timestep (`torch.Tensor` of shape `(batch,)`): `sigma * num_train_timesteps` (times `timestep_scale`).
            encoder_attention_mask (`torch.Tensor` of shape `(batch, sequence_length)`, *optional*): 1 = keep.
            attention_kwargs (`dict`, *optional*): passed to SANA (e.g. `{"scale": lora_scale}`).
            return_dict (`bool`): return a `Transformer2DModelOutput` (default) or a tuple.

        Returns:
            `Transformer2DModelOutput` whose `sample` is the predicted velocity, shape
            `(batch, out_channels, height, width)`.
        """
        channels = self.config.in_channels
        condition_channels = self.config.condition_channels
        if hidden_states.ndim != 4 or hidden_states.shape[1] != channels:
            raise ValueError(
                f"`hidden_states` must have shape (batch, {channels}, height, width), got {tuple(hidden_states.shape)}."
            )
        if condition_latents.ndim != 4 or condition_latents.shape[1] != condition_channels:
            raise ValueError(
                f"`condition_latents` must have shape (batch, {condition_channels}, height, width), "
                f"got {tuple(condition_latents.shape)}."
            )
        if condition_latents.shape[2:] != hidden_states.shape[2:]:
            raise ValueError(
                f"`condition_latents` spatial size {tuple(condition_latents.shape[2:])} does not match "
                f"`hidden_states` spatial size {tuple(hidden_states.shape[2:])}."
            )
        batch = hidden_states.shape[0]
        if condition_latents.shape[0] != batch:
            if condition_latents.shape[0] != 1:
                raise ValueError(
                    f"`condition_latents` has batch size {condition_latents.shape[0]}, expected {batch} or 1."
                )
            condition_latents = condition_latents.expand(batch, -1, -1, -1)

        model_input = torch.cat([hidden_states, condition_latents.to(hidden_states.dtype)], dim=1)
        if not self.is_projection_fused:
            model_input = self.projection(model_input.to(self.projection.weight.dtype))

        return self.transformer(
            model_input,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            encoder_attention_mask=encoder_attention_mask,
            attention_kwargs=attention_kwargs,
            return_dict=return_dict,
        )
