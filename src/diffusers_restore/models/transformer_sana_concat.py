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
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffusers import ConfigMixin, ModelMixin, SanaTransformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin, SanaLoraLoaderMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import logging

from .safe_weights import SafetensorsOnlyModelMixin, refuse_pickle, safetensors_only_kwargs

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

#: File that `save_lora_adapter` writes beside `pytorch_lora_weights.safetensors`: the fully trained condition
#: projection, stored as `{"projection.weight": [in_channels, in_channels + condition_channels, 1, 1]}`.
CONDITION_PROJECTION_WEIGHT_NAME = "condition_projection.safetensors"
#: Name of the projection weight in a LoRA state dict relative to this model (a pipeline LoRA file stores it as
#: `transformer.projection.weight`).
PROJECTION_KEY = "projection.weight"
# Hub download arguments shared by `load_lora_adapter`, the pipeline's `lora_state_dict` and the sidecar fetch.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def fetch_condition_projection(
    pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs: Any
) -> torch.Tensor | None:
    """The condition projection saved beside a LoRA adapter by
    [`~ConcatConditionedTransformer.save_lora_adapter`] (`condition_projection.safetensors`), or `None` when the
    folder or Hub repo has no such file.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): the folder or Hub repo id the LoRA file was read from.
            A path to a single weight file has no sidecar (returns `None`).
        hub_kwargs: `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`.

    Returns:
        `torch.Tensor` of shape `(in_channels, in_channels + condition_channels, 1, 1)`, or `None`.
    """
    from safetensors.torch import load_file

    path = os.fspath(pretrained_model_name_or_path)
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        file = os.path.join(path, subfolder, CONDITION_PROJECTION_WEIGHT_NAME)
        if not os.path.isfile(file):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            file = hf_hub_download(
                path,
                CONDITION_PROJECTION_WEIGHT_NAME,
                subfolder=subfolder or None,
                revision=hub_kwargs.get("revision"),
                token=hub_kwargs.get("token"),
                cache_dir=hub_kwargs.get("cache_dir"),
                local_files_only=bool(hub_kwargs.get("local_files_only")),
                force_download=bool(hub_kwargs.get("force_download")),
                proxies=hub_kwargs.get("proxies"),
            )
        except LocalEntryNotFoundError:  # offline, not cached: we cannot tell whether the repo has one
            logger.warning(
                f"{path}: {CONDITION_PROJECTION_WEIGHT_NAME} is not in the local cache and the Hub cannot be reached; "
                "the LoRA loads without a condition projection (the model keeps its own)."
            )
            return None
        except EntryNotFoundError:
            return None
    weights = load_file(file)
    if PROJECTION_KEY not in weights:
        raise ValueError(f"{file} has no `{PROJECTION_KEY}` entry (it holds {sorted(weights)}).")
    return weights[PROJECTION_KEY]


@dataclass
class _LoraProjections:
    """What the loaded LoRA adapters did to the condition projection (see `ConcatConditionedTransformer`'s LoRA
    section): the projection before the first load (`base`), each adapter's trained projection, the adapters'
    weights (`set_adapters`), the active ones, and the coefficients of the fused ones."""

    base: torch.Tensor
    projections: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    fused: dict[str, float] = field(default_factory=dict)
    enabled: bool = True

    def weight(self, scale: float = 1.0, include_unfused: bool = True) -> torch.Tensor:
        """`base + sum_fused c_a (P_a - base) + scale * sum_{active, not fused} w_a (P_a - base)` (just `base` while
        disabled); adapters loaded without a projection contribute nothing. Shape of the projection weight."""
        weight = self.base.clone()
        if not self.enabled:
            return weight
        for name, coefficient in self.fused.items():
            if name in self.projections:
                weight += coefficient * (self.projections[name] - self.base)
        if include_unfused:
            for name in self.active:
                if name in self.projections and name not in self.fused:
                    weight += scale * self.weights.get(name, 1.0) * (self.projections[name] - self.base)
        return weight

    def has_unfused_delta(self) -> bool:
        return self.enabled and any(name in self.projections and name not in self.fused for name in self.active)


