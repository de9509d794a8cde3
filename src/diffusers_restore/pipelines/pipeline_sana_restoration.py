# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""`SanaRestorationPipeline`: restore a degraded image with SANA conditioned on the image's latent.

One call, in order (DESIGN.md §5)::

    image -> RGB in [0, 1] -> [upscale resize] -> reflect-pad to the VAE multiple -> VAE encode -> z_lq
    prompt, negative-quality prompt -> Gemma-2 -> embeddings          (cached across calls)
    latents = noise, or z_lq noised to sigma = strength
    for each sigma: v = transformer(latents, z_lq, text, t), CFG (linear in sigma), scheduler.step(v, ..., z_lq)
    -> VAE decode -> crop the padding -> [colour fix toward the input] -> output

Images larger than a tile (by default the transformer's native resolution) are processed in overlapping tiles:
the velocity is predicted per latent tile and blended with smooth weights before the single scheduler step of
each denoising step, and the VAE encodes and decodes tile by tile, so peak memory depends on the tile size only.
"""

from __future__ import annotations

import collections
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
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps
from diffusers.utils import BaseOutput, is_torch_xla_available, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..data.latents import decode_latents
from ..models.transformer_sana_concat import ConcatConditionedTransformer
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

# Files never downloaded by `from_pretrained`: pickled weights are never loaded by this package.
_UNSAFE_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5", "*.ot"]

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
        >>> restored = pipe(
        ...     degraded,
        ...     prompt="Restore this image to high quality",
        ...     num_inference_steps=20,
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... ).images[0]
        >>> restored.save("restored.png")

        >>> # 2x super-resolution: images above the model's native resolution are tiled automatically
        >>> upscaled = pipe(degraded, upscale=2).images[0]
        ```
"""


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
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "condition_latents"]

    # Prompt encoding is SanaPipeline's (Gemma-2, SANA's token selection); these are borrowed, not re-implemented.
    bad_punct_regex = SanaPipeline.bad_punct_regex
    _text_preprocessing = SanaPipeline._text_preprocessing
    _clean_caption = SanaPipeline._clean_caption

    #: Number of prompts whose embeddings are kept between calls (least recently used dropped first); 0 disables.
    prompt_cache_size: int = 32

    def __init__(
        self,
        tokenizer: GemmaTokenizer | GemmaTokenizerFast,
        text_encoder: Gemma2PreTrainedModel,
        vae: AutoencoderDC,
        transformer: ConcatConditionedTransformer,
        scheduler: RestorationGuidedFlowScheduler | FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
        )
        self.vae_scale_factor = self._vae_spatial_factor(vae) if vae is not None else 32
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._prompt_cache: collections.OrderedDict = collections.OrderedDict()
        self._prompt_cache_owner: tuple | None = None
        self._prompt_cache_bypass = False

    @staticmethod
    def _vae_spatial_factor(vae) -> int:
        factor = getattr(vae, "spatial_compression_ratio", None)
        if factor is None:
            blocks = vae.config.get("encoder_block_out_channels") or vae.config.get("block_out_channels")
            factor = 2 ** (len(blocks) - 1)
        return int(factor)

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
        512/1024 px checkpoints), unless `scheduler` is given. No weight is copied.

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
        )

    @staticmethod
    def _convert_scheduler(sana_scheduler) -> RestorationGuidedFlowScheduler:
        """SANA's scheduler (DPM-Solver with `flow_shift`, or flow-matching Euler with `shift`) -> restoration one."""
        config = dict(sana_scheduler.config)
        if hasattr(RestorationGuidedFlowScheduler, "from_sana_config"):
            return RestorationGuidedFlowScheduler.from_sana_config(config)
        # diffusers drops `flow_shift` when converting (conventions §0.5): carry it over explicitly
        shift = config.get("flow_shift", config.get("shift", 1.0))
        return RestorationGuidedFlowScheduler.from_config(config, shift=shift)

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
                "Efficient-Large-Model/Sana_1600M_1024px_diffusers", torch_dtype=torch.bfloat16
            )
        """
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
        """
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
                ignore_patterns=_UNSAFE_WEIGHT_PATTERNS,
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
        pipeline = super().from_pretrained(path, **kwargs)
        if not isinstance(pipeline.transformer, ConcatConditionedTransformer):
            raise ValueError(
                f"The transformer loaded from {pretrained_model_name_or_path} is a "
                f"{type(pipeline.transformer).__name__}, not a ConcatConditionedTransformer."
            )
        return pipeline

    @staticmethod
    def _read_model_index(path: str) -> dict[str, Any]:
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            raise ValueError(f"{path} has no model_index.json: it is not a saved pipeline.")
        with open(index_file, encoding="utf-8") as handle:
            return json.load(handle)

    @staticmethod
    def _import_component_modules(model_index: dict[str, Any]) -> None:
        """Import this package's modules named as component libraries (diffusers only resolves loaded modules).

        Only `diffusers_restore.*` names are imported: a downloaded index must not choose what code runs.
        """
        for value in model_index.values():
            if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
                if value[0].startswith(f"{__package__.split('.')[0]}."):
                    importlib.import_module(value[0])

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
        """Load the `transformer.`-prefixed entries of a pipeline LoRA file (`load_lora_weights`) into `transformer`.

        As [`SanaLoraLoaderMixin.load_lora_into_transformer`], with the prefix passed explicitly: the wrapper's
        `load_lora_adapter` filters by prefix only when told to, and would otherwise look for
        `transformer.transformer.*` modules.
        """
        transformer.load_lora_adapter(
            state_dict,
            prefix=cls.transformer_name,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=_pipeline,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
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
        `None` without classifier-free guidance. The cache is skipped while a LoRA scale is applied to the text
        encoder, when gradients are enabled, and when the text encoder carries adapters; it is reset whenever the
        text encoder or tokenizer object changes or its weights are modified in place (see `clear_prompt_cache`).
        """
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
        """The classifier-free guidance scale of the current step (of the first step before the loop)."""
        return self._guidance_scale

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether any step of the current call uses classifier-free guidance (a scale above 1)."""
        return self._do_classifier_free_guidance

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

    # ----------------------------------------------------------------------------------------------- checks

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        num_inference_steps,
        timesteps,
        sigmas,
        guidance_scale,
        guidance_scale_end,
        restoration_guidance,
        strength,
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
        """Raise a `ValueError` naming the first invalid argument (image checks happen while converting)."""

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if timesteps is None and sigmas is None:
            if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
                raise ValueError(f"`num_inference_steps` must be an integer, got {num_inference_steps!r}.")
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        for name, value in (("guidance_scale", guidance_scale), ("guidance_scale_end", guidance_scale_end)):
            if value is None and name == "guidance_scale_end":
                continue
            if not number(value) or value < 1.0:
                raise ValueError(
                    f"`{name}` must be a number >= 1 (1 disables classifier-free guidance), got {value!r}."
                )
        if restoration_guidance is not None and (not number(restoration_guidance) or restoration_guidance < 0):
            raise ValueError(f"`restoration_guidance` must be >= 0 (0 = off) or None, got {restoration_guidance!r}.")
        if not number(strength) or not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1] (1 = start from pure noise), got {strength!r}.")
        if not number(upscale) or upscale < 1.0:
            raise ValueError(f"`upscale` must be a number >= 1 (1 = same size), got {upscale!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if color_fix is not None and color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"`color_fix` must be one of {COLOR_FIX_METHODS} or None, got {color_fix!r}.")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` must be a positive integer, got {max_sequence_length!r}.")
        factor = self.vae_scale_factor
        if tile_size is not None:
            if not isinstance(tile_size, int) or tile_size < 0 or tile_size % factor:
                raise ValueError(
                    f"`tile_size` must be None (automatic), 0 (never tile) or a positive multiple of {factor} "
                    f"(the VAE's downsampling factor) in pixels, got {tile_size!r}."
                )
        if tile_overlap is not None:
            if not isinstance(tile_overlap, int) or tile_overlap < 0 or tile_overlap % factor:
                raise ValueError(
                    f"`tile_overlap` must be None (a quarter of the tile) or a multiple of {factor} pixels, "
                    f"got {tile_overlap!r}."
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
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` (may be the empty string) or `prompt_embeds`.")
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
        uses_guidance = guidance_scale > 1 or (guidance_scale_end is not None and guidance_scale_end > 1)
        if uses_guidance and prompt_embeds is not None and negative_prompt_embeds is None:
            if getattr(self, "text_encoder", None) is None:
                raise ValueError(
                    "`negative_prompt_embeds` is required for classifier-free guidance when the pipeline has no "
                    "text encoder (or set `guidance_scale=1.0, guidance_scale_end=None`)."
                )

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
        self, image: PipelineImageInput, upscale: float, device: torch.device
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Convert `image` (see `__call__`) to RGB `(batch, 3, height * upscale, width * upscale)` in [0, 1] on
        `device`, resized bicubically when `upscale > 1`; returns it with the images' alpha channels (or `None`)."""
        if image is None:
            raise ValueError("`image` is required: the degraded image(s) to restore.")
        pixels, alphas = images_to_tensor(image)
        pixels = pixels.to(device)
        height, width = pixels.shape[-2:]
        if upscale != 1:
            size = (max(1, round(height * upscale)), max(1, round(width * upscale)))
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)
            alphas = [
                None
                if alpha is None
                else F.interpolate(alpha[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0.0, 1.0)
                for alpha in alphas
            ]
        if min(pixels.shape[-2:]) < self.vae_scale_factor:
            raise ValueError(
                f"`image` is too small: {height}x{width} px (x{upscale} = {pixels.shape[-2]}x{pixels.shape[-1]}); "
                f"each side must be at least {self.vae_scale_factor} px after `upscale` (one latent pixel)."
            )
        return pixels, alphas

    def _tiling_plan(self, height: int, width: int, tile_size: int | None, tile_overlap: int | None):
        """`(tile, overlap)` in latent pixels for an image of `height` x `width` padded pixels, or `None` (untiled)."""
        tile_px = self.default_tile_size if tile_size is None else tile_size
        if tile_px == 0 or max(height, width) <= tile_px:
            return None
        if tile_overlap is None:
            tile_overlap = (tile_px // 4) // self.vae_scale_factor * self.vae_scale_factor
        return tile_px // self.vae_scale_factor, tile_overlap // self.vae_scale_factor

    def _vae_encode(self, pixels: torch.Tensor, tiling) -> torch.Tensor:
        """`(batch, 3, H, W)` in [-1, 1] -> scaled latents `(batch, C, H / f, W / f)` float32."""
        vae = self.vae
        shift = vae.config.get("shift_factor", None) or 0.0

        def encode(x: torch.Tensor) -> torch.Tensor:
            output = vae.encode(x.to(vae.dtype))
            if hasattr(output, "latent"):
                latent = output.latent
            elif hasattr(output, "latent_dist"):
                latent = output.latent_dist.mode()
            else:
                latent = output[0]
            return (latent.float() - shift) * vae.config.scaling_factor

        try:
            if tiling is None:
                return encode(pixels)
            tile, overlap = tiling
            factor = self.vae_scale_factor
            grid = (pixels.shape[-2] // factor, pixels.shape[-1] // factor)

            def encode_tile(top: int, left: int, height: int, width: int) -> torch.Tensor:
                rows = slice(top * factor, (top + height) * factor)
                cols = slice(left * factor, (left + width) * factor)
                return encode(pixels[:, :, rows, cols])

            return blend_tiles(encode_tile, grid, tile, overlap)
        except torch.OutOfMemoryError:
            warnings.warn(_OOM_ADVICE.format(stage="encoding the image"))
            raise

    def _vae_decode(self, latents: torch.Tensor, tiling) -> torch.Tensor:
        """Scaled latents -> images `(batch, 3, H, W)` in [0, 1] float32."""
        try:
            if tiling is None:
                decoded = decode_latents(self.vae, latents)
            else:
                tile, overlap = tiling

                def decode_tile(top: int, left: int, height: int, width: int) -> torch.Tensor:
                    return decode_latents(self.vae, latents[:, :, top : top + height, left : left + width])

                decoded = blend_tiles(decode_tile, latents.shape[-2:], tile, overlap, self.vae_scale_factor)
        except torch.OutOfMemoryError:
            warnings.warn(_OOM_ADVICE.format(stage="decoding the latents"))
            raise
        return (decoded / 2 + 0.5).clamp(0.0, 1.0)

    def prepare_latents(
        self,
        condition_latents: torch.Tensor,
        start_sigma: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Starting latents, float32 shaped like `condition_latents` `(batch, C, h, w)`.

        Given `latents` are used as they are. Otherwise the start is pure noise when `start_sigma == 1`, else the
        condition noised along the flow path: `(1 - sigma) * condition_latents + sigma * noise`.
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
        if start_sigma >= 1.0:
            return noise
        return (1.0 - start_sigma) * condition_latents + start_sigma * noise

    # ---------------------------------------------------------------------------------------- scheduler side

    def _strength_start_index(self, strength: float) -> int:
        """Index of the first step whose sigma is `<= strength` (0 for `strength == 1`)."""
        if hasattr(self.scheduler, "strength_start_index"):
            return int(self.scheduler.strength_start_index(strength))
        sigmas = self.scheduler.sigmas[:-1].float().cpu()  # the last entry is the terminal sigma (0)
        candidates = torch.nonzero(sigmas <= strength + 1e-6).flatten()
        if len(candidates) == 0:
            raise ValueError(
                f"`strength` {strength} is below every sigma of the schedule (smallest {float(sigmas.min()):.4f}): "
                "raise `strength` or `num_inference_steps`."
            )
        return int(candidates[0])

    @staticmethod
    def _linear_guidance(sigma: float, sigma_max: float, start: float, end: float | None) -> float:
        """SUPIR's linear CFG moved to flow sigmas: `start` at `sigma_max`, `end` as sigma -> 0."""
        if end is None:
            return start
        return end + (start - end) * sigma / sigma_max

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
        prompt: str | list[str] | None = "",
        negative_prompt: str | list[str] | None = DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps: int = 20,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 1.0,
        guidance_scale_end: float | None = 4.0,
        restoration_guidance: float | None = None,
        strength: float = 1.0,
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

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The degraded image(s), any size; a batch shares one size (call once per size otherwise).
                PIL: any mode. RGBA/LA/PA (and P with transparency) restore the RGB and carry the original alpha,
                resized with `upscale`, to PIL outputs (RGBA); `np`/`pt` outputs are RGB. 16-bit grey (I;16, I) is
                read as value / 65535; grey and other modes (CMYK, YCbCr, ...) are converted to RGB.
                numpy: HW, HWC or NHWC (1 or 3 channels), uint8, uint16, or float in [0, 1].
                torch: HW, CHW or NCHW (1 or 3 channels), uint8 or float in **[0, 1]** (not [-1, 1]; negative values
                raise). Each image is reflect-padded to the VAE's multiple and the result cropped back, so the output
                has the input's size times `upscale`.
            prompt (`str` or `list[str]`, defaults to `""`):
                What the restoration should produce (e.g. "Restore this image to high quality"); one per image or
                one for all.
            negative_prompt (`str` or `list[str]`, defaults to `DEFAULT_NEGATIVE_PROMPT`):
                The negative-quality prompt classifier-free guidance pushes away from ("blurry, noisy, jpeg
                artifacts, ..."). `""` reproduces text-to-image CFG. Ignored without guidance.
            num_inference_steps (`int`, defaults to 20):
                Denoising steps of the full schedule (`strength < 1` runs the last part of it only).
            timesteps (`list[float]`, *optional*), sigmas (`list[float]`, *optional*):
                Custom schedule for schedulers that accept one in `set_timesteps` (overrides `num_inference_steps`).
            guidance_scale (`float`, defaults to 1.0):
                Classifier-free guidance scale at the noisiest step (sigma = sigma_max). 1 = no guidance.
            guidance_scale_end (`float`, *optional*, defaults to 4.0):
                Guidance scale as sigma -> 0; the scale moves linearly in sigma from `guidance_scale` to it (SUPIR's
                linear CFG). `None` keeps `guidance_scale` constant. The default 1 -> 4 is SUPIR's fidelity setting:
                no text guidance while the structure forms (less hallucination), quality guidance for the details.
                Steps whose scale is 1 skip the unconditional pass; `guidance_scale=1, guidance_scale_end=None`
                disables guidance (one transformer pass per step).
            restoration_guidance (`float`, *optional*):
                Restoration guidance strength tau_r (0 = off; larger values pull the estimate toward the degraded
                latent for longer, trading detail for fidelity). `None` uses the scheduler's configuration.
                Needs a [`RestorationGuidedFlowScheduler`].
            strength (`float`, defaults to 1.0):
                Start noise level in (0, 1]: 1 starts from pure noise; below 1 the start is the degraded latent
                noised to the first schedule sigma <= `strength`, and only the remaining steps run.
            upscale (`float`, defaults to 1.0):
                Super-resolution factor >= 1: the input is resized (bicubic) by it before encoding.
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
                Tile side in pixels (a multiple of the VAE factor). `None`: automatic, the transformer's native
                resolution (`sample_size * f`, 1024 px for SANA 1024 px checkpoints); `0`: never tile. Images whose
                padded side exceeds it are denoised in overlapping latent tiles (blended every step with smooth
                weights before the single scheduler step) and encoded/decoded by the VAE tile by tile, so memory is
                bounded by the tile.
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
                returned dict may replace any of the tensors it was given.
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
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        # the defaults step aside when the user passes embeddings instead
        if prompt_embeds is not None and prompt == "":
            prompt = None
        if negative_prompt_embeds is not None and negative_prompt == DEFAULT_NEGATIVE_PROMPT:
            negative_prompt = None

        # 1. Check inputs
        self.check_inputs(
            prompt,
            negative_prompt,
            num_inference_steps,
            timesteps,
            sigmas,
            guidance_scale,
            guidance_scale_end,
            restoration_guidance,
            strength,
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
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        if restoration_guidance and "restoration_guidance_tau" not in step_parameters:
            raise ValueError(
                f"`restoration_guidance` needs a RestorationGuidedFlowScheduler; this pipeline's scheduler is a "
                f"{type(self.scheduler).__name__}. Leave it None (or 0), or swap the scheduler with "
                "`RestorationGuidedFlowScheduler.from_config(pipe.scheduler.config)`."
            )
        condition_channels = self.transformer.config.condition_channels
        if self.vae.config.latent_channels != condition_channels:
            raise ValueError(
                f"The VAE has {self.vae.config.latent_channels} latent channels but the transformer expects "
                f"{condition_channels} condition channels."
            )

        self._guidance_scale = guidance_scale
        self._do_classifier_free_guidance = guidance_scale > 1 or bool(guidance_scale_end and guidance_scale_end > 1)
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Images: RGB in [0, 1], upscaled, padded to the VAE multiple
        pixels, alphas = self.prepare_image(image, upscale, device)
        batch_size = pixels.shape[0]
        self._check_batch(batch_size, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if isinstance(prompt, str):
            prompt = [prompt] * batch_size
        out_height, out_width = pixels.shape[-2:]
        padded = pad_to_multiple(pixels, self.vae_scale_factor)
        tiling = self._tiling_plan(padded.shape[-2], padded.shape[-1], tile_size, tile_overlap)

        # 3. Text: prompt and negative-quality prompt (cached across calls)
        lora_scale = attention_kwargs.get("scale", None) if attention_kwargs is not None else None
        (
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        ) = self.encode_prompt(
            prompt,
            self.do_classifier_free_guidance,
            negative_prompt="" if negative_prompt is None else negative_prompt,
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

        # 4. Condition latents of the degraded image, one per output image
        condition_latents = self._vae_encode(padded * 2.0 - 1.0, tiling)
        condition_latents = condition_latents.repeat_interleave(num_images_per_prompt, dim=0)

        # 5. Timesteps, trimmed by `strength`
        timestep_device = "cpu" if XLA_AVAILABLE else device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )
        sigma_max = float(self.scheduler.sigmas[0])
        start_index = self._strength_start_index(strength) if strength < 1.0 else 0
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start_index)
        timesteps = timesteps[start_index:]
        start_sigma = float(self.scheduler.sigmas[start_index]) if strength < 1.0 else 1.0

        # 6. Starting latents
        latents = self.prepare_latents(condition_latents, start_sigma, generator, latents)

        # 7. Scheduler extras: the condition for restoration guidance, generators for stochastic samplers
        step_kwargs: dict[str, Any] = {}
        if "condition_latents" in step_parameters:
            step_kwargs["condition_latents"] = condition_latents
        if restoration_guidance is not None and "restoration_guidance_tau" in step_parameters:
            step_kwargs["restoration_guidance_tau"] = restoration_guidance
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator

        # 8. Denoising loop
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                sigma = float(self.scheduler.sigmas[start_index + i])
                self._guidance_scale = self._linear_guidance(sigma, sigma_max, guidance_scale, guidance_scale_end)
                guidance = self._guidance_scale if negative_prompt_embeds is not None else 1.0
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
                        guidance,
                    )

                if tiling is None:
                    velocity = predict(0, 0, *latents.shape[-2:])
                else:
                    velocity = blend_tiles(predict, latents.shape[-2:], *tiling)

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

                progress_bar.update()
                if XLA_AVAILABLE:
                    xm.mark_step()

        # 9. Decode, crop the padding, colour fix, convert
        if output_type == "latent":
            images = latents
        else:
            restored = self._vae_decode(latents, tiling)[:, :, :out_height, :out_width]
            if color_fix is not None:
                reference = pixels.repeat_interleave(num_images_per_prompt, dim=0)
                restored = apply_color_fix(restored, reference, color_fix)
            images = self._postprocess(restored, alphas, num_images_per_prompt, output_type)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (images,)
        return SanaRestorationPipelineOutput(images=images)

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


_OOM_ADVICE = (
    "Out of memory while {stage}. Process the image in tiles: pass a smaller `tile_size` (e.g. tile_size=512) to "
    "the pipeline call, or enable the VAE's own tiling with `pipe.enable_vae_tiling()`."
)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (array * 255.0).round().clip(0, 255).astype(np.uint8)


def _is_list_of_str(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
