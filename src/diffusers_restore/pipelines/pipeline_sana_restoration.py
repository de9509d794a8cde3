# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""`SanaRestorationPipeline`: restore a degraded image with SANA conditioned on the image's latent.

One call: the image is converted to RGB in [0, 1], cleaned by the optional degradation removal stage, resized by
`upscale`, padded to whole transformer tokens and VAE-encoded (the condition `z_lq`); the prompt and the
negative-quality prompt are encoded by Gemma-2 (cached across calls); from noise (or from `z_lq` noised, `strength < 1`)
each step predicts the velocity `v = transformer(latents, z_lq, text, t)` with classifier-free guidance and takes one
restoration-guided flow-matching step; the result is decoded, the cleaned input's detail the VAE cannot carry is added
back (`fidelity`), the padding cropped and the colours fixed toward the input. Conventions are diffusers': sigma = 1 is
pure noise, `x_t = (1 - sigma) * x0 + sigma * noise`, `v = noise - x0`.

Images larger than a tile are processed in overlapping tiles of one layout (`TileGrid`) by every stage, so peak memory
depends on the tile size only. Each stage reports through `progress_bar(total=..., desc=...)`, counting tiles:
"degradation removal", "VAE encode", "denoising" (steps x tiles), "VAE decode".
"""

from __future__ import annotations

import collections
import functools
import glob
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from transformers import Gemma2PreTrainedModel, GemmaTokenizer, GemmaTokenizerFast

from diffusers import AutoencoderDC, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SanaPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.pipelines.sana.pipeline_sana import retrieve_timesteps
from diffusers.utils import (
    USE_PEFT_BACKEND,
    BaseOutput,
    is_torch_xla_available,
    logging,
    replace_example_docstring,
    scale_lora_layers,
    unscale_lora_layers,
)
from diffusers.utils.torch_utils import randn_tensor

from ..models.degradation_removal import DegradationRemovalModel
from ..models.safe_weights import PICKLE_PATTERNS, pickle_refusals_explained, weights_loading_kwargs
from ..models.transformer_sana_concat import PROJECTION_KEY, ConcatConditionedTransformer, add_condition_projection
from ..models.upscale_decoder import DCUpscaleDecoder
from ..models.vae_latents import decode_latents, encode_latents, unscale_latents, vae_spatial_factor
from ..schedulers.scheduling_restoration_guided_flow import RestorationGuidedFlowScheduler
from .image_processing_restoration import (
    COLOR_FIX_METHODS,
    RestorationImageProcessor,
    TileGrid,
    apply_color_fix,
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

# The sampling arguments a pipeline may record in its config (`sampling_defaults`), with the values used when neither
# the call nor the config sets them: SanaPipeline's 20 steps and guidance 4.5, the scheduler's own restoration
# guidance, and a start from pure noise.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 20,
    "guidance_scale": 4.5,
    "guidance_scale_start": None,
    "restoration_guidance": None,
    "strength": 1.0,
    "fidelity": 0.0,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


# What a call argument that is not `None` must be: (test, the rule in words); the sampling arguments' rules hold for
# `sampling_defaults` too.
ARGUMENT_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_inference_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "guidance_scale": (lambda v: _is_number(v) and v >= 1, "a number >= 1 (1 = no classifier-free guidance)"),
    "guidance_scale_start": (lambda v: _is_number(v) and v >= 1, "a number >= 1 (1 = no classifier-free guidance)"),
    "restoration_guidance": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = off) or None"),
    "strength": (
        lambda v: _is_number(v) and 0 < v <= 1,
        "in (0, 1]: the fraction of the denoising schedule to run (1 = all of it, from pure noise)",
    ),
    "fidelity": (lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1] (0 = off)"),
    "upscale": (lambda v: _is_number(v) and v >= 1, "a number >= 1 (1 = same size)"),
    "output_type": (lambda v: v in ("pil", "np", "pt", "latent"), "one of 'pil', 'np', 'pt', 'latent'"),
    "color_fix": (lambda v: v in COLOR_FIX_METHODS, f"one of {COLOR_FIX_METHODS} or None"),
    "prompt": (_is_text, "a string or a list of strings"),
    "negative_prompt": (_is_text, "a string or a list of strings"),
}


def _check_arguments(values: dict[str, Any], rules: dict, label: str = "`{}`") -> None:
    """Raise a `ValueError` for the first value of `values` (not `None`) that breaks its rule in `rules`."""
    for name, (test, rule) in rules.items():
        value = values.get(name)
        if value is not None and not test(value):
            raise ValueError(f"{label.format(name)} must be {rule}, got {value!r}.")


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


def _one_call_at_a_time(call: Callable) -> Callable:
    """Serialise the calls of one pipeline, whose scheduler and call state are shared: a call from another thread
    waits for the running one; a call from inside the running one (e.g. from its callback) is refused."""

    @functools.wraps(call)
    def serialised(self, *args, **kwargs):
        if self._calling_thread == threading.get_ident():
            raise RuntimeError(
                f"{type(self).__name__} was called from inside its own running call (e.g. from a callback); one "
                "pipeline runs one call at a time."
            )
        with self._call_lock:
            self._calling_thread = threading.get_ident()
            try:
                return call(self, *args, **kwargs)
            finally:
                self._calling_thread = None

    return serialised


@dataclass
class SanaRestorationPipelineOutput(BaseOutput):
    """Output of [`SanaRestorationPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The restored images, `num_images_per_prompt` consecutive results per input image: PIL images (RGB, or RGBA
            when the input had alpha), a float32 `(batch, height, width, 3)` array or a `(batch, 3, height, width)`
            tensor in [0, 1], or, for `output_type="latent"`, the final latents of the padded image.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class SanaRestorationPipeline(DiffusionPipeline, SanaLoraLoaderMixin):
    r"""
    Image restoration with SANA: a [`ConcatConditionedTransformer`] denoises the clean image's latent conditioned
    on the degraded image's latent, with a restoration-guided flow-matching scheduler.

    This model inherits from [`DiffusionPipeline`] (saving, loading, offloading, Hub upload; `import diffusers_restore`
    first). One pipeline runs one call at a time: calls from several threads wait for each other.

    Args:
        tokenizer ([`GemmaTokenizer`] or [`GemmaTokenizerFast`], *optional*): the text tokenizer.
        text_encoder ([`Gemma2PreTrainedModel`], *optional*): the text encoder (SANA uses Gemma-2-2B's `Gemma2Model`).
        vae ([`AutoencoderDC`]): encodes the degraded image and decodes the result. Any diffusers autoencoder with a
            `scaling_factor` works (`AutoencoderKL`'s latent distribution is read at its mode).
        transformer ([`ConcatConditionedTransformer`]): predicts the flow-matching velocity.
        scheduler ([`RestorationGuidedFlowScheduler`] or [`FlowMatchEulerDiscreteScheduler`], the latter without
            restoration guidance).
        degradation_removal ([`DegradationRemovalModel`], *optional*): a pixel-space first stage (as in DiffBIR and
            PASD) applied to the degraded image before it is encoded; its output is also the colour-fix reference.
            `examples/train_degradation_removal.py` trains it.
        upscale_decoder ([`DCUpscaleDecoder`], *optional*): a decoder whose output is `upscale_factor` times larger
            than the VAE's. A call with that `upscale` encodes the image at its own size and decodes with it instead
            of resizing first. `examples/train_decoder.py --upscale 2` trains it; `diffusers_restore.install_decoder`
            adds it to a pipeline folder.
        sampling_defaults (`dict`, *optional*): the model's recommended call, values of the call arguments in
            `SAMPLING_DEFAULTS` used when a call leaves them at `None` (see `set_sampling_defaults`).
        direction (`str`, *optional*): recorded in model_index.json: "restore" here, "degrade" for
            [`SanaDegradationPipeline`]; each class refuses the other's folders.
        empty_prompt_embeds (`list[list[float]]`, *optional*): the empty prompt's embedding (its unmasked tokens),
            recorded when the tokenizer or text encoder is set to `None`: such a pipeline, and the folder it saves, runs
            on it for the empty prompt (`prompt=None` or `""`, `negative_prompt=""`); other prompts then need
            `prompt_embeds` from `encode_prompt` of a pipeline that has a text encoder. To ship a restorer without its
            text encoder: `pipe.tokenizer = pipe.text_encoder = None`, then `save_pretrained`.
    """

    model_cpu_offload_seq = "text_encoder->degradation_removal->transformer->vae->upscale_decoder"
    _optional_components = ["tokenizer", "text_encoder", "degradation_removal", "upscale_decoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "condition_latents"]

    # Prompt encoding is SanaPipeline's (Gemma-2, SANA's token selection), borrowed rather than re-implemented.
    bad_punct_regex = SanaPipeline.bad_punct_regex
    _text_preprocessing = SanaPipeline._text_preprocessing
    _clean_caption = SanaPipeline._clean_caption
    _get_gemma_prompt_embeds = SanaPipeline._get_gemma_prompt_embeds

    #: Number of prompts whose embeddings are kept between calls (least recently used dropped first); 0 disables.
    prompt_cache_size: int = 32
    #: What the model was trained to do; recorded in model_index.json so that a folder is never loaded the other way.
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
        empty_prompt_embeds: list[list[float]] | None = None,
    ):
        super().__init__()
        if direction is not None and direction != self.direction:
            loader = {"restore": "SanaRestorationPipeline", "degrade": "SanaDegradationPipeline"}.get(direction)
            raise ValueError(
                f"This model was trained to {direction!r} images, {type(self).__name__} is for {self.direction!r}"
                + (f": load it with {loader}." if loader else "; known directions: 'restore', 'degrade'.")
            )
        self._prompt_cache: collections.OrderedDict = collections.OrderedDict()
        self._call_lock, self._calling_thread = threading.Lock(), None
        self.register_to_config(empty_prompt_embeds=empty_prompt_embeds, direction=self.direction)
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
            degradation_removal=degradation_removal,
            upscale_decoder=upscale_decoder,
        )
        self.set_sampling_defaults(**(sampling_defaults or {}))
        self.vae_scale_factor = vae_spatial_factor(vae) if vae is not None else 32
        self.image_processor = RestorationImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("tokenizer", "text_encoder"):
            if value is None and all(self.__dict__.get(key) is not None for key in ("tokenizer", "text_encoder")):
                self._record_empty_prompt()  # the pipeline keeps running on the empty prompt without them
            self._prompt_cache.clear()  # cached embeddings belong to the text encoder they came from
        super().__setattr__(name, value)

    @classmethod
    def from_sana_pipeline(cls, sana_pipeline: SanaPipeline, condition_channels: int | None = None, scheduler=None):
        """Build an (untrained) restoration pipeline from a text-to-image [`SanaPipeline`], sharing its modules.

        The transformer is wrapped with [`ConcatConditionedTransformer.from_transformer`] (identity on the noisy latent,
        zero on the condition: SANA exactly, until fine-tuned); the scheduler becomes a
        [`RestorationGuidedFlowScheduler`] with SANA's flow shift unless `scheduler` is given; the sampling defaults are
        SanaPipeline's (20 steps, guidance 4.5). `condition_channels` defaults to the VAE's latent channels.
        """
        if scheduler is None:
            scheduler = RestorationGuidedFlowScheduler.from_sana_config(dict(sana_pipeline.scheduler.config))
        transformer = ConcatConditionedTransformer.from_transformer(
            sana_pipeline.transformer, condition_channels=condition_channels
        )
        return cls(
            tokenizer=sana_pipeline.tokenizer,
            text_encoder=sana_pipeline.text_encoder,
            vae=sana_pipeline.vae,
            transformer=transformer,
            scheduler=scheduler,
            sampling_defaults={name: SAMPLING_DEFAULTS[name] for name in ("num_inference_steps", "guidance_scale")},
        )

    @classmethod
    def from_pretrained_sana(
        cls, pretrained_model_name_or_path: str | os.PathLike, condition_channels: int | None = None, scheduler=None,
        **kwargs: Any,
    ) -> "SanaRestorationPipeline":
        """Load a plain SANA text-to-image checkpoint (Hub id or folder) as an untrained restorer (see
        `from_sana_pipeline`); `kwargs` go to `SanaPipeline.from_pretrained`. Example::

            pipe = SanaRestorationPipeline.from_pretrained_sana(
                "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers", torch_dtype=torch.bfloat16
            )
        """
        kwargs = weights_loading_kwargs(pretrained_model_name_or_path, kwargs)
        with pickle_refusals_explained(pretrained_model_name_or_path):
            sana_pipeline = SanaPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_sana_pipeline(sana_pipeline, condition_channels=condition_channels, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """[`DiffusionPipeline.from_pretrained`] (same arguments) under the package's weight-loading rule
        (`diffusers_restore.models.safe_weights`). A Hub repo id is fetched with `snapshot_download` (diffusers' own
        download refuses component classes from outside diffusers and transformers), pickled weights only for a
        component without safetensors. A plain SANA checkpoint is refused with a pointer to `from_pretrained_sana`,
        unless a `transformer` is passed.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            path = cls._download(path, kwargs)
        model_index = cls.load_config(path)
        if model_index.get("_class_name") == SanaPipeline.__name__ and "transformer" not in kwargs:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a text-to-image SanaPipeline, not a restoration pipeline. "
                "Build an untrained restorer from it with `SanaRestorationPipeline.from_pretrained_sana(...)`, or "
                "pass `transformer=ConcatConditionedTransformer.from_pretrained(...)`."
            )
        for name, value in model_index.items():  # diffusers would look for a missing component in the folder itself
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and name not in kwargs:
                if not os.path.isdir(os.path.join(path, name)):
                    raise ValueError(
                        f"{path}: model_index.json lists the component '{name}', but the folder has no {name}/ "
                        "subfolder: the pipeline folder is incomplete."
                    )
        kwargs = weights_loading_kwargs(path, kwargs)
        with pickle_refusals_explained(path):
            return super().from_pretrained(path, **kwargs)

    @staticmethod
    def _download(repo_id: str, kwargs: dict[str, Any]) -> str:
        """The local snapshot of the Hub repo `repo_id`; takes the Hub arguments out of `kwargs`."""
        names = ("revision", "token", "cache_dir", "local_files_only", "force_download")
        hub = {name: kwargs.pop(name) for name in names if name in kwargs}
        try:
            path = snapshot_download(repo_id, ignore_patterns=list(PICKLE_PATTERNS), **hub)
        except HFValidationError:
            raise FileNotFoundError(
                f"{repo_id} is neither a folder (none exists there) nor a Hub repo id ('org/name')."
            ) from None
        pickled_only = [
            name
            for name in os.listdir(path)
            if os.path.isfile(os.path.join(path, name, "config.json"))
            and not glob.glob(os.path.join(path, name, "*.safetensors"))
        ]
        if pickled_only and kwargs.get("use_safetensors") is not True:
            path = snapshot_download(repo_id, allow_patterns=[f"{name}/*" for name in pickled_only], **hub)
        return path

    # A restoration LoRA carries the condition projection that LoRA runs train fully: as `transformer.projection.weight`
    # in a pipeline LoRA file, or in `condition_projection.safetensors` beside the file of a
    # `ConcatConditionedTransformer.save_lora_adapter` folder (the training script's `transformer_lora/`). The
    # transformer loads it as a LoRA of its own on the projection (see `ConcatConditionedTransformer`).

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """[`SanaLoraLoaderMixin.lora_state_dict`] under the package's weight-loading rule, plus
        `transformer.projection.weight` from `condition_projection.safetensors` when the folder or Hub repo has one
        and the LoRA file holds no projection."""
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            return super().lora_state_dict(source, **kwargs)
        return_metadata = kwargs.pop("return_lora_metadata", False)
        folder = os.path.join(os.fspath(source), kwargs.get("subfolder") or "")
        kwargs = weights_loading_kwargs(folder, kwargs)
        with pickle_refusals_explained(folder):
            state_dict, metadata = super().lora_state_dict(source, return_lora_metadata=True, **kwargs)
            key = f"{cls.transformer_name}.{PROJECTION_KEY}"
            state_dict = add_condition_projection(state_dict, source, key, **kwargs)
        return (state_dict, metadata) if return_metadata else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs: Any,
    ) -> None:
        """[`SanaLoraLoaderMixin.load_lora_weights`], for a pipeline LoRA file, a `save_lora_adapter` folder (the
        training script's `transformer_lora/`), a Hub repo holding either, or a state dict, whose LoRA weights may come
        with the trained `transformer.projection.weight`."""
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
        """[`SanaLoraLoaderMixin.save_lora_weights`], plus `condition_projection` (the projection trained with the
        adapter, `pipe.transformer.projection` after a LoRA run, a tensor `(in_channels, in_channels +
        condition_channels, 1, 1)` or the conv), saved as `transformer.projection.weight`."""
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

    def clear_prompt_cache(self) -> None:
        """Forget the cached prompt embeddings. Setting `pipe.text_encoder` or `pipe.tokenizer` does this; call it
        after changing the text encoder's weights in place."""
        self._prompt_cache.clear()

    @torch.no_grad()
    def _record_empty_prompt(self) -> None:
        """Record the empty prompt's unmasked tokens (all a transformer sees of it) as `empty_prompt_embeds`, from the
        prompt cache when it holds them, else encoded."""
        cached = next((row for key, row in self._prompt_cache.items() if key[0] == "" and not key[3]), None)
        if cached is None and self.text_encoder.device.type != "meta":
            embeds, mask = self._get_gemma_prompt_embeds(
                [""], self.text_encoder.device, self.text_encoder.dtype, max_sequence_length=8
            )
            cached = embeds[0], mask[0]
        if cached is not None:
            self.register_to_config(empty_prompt_embeds=cached[0][cached[1].bool()].float().tolist())

    def _text_embeddings(
        self,
        prompts: list[str],
        device: torch.device,
        clean_caption: bool,
        max_sequence_length: int,
        complex_human_instruction: list[str] | None,
        lora_scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings `(len(prompts), max_sequence_length, hidden)` and masks of `prompts` after SANA's token selection
        (the first token and the last `max_sequence_length - 1`), from a least-recently-used cache of
        `prompt_cache_size` prompts keyed by the prompt and these arguments (bypassed while gradients are enabled and
        for a text encoder with LoRA adapters). Without a text encoder, only the empty prompt is known."""
        if self.tokenizer is None or self.text_encoder is None:
            recorded = self.config.get("empty_prompt_embeds")
            if recorded is None or any(prompts):
                what = f"the prompt {next(p for p in prompts if p)!r}" if any(prompts) else "the empty prompt"
                raise ValueError(
                    f"This pipeline has no text encoder to encode {what}. Pass `prompt_embeds` and "
                    "`prompt_attention_mask` (and the `negative_` ones for guidance) from `encode_prompt` of a "
                    "pipeline that has one; without, only the empty prompt works (`prompt=None` or \"\", "
                    f"`negative_prompt=\"\"`), from its embedding recorded with the model"
                    f"{' (none is)' if recorded is None else ''}."
                )
            dtype = self.transformer.dtype if self.transformer is not None else torch.float32
            tokens = torch.tensor(recorded, dtype=dtype, device=device)
            embeds = tokens.new_zeros(len(prompts), max_sequence_length, tokens.shape[1])
            embeds[:, : len(tokens)] = tokens
            mask = torch.zeros(len(prompts), max_sequence_length, dtype=torch.long, device=device)
            mask[:, : len(tokens)] = 1
            return embeds, mask

        selection = [0, *range(-max_sequence_length + 1, 0)]

        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            if lora_scale is not None and USE_PEFT_BACKEND:
                scale_lora_layers(self.text_encoder, lora_scale)
            embeds, mask = self._get_gemma_prompt_embeds(
                texts, device, self.text_encoder.dtype, clean_caption, max_sequence_length, complex_human_instruction
            )
            if lora_scale is not None and USE_PEFT_BACKEND:
                unscale_lora_layers(self.text_encoder, lora_scale)
            return embeds[:, selection], mask[:, selection]

        if self.prompt_cache_size <= 0 or torch.is_grad_enabled() or getattr(self.text_encoder, "peft_config", None):
            return encode(prompts)
        settings = (clean_caption, max_sequence_length, tuple(complex_human_instruction or ()), str(device))
        keys = [(text, *settings, self.text_encoder.dtype) for text in prompts]
        missing = list(dict.fromkeys(key for key in keys if key not in self._prompt_cache))
        if missing:
            for key, embeds, mask in zip(missing, *encode([key[0] for key in missing])):
                self._prompt_cache[key] = (embeds, mask)
        for key in keys:
            self._prompt_cache.move_to_end(key)
        rows = [self._prompt_cache[key] for key in keys]
        while len(self._prompt_cache) > self.prompt_cache_size:
            self._prompt_cache.popitem(last=False)
        return torch.stack([row[0] for row in rows]), torch.stack([row[1] for row in rows])

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = "",
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
        r"""[`SanaPipeline.encode_prompt`] (same arguments and returns), with the embeddings of repeated prompts cached
        (see `prompt_cache_size`). `prompt=None` and `negative_prompt=None` are the empty prompt. Needs only the
        `tokenizer` and `text_encoder`; without them, only the empty prompt is known (see `empty_prompt_embeds`).

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`: embeddings
            `(batch * num_images_per_prompt, max_sequence_length, hidden)` and masks `(batch * num_images_per_prompt,
            max_sequence_length)`; the negative ones are `None` without classifier-free guidance.
        """
        device = device or self._execution_device
        text_kwargs = dict(
            device=device, clean_caption=clean_caption, max_sequence_length=max_sequence_length, lora_scale=lora_scale
        )
        if prompt_embeds is None:
            prompts = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._text_embeddings(
                prompts, complex_human_instruction=complex_human_instruction, **text_kwargs
            )
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch_size = prompt_embeds.shape[0]
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch_size
            negative_prompt_embeds, negative_prompt_attention_mask = self._text_embeddings(
                negatives, complex_human_instruction=None, **text_kwargs
            )
        # one return statement, of these names: diffusers' tests read encode_prompt's outputs from it
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            None if tensor is None else tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)
            for tensor in (prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)
        )
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The values that call arguments left at `None` take: the config's `sampling_defaults` over
        `SAMPLING_DEFAULTS`."""
        return {**SAMPLING_DEFAULTS, **(self.config.get("sampling_defaults") or {})}

    def set_sampling_defaults(self, **sampling_defaults: Any) -> None:
        """Record this model's recommended call (arguments among `SAMPLING_DEFAULTS`, checked as a call checks them) in
        the pipeline's config, saved in model_index.json. `None` removes a recorded value; other recorded values stay.
        Example, a one-step restorer::

            pipe.set_sampling_defaults(num_inference_steps=1, guidance_scale=1.0)
            pipe.save_pretrained("my-restorer")   # SanaRestorationPipeline.from_pretrained("my-restorer")(image)
        """
        recorded = {**(self.config.get("sampling_defaults") or {}), **sampling_defaults}
        unknown = sorted(set(recorded) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise ValueError(
                f"`sampling_defaults` has unknown entries {unknown}; allowed: {', '.join(SAMPLING_DEFAULTS)}."
            )
        _check_arguments(recorded, ARGUMENT_RULES, "`sampling_defaults['{}']`")
        # kept in SAMPLING_DEFAULTS order, so model_index.json and the model card list them the same way every time
        self.register_to_config(
            sampling_defaults={k: recorded[k] for k in SAMPLING_DEFAULTS if recorded.get(k) is not None}
        )

    def resolve_sampling_arguments(self, **given: Any) -> dict[str, Any]:
        """The sampling arguments (keys of `SAMPLING_DEFAULTS`) a call with the keyword arguments `given` uses: each one
        `given` leaves out or at `None` comes from `sampling_defaults`. `guidance_scale_start` is taken from the
        defaults only with `guidance_scale`: an explicit `guidance_scale` alone is a constant scale."""
        defaults = self.sampling_defaults
        resolved = {name: defaults[name] if given.get(name) is None else given[name] for name in SAMPLING_DEFAULTS}
        if given.get("guidance_scale") is not None and given.get("guidance_scale_start") is None:
            resolved["guidance_scale_start"] = None
        return resolved

    def check_inputs(
        self,
        prompt=None,
        negative_prompt=None,
        num_inference_steps=None,
        timesteps=None,
        sigmas=None,
        guidance_scale=None,
        guidance_scale_start=None,
        restoration_guidance=None,
        strength=None,
        fidelity=None,
        upscale=1.0,
        prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt_embeds=None,
        negative_prompt_attention_mask=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        color_fix=None,
        tile_size=None,
        tile_overlap=None,
    ) -> None:
        """Raise a `ValueError` naming the first invalid argument of `__call__` (sampling arguments as
        `resolve_sampling_arguments` resolves them), before any model runs. To check settings once before a batch of
        images: `pipe.check_inputs(**{**kwargs, **pipe.resolve_sampling_arguments(**kwargs)})`."""
        arguments = locals()
        missing = [name for name in ("vae", "transformer", "scheduler") if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"This pipeline has no {' or '.join(f'`{name}`' for name in missing)}, which restoring an image needs "
                f"(it was built or loaded with {missing[0]}=None, e.g. to encode prompts only)."
            )
        on_meta = [
            name
            for name, module in self.components.items()
            if isinstance(module, torch.nn.Module)
            and not hasattr(module, "_hf_hook")  # offloaded by accelerate: its weights come in when needed
            and any(parameter.is_meta for parameter in module.parameters())
        ]
        if on_meta:
            raise ValueError(
                f"The pipeline's {', '.join(on_meta)} weights are on the meta device, which holds no values (as after "
                "`pipe.to('meta')`): load the pipeline again with `from_pretrained`."
            )
        multiple, factor = self.size_multiple, self.vae_scale_factor
        tile = self.default_tile_size if tile_size is None else tile_size
        rules = {
            **ARGUMENT_RULES,
            "tile_size": (
                lambda v: isinstance(v, int) and v >= 0 and v % multiple == 0,
                f"None (automatic), 0 (never tile) or a positive multiple of {multiple} px (the VAE's factor {factor} "
                "x the transformer's patch size: one token)",
            ),
            "tile_overlap": (
                lambda v: isinstance(v, int) and v >= 0 and v % factor == 0 and not 0 < tile <= v,
                f"None (a quarter of the tile) or a multiple of {factor} px (the VAE's factor) smaller than the tile "
                f"({tile} px)",
            ),
            "callback_on_step_end_tensor_inputs": (
                lambda v: set(v) <= set(self._callback_tensor_inputs),
                f"a list of names from {self._callback_tensor_inputs}",
            ),
        }
        _check_arguments(arguments, rules)
        train_timesteps = float(self.scheduler.config.get("num_train_timesteps", 1000))
        for name, schedule, upper in (("timesteps", timesteps, train_timesteps), ("sigmas", sigmas, 1.0)):
            values = None if schedule is None else np.asarray(torch.as_tensor(schedule).cpu(), dtype=np.float64)
            if values is not None and not (
                values.ndim == 1
                and values.size > 0
                and np.isfinite(values).all()
                and 0 < values.min() <= values.max() <= upper
                and (np.diff(values) <= 0).all()
            ):
                raise ValueError(
                    f"`{name}` must be a non-empty list of finite numbers in (0, {upper:g}] that does not increase "
                    f"(denoising goes from noisy to clean), got {schedule!r}."
                )
        if restoration_guidance and not isinstance(self.scheduler, RestorationGuidedFlowScheduler):
            raise ValueError(
                f"`restoration_guidance` needs a RestorationGuidedFlowScheduler; this pipeline's scheduler is a "
                f"{type(self.scheduler).__name__}. Leave it None (or 0), or swap the scheduler with "
                "`RestorationGuidedFlowScheduler.from_config(pipe.scheduler.config)`."
            )
        for name, text, embeds, mask in (
            ("prompt", prompt, prompt_embeds, prompt_attention_mask),
            ("negative_prompt", negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask),
        ):
            if text is not None and embeds is not None:
                raise ValueError(f"Pass either `{name}` or `{name}_embeds`, not both.")
            if embeds is not None and mask is None:
                raise ValueError(f"`{name}_attention_mask` is required with `{name}_embeds`.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
                )

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def default_tile_size(self) -> int:
        """Automatic tile size in pixels: the transformer's native resolution (`sample_size` latent pixels, 1024 px for
        SANA 1024 px checkpoints); 0 (never tile) without a transformer."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor if self.transformer is not None else 0

    @property
    def _patch_size(self) -> int:
        return int(self.transformer.config.patch_size or 1) if self.transformer is not None else 1

    @property
    def size_multiple(self) -> int:
        """Images are padded to a multiple of this many pixels per side: one transformer token (the VAE's factor times
        the patch size; 32 for SANA with DC-AE f32)."""
        return self.vae_scale_factor * self._patch_size

    def progress_bar(self, iterable=None, total=None, desc: str | None = None):
        """[`DiffusionPipeline.progress_bar`], with `desc` naming the stage it counts; a `desc` given to
        `set_progress_bar_config` wins."""
        config = getattr(self, "_progress_bar_config", {})
        self._progress_bar_config = {"desc": desc, **config} if desc else config
        try:
            return super().progress_bar(iterable=iterable, total=total)
        finally:
            self._progress_bar_config = config

    def _tile_grid(self, size, tile_size: int | None, tile_overlap: int | None, cell: int = 1, align: int = 1):
        """The tiles of an image of `size` cells of `cell` px (pixels for the degradation removal stage, latent pixels
        for the VAE and the transformer): one tile when it fits in `tile_size` px (`None`: `default_tile_size`; 0:
        never tile), else tiles of `tile_size` px (whole `align` cells) overlapping by `tile_overlap` px (`None`: a
        quarter of the tile)."""
        size = (int(size[0]), int(size[1]))
        tile_px = self.default_tile_size if tile_size is None else tile_size
        if tile_px == 0 or max(size) * cell <= tile_px:
            return TileGrid(size, max(size))
        tile = max(tile_px // cell // align, 1) * align
        overlap = (tile_px // 4 if tile_overlap is None else tile_overlap) // cell
        return TileGrid(size, tile, min(overlap, tile - 1), align)

    @torch.no_grad()
    def remove_degradations(
        self, pixels: torch.Tensor, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> torch.Tensor:
        """Run the `degradation_removal` stage on RGB `(batch, 3, H, W)` pixels in [0, 1], tiled as a call tiles (on
        the stage's own grid); returns the cleaned pixels, float32 clamped to [0, 1]."""
        model = self.degradation_removal
        height, width = pixels.shape[-2:]
        padded = pad_to_multiple(pixels, model.size_multiple)
        tiles = self._tile_grid(padded.shape[-2:], tile_size, tile_overlap, align=model.size_multiple)
        # a stage conditioned on image-level estimates (noise level, ...) gets the whole image's in every tile
        conditioning = model.image_conditioning(pixels)

        def clean(top: int, left: int, tile_height: int, tile_width: int) -> torch.Tensor:
            tile = padded[:, :, top : top + tile_height, left : left + tile_width].to(model.dtype)
            return model(tile, **conditioning)

        with self.progress_bar(total=len(tiles), desc="degradation removal") as progress:
            cleaned = tiles.blend(clean, progress=progress)
        return cleaned[:, :, :height, :width].clamp(0.0, 1.0)

    def _vae_encode(self, pixels: torch.Tensor, tiles: TileGrid) -> torch.Tensor:
        """RGB `(batch, 3, H, W)` in [0, 1] (H, W multiples of the VAE's factor) -> scaled latents, tile by tile."""
        factor = self.vae_scale_factor

        def encode(top: int, left: int, height: int, width: int) -> torch.Tensor:
            rows, cols = slice(top * factor, (top + height) * factor), slice(left * factor, (left + width) * factor)
            return encode_latents(self.vae, pixels[:, :, rows, cols] * 2.0 - 1.0)

        with self.progress_bar(total=len(tiles), desc="VAE encode") as progress:
            return tiles.blend(encode, progress=progress)

    def _vae_decode(self, latents: torch.Tensor, tiles: TileGrid | None, upscale_decoder: bool = False) -> torch.Tensor:
        """Scaled latents -> RGB in [0, 1] float32, tile by tile (`None`: whole), by the VAE or, with
        `upscale_decoder`, by `self.upscale_decoder` (`upscale_factor` times larger)."""
        tiles = tiles or TileGrid(tuple(latents.shape[-2:]), max(latents.shape[-2:]))
        decoder, factor = self.upscale_decoder, self.vae_scale_factor
        if upscale_decoder:
            factor *= decoder.config.upscale_factor

        def decode(top: int, left: int, height: int, width: int) -> torch.Tensor:
            part = latents[:, :, top : top + height, left : left + width]
            if upscale_decoder:
                return decoder(unscale_latents(self.vae, part).to(decoder.dtype), return_dict=False)[0]
            return decode_latents(self.vae, part)

        with self.progress_bar(total=len(tiles), desc="VAE decode") as progress:
            decoded = tiles.blend(decode, output_scale=factor, progress=progress)
        return (decoded / 2 + 0.5).clamp(0.0, 1.0)

    def prepare_latents(self, image_latents: torch.Tensor, start_sigma: float | None, generator, latents=None):
        """Starting latents, float32 shaped like `image_latents`: `latents` as given, else pure noise (`start_sigma`
        `None`: the whole schedule runs), else the condition noised to the first remaining step, `(1 - sigma) *
        image_latents + sigma * noise`."""
        shape = tuple(image_latents.shape)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` must have shape {shape} (batch, channels, padded height / {self.vae_scale_factor}, "
                    f"padded width / {self.vae_scale_factor}), got {tuple(latents.shape)}."
                )
            return latents.to(device=image_latents.device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but the batch holds {shape[0]} samples "
                "(images x num_images_per_prompt)."
            )
        noise = randn_tensor(shape, generator=generator, device=image_latents.device, dtype=torch.float32)
        return noise if start_sigma is None else (1.0 - start_sigma) * image_latents + start_sigma * noise

    def get_timesteps(self, num_inference_steps: int, strength: float) -> tuple[torch.Tensor, int]:
        """The tail of the schedule that `strength` runs, as in diffusers' img2img pipelines: the first
        `int(num_inference_steps - num_inference_steps * strength)` steps are skipped. Returns `(timesteps, number of
        steps that run)`."""
        init_timestep = min(num_inference_steps * strength, num_inference_steps)
        t_start = int(max(num_inference_steps - init_timestep, 0))
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @_one_call_at_a_time
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
        Restore `image`. The sampling arguments (`num_inference_steps` to `fidelity`) default to `None`: the value the
        model records in its config (`pipe.sampling_defaults`, e.g. one step without guidance for a one-step
        restorer); explicit values win.

        Args:
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The degraded image(s), at least one latent pixel per side after `upscale`; a batch shares one size.
                PIL: any mode; alpha (RGBA, LA, PA, P with transparency) is carried to PIL outputs (RGBA), and 16-bit,
                32-bit and float grey follow `image_io.high_bit_to_unit`. numpy: HW, HWC or NHWC; torch: HW, CHW or
                NCHW; 1 or 3 channels, integer or float in **[0, 1]** (not [-1, 1]). The output has the input's size
                times `upscale` (the image is padded by reflection to whole tokens and cropped back).
            prompt (`str` or `list[str]`, *optional*):
                What the restoration should produce (e.g. "Restore this image to high quality"), one for all images or
                one per image. No prompt is the empty prompt.
            negative_prompt (`str` or `list[str]`, defaults to `DEFAULT_NEGATIVE_PROMPT`):
                The negative-quality prompt that guidance pushes away from; `""` is text-to-image guidance.
            num_inference_steps (`int`, *optional*):
                Steps of the full schedule (`strength < 1` runs its tail). Default: 20 for a flow-matching model.
            timesteps (`list[float]`, *optional*), sigmas (`list[float]`, *optional*):
                A custom schedule instead of `num_inference_steps`: not increasing, sigmas in (0, 1], timesteps in (0,
                num_train_timesteps].
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale, constant over the steps; `1.0` disables guidance (one transformer pass
                per step). With `guidance_scale_start`, the scale at sigma -> 0. Default: 4.5 for a flow-matching model.
            guidance_scale_start (`float`, *optional*):
                SUPIR's linear guidance: the scale at the noisiest step, moving linearly in sigma to `guidance_scale`
                (e.g. `guidance_scale_start=1, guidance_scale=4` leaves the structure unguided). `None`: constant.
            restoration_guidance (`float`, *optional*):
                Restoration guidance strength tau_r of a [`RestorationGuidedFlowScheduler`] (0 = off; larger values
                pull the estimate toward the degraded latent for longer). `None`: the scheduler's configuration.
            strength (`float`, *optional*):
                As in diffusers' img2img pipelines, the fraction of the schedule to run, in (0, 1]; below 1 sampling
                starts from the degraded latent noised to the first remaining sigma. Default: 1.
            fidelity (`float`, *optional*):
                In [0, 1]: how much of the reference's detail that the VAE cannot represent is added back, `output =
                decode(latents) + fidelity * (reference - decode(encode(reference)))`, the reference being the encoded
                image (after the degradation removal stage; without one it is the degraded input, whose noise it would
                bring back). Costs one VAE decode. Not available when the `upscale_decoder` decodes. Default: 0.
            upscale (`float`, defaults to 1.0):
                Super-resolution factor >= 1: the input is resized (bicubic) before encoding, unless the pipeline's
                `upscale_decoder` has this `upscale_factor` and decodes the larger image itself.
            num_images_per_prompt (`int`, defaults to 1):
                Restorations per input image (consecutive in the output).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes the noise deterministic; a list needs one generator per output image.
            latents (`torch.Tensor`, *optional*):
                Starting latents `(batch * num_images_per_prompt, C, padded height / f, padded width / f)`.
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask
                (`torch.Tensor`, *optional*):
                The outputs of `encode_prompt`, instead of `prompt` / `negative_prompt`.
            color_fix (`str`, *optional*, defaults to `"wavelet"`):
                `"wavelet"` takes the result's low frequencies from the (cleaned) input, `"adain"` its channel means
                and deviations, `None` keeps the model's colours (for colour casts to be corrected).
            tile_size (`int`, *optional*):
                Tile side in pixels, a multiple of `size_multiple`. `None`: the transformer's native resolution
                (`default_tile_size`); `0`: never tile. Larger images are processed in overlapping tiles by every
                stage, each denoising step blending the tiles' velocities before its one scheduler step.
            tile_overlap (`int`, *optional*):
                Minimum overlap of neighbouring tiles in pixels, a multiple of the VAE's factor; a quarter of the tile
                by default.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (NHWC float32 in [0, 1]), `"pt"` (NCHW in [0, 1]) or `"latent"` (the padded image's
                final latents).
            return_dict, clean_caption, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
            max_sequence_length:
                As in [`SanaPipeline.__call__`]; the callback's tensors come from `_callback_tensor_inputs`.
            complex_human_instruction (`list[str]`, *optional*):
                SANA's prompt-enhancing instruction prefix; off by default (it costs ~1k tokens per prompt).

        Examples:

        Returns:
            [`SanaRestorationPipelineOutput`] or `tuple`: the restored images; `(images,)` when `return_dict` is
            `False`.

        Raises:
            `ValueError` naming an invalid argument or image; `RuntimeError` when the model produces NaN or infinite
            values (broken weights, or float16 overflow).
        """
        # 1. Resolve the model's sampling defaults, check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if negative_prompt_embeds is not None and negative_prompt == DEFAULT_NEGATIVE_PROMPT:
            negative_prompt = None  # the default steps aside for the embeddings given instead
        fidelity_requested = fidelity
        sampling = self.resolve_sampling_arguments(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            guidance_scale_start=guidance_scale_start,
            restoration_guidance=restoration_guidance,
            strength=strength,
            fidelity=fidelity,
        )
        self.check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            timesteps=timesteps,
            sigmas=sigmas,
            upscale=upscale,
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            color_fix=color_fix,
            tile_size=tile_size,
            tile_overlap=tile_overlap,
            **sampling,
        )
        num_inference_steps, guidance_scale, guidance_scale_start, restoration_guidance, strength, fidelity = (
            sampling.values()
        )

        # 2. Define call parameters
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 3. Preprocess the image: RGB in [0, 1] (alpha kept aside), cleaned by the degradation removal stage, resized
        # by `upscale` unless the upscale decoder makes the larger image at the end
        pixels, alphas = self.image_processor.preprocess(image)
        batch_size, (height, width) = len(pixels), pixels.shape[-2:]
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt), ("prompt_embeds", prompt_embeds),
                            ("negative_prompt_embeds", negative_prompt_embeds)):
            if isinstance(value, (list, torch.Tensor)) and len(value) != batch_size:
                raise ValueError(
                    f"`{name}` has {len(value)} entries but `image` holds {batch_size} image(s): pass one entry per "
                    "image, or a single string for all."
                )
        decoder_upscale = 1
        if self.upscale_decoder is not None and upscale == self.upscale_decoder.config.upscale_factor:
            decoder_upscale = self.upscale_decoder.config.upscale_factor
            if fidelity_requested:
                raise ValueError(
                    f"`fidelity` needs the reference image at the output's resolution, which does not exist when the "
                    f"upscale decoder produces the x{decoder_upscale} image: pass `fidelity=0`."
                )
            fidelity = 0.0
        size = (max(1, round(height * upscale / decoder_upscale)), max(1, round(width * upscale / decoder_upscale)))
        if min(size) < self.vae_scale_factor:
            raise ValueError(
                f"`image` is too small: {height}x{width} px, encoded at {size[0]}x{size[1]} (`upscale`={upscale}); each "
                f"side must be at least {self.vae_scale_factor} px there (one latent pixel)."
            )
        pixels = pixels.to(device)
        if self.degradation_removal is not None:
            pixels = self.remove_degradations(pixels, tile_size, tile_overlap)
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)

        # 4. Encode the prompt, and the negative-quality prompt when any step uses guidance (cached across calls)
        if prompt_embeds is None and not isinstance(prompt, list):
            prompt = [prompt or ""] * batch_size
        (
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        ) = self.encode_prompt(
            prompt,
            max(guidance_scale, guidance_scale_start or 1.0) > 1,
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
            lora_scale=attention_kwargs.get("scale") if attention_kwargs is not None else None,
        )

        # 5. Encode the condition: the image padded to whole transformer tokens, VAE-encoded tile by tile
        padded = pad_to_multiple(pixels, self.size_multiple)
        factor = self.vae_scale_factor
        latent_size = (padded.shape[-2] // factor, padded.shape[-1] // factor)
        tiles = self._tile_grid(latent_size, tile_size, tile_overlap, cell=factor, align=self._patch_size)
        image_latents = self._vae_encode(padded, tiles)
        condition_latents = image_latents.repeat_interleave(num_images_per_prompt, dim=0)

        # 6. Prepare timesteps: the tail of the schedule that `strength` runs
        timestep_device = "cpu" if XLA_AVAILABLE else device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )
        sigma_max = float(self.scheduler.sigmas[0])
        if strength < 1.0:
            timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength)
        start_index = len(self.scheduler.timesteps) - len(timesteps)

        # 7. Prepare latents: noise, or the degraded latent noised to the first remaining sigma
        start_sigma = float(self.scheduler.sigmas[start_index]) if strength < 1.0 else None
        latents = self.prepare_latents(condition_latents, start_sigma, generator, latents)

        # 8. Denoising loop: the velocity tile by tile, blended, then one scheduler step on the whole latent (with
        # restoration guidance toward the condition when the scheduler has it)
        restoration_guided, tau = isinstance(self.scheduler, RestorationGuidedFlowScheduler), restoration_guidance
        dtype = self.transformer.dtype
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps) * len(tiles), desc="denoising") as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if guidance_scale_start is not None:  # linear in sigma, from guidance_scale_start at sigma_max
                    ratio = float(self.scheduler.sigmas[start_index + i]) / sigma_max
                    self._guidance_scale = guidance_scale + (guidance_scale_start - guidance_scale) * ratio
                guided = self.do_classifier_free_guidance
                embeds, mask = prompt_embeds, prompt_attention_mask
                if guided:
                    embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
                    mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
                timestep = t.to(device=device, dtype=torch.float32) * self.transformer.config.timestep_scale

                def predict(top: int, left: int, height: int, width: int) -> torch.Tensor:
                    window = (slice(None), slice(None), slice(top, top + height), slice(left, left + width))
                    latent_model_input, condition = latents[window], condition_latents[window]
                    if guided:
                        latent_model_input, condition = torch.cat([latent_model_input] * 2), torch.cat([condition] * 2)
                    velocity = self.transformer(
                        latent_model_input.to(dtype),
                        condition_latents=condition.to(dtype),
                        encoder_hidden_states=embeds.to(dtype),
                        encoder_attention_mask=mask,
                        timestep=timestep.expand(latent_model_input.shape[0]),
                        attention_kwargs=self.attention_kwargs,
                        return_dict=False,
                    )[0].float()
                    if guided:
                        velocity_uncond, velocity_text = velocity.chunk(2)
                        velocity = velocity_uncond + self.guidance_scale * (velocity_text - velocity_uncond)
                    return velocity

                velocity = tiles.blend(predict, progress=progress_bar)
                extra_step_kwargs = {"generator": generator}
                if restoration_guided:
                    extra_step_kwargs.update(condition_latents=condition_latents, restoration_guidance_tau=tau)
                latents = self.scheduler.step(velocity, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                    condition_latents = callback_outputs.pop("condition_latents", condition_latents)

                if XLA_AVAILABLE:
                    xm.mark_step()

        # 9. Decode tile by tile, add back what the VAE loses of the reference (fidelity), crop the padding, fix the
        # colours toward the (cleaned) input; never return non-finite values
        if output_type == "latent":
            image = latents
        else:
            image = self._vae_decode(latents, tiles, upscale_decoder=decoder_upscale > 1)
            image = image[:, :, : size[0] * decoder_upscale, : size[1] * decoder_upscale]
            if fidelity > 0:  # reference - decode(encode(reference))
                residual = pixels - self._vae_decode(image_latents, tiles)[:, :, : size[0], : size[1]]
                image = (image + fidelity * residual.repeat_interleave(num_images_per_prompt, dim=0)).clamp(0.0, 1.0)
            if color_fix is not None:
                reference = pixels.repeat_interleave(num_images_per_prompt, dim=0)
                if decoder_upscale > 1:
                    reference = F.interpolate(reference, size=image.shape[-2:], mode="bicubic", align_corners=False)
                image = apply_color_fix(image, reference, color_fix)
        if not torch.isfinite(image).all():
            raise RuntimeError(
                f"The {'latents' if output_type == 'latent' else 'restored images'} hold NaN or infinite values: the "
                "model's weights are likely broken (e.g. saved from a diverged training run) or float16 overflowed. "
                "Check the weights with torch.isfinite, or load the pipeline in float32 or bfloat16."
            )

        # 10. Postprocess: the output type, and PIL outputs get their input's alpha back
        image = self.image_processor.postprocess(image, output_type, alphas)

        # 11. Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return SanaRestorationPipelineOutput(images=image)
