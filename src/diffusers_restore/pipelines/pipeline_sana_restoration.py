# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""`SanaRestorationPipeline`: restore a degraded image with SANA conditioned on the image's latent.

One call, in order::

    image -> RGB in [0, 1] -> [degradation removal stage] -> [upscale resize]
          -> pad to a multiple of (VAE factor x patch size) -> VAE encode -> z_lq
    prompt, negative-quality prompt -> Gemma-2 -> embeddings          (cached across calls)
    latents = noise, or (strength < 1) z_lq noised to the first sigma of the remaining schedule
    for each sigma: v = transformer(latents, z_lq, text, t), classifier-free guidance, scheduler.step(v, ..., z_lq)
    -> VAE decode -> [+ fidelity x the cleaned input's detail the VAE cannot carry] -> crop the padding
    -> [colour fix toward the (cleaned) input] -> output

The flow-matching conventions are diffusers': sigma in [0, 1] with sigma = 1 pure noise,
`x_t = (1 - sigma) * x0 + sigma * noise`, the transformer predicts the velocity `v = noise - x0`, and one Euler step
is `x_next = x_t + (sigma_next - sigma) * v`.

Images larger than a tile (by default the transformer's native resolution) are processed in overlapping tiles:
the velocity is predicted per latent tile and blended with smooth weights before the single scheduler step of
each denoising step, and the VAE encodes and decodes tile by tile, so peak memory depends on the tile size only.

A pipeline carries its recommended sampling settings in its config (`sampling_defaults`, saved in
model_index.json): a one-step restorer records one step without guidance, a flow-matching fine-tune its steps and
guidance. Call arguments left at `None` take those values; explicit arguments win.
"""

from __future__ import annotations

import collections
import glob
import importlib
import inspect
import json
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from transformers import Gemma2PreTrainedModel, GemmaTokenizer, GemmaTokenizerFast

from diffusers import (
    AutoencoderDC,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps
from diffusers.utils import BaseOutput, is_torch_xla_available, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..models.degradation_removal import DegradationRemovalModel, estimate_noise_level
from ..models.safe_weights import UNSAFE_WEIGHT_PATTERNS, refuse_pickle, refuse_pickle_only_folder
from ..models.transformer_sana_concat import ConcatConditionedTransformer
from ..models.upscale_decoder import DCUpscaleDecoder
from ..models.vae_latents import decode_latents, encode_latents, unscale_latents, vae_spatial_factor
from ..schedulers.scheduling_restoration_guided_flow import RestorationGuidedFlowScheduler
from .image_processing_restoration import (
    COLOR_FIX_METHODS,
    apply_color_fix,
    blend_tiles,
    images_to_tensor,
    pad_to_multiple,
)

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False

logger = logging.get_logger(__name__)

# The negative-quality prompt (SUPIR's idea, in the short form PASD/SeeSR use): classifier-free guidance then pushes
# away from "degraded", not from "no text".
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, noisy, jpeg artifacts, compression artifacts, lowres, low quality, worst quality, over-smoothed, "
    "oversharpened, dotted, raster lines, watermark, deformed"
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# The call arguments a pipeline may record in its config (`sampling_defaults`), and the values used when neither the
# call nor the config sets them: SanaPipeline's 20 steps and constant guidance 4.5, the scheduler's own restoration
# guidance, and a start from pure noise.
SAMPLING_ARGUMENTS = (
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_start",
    "restoration_guidance",
    "strength",
    "fidelity",
)
FLOW_MATCHING_SAMPLING_DEFAULTS: dict[str, Any] = {"num_inference_steps": 20, "guidance_scale": 4.5}
BUILTIN_SAMPLING_DEFAULTS: dict[str, Any] = {
    **FLOW_MATCHING_SAMPLING_DEFAULTS,
    "guidance_scale_start": None,
    "restoration_guidance": None,
    "strength": 1.0,
    "fidelity": 0.0,
}

_MODEL_COMPONENTS = ("text_encoder", "vae", "transformer", "degradation_removal", "upscale_decoder")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_restore import SanaRestorationPipeline

        >>> # a folder or Hub repo written by `SanaRestorationPipeline.save_pretrained` (e.g. by train_paired.py)
        >>> pipe = SanaRestorationPipeline.from_pretrained("path/or/repo-of-a-sana-restorer", torch_dtype=torch.bfloat16)
        >>> pipe.to("cuda")

        >>> degraded = Image.open("degraded.png")
        >>> # steps and guidance come from the model's own `sampling_defaults` unless given
        >>> restored = pipe(degraded, generator=torch.Generator("cuda").manual_seed(0)).images[0]
        >>> restored.save("restored.png")

        >>> # 2x super-resolution: images above the model's native resolution are tiled automatically
        >>> upscaled = pipe(degraded, upscale=2).images[0]
        ```
"""


def _resize_alphas(alphas: list[torch.Tensor | None], size: tuple[int, int]) -> list[torch.Tensor | None]:
    """Alpha channels `(1, H, W)` (or None) resized bicubically to `size`, clamped to [0, 1]."""
    return [
        None if alpha is None else F.interpolate(alpha[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0.0, 1.0)
        for alpha in alphas
    ]


@dataclass
class SanaRestorationPipelineOutput(BaseOutput):
    """Output of [`SanaRestorationPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The restored images, `num_images_per_prompt` consecutive results per input image: a list of PIL images
            (RGB, or RGBA when the input carried alpha), a float32 `(batch, height, width, 3)` array in [0, 1], a
            float `(batch, 3, height, width)` tensor in [0, 1], or, for `output_type="latent"`, the final latents
            `(batch, channels, height', width')` of the padded image.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class SanaRestorationPipeline(DiffusionPipeline, SanaLoraLoaderMixin):
    r"""
    Image restoration with SANA: a [`ConcatConditionedTransformer`] denoises the clean image's latent conditioned
    on the degraded image's latent, with a restoration-guided flow-matching scheduler.

    This model inherits from [`DiffusionPipeline`]: saving, loading, device placement, offloading and Hub upload work
    as for any diffusers pipeline (`import diffusers_restore` first; `from_pretrained` also accepts a Hub repo id).

    Args:
        tokenizer ([`GemmaTokenizer`] or [`GemmaTokenizerFast`]): the text tokenizer.
        text_encoder ([`Gemma2PreTrainedModel`]): the text encoder (SANA uses Gemma-2-2B's `Gemma2Model`).
        vae ([`AutoencoderDC`]): encodes the degraded image and decodes the result. Any diffusers autoencoder with a
            `scaling_factor` works (`AutoencoderKL`'s latent distribution is read at its mode).
        transformer ([`ConcatConditionedTransformer`]): predicts the flow-matching velocity.
        scheduler ([`RestorationGuidedFlowScheduler`] or any flow-matching scheduler): the sampler. A plain
            [`FlowMatchEulerDiscreteScheduler`] works too, without restoration guidance.
        degradation_removal ([`DegradationRemovalModel`], *optional*): a pixel-space first stage (as in DiffBIR and
            PASD) applied to the degraded image before it is encoded; its output is also the colour-fix reference.
            `examples/train_paired.py --train_degradation_removal` trains it.
        upscale_decoder ([`DCUpscaleDecoder`], *optional*): a decoder whose output is `upscale_factor` times larger
            than the VAE's. A call with that `upscale` then encodes the image at its own size and decodes with it,
            instead of resizing the image first (4x fewer latent pixels to denoise at 2x). `examples/train_decoder.py
            --upscale 2` trains it; `diffusers_restore.install_decoder` adds it to a pipeline folder.
        sampling_defaults (`dict`, *optional*):
            The recommended call of this model: values for `num_inference_steps`, `guidance_scale`,
            `guidance_scale_start`, `restoration_guidance` and `strength`, used when a call leaves them at `None`.
            Stored in the pipeline's config (model_index.json); set it with
            [`~SanaRestorationPipeline.set_sampling_defaults`]. Unset entries fall back to `BUILTIN_SAMPLING_DEFAULTS`.
        direction (`str`, *optional*):
            Set by `from_pretrained` from model_index.json: the direction the folder was saved with. A folder saved
            by [`SanaDegradationPipeline`] ("degrade") is refused here with a message naming that class, and the
            other way round. Folders saved before directions were recorded are restorers.

    A pipeline may be built with only some components (e.g. only `tokenizer` and `text_encoder` to encode prompts,
    or without them when prompt embeddings are passed in); each method says which components it needs.
    """

    model_cpu_offload_seq = "text_encoder->degradation_removal->transformer->vae->upscale_decoder"
    _optional_components = ["tokenizer", "text_encoder", "degradation_removal", "upscale_decoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "condition_latents"]

    # Prompt encoding is SanaPipeline's (Gemma-2, SANA's token selection); these are borrowed, not re-implemented.
    bad_punct_regex = SanaPipeline.bad_punct_regex
    _text_preprocessing = SanaPipeline._text_preprocessing
    _clean_caption = SanaPipeline._clean_caption

    #: Number of prompts whose embeddings are kept between calls (least recently used dropped first); 0 disables.
    prompt_cache_size: int = 32
    #: What the model was trained to do: "restore" (degraded -> clean) here, "degrade" for `SanaDegradationPipeline`.
    #: Recorded in model_index.json, so that a folder of one direction is never loaded as the other.
    direction: str = "restore"

    def __init__(
        self,
        tokenizer: GemmaTokenizer | GemmaTokenizerFast,
        text_encoder: Gemma2PreTrainedModel,
        vae: AutoencoderDC,
        transformer: ConcatConditionedTransformer,
        scheduler: RestorationGuidedFlowScheduler | FlowMatchEulerDiscreteScheduler,
        degradation_removal: DegradationRemovalModel | None = None,
        sampling_defaults: dict[str, Any] | None = None,
        upscale_decoder: DCUpscaleDecoder | None = None,
        direction: str | None = None,
    ):
        super().__init__()
        if direction is not None and direction != type(self).direction:
            loader = {"restore": "SanaRestorationPipeline", "degrade": "SanaDegradationPipeline"}.get(direction)
            raise ValueError(
                f"This model was trained to {direction!r} images, {type(self).__name__} is for {type(self).direction!r}"
                + (f": load it with {loader}." if loader else "; known directions: 'restore', 'degrade'.")
            )
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            degradation_removal=degradation_removal,
            upscale_decoder=upscale_decoder,
        )
        self.register_to_config(sampling_defaults=self._checked_sampling_defaults(sampling_defaults or {}))
        self.register_to_config(direction=type(self).direction)
        self.vae_scale_factor = vae_spatial_factor(vae) if vae is not None else 32
        self._prompt_cache: collections.OrderedDict = collections.OrderedDict()
        self._prompt_cache_owner: tuple | None = None
        self._prompt_cache_bypass = False

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_sana_pipeline(
        cls,
        sana_pipeline: SanaPipeline,
        condition_channels: int | None = None,
        scheduler=None,
    ) -> "SanaRestorationPipeline":
        """Build an (untrained) restoration pipeline from a text-to-image [`SanaPipeline`], sharing its modules.

        The transformer is wrapped with [`ConcatConditionedTransformer.from_transformer`] (identity on the noisy
        latent, zero on the condition: it reproduces SANA exactly until fine-tuned), and the scheduler becomes a
        [`RestorationGuidedFlowScheduler`] with SANA's flow shift (`flow_shift` of SANA's DPM-Solver, 3.0 for the
        512/1024 px checkpoints), unless `scheduler` is given. No weight is copied. The pipeline records
        flow-matching sampling defaults (`FLOW_MATCHING_SAMPLING_DEFAULTS`: 20 steps, constant guidance 4.5, as
        SanaPipeline); a fine-tune records its own (see `set_sampling_defaults`).

        Args:
            sana_pipeline ([`SanaPipeline`]): the base pipeline (`tokenizer`, `text_encoder`, `vae`, `transformer`,
                `scheduler`).
            condition_channels (`int`, *optional*): channels of the condition latent; defaults to the VAE's latent
                channels.
            scheduler (*optional*): a scheduler to use instead of the converted one.
        """
        if not isinstance(sana_pipeline, SanaPipeline):
            raise ValueError(
                f"`sana_pipeline` must be a diffusers SanaPipeline, got {type(sana_pipeline).__name__}."
            )
        if scheduler is None:
            scheduler = cls._convert_scheduler(sana_pipeline.scheduler)
        transformer = ConcatConditionedTransformer.from_transformer(
            sana_pipeline.transformer, condition_channels=condition_channels
        )
        return cls(
            tokenizer=sana_pipeline.tokenizer,
            text_encoder=sana_pipeline.text_encoder,
            vae=sana_pipeline.vae,
            transformer=transformer,
            scheduler=scheduler,
            sampling_defaults=dict(FLOW_MATCHING_SAMPLING_DEFAULTS),
        )

    @staticmethod
    def _convert_scheduler(sana_scheduler) -> RestorationGuidedFlowScheduler:
        """SANA's scheduler (DPM-Solver with `flow_shift`, or flow-matching Euler with `shift`) -> restoration one."""
        return RestorationGuidedFlowScheduler.from_sana_config(dict(sana_scheduler.config))

    @classmethod
    def from_pretrained_sana(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        condition_channels: int | None = None,
        scheduler=None,
        **kwargs: Any,
    ) -> "SanaRestorationPipeline":
        """Load a plain SANA text-to-image checkpoint (Hub id or folder) and turn it into an untrained restorer.

        `kwargs` go to `SanaPipeline.from_pretrained` (`torch_dtype`, `revision`, `variant`, ...). See
        [`~SanaRestorationPipeline.from_sana_pipeline`]. Example::

            pipe = SanaRestorationPipeline.from_pretrained_sana(
                "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", torch_dtype=torch.bfloat16
            )
        """
        refuse_pickle(kwargs.get("use_safetensors"), "pipeline weights")
        kwargs["use_safetensors"] = True
        sana_pipeline = SanaPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_sana_pipeline(sana_pipeline, condition_channels=condition_channels, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a pipeline saved by `save_pretrained` from a local folder or a Hub repo id.

        Accepts the arguments of [`DiffusionPipeline.from_pretrained`]. A repo id is first fetched with
        `huggingface_hub.snapshot_download` (`revision`, `token`, `cache_dir`, `local_files_only`, `force_download`
        are honoured; pickled weight files are never downloaded) and then loaded like a folder: diffusers' own
        download step refuses `model_index.json` entries that name a component class from outside diffusers and
        transformers, such as this package's transformer and scheduler. The component modules named in
        `model_index.json` that belong to `diffusers_restore` are imported before loading.

        A plain SANA checkpoint is refused with a pointer to [`~SanaRestorationPipeline.from_pretrained_sana`],
        unless a `transformer` is passed explicitly.

        Weights load from safetensors only (`use_safetensors=False` is refused). Before anything is loaded, the folder
        is checked and a `ValueError` names what is broken: an unreadable `model_index.json`, a component subfolder
        that is missing, a truncated or corrupt `.safetensors` file, or a component with pickled weights only
        (`*.bin`, `*.pt`, ...: convert them with `save_pretrained(..., safe_serialization=True)` in a trusted
        environment; this package never unpickles).
        """
        refuse_pickle(kwargs.get("use_safetensors"), "pipeline weights")
        kwargs["use_safetensors"] = True
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            proxies = kwargs.pop("proxies", None)
            if proxies:
                logger.warning("`proxies` is not supported by huggingface_hub's snapshot_download and is ignored.")
            path = snapshot_download(
                path,
                revision=kwargs.pop("revision", None),
                token=kwargs.pop("token", None),
                cache_dir=kwargs.pop("cache_dir", None),
                local_files_only=bool(kwargs.pop("local_files_only", False)),
                force_download=kwargs.pop("force_download", False),
                ignore_patterns=list(UNSAFE_WEIGHT_PATTERNS),
            )
        else:
            for key in ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies"):
                kwargs.pop(key, None)  # meaningless for a folder; diffusers would warn about some of them

        model_index = cls._read_model_index(path)
        cls._import_component_modules(model_index)
        if model_index.get("_class_name") == SanaPipeline.__name__ and "transformer" not in kwargs:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a text-to-image SanaPipeline, not a restoration pipeline. "
                "Build an untrained restorer from it with `SanaRestorationPipeline.from_pretrained_sana(...)`, or "
                "pass `transformer=ConcatConditionedTransformer.from_pretrained(...)`."
            )
        cls._check_pipeline_folder(path, model_index, passed=set(kwargs))
        pipeline = super().from_pretrained(path, **kwargs)
        if pipeline.transformer is not None and not isinstance(pipeline.transformer, ConcatConditionedTransformer):
            raise ValueError(
                f"The transformer loaded from {pretrained_model_name_or_path} is a "
                f"{type(pipeline.transformer).__name__}, not a ConcatConditionedTransformer."
            )
        return pipeline

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs: Any):
        """[`DiffusionPipeline.save_pretrained`] (same arguments: `variant`, `max_shard_size`, `push_to_hub`, ...),
        in safetensors only: `safe_serialization=False` is refused."""
        if not safe_serialization:
            raise ValueError(
                "`safe_serialization=False` is not supported: SanaRestorationPipeline saves weights as safetensors "
                "only, the only format it loads."
            )
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)

    @staticmethod
    def _read_model_index(path: str) -> dict[str, Any]:
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            raise ValueError(f"{path} has no model_index.json: it is not a saved pipeline.")
        try:
            with open(index_file, encoding="utf-8") as handle:
                model_index = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{index_file} is not valid JSON ({error}): the pipeline folder is damaged. Save the pipeline again "
                "or download a fresh copy."
            ) from None
        if not isinstance(model_index, dict):
            raise ValueError(f"{index_file} does not hold a JSON object: the pipeline folder is damaged.")
        return model_index

    @staticmethod
    def _check_pipeline_folder(path: str, model_index: dict[str, Any], passed: set[str]) -> None:
        """Raise a `ValueError` naming the first broken part of a pipeline folder (components passed as arguments
        are not checked): a missing component subfolder, a model component without safetensors weights (pickled
        ones only, or none), or a `.safetensors` file whose header or length is damaged (e.g. a truncated copy)."""
        from safetensors import safe_open

        for name, value in model_index.items():
            if name.startswith("_") or name in passed or not isinstance(value, (list, tuple)) or len(value) != 2:
                continue
            if value[0] is None:  # saved as None (an optional component that was not set)
                continue
            folder = os.path.join(path, name)
            if not os.path.isdir(folder):
                raise ValueError(
                    f"{path}: model_index.json lists the component '{name}' ({value[1]}) but the folder has no "
                    f"{name}/ subfolder: the pipeline folder is incomplete."
                )
            safetensors_files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            for file in safetensors_files:
                try:
                    with safe_open(file, framework="pt"):
                        pass
                except Exception as error:  # SafetensorError, OSError: unreadable, truncated or not safetensors
                    raise ValueError(
                        f"{file} is damaged ({error}); it may be a truncated copy. Save or download the pipeline "
                        "again."
                    ) from None
            if name in _MODEL_COMPONENTS and not safetensors_files:
                refuse_pickle_only_folder(folder)
                raise ValueError(f"{folder} has no weights (*.safetensors): the pipeline folder is incomplete.")

    @staticmethod
    def _import_component_modules(model_index: dict[str, Any]) -> None:
        """Import this package's modules named as component libraries (diffusers only resolves loaded modules).

        Only `diffusers_restore.*` names are imported: a downloaded index must not choose what code runs.
        """
        for value in model_index.values():
            if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
                if value[0].startswith(f"{__package__.split('.')[0]}."):
                    importlib.import_module(value[0])

    # ---------------------------------------------------------------------------------------------------- LoRA
    # A restoration LoRA carries the condition projection that LoRA runs train fully: as
    # `transformer.projection.weight` in a pipeline LoRA file (`save_lora_weights`), in
    # `condition_projection.safetensors` beside the LoRA file of a `ConcatConditionedTransformer.save_lora_adapter`
    # folder (what `examples/train_paired.py --use_lora` writes to `transformer_lora/`). The transformer loads it as a
    # LoRA of its own on the projection, so `set_adapters`, `fuse_lora`, `unfuse_lora`, `disable_lora`,
    # `delete_adapters` and `unload_lora_weights` treat it as they treat the other LoRA layers (see
    # `ConcatConditionedTransformer`).

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """[`SanaLoraLoaderMixin.lora_state_dict`], plus `transformer.projection.weight` from
        `condition_projection.safetensors` when the folder or Hub repo has one and the LoRA file holds no
        projection."""
        from ..models.transformer_sana_concat import PROJECTION_KEY, add_condition_projection

        return_metadata = kwargs.pop("return_lora_metadata", False)
        state_dict, metadata = super().lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not isinstance(pretrained_model_name_or_path_or_dict, dict):
            key = f"{cls.transformer_name}.{PROJECTION_KEY}"
            state_dict = add_condition_projection(state_dict, pretrained_model_name_or_path_or_dict, key, **kwargs)
        return (state_dict, metadata) if return_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """[`SanaLoraLoaderMixin.load_lora_weights`], for a pipeline LoRA file, a `save_lora_adapter` folder such as
        the training script's `<output_dir>/transformer_lora`, a Hub repo holding either, or a state dict; besides
        LoRA weights, the state dict may hold the trained `transformer.projection.weight`."""
        from ..models.transformer_sana_concat import PROJECTION_KEY

        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", True)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        state_dict, metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, **kwargs
        )
        if not all("lora" in key or key.endswith(PROJECTION_KEY) for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint. Make sure all LoRA param names contain `'lora'` substring.")
        self.load_lora_into_transformer(
            state_dict,
            transformer=self.transformer,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def load_lora_into_transformer(
        cls,
        state_dict,
        transformer,
        adapter_name=None,
        _pipeline=None,
        low_cpu_mem_usage=False,
        hotswap: bool = False,
        metadata=None,
    ):
        """[`SanaLoraLoaderMixin.load_lora_into_transformer`], passing the `transformer` prefix that the wrapper's
        `load_lora_adapter` does not assume (its own keys start with `transformer.`)."""
        transformer.load_lora_adapter(
            state_dict,
            prefix=cls.transformer_name,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | torch.nn.Module | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        condition_projection: torch.Tensor | torch.nn.Module | None = None,
    ) -> None:
        """[`SanaLoraLoaderMixin.save_lora_weights`], plus the trained condition projection.

        Args:
            condition_projection (`torch.Tensor` of shape `(in_channels, in_channels + condition_channels, 1, 1)` or
                the `nn.Conv2d`, *optional*): the projection trained with the adapter (`pipe.transformer.projection`
                after a LoRA run), saved as `transformer.projection.weight`. Not needed when `transformer_lora_layers`
                already hold it (as `projection.weight`, or as the LoRA pair of a loaded adapter).
        """
        from ..models.transformer_sana_concat import PROJECTION_KEY

        layers = transformer_lora_layers
        if condition_projection is not None:
            layers = layers.state_dict() if isinstance(layers, torch.nn.Module) else dict(layers or {})
            if isinstance(condition_projection, torch.nn.Module):
                condition_projection = condition_projection.weight
            layers[PROJECTION_KEY] = condition_projection.detach()
        super().save_lora_weights(
            save_directory,
            transformer_lora_layers=layers,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
            transformer_lora_adapter_metadata=transformer_lora_adapter_metadata,
        )

    # -------------------------------------------------------------------------------------------- VAE tiling

    def enable_vae_tiling(self, **kwargs: Any) -> None:
        """Turn on the VAE's own tiling (`vae.enable_tiling(**kwargs)`), used inside every VAE call.

        Independent of the pipeline's `tile_size`, which already tiles large images at the pipeline level.
        """
        self.vae.enable_tiling(**kwargs)

    def disable_vae_tiling(self) -> None:
        """Turn off the VAE's own tiling (`vae.disable_tiling()`)."""
        self.vae.disable_tiling()

    # ----------------------------------------------------------------------------------------- prompt encoding

    def clear_prompt_cache(self) -> None:
        """Forget all cached prompt embeddings."""
        self._prompt_cache.clear()
        self._prompt_cache_owner = None

    def _prompt_cache_active(self) -> bool:
        """Whether cached embeddings may be used, resetting the cache when the text encoder has changed."""
        encoder = getattr(self, "text_encoder", None)
        if self.prompt_cache_size <= 0 or encoder is None or self._prompt_cache_bypass or torch.is_grad_enabled():
            return False
        if getattr(encoder, "peft_config", None) or getattr(encoder, "_hf_peft_config_loaded", False):
            return False  # adapters can be switched or rescaled in place
        # Entries belong to one text encoder and tokenizer (held weakly: a replaced encoder must be freeable) and to
        # one state of its weights: in-place updates (load_state_dict, training) bump the version counters.
        version = sum(parameter._version for parameter in encoder.parameters())
        owner = self._prompt_cache_owner
        if owner is None or owner[0]() is not encoder or owner[1]() is not self.tokenizer or owner[2] != version:
            self._prompt_cache.clear()
            tokenizer_ref = weakref.ref(self.tokenizer) if self.tokenizer is not None else (lambda: None)
            self._prompt_cache_owner = (weakref.ref(encoder), tokenizer_ref, version)
        return True

    def _get_gemma_prompt_embeds(
        self,
        prompt: str | list[str],
        device: torch.device,
        dtype: torch.dtype,
        clean_caption: bool = False,
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[`SanaPipeline._get_gemma_prompt_embeds`] with a per-prompt LRU cache.

        Returns `(embeds, mask)` of shapes `(batch, max_sequence_length, hidden)` and `(batch, max_sequence_length)`:
        SANA's token selection (the first token and the last `max_sequence_length - 1`) is applied here, which
        makes the selection in `encode_prompt` an identity and keeps cache entries short when a complex human
        instruction is prepended. Only prompts missing from the cache reach the text encoder, once each.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        selection = [0] + list(range(-max_sequence_length + 1, 0))

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, mask = SanaPipeline._get_gemma_prompt_embeds(
                self, texts, device, dtype, clean_caption, max_sequence_length, complex_human_instruction
            )
            return embeds[:, selection], mask[:, selection]

        if not self._prompt_cache_active():
            return encode(prompts)

        instruction = tuple(complex_human_instruction) if complex_human_instruction else None
        settings = (max_sequence_length, instruction, bool(clean_caption), str(torch.device(device)), dtype)
        missing = list(dict.fromkeys(p for p in prompts if (p, *settings) not in self._prompt_cache))
        if missing:
            embeds, mask = encode(missing)
            for index, text in enumerate(missing):
                self._prompt_cache[(text, *settings)] = (embeds[index].detach().clone(), mask[index].clone())
        rows = []
        for text in prompts:
            key = (text, *settings)
            self._prompt_cache.move_to_end(key)
            rows.append(self._prompt_cache[key])
        while len(self._prompt_cache) > max(self.prompt_cache_size, len(set(prompts))):
            self._prompt_cache.popitem(last=False)
        return torch.stack([row[0] for row in rows]), torch.stack([row[1] for row in rows])

    def encode_prompt(
        self,
        prompt: str | list[str],
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] = "",
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        clean_caption: bool = False,
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """[`SanaPipeline.encode_prompt`] (same arguments and returns), with cached embeddings for repeated prompts.

        Returns `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`,
        embeddings of shape `(batch * num_images_per_prompt, max_sequence_length, hidden)`; the negative ones are
        `None` without classifier-free guidance. `negative_prompt=None` is the empty negative prompt. Needs only the
        `tokenizer` and `text_encoder` components (a pipeline built with the others set to `None` works). The cache is skipped while a LoRA scale is applied to the text
        encoder, when gradients are enabled, and when the text encoder carries adapters; it is reset whenever the
        text encoder or tokenizer object changes or its weights are modified in place (see `clear_prompt_cache`).
        """
        if negative_prompt is None:
            negative_prompt = ""
        needs_text_encoder = prompt_embeds is None or (do_classifier_free_guidance and negative_prompt_embeds is None)
        if needs_text_encoder and (getattr(self, "text_encoder", None) is None or getattr(self, "tokenizer", None) is None):
            raise ValueError(
                "Encoding a prompt needs the pipeline's `tokenizer` and `text_encoder`, and this pipeline has "
                f"{'no tokenizer' if getattr(self, 'tokenizer', None) is None else 'no text_encoder'}. Pass "
                "`prompt_embeds` / `prompt_attention_mask` (and `negative_prompt_embeds` / "
                "`negative_prompt_attention_mask` for classifier-free guidance) instead, computed with a pipeline "
                "that has them (`encode_prompt`)."
            )
        self._prompt_cache_bypass = lora_scale is not None
        try:
            return SanaPipeline.encode_prompt(
                self,
                prompt,
                do_classifier_free_guidance=do_classifier_free_guidance,
                negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt,
                device=device,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                prompt_attention_mask=prompt_attention_mask,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                clean_caption=clean_caption,
                max_sequence_length=max_sequence_length,
                complex_human_instruction=complex_human_instruction,
                lora_scale=lora_scale,
            )
        finally:
            self._prompt_cache_bypass = False

    # -------------------------------------------------------------------------------------------- properties

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the current step. A `callback_on_step_end` may change
        `pipe._guidance_scale`; the new value holds from the next step on (it also replaces a linear schedule)."""
        return self._guidance_scale

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current step uses classifier-free guidance: `guidance_scale > 1`."""
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def default_tile_size(self) -> int:
        """Automatic tile size in pixels: the transformer's native resolution (`sample_size` latent pixels; 1024 px
        for SANA 1024 px checkpoints)."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def _patch_size(self) -> int:
        return int(self.transformer.config.patch_size or 1) if self.transformer is not None else 1

    @property
    def size_multiple(self) -> int:
        """Images are padded to a multiple of this many pixels per side: the VAE's factor times the transformer's
        patch size, i.e. one transformer token (32 for SANA with DC-AE f32 and patch size 1)."""
        return self.vae_scale_factor * self._patch_size

    # ------------------------------------------------------------------------------------- sampling defaults

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The values that call arguments left at `None` take: the recorded `sampling_defaults` of this pipeline's
        config over `BUILTIN_SAMPLING_DEFAULTS`."""
        return {**BUILTIN_SAMPLING_DEFAULTS, **(self.config.get("sampling_defaults") or {})}

    def set_sampling_defaults(self, **sampling_defaults: Any) -> None:
        """Record this model's recommended call in the pipeline's config (saved in model_index.json).

        Keyword arguments among `SAMPLING_ARGUMENTS` (`num_inference_steps`, `guidance_scale`,
        `guidance_scale_start`, `restoration_guidance`, `strength`, `fidelity`), validated as a call validates them; `None`
        removes a recorded value (the built-in default applies again). Other recorded values are kept. Example, a
        one-step restorer::

            pipe.set_sampling_defaults(num_inference_steps=1, guidance_scale=1.0)
            pipe.save_pretrained("my-restorer")   # SanaRestorationPipeline.from_pretrained("my-restorer")(image)
        """
        recorded = {**(self.config.get("sampling_defaults") or {}), **sampling_defaults}
        recorded = {name: value for name, value in recorded.items() if value is not None}
        self.register_to_config(sampling_defaults=self._checked_sampling_defaults(recorded))

    @staticmethod
    def _checked_sampling_defaults(values: Any) -> dict[str, Any]:
        if not isinstance(values, dict):
            raise ValueError(f"`sampling_defaults` must be a dict, got {type(values).__name__}.")
        unknown = sorted(set(values) - set(SAMPLING_ARGUMENTS))
        if unknown:
            raise ValueError(
                f"`sampling_defaults` has unknown entries {unknown}; allowed: {', '.join(SAMPLING_ARGUMENTS)}."
            )
        _check_sampling_values(values, "sampling_defaults")
        return {name: values[name] for name in SAMPLING_ARGUMENTS if values.get(name) is not None}

    def _resolve_sampling_arguments(self, given: dict[str, Any]) -> dict[str, Any]:
        """The sampling arguments of a call: each value of `given` that is `None` comes from `sampling_defaults`.

        One coupling: `guidance_scale_start` is taken from the defaults only when `guidance_scale` is too, so an
        explicit `guidance_scale` alone always means a constant scale (`guidance_scale=1.0`: no guidance at all).
        """
        defaults = self.sampling_defaults
        resolved = {name: defaults[name] if given.get(name) is None else given[name] for name in SAMPLING_ARGUMENTS}
        if given.get("guidance_scale") is not None and given.get("guidance_scale_start") is None:
            resolved["guidance_scale_start"] = None
        return resolved

    def check_call_arguments(self, **call_kwargs: Any) -> None:
        """Validate keyword arguments of `__call__` (any but `image`) exactly as a call would, without running a model.

        Arguments left out take their `__call__` defaults, and the sampling arguments resolve from
        `sampling_defaults`. Raises a `ValueError` naming the first invalid argument; useful to refuse bad settings
        before a batch of images (the `sana-restore` CLI does).
        """
        parameters = inspect.signature(self.__call__).parameters
        unknown = sorted(set(call_kwargs) - set(parameters))
        if unknown:
            raise ValueError(f"{type(self).__name__}.__call__ has no argument(s) {unknown}.")
        arguments = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
        arguments.update(call_kwargs)
        arguments.update(self._resolve_sampling_arguments(arguments))
        check_parameters = inspect.signature(self.check_inputs).parameters
        self.check_inputs(**{name: arguments.get(name) for name in check_parameters})

    # ----------------------------------------------------------------------------------------------- checks

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_inference_steps,
        timesteps,
        sigmas,
        guidance_scale,
        guidance_scale_start,
        restoration_guidance,
        strength,
        fidelity,
        upscale,
        num_images_per_prompt,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        output_type,
        callback_on_step_end_tensor_inputs,
        max_sequence_length,
        color_fix,
        tile_size,
        tile_overlap,
    ) -> None:
        """Raise a `ValueError` naming the first invalid argument (image checks happen while converting).

        The sampling arguments are the resolved ones (see `sampling_defaults`)."""
        for name in ("vae", "transformer", "scheduler"):
            if getattr(self, name, None) is None:
                raise ValueError(
                    f"This pipeline has no `{name}`, which restoring an image needs (it was built or loaded with "
                    f"{name}=None, e.g. to encode prompts only)."
                )
        if timesteps is not None and sigmas is not None:
            raise ValueError("Pass either `timesteps` or `sigmas`, not both.")
        if timesteps is None and sigmas is None:
            _check_sampling_values({"num_inference_steps": num_inference_steps}, "argument")
        else:
            name, values = ("sigmas", sigmas) if sigmas is not None else ("timesteps", timesteps)
            upper = 1.0 if name == "sigmas" else float(self.scheduler.config.get("num_train_timesteps", 1000))
            _check_schedule(name, values, upper)
            schedule_parameters = set(inspect.signature(self.scheduler.set_timesteps).parameters)
            if name not in schedule_parameters:
                raise ValueError(
                    f"`{name}` needs a scheduler whose `set_timesteps` accepts them; {type(self.scheduler).__name__} "
                    "does not."
                )
        _check_sampling_values(
            {
                "guidance_scale": guidance_scale,
                "guidance_scale_start": guidance_scale_start,
                "restoration_guidance": restoration_guidance,
                "strength": strength,
                "fidelity": fidelity,
            },
            "argument",
        )
        if restoration_guidance and "restoration_guidance_tau" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(
                f"`restoration_guidance` needs a RestorationGuidedFlowScheduler; this pipeline's scheduler is a "
                f"{type(self.scheduler).__name__}. Leave it None (or 0), or swap the scheduler with "
                "`RestorationGuidedFlowScheduler.from_config(pipe.scheduler.config)`."
            )
        if not _is_number(upscale) or upscale < 1.0:
            raise ValueError(f"`upscale` must be a number >= 1 (1 = same size), got {upscale!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if color_fix is not None and color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"`color_fix` must be one of {COLOR_FIX_METHODS} or None, got {color_fix!r}.")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` must be a positive integer, got {max_sequence_length!r}.")
        multiple, factor = self.size_multiple, self.vae_scale_factor
        if tile_size is not None:
            if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 0 or tile_size % multiple:
                raise ValueError(
                    f"`tile_size` must be None (automatic), 0 (never tile) or a positive multiple of {multiple} px "
                    f"(the VAE's factor {factor} x the transformer's patch size: one token), got {tile_size!r}."
                )
        if tile_overlap is not None:
            if not isinstance(tile_overlap, int) or isinstance(tile_overlap, bool) or tile_overlap < 0 or tile_overlap % factor:
                raise ValueError(
                    f"`tile_overlap` must be None (a quarter of the tile) or a multiple of {factor} pixels (the VAE's "
                    f"factor), got {tile_overlap!r}."
                )
            effective_tile = self.default_tile_size if tile_size is None else tile_size
            if effective_tile and tile_overlap >= effective_tile:
                raise ValueError(
                    f"`tile_overlap` ({tile_overlap}) must be smaller than the tile size ({effective_tile} px)."
                )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}."
                )

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is not None and not (isinstance(prompt, str) or _is_list_of_str(prompt)):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        if negative_prompt is not None and not (isinstance(negative_prompt, str) or _is_list_of_str(negative_prompt)):
            raise ValueError(
                f"`negative_prompt` must be a string or a list of strings, got {type(negative_prompt).__name__}."
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt_embeds is not None and prompt_attention_mask is None:
            raise ValueError("`prompt_attention_mask` is required with `prompt_embeds`.")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            raise ValueError("`negative_prompt_attention_mask` is required with `negative_prompt_embeds`.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
                )
        has_text_encoder = getattr(self, "text_encoder", None) is not None and getattr(self, "tokenizer", None) is not None
        if not has_text_encoder:
            if prompt_embeds is None:
                raise ValueError(
                    "This pipeline has no tokenizer/text encoder: pass `prompt_embeds` and `prompt_attention_mask` "
                    "(from `encode_prompt` of a pipeline that has them)."
                )
            uses_guidance = guidance_scale > 1 or (guidance_scale_start is not None and guidance_scale_start > 1)
            if uses_guidance and negative_prompt_embeds is None:
                raise ValueError(
                    "`negative_prompt_embeds` is required for classifier-free guidance when the pipeline has no text "
                    "encoder (or set `guidance_scale=1.0`)."
                )

    @staticmethod
    def _prompt_arguments(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """`(prompt, negative_prompt)` as the call uses them: the defaults (`""` and `DEFAULT_NEGATIVE_PROMPT`) step
        aside when embeddings are passed instead, and no prompt at all is the empty prompt."""
        if prompt_embeds is not None and prompt == "":
            prompt = None
        if prompt is None and prompt_embeds is None:
            prompt = ""
        if negative_prompt_embeds is not None and negative_prompt == DEFAULT_NEGATIVE_PROMPT:
            negative_prompt = None
        return prompt, negative_prompt

    def _check_batch(self, batch_size, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> None:
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if isinstance(value, list) and len(value) != batch_size:
                raise ValueError(
                    f"`{name}` has {len(value)} entries but `image` holds {batch_size} image(s): pass one entry per "
                    "image, or a single string for all."
                )
        for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if value is not None and value.shape[0] != batch_size:
                raise ValueError(
                    f"`{name}` has batch size {value.shape[0]} but `image` holds {batch_size} image(s)."
                )

    # -------------------------------------------------------------------------------------------- image side

    def prepare_image(
        self,
        image: PipelineImageInput,
        upscale: float,
        device: torch.device,
        remove_degradations: bool = False,
        tile_size: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Convert `image` (see `__call__`) to RGB `(batch, 3, height * upscale, width * upscale)` in [0, 1] on
        `device`: first cleaned by the `degradation_removal` stage when asked and present (at the input's
        resolution, where the degradation lives), then resized bicubically when `upscale > 1`. Returns it with the
        images' alpha channels (or `None`)."""
        if image is None:
            raise ValueError("`image` is required: the degraded image(s) to restore.")
        pixels, alphas = images_to_tensor(image)
        pixels = pixels.to(device)
        height, width = pixels.shape[-2:]
        if remove_degradations and getattr(self, "degradation_removal", None) is not None:
            pixels = self.remove_degradations(pixels, tile_size)
        if upscale != 1:
            size = (max(1, round(height * upscale)), max(1, round(width * upscale)))
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)
            alphas = _resize_alphas(alphas, size)
        if min(pixels.shape[-2:]) < self.vae_scale_factor:
            raise ValueError(
                f"`image` is too small: {height}x{width} px (x{upscale} = {pixels.shape[-2]}x{pixels.shape[-1]}); "
                f"each side must be at least {self.vae_scale_factor} px after `upscale` (one latent pixel)."
            )
        return pixels, alphas

    @torch.no_grad()
    def remove_degradations(self, pixels: torch.Tensor, tile_size: int | None = None) -> torch.Tensor:
        """Run the `degradation_removal` stage on RGB `(batch, 3, H, W)` pixels in [0, 1]; returns the cleaned
        pixels clamped to [0, 1] (float32). Images larger than the tile (`tile_size` as in `__call__`) are processed in
        overlapping pixel tiles blended like the latent tiles, so memory stays bounded."""
        model = self.degradation_removal
        dtype = next(model.parameters()).dtype
        tile_px = self.default_tile_size if tile_size is None else tile_size
        if tile_px == 0 or max(pixels.shape[-2:]) <= tile_px:
            cleaned = model(pixels.to(dtype)).float()
        else:
            # tiles on the model's own grid (its pixel-unshuffle and strided convolutions), as the whole image is
            multiple = getattr(model, "size_multiple", 1)
            height, width = pixels.shape[-2:]
            padded = pad_to_multiple(pixels, multiple)
            tile = max(tile_px // multiple, 1) * multiple

            # a stage conditioned on the noise level gets the whole image's in every tile
            level = estimate_noise_level(pixels) if model.config.get("noise_level_input") else None

            def clean_tile(top: int, left: int, tile_height: int, tile_width: int) -> torch.Tensor:
                tile_pixels = padded[:, :, top : top + tile_height, left : left + tile_width].to(dtype)
                return (model(tile_pixels) if level is None else model(tile_pixels, noise_level=level)).float()

            cleaned = blend_tiles(clean_tile, padded.shape[-2:], tile, tile // 4, align=multiple)[:, :, :height, :width]
        _check_finite(cleaned, "the degradation removal stage's output", _NON_FINITE_ADVICE)
        return cleaned.clamp(0.0, 1.0)

    def _tiling_plan(self, height: int, width: int, tile_size: int | None, tile_overlap: int | None):
        """`(tile, overlap)` in latent pixels for an image of `height` x `width` padded pixels, or `None` (untiled).

        Tiles are multiples of the transformer's patch size (`check_inputs` checks `tile_size`), and so is the padded
        image, so every tile the transformer sees has whole patches."""
        tile_px = self.default_tile_size if tile_size is None else tile_size
        if tile_px == 0 or max(height, width) <= tile_px:
            return None
        if tile_overlap is None:
            tile_overlap = (tile_px // 4) // self.vae_scale_factor * self.vae_scale_factor
        return tile_px // self.vae_scale_factor, tile_overlap // self.vae_scale_factor

    def _vae_encode(self, pixels: torch.Tensor, tiling) -> torch.Tensor:
        """`(batch, 3, H, W)` in [-1, 1] -> scaled latents `(batch, C, H / f, W / f)` float32, tile by tile when
        `tiling` says so."""
        try:
            if tiling is None:
                return encode_latents(self.vae, pixels)
            tile, overlap = tiling
            factor = self.vae_scale_factor
            grid = (pixels.shape[-2] // factor, pixels.shape[-1] // factor)

            def encode_tile(top: int, left: int, height: int, width: int) -> torch.Tensor:
                rows = slice(top * factor, (top + height) * factor)
                cols = slice(left * factor, (left + width) * factor)
                return encode_latents(self.vae, pixels[:, :, rows, cols])

            return blend_tiles(encode_tile, grid, tile, overlap, align=self._patch_size)
        except torch.OutOfMemoryError:
            warnings.warn(_OOM_ADVICE.format(stage="encoding the image"))
            raise

    def _vae_decode(self, latents: torch.Tensor, tiling, upscale_decoder: bool = False) -> torch.Tensor:
        """Scaled latents -> images `(batch, 3, H, W)` in [0, 1] float32, decoded by the VAE or, with
        `upscale_decoder`, by `self.upscale_decoder` (then `upscale_factor` times larger)."""
        if upscale_decoder:
            decoder, factor = self.upscale_decoder, self.vae_scale_factor * self.upscale_decoder.config.upscale_factor

            def decode(part: torch.Tensor) -> torch.Tensor:
                return decoder(unscale_latents(self.vae, part).to(decoder.dtype), return_dict=False)[0].float()
        else:
            factor = self.vae_scale_factor

            def decode(part: torch.Tensor) -> torch.Tensor:
                return decode_latents(self.vae, part)

        try:
            if tiling is None:
                decoded = decode(latents)
            else:
                tile, overlap = tiling

                def decode_tile(top: int, left: int, height: int, width: int) -> torch.Tensor:
                    return decode(latents[:, :, top : top + height, left : left + width])

                decoded = blend_tiles(decode_tile, latents.shape[-2:], tile, overlap, factor, align=self._patch_size)
        except torch.OutOfMemoryError:
            warnings.warn(_OOM_ADVICE.format(stage="decoding the latents"))
            raise
        return (decoded / 2 + 0.5).clamp(0.0, 1.0)

    def _encode_condition(self, pixels: torch.Tensor, tile_size: int | None, tile_overlap: int | None):
        """Pad RGB `pixels` in [0, 1] to `size_multiple` and encode them: `(latents, tiling)`."""
        padded = pad_to_multiple(pixels, self.size_multiple)
        tiling = self._tiling_plan(padded.shape[-2], padded.shape[-1], tile_size, tile_overlap)
        latents = self._vae_encode(padded * 2.0 - 1.0, tiling)
        _check_finite(latents, "the VAE's encoding of the image", "the VAE weights are broken, or fp16 overflowed")
        return latents, tiling

    def prepare_latents(
        self,
        condition_latents: torch.Tensor,
        start_sigma: float | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Starting latents, float32 shaped like `condition_latents` `(batch, C, h, w)`.

        Given `latents` are used as they are. Otherwise the start is pure noise when `start_sigma` is `None` (the
        whole schedule runs), else the condition noised along the flow path to the first remaining step:
        `(1 - sigma) * condition_latents + sigma * noise` (the scheduler's `scale_noise`).
        """
        shape = tuple(condition_latents.shape)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` must have shape {shape} (batch, channels, padded height / {self.vae_scale_factor}, "
                    f"padded width / {self.vae_scale_factor}), got {tuple(latents.shape)}."
                )
            return latents.to(device=condition_latents.device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but the batch holds {shape[0]} samples "
                "(images x num_images_per_prompt)."
            )
        noise = randn_tensor(shape, generator=generator, device=condition_latents.device, dtype=torch.float32)
        if start_sigma is None:
            return noise
        return (1.0 - start_sigma) * condition_latents + start_sigma * noise

    # ---------------------------------------------------------------------------------------- scheduler side

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """The tail of the schedule that `strength` runs, as in diffusers' img2img pipelines.

        `strength` is the fraction of the `num_inference_steps`-step schedule to run: the first
        `int(num_inference_steps - num_inference_steps * strength)` steps are skipped (and the scheduler told with
        `set_begin_index`). Returns `(timesteps, number of steps that run)`.
        """
        init_timestep = min(num_inference_steps * strength, num_inference_steps)
        t_start = int(max(num_inference_steps - init_timestep, 0))
        order = getattr(self.scheduler, "order", 1)
        timesteps = self.scheduler.timesteps[t_start * order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * order)
        return timesteps, num_inference_steps - t_start

    @staticmethod
    def _scheduled_guidance(sigma: float, sigma_max: float, guidance_scale: float, start: float | None) -> float:
        """Classifier-free guidance scale at `sigma`: constant `guidance_scale`, or with `start` given, SUPIR's linear
        schedule in sigma: `start` at `sigma_max` (the noisiest step) moving to `guidance_scale` as sigma -> 0."""
        if start is None:
            return guidance_scale
        ratio = min(max(sigma / sigma_max, 0.0), 1.0) if sigma_max > 0 else 0.0
        return guidance_scale + (start - guidance_scale) * ratio

    def _velocity(
        self,
        latents: torch.Tensor,
        condition_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """One guided velocity prediction `(batch, C, h, w)` float32; cond + uncond in one batched forward."""
        dtype = self.transformer.dtype
        batch = latents.shape[0]
        if guidance_scale > 1.0:
            model_input = torch.cat([latents, latents])
            condition = torch.cat([condition_latents, condition_latents])
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
        else:
            model_input, condition, embeds, mask = latents, condition_latents, prompt_embeds, prompt_attention_mask
        timesteps = timestep.expand(model_input.shape[0]) * self.transformer.config.timestep_scale
        velocity = self.transformer(
            model_input.to(dtype),
            condition_latents=condition.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            timestep=timesteps,
            encoder_attention_mask=mask,
            attention_kwargs=self.attention_kwargs,
            return_dict=False,
        )[0].float()
        if guidance_scale > 1.0:
            uncond, cond = velocity[:batch], velocity[batch:]
            velocity = uncond + guidance_scale * (cond - uncond)
        return velocity

    # ------------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: PipelineImageInput = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps: int | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        guidance_scale_start: float | None = None,
        restoration_guidance: float | None = None,
        strength: float | None = None,
        fidelity: float | None = None,
        upscale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        color_fix: str | None = "wavelet",
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = None,
    ) -> SanaRestorationPipelineOutput | tuple:
        r"""
        Restore `image`.

        The sampling arguments (`num_inference_steps`, `guidance_scale`, `guidance_scale_start`,
        `restoration_guidance`, `strength`) default to `None`, which takes the value this model records in its
        config (`pipe.sampling_defaults`; e.g. a one-step restorer records one step without guidance); explicit
        values win.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The degraded image(s), any size of at least one latent pixel per side; a batch shares one size (call
                once per size otherwise). PIL: any mode. RGBA/LA/PA (and P with transparency) restore the RGB and
                carry the original alpha, resized with `upscale`, to PIL outputs (RGBA); `np`/`pt` outputs are RGB.
                16-bit grey (I;16, I) is read as value / 65535; grey and other modes (CMYK, YCbCr, ...) are converted
                to RGB. numpy: HW, HWC or NHWC (1 or 3 channels), uint8, uint16, or float in [0, 1]. torch: HW, CHW
                or NCHW (1 or 3 channels), uint8 or float in **[0, 1]** (not [-1, 1]; negative values raise). Each
                image is padded (by reflection) to a multiple of `size_multiple` (one transformer token) and the
                result cropped back, so the output has the input's size times `upscale`.
            prompt (`str` or `list[str]`, *optional*):
                What the restoration should produce (e.g. "Restore this image to high quality"); one per image or
                one for all. No prompt is the empty prompt.
            negative_prompt (`str` or `list[str]`, defaults to `DEFAULT_NEGATIVE_PROMPT`):
                The negative-quality prompt classifier-free guidance pushes away from ("blurry, noisy, jpeg
                artifacts, ..."). `""` reproduces text-to-image CFG. Ignored without guidance.
            num_inference_steps (`int`, *optional*):
                Denoising steps of the full schedule (`strength < 1` runs the last part of it only). Default: the
                model's `sampling_defaults` (20 for a flow-matching model).
            timesteps (`list[float]`, *optional*), sigmas (`list[float]`, *optional*):
                Custom schedule for schedulers that accept one in `set_timesteps` (overrides `num_inference_steps`):
                non-empty, finite, not increasing; sigmas in (0, 1], timesteps in (0, num_train_timesteps].
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale, as in every diffusers pipeline: constant over the steps, and `1.0`
                disables guidance (one transformer pass per step). With `guidance_scale_start`, the scale at the last
                step. Default: the model's `sampling_defaults` (4.5 for a flow-matching model, as SanaPipeline).
            guidance_scale_start (`float`, *optional*):
                Opt-in linear guidance (SUPIR's linear CFG): the scale at the noisiest step (`sigma_max`), moving
                linearly in sigma to `guidance_scale` at sigma -> 0. E.g. `guidance_scale_start=1, guidance_scale=4`
                leaves the structure unguided (less hallucination) and guides the details. `None` = constant. Taken
                from `sampling_defaults` only when `guidance_scale` is too.
            restoration_guidance (`float`, *optional*):
                Restoration guidance strength tau_r (0 = off; larger values pull the estimate toward the degraded
                latent for longer, trading detail for fidelity). `None` uses the model's default, else the
                scheduler's configuration. Needs a [`RestorationGuidedFlowScheduler`].
            strength (`float`, *optional*):
                As in diffusers' img2img pipelines: the fraction of the `num_inference_steps` schedule to run, in
                (0, 1]. 1 runs every step from pure noise; below 1 the first `int(num_inference_steps * (1 -
                strength))` steps are skipped and sampling starts from the degraded latent noised to the first
                remaining sigma. Default: the model's `sampling_defaults` (1.0).
            fidelity (`float`, *optional*):
                In [0, 1]: how much of the (cleaned) input's detail that the VAE cannot represent is put back into the
                result: `output = decode(latents) + fidelity * (reference - decode(encode(reference)))`, where
                `reference` is the image the condition was encoded from (after the degradation removal stage, if
                any). A VAE's round trip loses fine detail (DC-AE f32 more than an f4 autoencoder); with a
                degradation removal stage, `fidelity=1` keeps all of that stage's detail and adds what the
                transformer changed, like the fidelity weight of StableSR's feature wrapping. Without such a stage
                the reference is the degraded input, whose noise it would bring back: leave it at 0 there. Costs one
                extra VAE decode. Default: the model's `sampling_defaults` (0). Not available when an
                `upscale_decoder` decodes (there is no reference at its resolution): the default is then ignored and
                an explicit value > 0 is refused.
            upscale (`float`, defaults to 1.0):
                Super-resolution factor >= 1: the input is resized (bicubic) by it before encoding. When the pipeline
                has an `upscale_decoder` and `upscale` is its `upscale_factor`, the input is encoded at its own size
                and that decoder produces the larger image instead.
            num_images_per_prompt (`int`, defaults to 1):
                Restorations per input image (consecutive in the output).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes the noise deterministic; a list needs one generator per output image.
            latents (`torch.Tensor`, *optional*):
                Starting latents used as given (replacing the noise, or the noised degraded latent when
                `strength < 1`); shape `(batch * num_images_per_prompt, C, padded height / f, padded width / f)`.
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask
                (`torch.Tensor`, *optional*):
                Pre-computed text embeddings `(batch, max_sequence_length, hidden)` and masks `(batch,
                max_sequence_length)` as returned by `encode_prompt`, instead of `prompt` / `negative_prompt`.
            color_fix (`str`, *optional*, defaults to `"wavelet"`):
                `"wavelet"` replaces the result's low frequencies (5-level à-trous, ~125 px support) by the input's,
                `"adain"` matches per-channel mean and standard deviation, `None` keeps the model's colours. On by
                default, as in SUPIR/PASD/DiffBIR: it removes the colour drift of latent diffusion; switch it off
                when the degradation itself is a colour cast to be corrected.
            tile_size (`int`, *optional*):
                Tile side in pixels (a multiple of `size_multiple`: the VAE factor x the transformer's patch size).
                `None`: automatic, the transformer's native resolution (`sample_size * f`, 1024 px for SANA 1024 px
                checkpoints); `0`: never tile. Images whose padded side exceeds it are denoised in overlapping latent
                tiles (blended every step with smooth weights before the single scheduler step) and encoded/decoded
                by the VAE tile by tile, so memory is bounded by the tile.
            tile_overlap (`int`, *optional*):
                Minimum overlap of neighbouring tiles in pixels (a multiple of the VAE factor, smaller than the
                tile); defaults to a quarter of the tile.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (NHWC float32 in [0, 1]), `"pt"` (NCHW float in [0, 1]) or `"latent"` (the final
                latents of the padded image, no decoding).
            return_dict (`bool`, defaults to `True`):
                Return a [`SanaRestorationPipelineOutput`] instead of a tuple.
            clean_caption (`bool`, defaults to `False`):
                Clean the prompts as SANA does (needs `beautifulsoup4` and `ftfy`).
            attention_kwargs (`dict`, *optional*):
                Passed to the transformer's attention processors (`{"scale": lora_scale}` for LoRA).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after every step as `callback_on_step_end(pipe, step, timestep, callback_kwargs)`; the
                returned dict may replace any of the tensors it was given. Setting `pipe._guidance_scale` there
                changes the guidance scale from the next step on.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors given to the callback, from `_callback_tensor_inputs` (`latents`, `prompt_embeds`,
                `negative_prompt_embeds`, `condition_latents`).
            max_sequence_length (`int`, defaults to 300):
                Text tokens kept per prompt.
            complex_human_instruction (`list[str]`, *optional*):
                SANA's prompt-enhancing instruction prefix. Off by default: restoration prompts are short
                instructions, and the prefix costs ~1k extra tokens in the text encoder.

        Examples:

        Returns:
            [`SanaRestorationPipelineOutput`] or `tuple`: the restored images (see the output's documentation); as
            `(images,)` when `return_dict` is `False`.

        Raises:
            `ValueError` for invalid arguments or images (naming them); `RuntimeError` when the model produces NaN or
            infinite values (broken weights, or fp16 overflow) instead of returning garbage.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prompt, negative_prompt = self._prompt_arguments(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        sampling = self._resolve_sampling_arguments(
            dict(
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_scale_start=guidance_scale_start,
                restoration_guidance=restoration_guidance,
                strength=strength,
                fidelity=fidelity,
            )
        )
        num_inference_steps, guidance_scale = sampling["num_inference_steps"], sampling["guidance_scale"]
        guidance_scale_start, restoration_guidance = sampling["guidance_scale_start"], sampling["restoration_guidance"]
        fidelity_given = fidelity is not None
        strength, fidelity = sampling["strength"], sampling["fidelity"]

        # 1. Check inputs
        self.check_inputs(
            prompt,
            negative_prompt,
            num_inference_steps,
            timesteps,
            sigmas,
            guidance_scale,
            guidance_scale_start,
            restoration_guidance,
            strength,
            fidelity,
            upscale,
            num_images_per_prompt,
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
            output_type,
            callback_on_step_end_tensor_inputs,
            max_sequence_length,
            color_fix,
            tile_size,
            tile_overlap,
        )
        condition_channels = self.transformer.config.condition_channels
        if self.vae.config.latent_channels != condition_channels:
            raise ValueError(
                f"The VAE has {self.vae.config.latent_channels} latent channels but the transformer expects "
                f"{condition_channels} condition channels."
            )

        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Images: RGB in [0, 1], cleaned by the degradation removal stage (if any), upscaled (by the upscale
        # decoder at the end when there is one for this factor, else resized now)
        decoder_upscale = 1
        if self.upscale_decoder is not None and upscale == self.upscale_decoder.config.upscale_factor:
            decoder_upscale = self.upscale_decoder.config.upscale_factor
            if fidelity > 0 and fidelity_given:
                raise ValueError(
                    f"`fidelity` ({fidelity}) needs the reference image at the output's resolution, which does not "
                    f"exist when the upscale decoder produces the x{decoder_upscale} image: pass `fidelity=0`."
                )
            fidelity = 0.0
        pixels, alphas = self.prepare_image(
            image, upscale / decoder_upscale, device, remove_degradations=True, tile_size=tile_size
        )
        batch_size = pixels.shape[0]
        self._check_batch(batch_size, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if isinstance(prompt, str):
            prompt = [prompt] * batch_size
        out_height, out_width = pixels.shape[-2] * decoder_upscale, pixels.shape[-1] * decoder_upscale
        if decoder_upscale > 1:
            alphas = _resize_alphas(alphas, (out_height, out_width))

        # 3. Text: prompt, and the negative-quality prompt when any step uses guidance (cached across calls)
        lora_scale = attention_kwargs.get("scale", None) if attention_kwargs is not None else None
        text_kwargs = dict(
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            clean_caption=clean_caption,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        uses_guidance = guidance_scale > 1 or (guidance_scale_start is not None and guidance_scale_start > 1)
        (
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        ) = self.encode_prompt(
            prompt,
            uses_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            complex_human_instruction=complex_human_instruction,
            **text_kwargs,
        )

        # 4. Condition latents of the degraded image (padded to whole transformer tokens), one per output image
        reference_latents, tiling = self._encode_condition(pixels, tile_size, tile_overlap)
        condition_latents = reference_latents.repeat_interleave(num_images_per_prompt, dim=0)

        # 5. Timesteps: the tail of the schedule that `strength` runs
        timestep_device = "cpu" if XLA_AVAILABLE else device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )
        sigma_max = float(self.scheduler.sigmas[0])
        if strength < 1.0:
            timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength)
        start_index = len(self.scheduler.timesteps) - len(timesteps)

        # 6. Starting latents: noise, or the degraded latent noised to the first remaining sigma
        start_sigma = float(self.scheduler.sigmas[start_index]) if strength < 1.0 else None
        latents = self.prepare_latents(condition_latents, start_sigma, generator, latents)

        # 7. Scheduler extras: the condition for restoration guidance, generators for stochastic samplers
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs: dict[str, Any] = {}
        if "condition_latents" in step_parameters:
            step_kwargs["condition_latents"] = condition_latents
        if restoration_guidance is not None and "restoration_guidance_tau" in step_parameters:
            step_kwargs["restoration_guidance_tau"] = restoration_guidance
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator

        # 8. Denoising loop
        self._num_timesteps = len(timesteps)
        scheduled_guidance = guidance_scale_start is not None  # False once a callback sets the scale itself
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if scheduled_guidance:
                    sigma = float(self.scheduler.sigmas[start_index + i])
                    self._guidance_scale = self._scheduled_guidance(sigma, sigma_max, guidance_scale, guidance_scale_start)
                step_guidance = self._guidance_scale
                if step_guidance > 1 and negative_prompt_embeds is None:
                    # a callback turned guidance on in a call that started without it
                    negative_prompt_embeds, negative_prompt_attention_mask = self._negative_embeddings(
                        negative_prompt, batch_size, text_kwargs
                    )
                timestep = t.to(device=device, dtype=torch.float32)

                def predict(top: int, left: int, height: int, width: int) -> torch.Tensor:
                    rows, cols = slice(top, top + height), slice(left, left + width)
                    return self._velocity(
                        latents[:, :, rows, cols],
                        condition_latents[:, :, rows, cols],
                        prompt_embeds,
                        prompt_attention_mask,
                        negative_prompt_embeds,
                        negative_prompt_attention_mask,
                        timestep,
                        step_guidance,
                    )

                if tiling is None:
                    velocity = predict(0, 0, *latents.shape[-2:])
                else:  # tiles start on the patch grid, so each token covers the same latent pixels as untiled
                    velocity = blend_tiles(predict, latents.shape[-2:], *tiling, align=self._patch_size)

                # one scheduler step on the whole latent: guidance and solver state advance exactly once
                if "condition_latents" in step_kwargs:
                    step_kwargs["condition_latents"] = condition_latents
                latents = self.scheduler.step(velocity, t, latents, **step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                        "condition_latents": condition_latents,
                    }
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    condition_latents = callback_outputs.pop("condition_latents", condition_latents)
                    if self._guidance_scale != step_guidance:
                        scheduled_guidance = False  # the callback's scale holds from the next step on

                progress_bar.update()
                if XLA_AVAILABLE:
                    xm.mark_step()

        # 9. Decode, crop the padding, colour fix, convert
        if not self.interrupt:
            _check_finite(latents, "the denoised latents", _NON_FINITE_ADVICE)
        if output_type == "latent":
            images = latents
        else:
            restored = self._vae_decode(latents, tiling, upscale_decoder=decoder_upscale > 1)
            restored = restored[:, :, :out_height, :out_width]
            _check_finite(restored, "the decoded image", _NON_FINITE_ADVICE)
            reference = pixels
            if decoder_upscale > 1:  # the colour-fix reference at the output's size
                reference = F.interpolate(pixels, size=(out_height, out_width), mode="bicubic", align_corners=False)
            reference = reference.repeat_interleave(num_images_per_prompt, dim=0)
            if fidelity > 0:
                # what the VAE loses of the reference: reference - decode(encode(reference))
                round_trip = self._vae_decode(reference_latents, tiling)[:, :, :out_height, :out_width]
                residual = (pixels - round_trip).repeat_interleave(num_images_per_prompt, dim=0)
                restored = (restored + fidelity * residual).clamp(0.0, 1.0)
            if color_fix is not None:
                restored = apply_color_fix(restored, reference, color_fix)
            images = self._postprocess(restored, alphas, num_images_per_prompt, output_type)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return SanaRestorationPipelineOutput(images=images)

    def _negative_embeddings(self, negative_prompt, batch_size: int, text_kwargs: dict[str, Any]):
        """Embeddings `(embeds, mask)` of the negative prompt, encoded as SanaPipeline encodes negatives (no
        instruction prefix); for guidance switched on mid-call by a callback."""
        if getattr(self, "text_encoder", None) is None or negative_prompt is None:
            raise ValueError(
                "A callback raised `guidance_scale` above 1 in a call without negative prompt embeddings and the "
                "pipeline cannot encode them: pass `negative_prompt_embeds`, or start the call with guidance."
            )
        prompts = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
        embeds, mask, _, _ = self.encode_prompt(prompts, False, complex_human_instruction=None, **text_kwargs)
        return embeds, mask

    def _postprocess(self, images: torch.Tensor, alphas, num_images_per_prompt: int, output_type: str):
        """`(batch, 3, H, W)` in [0, 1] -> `output_type`; PIL outputs get their input's alpha back (RGBA)."""
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return array
        outputs = []
        for index, rgb in enumerate(array):
            alpha = alphas[index // num_images_per_prompt]
            if alpha is None:
                outputs.append(PIL.Image.fromarray(_to_uint8(rgb)))
            else:
                rgba = np.concatenate([rgb, alpha.permute(1, 2, 0).float().cpu().numpy()], axis=2)
                outputs.append(PIL.Image.fromarray(_to_uint8(rgba)))
        return outputs


_NON_FINITE_ADVICE = (
    "the model's weights are likely broken (e.g. saved from a diverged training run) or float16 overflowed: check "
    "the weights with torch.isfinite, or load the pipeline in float32 / bfloat16"
)

_OOM_ADVICE = (
    "Out of memory while {stage}. Process the image in tiles: pass a smaller `tile_size` (e.g. tile_size=512) to "
    "the pipeline call, or enable the VAE's own tiling with `pipe.enable_vae_tiling()`."
)


def _check_finite(tensor: torch.Tensor, what: str, advice: str) -> None:
    """Raise a `RuntimeError` when `tensor` holds NaN or infinite values: never return garbage silently."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise RuntimeError(f"{what} contain {bad} NaN or infinite value(s) of {tensor.numel()}: {advice}.")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (array * 255.0).round().clip(0, 255).astype(np.uint8)


def _is_list_of_str(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_sampling_values(values: dict[str, Any], kind: str) -> None:
    """Validate the sampling arguments present (not `None`) in `values`; `kind` names them in errors ("argument" for
    a call, "sampling_defaults" for recorded defaults)."""

    def name(key: str) -> str:
        return f"`{key}`" if kind == "argument" else f"`{kind}['{key}']`"

    steps = values.get("num_inference_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"{name('num_inference_steps')} must be an integer >= 1, got {steps!r}.")
    for key in ("guidance_scale", "guidance_scale_start"):
        value = values.get(key)
        if value is not None and (not _is_number(value) or value < 1.0):
            raise ValueError(f"{name(key)} must be a number >= 1 (1 = no classifier-free guidance), got {value!r}.")
    tau = values.get("restoration_guidance")
    if tau is not None and (not _is_number(tau) or tau < 0):
        raise ValueError(f"{name('restoration_guidance')} must be a number >= 0 (0 = off) or None, got {tau!r}.")
    fidelity = values.get("fidelity")
    if fidelity is not None and (not _is_number(fidelity) or not 0.0 <= fidelity <= 1.0):
        raise ValueError(f"{name('fidelity')} must be in [0, 1] (0 = off), got {fidelity!r}.")
    strength = values.get("strength")
    if strength is not None and (not _is_number(strength) or not 0.0 < strength <= 1.0):
        raise ValueError(
            f"{name('strength')} must be in (0, 1]: the fraction of the denoising schedule to run (1 = all of it, "
            f"from pure noise), got {strength!r}."
        )


def _check_schedule(name: str, values, upper: float) -> None:
    """A custom `sigmas` / `timesteps` schedule: a non-empty 1-D sequence of finite numbers in (0, upper], not
    increasing (denoising goes from noisy to clean)."""
    try:
        array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a sequence of numbers, got {type(values).__name__}.") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence of numbers, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite values: {values!r}.")
    if array.min() <= 0.0 or array.max() > upper:
        raise ValueError(f"`{name}` must lie in (0, {upper:g}], got values in [{array.min():g}, {array.max():g}].")
    if (np.diff(array) > 0).any():
        raise ValueError(f"`{name}` must not increase (from noisy to clean), got {values!r}.")
