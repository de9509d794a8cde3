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

Condition-anchored output (``condition_residual=True``): SANA's output ``r`` is read as the difference between the
condition and the clean latent, ``x0 = z_cond - r``, and returned as the flow-matching velocity that gives that
``x0``::

    v = (x_t - z_cond + r) / sigma          # so that x_t - sigma * v = z_cond - r

with ``sigma = timestep / (1000 * timestep_scale)`` (diffusers' flow-matching timesteps). SANA's output layer starts at
zero, so a new model returns the condition unchanged and training learns only the correction it can make (the way
residual restorers start from the degraded input). Meant for one-step models (sigma = 1); at small sigma the division
amplifies the output's errors in velocity, not in ``x0``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from diffusers import ConfigMixin, ModelMixin, SanaTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin, SanaLoraLoaderMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale, logging

from .safe_weights import SafeWeightsModelMixin, pickle_refusals_explained, weights_loading_kwargs

logger = logging.get_logger(__name__)

#: File that `save_lora_adapter` writes beside the LoRA file when the projection was trained in place (a LoRA run):
#: `{"projection.weight": [in_channels, in_channels + condition_channels, 1, 1]}` (`.bin` with
#: `safe_serialization=False`).
CONDITION_PROJECTION_WEIGHT_NAME = "condition_projection.safetensors"
#: Name of the trained projection in a LoRA state dict relative to this model (`transformer.projection.weight` in a
#: pipeline LoRA file).
PROJECTION_KEY = "projection.weight"
# Hub download arguments of `load_lora_adapter` and the pipeline's `lora_state_dict` that `add_condition_projection`
# uses too.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def add_condition_projection(
    state_dict: dict[str, torch.Tensor],
    source: str | os.PathLike,
    key: str = PROJECTION_KEY,
    use_safetensors: bool | None = None,
    **hub_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """`state_dict` (read from `source`) with the trained projection that
    [`~ConcatConditionedTransformer.save_lora_adapter`] wrote beside it (`condition_projection.safetensors`, else,
    unless `use_safetensors=True`, `condition_projection.bin` through torch's weights-only loader) added as `key`,
    unless `state_dict` already holds a projection or `source` (a folder, a Hub repo id or a single file) has none.

    `hub_kwargs`: `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`.
    The projection has shape `(in_channels, in_channels + condition_channels, 1, 1)`.
    """
    from diffusers.models.model_loading_utils import load_state_dict
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    path = os.fspath(source)
    hub_kwargs = {name: value for name, value in hub_kwargs.items() if name in HUB_KWARGS}
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    if os.path.isfile(path) or any(name.endswith(PROJECTION_KEY) for name in state_dict):
        return state_dict
    names = [CONDITION_PROJECTION_WEIGHT_NAME]
    if use_safetensors is not True:
        names.append(CONDITION_PROJECTION_WEIGHT_NAME.replace(".safetensors", ".bin"))
    for name in names:
        if os.path.isdir(path):
            file = os.path.join(path, subfolder, name)
            if not os.path.isfile(file):
                continue
        else:
            try:
                file = hf_hub_download(path, name, subfolder=subfolder or None, **hub_kwargs)
            except EntryNotFoundError:
                continue
            except LocalEntryNotFoundError:  # offline and not cached: whether the repo has one is unknown
                logger.warning(
                    f"{path}: {name} is neither cached nor downloadable; the LoRA loads without a condition "
                    "projection (the model keeps its own)."
                )
                return state_dict
        return {**state_dict, key: load_state_dict(file)[PROJECTION_KEY]}
    return state_dict


class ConcatConditionedTransformer(SafeWeightsModelMixin, ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A [`SanaTransformer2DModel`] that takes a condition latent (the degraded image) concatenated to its input.

    The SANA arguments have the meaning and defaults of [`SanaTransformer2DModel`] (the defaults describe SANA 1.6B);
    the wrapped model is available as `self.transformer`.

    Args:
        condition_channels (`int`, *optional*):
            Channels of the condition latent. Defaults to `in_channels` (the degraded image encoded by the same VAE).
        condition_residual (`bool`, defaults to False):
            Read SANA's output as `z_cond - x0` and return the velocity of that `x0` (see the module docstring); a new
            model then returns the condition unchanged.

    Weights are stored as `transformer.*` (SANA's own state dict, untouched) and `projection.weight`
    (`[in_channels, in_channels + condition_channels, 1, 1]`).

    The wrapped model may be any SANA transformer: SANA 1.0 and 1.5 (`qk_norm`), 600M to 4.8B, and SANA-Sprint
    (`guidance_embeds=True`, which needs the `guidance` argument of [`~ConcatConditionedTransformer.forward`]).

    **LoRA.** A LoRA run trains the projection fully (it is new: SANA never saw a condition), beside the adapters
    (`add_adapter` keeps it trainable), and [`~ConcatConditionedTransformer.save_lora_adapter`] writes it beside the
    LoRA file. When such an adapter is loaded ([`~ConcatConditionedTransformer.load_lora_adapter`] or the pipeline's
    `load_lora_weights`), the projection becomes a LoRA target of its own: the trained projection `P_a` is loaded as
    an exact full-rank LoRA on the 1x1 convolution (`lora_B` the identity, `lora_A = P_a - P_0`, scale 1), `P_0`
    being the projection's weight at load time. Everything diffusers does to LoRA layers then applies to it unchanged:
    with active adapters `a`, `set_adapters` weights `w_a` and a forward `attention_kwargs["scale"]` `s`, the
    projection in use is `P_0 + sum_a s * w_a * (P_a - P_0)`; `disable_lora` gives `P_0`; `fuse_lora` merges the
    term into `P_0` and `unfuse_lora` takes it out; `delete_adapters` and `unload_lora` drop it (after `fuse_lora`,
    `unload_lora` keeps the merged projection, as it keeps the other merged weights). Limits: `P_0` includes the
    adapters fused when a later one loads, so that one's term is relative to them; a LoRA file saved from a loaded
    adapter holds the projection as its LoRA pair; DoRA adapters cannot carry a projection.
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
        condition_residual: bool = False,
    ) -> None:
        super().__init__()
        if condition_channels is None:
            condition_channels = in_channels
            # keep the config explicit so a saved folder says what it was trained with
            self.register_to_config(condition_channels=condition_channels)
        if condition_residual:
            self._check_condition_residual(in_channels, out_channels, condition_channels)

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
        if condition_residual:
            self.reset_residual_output()
        # set by `fuse_projection`: (SANA's original patch-embedding conv, the fused conv)
        self._fused_patch_embed: tuple[nn.Conv2d, nn.Conv2d] | None = None

    @torch.no_grad()
    def reset_projection(self) -> None:
        """Re-initialise the projection: identity on the noisy channels, zero on the condition channels."""
        weight = torch.zeros_like(self.projection.weight)
        channels = self.config.in_channels
        weight[:, :channels, 0, 0] = torch.eye(channels, dtype=weight.dtype, device=weight.device)
        self.projection.weight.copy_(weight)

    @torch.no_grad()
    def reset_residual_output(self) -> None:
        """Zero SANA's output layer, so that a `condition_residual` model returns the condition unchanged."""
        nn.init.zeros_(self.transformer.proj_out.weight)
        if self.transformer.proj_out.bias is not None:
            nn.init.zeros_(self.transformer.proj_out.bias)

    def enable_condition_residual(self) -> None:
        """Make this model a `condition_residual` one that starts from the condition: the flag is set in its config
        (saved with it) and SANA's output layer zeroed, so it returns the condition latent until trained (a one-step
        model's correction then starts at zero). The rest of the weights (projection, SANA's blocks) are kept."""
        self._check_condition_residual(self.config.in_channels, self.config.out_channels,
                                       self.config.condition_channels)
        self.register_to_config(condition_residual=True)
        self.reset_residual_output()

    @staticmethod
    def _check_condition_residual(in_channels: int, out_channels: int | None, condition_channels: int) -> None:
        if condition_channels != in_channels or (out_channels or in_channels) != in_channels:
            raise ValueError("`condition_residual` needs the condition, input and output latents to have the same "
                             f"channels, got {condition_channels}, {in_channels} and {out_channels}.")

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
        from accelerate import init_empty_weights

        if not isinstance(transformer, SanaTransformer2DModel):
            raise ValueError(
                f"`transformer` must be a diffusers SanaTransformer2DModel, got {type(transformer).__name__}."
            )
        # SANA is built on the meta device (no memory, no random init), then replaced by the real one
        # (a quantized SANA's config also records its quantization, which is no architecture argument)
        sana_config = {
            key: value
            for key, value in transformer.config.items()
            if not key.startswith("_") and key != "quantization_config"
        }
        with init_empty_weights():
            model = cls(**sana_config, condition_channels=condition_channels, condition_residual=False)
        model.transformer = transformer
        parameter = next(transformer.parameters())
        model.projection = nn.Conv2d(
            model.projection.in_channels, model.projection.out_channels, kernel_size=1, bias=False
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
                "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", subfolder="transformer", torch_dtype=torch.bfloat16
            )
        """
        folder = os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        kwargs = weights_loading_kwargs(folder, kwargs)
        transformer = SanaTransformer2DModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_transformer(transformer, condition_channels=condition_channels)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a saved `ConcatConditionedTransformer` (see `ModelMixin.from_pretrained` for the arguments), under the
        package's weight-loading rule (`diffusers_restore.models.safe_weights`).

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
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)  # SafeWeightsModelMixin's


    # ------------------------------------------------------------------ inference-time fusion

    @property
    def is_projection_fused(self) -> bool:
        return self._fused_patch_embed is not None

    @torch.no_grad()
    def fuse_projection(self) -> None:
        """Fold the 1x1 projection into SANA's patch-embedding convolution (inference only).

        Both are linear in the input channels, so `patch_embed(projection(x)) == fused(x)` with
        `fused.weight[o, k] = sum_c patch_embed.weight[o, c] * projection[c, k]` (for every kernel position, so any
        `patch_size` works). Saves one full pass over the latents per step. The projection is folded as it acts now,
        LoRA adapters on it included: after changing adapters, `unfuse_projection()` and fuse again.
        """
        if self.is_projection_fused:
            return
        patch_conv = self.transformer.patch_embed.proj
        weight = self.projection.weight
        # the projection's matrix [C, C + C_cond] as its response to each input channel (exact for a 1x1 conv)
        probe = torch.eye(weight.shape[1], device=weight.device, dtype=weight.dtype)[:, :, None, None]
        projection = self.projection(probe)[:, :, 0, 0].T
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

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        **kwargs: Any,
    ) -> None:
        """[`ModelMixin.save_pretrained`] (its arguments spelled out, so that a pipeline passes them on), refusing a
        fused model: its weights no longer match its config (call `unfuse_projection()` first).
        """
        if self.is_projection_fused:
            raise ValueError("The projection is fused into SANA's patch embedding: call `unfuse_projection()` first.")
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            use_flashpack=use_flashpack,
            **kwargs,
        )

    # ------------------------------------------------------------------ LoRA (see the class docstring)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """`PeftAdapterMixin.add_adapter`, keeping the condition projection trainable (a LoRA run trains it fully, as
        diffusers' control LoRA scripts train their expanded input layer)."""
        super().add_adapter(adapter_config, adapter_name=adapter_name)
        self.projection.requires_grad_(True)

    def save_lora_adapter(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str = "default",
        upcast_before_saving: bool = False,
        safe_serialization: bool = True,
        weight_name: str | None = None,
    ) -> None:
        """`PeftAdapterMixin.save_lora_adapter`, plus the projection when it was trained in place (not loaded as
        this adapter's LoRA pair): `condition_projection.safetensors` (`.bin` with `safe_serialization=False`), key
        `projection.weight`, which [`~ConcatConditionedTransformer.load_lora_adapter`] and the pipeline's
        `load_lora_weights` read back.
        """
        super().save_lora_adapter(
            save_directory,
            adapter_name=adapter_name,
            upcast_before_saving=upcast_before_saving,
            safe_serialization=safe_serialization,
            weight_name=weight_name,
        )
        if adapter_name in getattr(self.projection, "lora_A", {}):
            return  # the LoRA file holds it
        weights = {PROJECTION_KEY: self.projection.weight.detach().to("cpu").contiguous()}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(weights, os.path.join(save_directory, CONDITION_PROJECTION_WEIGHT_NAME))
        else:
            name = CONDITION_PROJECTION_WEIGHT_NAME.replace(".safetensors", ".bin")
            torch.save(weights, os.path.join(save_directory, name))

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        prefix: str | None = "transformer",
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """`PeftAdapterMixin.load_lora_adapter`, with the trained projection loaded as a LoRA on it (see the class
        docstring).

        Accepted: a folder or Hub repo written by [`~ConcatConditionedTransformer.save_lora_adapter`] (the LoRA file
        and `condition_projection.safetensors`, as `examples/train_paired.py --use_lora` writes to
        `transformer_lora/`), or a state dict. Keys may be relative to this model (`transformer.*`,
        `projection.weight`, `projection.lora_*`) or to the wrapped SANA (`transformer_blocks.*`: a text-to-image SANA
        LoRA applies to the wrapped model).

        Args:
            prefix (`str`, *optional*, defaults to `"transformer"`): as in diffusers, the component name in front of
                the keys of a pipeline LoRA file; keys without it are ignored (but for the projection's own,
                `projection.*`), and a warning says so when none has it. This model's own files (keys `transformer.*`,
                the wrapped SANA) load with the default; keys relative to the wrapped SANA need `prefix=None`.
            hotswap, kwargs: as in `PeftAdapterMixin.load_lora_adapter` (`adapter_name`, `weight_name`, `metadata`,
                `use_safetensors`, `low_cpu_mem_usage`, the Hub arguments).
        """
        source = pretrained_model_name_or_path_or_dict
        metadata = kwargs.pop("metadata", None)
        if isinstance(source, dict):
            state_dict = dict(source)
        else:
            fetch_names = (*HUB_KWARGS, "weight_name", "use_safetensors")
            fetch_kwargs = {key: kwargs.pop(key) for key in fetch_names if key in kwargs}
            folder = os.path.join(os.fspath(source), fetch_kwargs.get("subfolder") or "")
            fetch_kwargs = weights_loading_kwargs(folder, fetch_kwargs)
            with pickle_refusals_explained(folder):
                state_dict, file_metadata = SanaLoraLoaderMixin.lora_state_dict(
                    source, return_lora_metadata=True, **fetch_kwargs
                )
                state_dict = add_condition_projection(state_dict, source, **fetch_kwargs)
            metadata = metadata or file_metadata

        if prefix is not None:  # the projection's keys are this model's with or without the prefix
            state_dict = {
                k.removeprefix(f"{prefix}."): v
                for k, v in state_dict.items()
                if k.startswith((f"{prefix}.", "projection."))
            }
            # a pipeline file's metadata is prefixed; a model-level LoraConfig dict (save_lora_adapter) is not
            if metadata and any(k.startswith(f"{prefix}.") for k in metadata):
                metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
        if not state_dict:  # nothing for this model: diffusers warns (with a prefix) and goes on
            return super().load_lora_adapter({}, prefix=prefix, hotswap=hotswap, **kwargs)

        # keys relative to the wrapped SANA get its attribute name in front (SANA has no child named like ours)
        sana_children = {name for name, _ in self.transformer.named_children()}
        state_dict = {
            (f"transformer.{key}" if key.split(".", 1)[0] in sana_children else key): value
            for key, value in state_dict.items()
        }
        projection = state_dict.pop(PROJECTION_KEY, None)
        if projection is not None and not torch.equal(projection.to(self.projection.weight), self.projection.weight):
            metadata = self._add_projection_lora(state_dict, metadata, projection)
        super().load_lora_adapter(state_dict, prefix=None, hotswap=hotswap, metadata=metadata, **kwargs)

    def _add_projection_lora(
        self, state_dict: dict[str, torch.Tensor], metadata: dict | None, projection: torch.Tensor
    ) -> dict | None:
        """Put the trained projection `P_a` into `state_dict` as an exact LoRA pair on `projection` (`lora_B` = I,
        `lora_A = P_a - P_0`, scale 1) and into `metadata` (a `LoraConfig` dict, or `None` to let diffusers infer
        it from the shapes, which also gives scale 1); return the metadata."""
        base = self.projection.weight
        if projection.shape != base.shape:
            raise ValueError(
                f"The LoRA's condition projection has shape {tuple(projection.shape)}, but this model's is "
                f"{tuple(base.shape)} (in_channels={self.config.in_channels}, "
                f"condition_channels={self.config.condition_channels})."
            )
        if (metadata or {}).get("use_dora") or any("lora_magnitude_vector" in key for key in state_dict):
            raise ValueError("A DoRA adapter cannot carry a condition projection (`projection.weight`).")
        rank = base.shape[0]
        state_dict["projection.lora_A.weight"] = projection.float() - base.detach().float().to(projection.device)
        state_dict["projection.lora_B.weight"] = torch.eye(rank)[:, :, None, None]
        if (metadata or {}).get("lora_bias") or any(key.endswith("lora_B.bias") for key in state_dict):
            state_dict["projection.lora_B.bias"] = torch.zeros(rank)
        if metadata is None:
            return None
        metadata = dict(metadata)
        targets = metadata.get("target_modules")
        if isinstance(targets, (list, tuple, set)):
            metadata["target_modules"] = [*targets, "projection"]
        alpha = rank**0.5 if metadata.get("use_rslora") else rank  # scale alpha / r (alpha / sqrt(r) with rsLoRA)
        metadata["rank_pattern"] = {**(metadata.get("rank_pattern") or {}), "^projection": rank}
        metadata["alpha_pattern"] = {**(metadata.get("alpha_pattern") or {}), "^projection": alpha}
        return metadata

    # ------------------------------------------------------------------ forward

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        condition_latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples: tuple[torch.Tensor, ...] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Every argument after `condition_latents` is [`SanaTransformer2DModel.forward`]'s, with its meaning, passed on
        unchanged.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, height, width)`): the noisy latent `x_t`.
            condition_latents (`torch.Tensor` of shape `(batch, condition_channels, height, width)`): the degraded
                image's latent (scaled like the noisy latent). A batch of 1 is broadcast to `batch`.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, sequence_length, caption_channels)`): text features.
            timestep (`torch.Tensor` of shape `(batch,)`): `sigma * num_train_timesteps` (times `timestep_scale`).
            guidance (`torch.Tensor` of shape `(batch,)`, *optional*): the guidance-scale input of a SANA-Sprint
                transformer (`guidance_embeds=True`); required there, unused otherwise.
            encoder_attention_mask (`torch.Tensor` of shape `(batch, sequence_length)`, *optional*): 1 = keep.
            attention_mask (`torch.Tensor` of shape `(batch, height * width)`, *optional*): 1 = keep, over the latent
                tokens.
            attention_kwargs (`dict`, *optional*): passed to SANA; `{"scale": lora_scale}` scales the loaded LoRA
                adapters, the projection's included.
            controlnet_block_samples (`tuple` of `torch.Tensor`, *optional*): per-block residuals of a SANA ControlNet.
            return_dict (`bool`): return a `Transformer2DModelOutput` (default) or a tuple.

        Returns:
            `Transformer2DModelOutput` whose `sample` is the predicted velocity, shape
            `(batch, out_channels, height, width)`.
        """
        # torch would only report the channels of the concatenation, which the caller never built
        expected = (self.config.in_channels, self.config.condition_channels)
        if (hidden_states.shape[1], condition_latents.shape[1]) != expected:
            raise ValueError(
                f"`hidden_states` and `condition_latents` must have {expected[0]} and {expected[1]} channels, got "
                f"{hidden_states.shape[1]} and {condition_latents.shape[1]}."
            )
        condition_latents = condition_latents.expand(hidden_states.shape[0], -1, -1, -1)
        model_input = torch.cat([hidden_states, condition_latents.to(hidden_states.dtype)], dim=1)
        if not self.is_projection_fused:
            model_input = self.projection(model_input.to(self.projection.weight.dtype))

        output = self.transformer(
            model_input,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            guidance=guidance,
            encoder_attention_mask=encoder_attention_mask,
            attention_mask=attention_mask,
            attention_kwargs=attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            return_dict=False,
        )[0]
        if self.config.get("condition_residual", False):
            sigma = timestep.float().reshape(-1, 1, 1, 1) / (1000.0 * self.config.timestep_scale)
            anchored = hidden_states.float() - condition_latents.float() + output.float()
            output = (anchored / sigma.clamp(min=1e-3)).to(output.dtype)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