class ConcatConditionedTransformer(SafetensorsOnlyModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""
    A [`SanaTransformer2DModel`] that takes a condition latent (the degraded image) concatenated to its input.

    The SANA arguments have the meaning and defaults of [`SanaTransformer2DModel`] (the defaults describe SANA 1.6B);
    the wrapped model is available as `self.transformer`.

    Args:
        condition_channels (`int`, *optional*):
            Channels of the condition latent. Defaults to `in_channels` (the degraded image encoded by the same VAE).

    Weights are stored as `transformer.*` (SANA's own state dict, untouched) and `projection.weight`
    (`[in_channels, in_channels + condition_channels, 1, 1]`), in safetensors only.

    The wrapped model may be any SANA transformer: SANA 1.0 and 1.5 (`qk_norm`), 600M to 4.8B, and SANA-Sprint
    (`guidance_embeds=True`, which needs the `guidance` argument of [`~ConcatConditionedTransformer.forward`]).
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
        # what loaded LoRA adapters did to the projection (see the LoRA section); None until one carries a projection
        self._lora_projection_state: _LoraProjections | None = None

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
                "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", subfolder="transformer", torch_dtype=torch.bfloat16
            )
        """
        kwargs = safetensors_only_kwargs(pretrained_model_name_or_path, kwargs)
        transformer = SanaTransformer2DModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_transformer(transformer, condition_channels=condition_channels)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a saved `ConcatConditionedTransformer` (see `ModelMixin.from_pretrained` for the arguments).

        Weights load from safetensors only (`use_safetensors=True` is always passed; `False` is refused): a folder
        holding only pickled weights gets an error that says how to convert it. A folder that holds a plain
        `SanaTransformer2DModel` is recognised from its config and wrapped with
        [`~ConcatConditionedTransformer.from_sana_pretrained`] (identity projection), instead of being loaded with
        mismatched weight names.
        """
        refuse_pickle(kwargs.get("use_safetensors"), "model weights")  # before anything is read
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
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)  # SafetensorsOnlyModelMixin's


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
        """[`SafetensorsOnlyModelMixin.save_pretrained`] (safetensors only, diffusers' arguments spelled out so that a
        pipeline passes `variant` and `max_shard_size` on), refusing also a fused model (its weights no longer match
        its config: call `unfuse_projection()` first) and `use_flashpack=True`.
        """
        if self.is_projection_fused:
            raise ValueError("The projection is fused into SANA's patch embedding: call `unfuse_projection()` first.")
        if use_flashpack:
            raise ValueError("`use_flashpack=True` is not supported: ConcatConditionedTransformer saves safetensors only.")
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            **kwargs,
        )

    # ------------------------------------------------------------------ LoRA
    #
    # A LoRA run trains the condition projection fully: it is new (SANA never saw a condition), so it cannot be a
    # low-rank update of anything. It travels with the adapter: `save_lora_adapter` writes it beside the LoRA file
    # (`condition_projection.safetensors`), and a pipeline LoRA file (`SanaRestorationPipeline.save_lora_weights`)
    # stores it as `transformer.projection.weight`.
    #
    # Loading an adapter `a` that carries a projection P_a makes `P_a - P_0` that adapter's delta, P_0 being the
    # projection before the first such load. The projection in use is then, like the LoRA layers' own weights,
    #     P = P_0 + sum over the active adapters a of  s * w_a * (P_a - P_0)
    # with w_a the `set_adapters` weight (1 after loading) and s the `attention_kwargs["scale"]` of a forward call.
    # One adapter at weight 1 gives back its trained projection; `disable_lora` gives P_0; `fuse_lora` fixes the
    # fused adapters' terms (s = `lora_scale`) and `unfuse_lora` frees them again; `unload_lora` (the pipeline's
    # `unload_lora_weights`) restores P_0 plus the fused terms only, just as it keeps fused LoRA weights and drops
    # the others. Adapters loaded without a projection contribute nothing to it.

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """`PeftAdapterMixin.add_adapter`, keeping the condition projection trainable.

        The projection is new (it did not exist in the text-to-image model), so a LoRA fine-tune must train it fully,
        as diffusers' control LoRA scripts do with their expanded input layer. Save it beside the adapter with
        [`~ConcatConditionedTransformer.save_lora_adapter`].
        """
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
        """Save the LoRA adapter (`pytorch_lora_weights.safetensors`, keys relative to this model) and the condition
        projection (`condition_projection.safetensors`, key `projection.weight`), which LoRA runs train fully.

        The projection saved is the adapter's own when it was loaded with one, else the model's current projection
        (the one trained beside the adapter). Both files load back with
        [`~ConcatConditionedTransformer.load_lora_adapter`] and with `SanaRestorationPipeline.load_lora_weights`.
        `safe_serialization=False` is refused (adapters load from safetensors only).
        """
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("`safe_serialization=False` is not supported: LoRA adapters are saved as safetensors only.")
        super().save_lora_adapter(
            save_directory,
            adapter_name=adapter_name,
            upcast_before_saving=upcast_before_saving,
            safe_serialization=True,
            weight_name=weight_name,
        )
        state = self._lora_projection_state
        if state is not None and adapter_name in state.projections:
            weight = state.projections[adapter_name].to(self.projection.weight.dtype)
        else:
            weight = self.projection.weight.detach()
        save_file(
            {PROJECTION_KEY: weight.to("cpu").contiguous()},
            os.path.join(save_directory, CONDITION_PROJECTION_WEIGHT_NAME),
        )

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        prefix: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a LoRA adapter and the condition projection that travels with it (see the LoRA notes above).

        Accepted: a folder or Hub repo written by [`~ConcatConditionedTransformer.save_lora_adapter`] (the LoRA file
        and its `condition_projection.safetensors`, as `examples/train_paired.py --use_lora` writes to
        `transformer_lora/`), or a state dict. Keys may be relative to this model (`transformer.*`, `projection.weight`)
        or to the wrapped SANA (`transformer_blocks.*`: a text-to-image SANA LoRA applies to the wrapped model).

        Args:
            pretrained_model_name_or_path_or_dict: folder, Hub repo id or state dict.
            prefix (`str`, *optional*): keep only the keys starting with `prefix.`, without it (also in the
                metadata). Defaults to `None`, where diffusers' `PeftAdapterMixin` defaults to `"transformer"`: this
                model's own keys already start with `transformer.` (the wrapped SANA), and stripping that would find
                no module. Pass `prefix="transformer"` for a pipeline LoRA file, whose keys carry the pipeline's
                component name in front.
            hotswap (`bool`): replace the weights of the already loaded adapter `adapter_name` in place.
            kwargs: `adapter_name`, `weight_name`, `metadata`, `low_cpu_mem_usage`, the Hub arguments (`subfolder`,
                `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`, `proxies`), as in
                `PeftAdapterMixin.load_lora_adapter`. Files load from safetensors only (`use_safetensors=False` is
                refused).
        """
        from diffusers.utils.peft_utils import get_adapter_name

        refuse_pickle(kwargs.pop("use_safetensors", None), "LoRA adapters")
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        weight_name = kwargs.pop("weight_name", None)
        metadata = kwargs.pop("metadata", None)
        source = pretrained_model_name_or_path_or_dict
        projection_key = f"{prefix}.{PROJECTION_KEY}" if prefix else PROJECTION_KEY
        if isinstance(source, dict):
            state_dict, description = dict(source), "The LoRA state dict"
        else:
            state_dict, file_metadata = SanaLoraLoaderMixin.lora_state_dict(
                source, weight_name=weight_name, use_safetensors=True, return_lora_metadata=True, **hub_kwargs
            )
            state_dict, metadata, description = dict(state_dict), metadata or file_metadata, str(source)
            if projection_key not in state_dict:
                projection = fetch_condition_projection(source, **hub_kwargs)
                if projection is not None:
                    state_dict[projection_key] = projection

        if prefix is not None:
            state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
            # a pipeline file's metadata is prefixed too; a model-level LoraConfig dict (save_lora_adapter) is not
            if metadata and any(k.startswith(f"{prefix}.") for k in metadata):
                metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
        projection = state_dict.pop(PROJECTION_KEY, None)
        state_dict = self._to_model_keys(state_dict)
        where = f" under the prefix {prefix!r}" if prefix is not None else ""
        if not state_dict:
            raise ValueError(f"{description} holds no LoRA weights{where} for this model.")
        not_lora = [key for key in state_dict if "lora" not in key]
        if not_lora:
            raise ValueError(
                f"{description} has entries that are neither LoRA weights nor `{PROJECTION_KEY}`: {not_lora[:5]}."
            )
        if projection is not None:
            projection = self._check_projection(projection, description)

        adapter_name = kwargs.pop("adapter_name", None)
        if adapter_name is None:
            adapter_name = get_adapter_name(self)
        super().load_lora_adapter(
            state_dict, prefix=None, hotswap=hotswap, adapter_name=adapter_name, metadata=metadata, **kwargs
        )

        state = self._lora_projection_state
        if projection is not None:
            if state is None:
                state = self._lora_projection_state = _LoraProjections(base=self.projection.weight.detach().float().clone())
            state.projections[adapter_name] = projection
        if state is not None:
            if not hotswap:
                state.weights[adapter_name] = 1.0
            self._sync_lora_projection()

    def _to_model_keys(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keys relative to the wrapped SANA (`transformer_blocks.0...`, as in a text-to-image SANA LoRA or a
        pipeline file read with `prefix`) get this model's `transformer.` in front; keys relative to this model are
        kept. SANA has no child module named `transformer` or `projection`, so the two never collide."""
        sana_children = {name for name, _ in self.transformer.named_children()}
        return {
            (f"transformer.{key}" if key.split(".", 1)[0] in sana_children else key): value
            for key, value in state_dict.items()
        }

    def _check_projection(self, projection: torch.Tensor, description: str) -> torch.Tensor:
        expected = tuple(self.projection.weight.shape)
        if tuple(projection.shape) != expected:
            raise ValueError(
                f"{description} holds a condition projection of shape {tuple(projection.shape)}, but this model's "
                f"projection is {expected} (in_channels={self.config.in_channels}, "
                f"condition_channels={self.config.condition_channels})."
            )
        return projection.detach().float().clone()

    def _active_adapter_names(self) -> list[str]:
        """`active_adapters()` as a list, empty (instead of an error) when no adapter is loaded."""
        if not getattr(self, "_hf_peft_config_loaded", False):
            return []
        active = self.active_adapters()
        return [active] if isinstance(active, str) else list(active or [])

    def _sync_lora_projection(self) -> None:
        """Write the projection the LoRA state asks for (see the LoRA notes) into `projection.weight`."""
        state = self._lora_projection_state
        if state is not None:
            state.active = self._active_adapter_names()
            self._write_projection(state.weight())

    @torch.no_grad()
    def _write_projection(self, weight: torch.Tensor) -> None:
        """Copy `weight` into the projection, re-fusing it into the patch embedding if `fuse_projection()` is in
        effect."""
        fused = self.is_projection_fused
        self.unfuse_projection()
        self.projection.weight.copy_(weight)
        if fused:
            self.fuse_projection()

    def set_adapters(
        self, adapter_names: list[str] | str, weights: float | list[float | None] | None = None
    ) -> None:
        """Activate `adapter_names` with `weights` (one number per adapter or one for all; `None` = 1.0), for the
        LoRA layers and the condition projection alike (see the LoRA notes above).

        As `PeftAdapterMixin.set_adapters`, which is not called: before diffusers 0.36 it looks the model class up by
        name in a table of per-block weight expanders without a default entry (a `KeyError` for this class).
        Per-block (dict) weights are a UNet feature and are refused.
        """
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weight_list = weights if isinstance(weights, list) else [weights] * len(names)
        if len(weight_list) != len(names):
            raise ValueError(
                f"Length of adapter names {len(names)} is not equal to the length of their weights {len(weight_list)}."
            )
        loaded = list(getattr(self, "peft_config", {}))
        missing = [name for name in names if name not in loaded]
        if missing:
            raise ValueError(f"Adapter(s) {missing} are not loaded; loaded adapters: {loaded}.")
        values = []
        for name, weight in zip(names, weight_list):
            weight = 1.0 if weight is None else weight
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"The weight of adapter {name!r} must be a number, got {weight!r}.")
            values.append(float(weight))
        set_weights_and_activate_adapters(self, names, values)
        if self._lora_projection_state is not None:
            self._lora_projection_state.weights.update(zip(names, values))
            self._sync_lora_projection()

    def disable_lora(self) -> None:
        """`PeftAdapterMixin.disable_lora`; the projection goes back to the one before any adapter was loaded. (peft
        unmerges fused layers when they run disabled, so fused adapters count as unfused afterwards.)"""
        super().disable_lora()
        if self._lora_projection_state is not None:
            self._lora_projection_state.enabled = False
            self._lora_projection_state.fused.clear()
            self._sync_lora_projection()

    def enable_lora(self) -> None:
        """`PeftAdapterMixin.enable_lora`; the projection follows the active adapters again."""
        super().enable_lora()
        if self._lora_projection_state is not None:
            self._lora_projection_state.enabled = True
            self._sync_lora_projection()

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        """`PeftAdapterMixin.delete_adapters`; the deleted adapters' projections are dropped too."""
        super().delete_adapters(adapter_names)
        state = self._lora_projection_state
        if state is None:
            return
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            state.projections.pop(name, None)
            state.weights.pop(name, None)
            state.fused.pop(name, None)
        self._sync_lora_projection()

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: list[str] | None = None):
        """`PeftAdapterMixin.fuse_lora`; the fused adapters' projection terms are fixed with them.

        As diffusers does for the LoRA layers (`scale_layer` before merging, never undone), `lora_scale` multiplies
        the weights of all active adapters and stays applied after `unfuse_lora()`.
        """
        super().fuse_lora(lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)
        state = self._lora_projection_state
        if state is None:
            return
        active = self._active_adapter_names()
        for name in active:
            state.weights[name] = state.weights.get(name, 1.0) * lora_scale
        for name in adapter_names if adapter_names is not None else active:
            state.fused[name] = state.weights.get(name, 1.0)
        self._sync_lora_projection()

    def unfuse_lora(self) -> None:
        """`PeftAdapterMixin.unfuse_lora`, safe to call when nothing is fused (layers already unmerged are left
        alone, without peft's "Already unmerged" warning); the projection terms are freed again.

        `SanaRestorationPipeline.unfuse_lora` unmerges the layers itself and then calls this for the projection.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                module.unmerge()
        if self._lora_projection_state is not None:
            self._lora_projection_state.fused.clear()
            self._sync_lora_projection()

    def unload_lora(self) -> None:
        """`PeftAdapterMixin.unload_lora`: removes every adapter. The projection goes back to the one before the
        first adapter was loaded, plus the terms of fused adapters (kept, as their fused LoRA weights are). A
        projection trained in place (`add_adapter` and training, no loading) is the model's own and is kept."""
        super().unload_lora()
        state = self._lora_projection_state
        if state is None:
            return
        self._write_projection(state.weight(include_unfused=False))
        self._lora_projection_state = None

    # ------------------------------------------------------------------ forward

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
                adapters, the condition projection's LoRA term included (see the LoRA section).
            controlnet_block_samples (`tuple` of `torch.Tensor`, *optional*): per-block residuals of a SANA ControlNet.
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
        lora_scale = attention_kwargs.get("scale", 1.0) if attention_kwargs else 1.0
        state = self._lora_projection_state
        scaled = state is not None and lora_scale != 1.0 and state.has_unfused_delta()
        if scaled and self.is_projection_fused:
            raise ValueError(
                "A LoRA scale (`attention_kwargs['scale']`) cannot reach the condition projection while it is fused "
                "into the patch embedding: call `unfuse_projection()` first, or `fuse_lora(lora_scale=...)`."
            )
        if scaled:
            weight = state.weight(scale=lora_scale).to(self.projection.weight)
            model_input = F.conv2d(model_input.to(weight.dtype), weight)
        elif not self.is_projection_fused:
            model_input = self.projection(model_input.to(self.projection.weight.dtype))

        return self.transformer(
            model_input,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            guidance=guidance,
            encoder_attention_mask=encoder_attention_mask,
            attention_mask=attention_mask,
            attention_kwargs=attention_kwargs,
            controlnet_block_samples=controlnet_block_samples,
            return_dict=return_dict,
        )
