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

Images larger than a tile (by default the transformer's native resolution) are processed in overlapping tiles, with
one layout for every stage (`TileGrid`): the degradation removal stage and the VAE run tile by tile, and each
denoising step predicts the velocity tile by tile and blends it before its single scheduler step, so peak memory
depends on the tile size only. Each stage reports its progress through `progress_bar(total=..., desc=...)` (tqdm),
counting tiles: "degradation removal", "VAE encode", "denoising" (steps x tiles), "VAE decode". Any tqdm hook (e.g.
Gradio's `gr.Progress(track_tqdm=True)`) sees the stage and the tile; `set_progress_bar_config(disable=True)` silences
them.

A pipeline carries its recommended sampling settings in its config (`sampling_defaults`, saved in
model_index.json): a one-step restorer records one step without guidance, a flow-matching fine-tune its steps and
guidance. Call arguments left at `None` take those values; explicit arguments win.
"""

from __future__ import annotations

import collections
import functools
import glob
import inspect
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
from ..models.transformer_sana_concat import ConcatConditionedTransformer
from ..models.upscale_decoder import DCUpscaleDecoder
from ..models.vae_latents import decode_latents, encode_latents, unscale_latents, vae_spatial_factor
from ..schedulers.scheduling_restoration_guided_flow import RestorationGuidedFlowScheduler
from .image_processing_restoration import (
    COLOR_FIX_METHODS,
    TileGrid,
    apply_color_fix,
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


# What a call argument that is not `None` must be: (test, the rule in words). The sampling arguments' rules hold for a
# pipeline's recorded `sampling_defaults` too.
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
    "output_type": (lambda v: v in OUTPUT_TYPES, f"one of {OUTPUT_TYPES}"),
    "color_fix": (lambda v: v in COLOR_FIX_METHODS, f"one of {COLOR_FIX_METHODS} or None"),
    "prompt": (_is_text, "a string or a list of strings"),
    "negative_prompt": (_is_text, "a string or a list of strings"),
}


def _check_arguments(
    values: dict[str, Any], rules: dict[str, tuple[Callable[[Any], bool], str]], label: str = "`{}`"
) -> None:
    """Raise a `ValueError` for the first value of `values` that breaks its rule in `rules` (`None`, and names
    without a rule, are not checked); `label` formats the name in the message."""
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


def _resize_alphas(alphas: list[torch.Tensor | None], size: tuple[int, int]) -> list[torch.Tensor | None]:
    """Alpha channels `(1, H, W)` (or None) resized bicubically to `size`, clamped to [0, 1]."""
    return [
        None if alpha is None else F.interpolate(alpha[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0.0, 1.0)
        for alpha in alphas
    ]


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
    One pipeline runs one call at a time: calls from several threads wait for each other.

    Args:
        tokenizer ([`GemmaTokenizer`] or [`GemmaTokenizerFast`], *optional*): the text tokenizer.
        text_encoder ([`Gemma2PreTrainedModel`], *optional*): the text encoder (SANA uses Gemma-2-2B's `Gemma2Model`).
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
            `guidance_scale_start`, `restoration_guidance`, `strength` and `fidelity`, used when a call leaves them at
            `None`. Stored in the pipeline's config (model_index.json); set it with
            [`~SanaRestorationPipeline.set_sampling_defaults`]. Unset entries fall back to `BUILTIN_SAMPLING_DEFAULTS`.
        direction (`str`, *optional*):
            Set by `from_pretrained` from model_index.json: the direction the folder was saved with. A folder saved
            by [`SanaDegradationPipeline`] ("degrade") is refused here with a message naming that class, and the
            other way round. Folders saved before directions were recorded are restorers.
        empty_prompt_embeds (`list[list[float]]`, *optional*):
            The empty prompt's embedding (its unmasked tokens, `(tokens, hidden)`), recorded in the config when the
            tokenizer or text encoder is set to `None`: such a pipeline, and the folder it saves, runs on it for the
            empty prompt (`prompt=None` or `""`, and `negative_prompt=""`); any other prompt then needs
            `prompt_embeds` from `encode_prompt` of a pipeline that has a text encoder. To ship a restorer without
            its text encoder: `pipe.tokenizer = pipe.text_encoder = None`, then `save_pretrained`.

    A pipeline may be built with only some components (e.g. only `tokenizer` and `text_encoder` to encode prompts);
    each method says which components it needs.
    """

    model_cpu_offload_seq = "text_encoder->degradation_removal->transformer->vae->upscale_decoder"
    _optional_components = ["tokenizer", "text_encoder", "degradation_removal", "upscale_decoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "condition_latents"]

    # Prompt encoding is SanaPipeline's (Gemma-2, SANA's token selection); these are borrowed, not re-implemented.
    bad_punct_regex = SanaPipeline.bad_punct_regex
    _text_preprocessing = SanaPipeline._text_preprocessing
    _clean_caption = SanaPipeline._clean_caption
    _get_gemma_prompt_embeds = SanaPipeline._get_gemma_prompt_embeds

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
        empty_prompt_embeds: list[list[float]] | None = None,
    ):
        super().__init__()
        if direction is not None and direction != type(self).direction:
            loader = {"restore": "SanaRestorationPipeline", "degrade": "SanaDegradationPipeline"}.get(direction)
            raise ValueError(
                f"This model was trained to {direction!r} images, {type(self).__name__} is for {type(self).direction!r}"
                + (f": load it with {loader}." if loader else "; known directions: 'restore', 'degrade'.")
            )
        self._prompt_cache: collections.OrderedDict = collections.OrderedDict()
        self._call_lock, self._calling_thread = threading.Lock(), None
        self.register_to_config(empty_prompt_embeds=empty_prompt_embeds)
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

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("tokenizer", "text_encoder"):
            has_text_encoder = all(self.__dict__.get(key) is not None for key in ("tokenizer", "text_encoder"))
            if value is None and has_text_encoder:
                self._record_empty_prompt()  # the pipeline keeps running on the empty prompt without them
            self._prompt_cache.clear()  # cached embeddings belong to the text encoder they came from
        super().__setattr__(name, value)


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
            sampling_defaults=dict(FLOW_MATCHING_SAMPLING_DEFAULTS),
        )

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
        kwargs = weights_loading_kwargs(pretrained_model_name_or_path, kwargs)
        with pickle_refusals_explained(pretrained_model_name_or_path):
            sana_pipeline = SanaPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_sana_pipeline(sana_pipeline, condition_channels=condition_channels, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a pipeline saved by `save_pretrained` from a local folder or a Hub repo id.

        As [`DiffusionPipeline.from_pretrained`] (same arguments), with the package's weight-loading rule
        (`diffusers_restore.models.safe_weights`: safetensors first, a pickled `.bin` only through torch's
        weights-only loader, and code in a weight file never runs). diffusers' own download step refuses a Hub repo
        whose model_index.json names component classes from outside diffusers and transformers, such as this
        package's transformer and scheduler: a repo id is therefore fetched here with
        `huggingface_hub.snapshot_download` (`revision`, `token`, `cache_dir`, `local_files_only`,
        `force_download`), pickled weights only for a model component that has no safetensors.

        A plain SANA checkpoint is refused with a pointer to [`~SanaRestorationPipeline.from_pretrained_sana`],
        unless a `transformer` is passed explicitly.
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
        missing = [
            name
            for name, value in model_index.items()
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and name not in kwargs
            and not os.path.isdir(os.path.join(path, name))
        ]
        if missing:  # diffusers would look for the component's files in the pipeline folder itself
            raise ValueError(
                f"{path}: model_index.json lists the component '{missing[0]}', but the folder has no {missing[0]}/ "
                "subfolder: the pipeline folder is incomplete."
            )
        kwargs = weights_loading_kwargs(path, kwargs)
        with pickle_refusals_explained(path):
            return super().from_pretrained(path, **kwargs)

    @staticmethod
    def _download(repo_id: str, kwargs: dict[str, Any]) -> str:
        """The local snapshot of the Hub repo `repo_id` (see `from_pretrained`); takes the Hub arguments out of
        `kwargs`."""
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

    # ----------------------------------------------------------------------------------------- prompt encoding

    def clear_prompt_cache(self) -> None:
        """Forget the cached prompt embeddings. Setting `pipe.text_encoder` or `pipe.tokenizer` does this; call it
        after changing the text encoder's weights in place (e.g. `load_state_dict`)."""
        self._prompt_cache.clear()

    @torch.no_grad()
    def _record_empty_prompt(self) -> None:
        """Record the empty prompt's embedding in the config (`empty_prompt_embeds`): its unmasked tokens, which are
        all a transformer sees of it (the attention mask hides the rest). Taken from the prompt cache when it holds
        the empty prompt (without an instruction prefix), else encoded."""
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
        """Embeddings `(len(prompts), max_sequence_length, hidden)` and attention masks of `prompts`, after SANA's
        token selection (the first token and the last `max_sequence_length - 1`).

        They come from a least-recently-used cache of `prompt_cache_size` prompts, keyed by the prompt and these
        arguments; the text encoder sees each missing prompt once. The cache is bypassed while gradients are enabled
        and when the text encoder carries LoRA adapters (whose scale may change between calls). Without a text
        encoder, only the empty prompt is known: `empty_prompt_embeds`, padded with masked zeros.
        """
        if self.tokenizer is None or self.text_encoder is None:
            recorded = self.config.get("empty_prompt_embeds")
            if recorded is None or any(prompts):
                what = f"the prompt {next(p for p in prompts if p)!r}" if any(prompts) else "the empty prompt"
                none = " (none is)" if recorded is None else ""
                raise ValueError(
                    f"This pipeline has no text encoder to encode {what}. Pass `prompt_embeds` and "
                    "`prompt_attention_mask` (and the `negative_` ones for guidance) from `encode_prompt` of a "
                    "pipeline that has one; without, only the empty prompt works (`prompt=None` or \"\", "
                    f"`negative_prompt=\"\"`), from its embedding recorded with the model{none}."
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
        r"""Encode the prompt and, for classifier-free guidance, the negative prompt: [`SanaPipeline.encode_prompt`]
        (same arguments and returns), with the embeddings of repeated prompts cached (see `prompt_cache_size`).

        `prompt=None` and `negative_prompt=None` are the empty prompt. Needs only the `tokenizer` and `text_encoder`
        components; without them, only the empty prompt is known (see `empty_prompt_embeds`).

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`:
            embeddings `(batch * num_images_per_prompt, max_sequence_length, hidden)` and masks `(batch *
            num_images_per_prompt, max_sequence_length)`; the negative ones are `None` without classifier-free
            guidance.
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

    # -------------------------------------------------------------------------------------------- properties

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the current step (with `guidance_scale_start`, the linear schedule
        sets it before every step)."""
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
        for SANA 1024 px checkpoints); 0 (never tile) without a transformer."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor if self.transformer is not None else 0

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
        `guidance_scale_start`, `restoration_guidance`, `strength`, `fidelity`), validated as a call validates them;
        `None` removes a recorded value (the built-in default applies again). Other recorded values are kept.
        Example, a one-step restorer::

            pipe.set_sampling_defaults(num_inference_steps=1, guidance_scale=1.0)
            pipe.save_pretrained("my-restorer")   # SanaRestorationPipeline.from_pretrained("my-restorer")(image)
        """
        recorded = {**(self.config.get("sampling_defaults") or {}), **sampling_defaults}
        self.register_to_config(sampling_defaults=self._checked_sampling_defaults(recorded))

    @staticmethod
    def _checked_sampling_defaults(values: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(values) - set(SAMPLING_ARGUMENTS))
        if unknown:
            raise ValueError(
                f"`sampling_defaults` has unknown entries {unknown}; allowed: {', '.join(SAMPLING_ARGUMENTS)}."
            )
        _check_arguments(values, ARGUMENT_RULES, "`sampling_defaults['{}']`")
        return {name: values[name] for name in SAMPLING_ARGUMENTS if values.get(name) is not None}

    def resolve_sampling_arguments(self, **given: Any) -> dict[str, Any]:
        """The sampling arguments (`SAMPLING_ARGUMENTS`) a call with the keyword arguments `given` uses: each one
        `given` leaves out or at `None` comes from `sampling_defaults`; other keys of `given` are ignored.

        One coupling: `guidance_scale_start` is taken from the defaults only when `guidance_scale` is too, so an
        explicit `guidance_scale` alone always means a constant scale (`guidance_scale=1.0`: no guidance at all).
        """
        defaults = self.sampling_defaults
        resolved = {name: defaults[name] if given.get(name) is None else given[name] for name in SAMPLING_ARGUMENTS}
        if given.get("guidance_scale") is not None and given.get("guidance_scale_start") is None:
            resolved["guidance_scale_start"] = None
        return resolved

    # ----------------------------------------------------------------------------------------------- checks

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
        """Raise a `ValueError` naming the first invalid argument, before any model runs (images are checked while
        they are converted).

        The arguments are `__call__`'s, the sampling ones as `resolve_sampling_arguments` resolves them; `None` is
        not checked. Callers that restore a batch of images check their settings once first::

            pipe.check_inputs(**{**kwargs, **pipe.resolve_sampling_arguments(**kwargs)})
        """
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
        if restoration_guidance and "restoration_guidance_tau" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError(
                f"`restoration_guidance` needs a RestorationGuidedFlowScheduler; this pipeline's scheduler is a "
                f"{type(self.scheduler).__name__}. Leave it None (or 0), or swap the scheduler with "
                "`RestorationGuidedFlowScheduler.from_config(pipe.scheduler.config)`."
            )
        for name, text, embeds, mask_name, mask in (
            ("prompt", prompt, prompt_embeds, "prompt_attention_mask", prompt_attention_mask),
            ("negative_prompt", negative_prompt, negative_prompt_embeds, "negative_prompt_attention_mask",
             negative_prompt_attention_mask),
        ):
            if text is not None and embeds is not None:
                raise ValueError(f"Pass either `{name}` or `{name}_embeds`, not both.")
            if embeds is not None and mask is None:
                raise ValueError(f"`{mask_name}` is required with `{name}_embeds`.")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
                )

    def progress_bar(self, iterable=None, total=None, desc: str | None = None):
        """[`DiffusionPipeline.progress_bar`], with `desc` naming the stage it counts (the module docstring lists
        them); a `desc` given to `set_progress_bar_config` wins."""
        config = getattr(self, "_progress_bar_config", {})
        self._progress_bar_config = {"desc": desc, **config} if desc else config
        try:
            return super().progress_bar(iterable=iterable, total=total)
        finally:
            self._progress_bar_config = config

    # -------------------------------------------------------------------------------------------- image side

    def prepare_image(
        self,
        image: PipelineImageInput,
        upscale: float,
        device: torch.device,
        remove_degradations: bool = False,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Convert `image` (see `__call__`) to RGB `(batch, 3, height * upscale, width * upscale)` in [0, 1] on
        `device`: first cleaned by the `degradation_removal` stage when asked and present (at the input's
        resolution, where the degradation lives), then resized bicubically when `upscale > 1`. Returns it with the
        images' alpha channels (or `None`)."""
        pixels, alphas = images_to_tensor(image)
        pixels = pixels.to(device)
        height, width = pixels.shape[-2:]
        if remove_degradations and self.degradation_removal is not None:
            pixels = self.remove_degradations(pixels, tile_size, tile_overlap)
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

    def _tile_grid(
        self, size, tile_size: int | None, tile_overlap: int | None, cell: int = 1, align: int = 1
    ) -> TileGrid:
        """The tiles of an image of `size` cells of `cell` x `cell` pixels (pixels for the degradation removal stage,
        latent pixels for the VAE and the transformer), the one tiling rule of a call: a single tile when the image
        fits in `tile_size` px (`None`: `default_tile_size`; 0: never tile), else tiles of `tile_size` px (a whole
        number of `align` cells) overlapping by `tile_overlap` px (`None`: a quarter of the tile)."""
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
        """Run the `degradation_removal` stage on RGB `(batch, 3, H, W)` pixels in [0, 1]; returns the cleaned
        pixels clamped to [0, 1] (float32). Tiled as a call tiles (`tile_size`, `tile_overlap`), on the stage's own
        grid (its pixel-unshuffle and strided convolutions), so memory stays bounded."""
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
        """`(batch, 3, H, W)` in [-1, 1] -> scaled latents `(batch, C, H / f, W / f)` float32, tile by tile."""
        factor = self.vae_scale_factor

        def encode(top: int, left: int, height: int, width: int) -> torch.Tensor:
            rows, cols = slice(top * factor, (top + height) * factor), slice(left * factor, (left + width) * factor)
            return encode_latents(self.vae, pixels[:, :, rows, cols])

        with self.progress_bar(total=len(tiles), desc="VAE encode") as progress:
            return tiles.blend(encode, progress=progress)

    def _vae_decode(self, latents: torch.Tensor, tiles: TileGrid | None, upscale_decoder: bool = False) -> torch.Tensor:
        """Scaled latents -> images `(batch, 3, H, W)` in [0, 1] float32, tile by tile (`tiles` of the latents;
        `None`: whole), decoded by the VAE or, with `upscale_decoder`, by `self.upscale_decoder` (then
        `upscale_factor` times larger)."""
        if tiles is None:
            tiles = TileGrid(tuple(latents.shape[-2:]), max(latents.shape[-2:]))
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

    def _encode_condition(self, pixels: torch.Tensor, tile_size: int | None, tile_overlap: int | None):
        """Pad RGB `pixels` in [0, 1] to `size_multiple` and encode them: `(latents, tiles of the latents)`."""
        padded = pad_to_multiple(pixels, self.size_multiple)
        factor = self.vae_scale_factor
        latent_size = (padded.shape[-2] // factor, padded.shape[-1] // factor)
        tiles = self._tile_grid(latent_size, tile_size, tile_overlap, cell=factor, align=self._patch_size)
        return self._vae_encode(padded * 2.0 - 1.0, tiles), tiles

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

    def prepare_extra_step_kwargs(
        self, generator, restoration_guidance: float | None, condition_latents: torch.Tensor
    ) -> dict[str, Any]:
        """The keyword arguments of `scheduler.step` that the scheduler takes: `generator` (stochastic samplers),
        `condition_latents` and `restoration_guidance_tau` (restoration guidance; `None` keeps the scheduler's
        configured strength)."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra = dict(
            generator=generator, condition_latents=condition_latents, restoration_guidance_tau=restoration_guidance
        )
        return {name: value for name, value in extra.items() if name in accepted and value is not None}

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
                16-bit, 32-bit and float grey (I;16, I, F) follow `image_io.high_bit_to_unit` (I;16 is 16-bit, I is
                16-bit when any value exceeds 255 else 8-bit, F is scaled by the smallest of 1, 255 and 65535 that
                holds it); grey and other modes (CMYK, YCbCr, ...) are converted to RGB. numpy: HW, HWC or NHWC (1
                or 3 channels), uint8, uint16, or float in [0, 1]. torch: HW, CHW or NCHW (1 or 3 channels), uint8 or
                float in **[0, 1]** (not [-1, 1]; negative values raise). Each
                image is padded (by reflection) to a multiple of `size_multiple` (one transformer token) and the
                result cropped back, so the output has the input's size times `upscale`.
            prompt (`str` or `list[str]`, *optional*):
                What the restoration should produce (e.g. "Restore this image to high quality"); one per image or
                one for all. No prompt is the empty prompt (the only one a pipeline without a text encoder knows).
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
                checkpoints); `0`: never tile. An image whose padded side exceeds it is processed in overlapping
                tiles by every stage: the degradation removal stage and the VAE run tile by tile, and each denoising
                step predicts the velocity tile by tile, blended with smooth weights before its single scheduler
                step, so memory is bounded by the tile. Each stage's progress bar counts its tiles.
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
                changes a constant guidance scale from the next step on (a linear schedule sets it every step).
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
        # 1. Resolve the model's sampling defaults, check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if negative_prompt_embeds is not None and negative_prompt == DEFAULT_NEGATIVE_PROMPT:
            negative_prompt = None  # the default steps aside for the embeddings given instead
        fidelity_asked = fidelity is not None and fidelity > 0
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
        num_inference_steps, guidance_scale, guidance_scale_start = (sampling[name] for name in SAMPLING_ARGUMENTS[:3])
        restoration_guidance, strength, fidelity = (sampling[name] for name in SAMPLING_ARGUMENTS[3:])

        # 2. Define call parameters
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 3. Preprocess the image: RGB in [0, 1], cleaned by the degradation removal stage (if any), upscaled (by the
        # upscale decoder at the end when it has this factor, else resized now)
        decoder_upscale = 1
        if self.upscale_decoder is not None and upscale == self.upscale_decoder.config.upscale_factor:
            decoder_upscale = self.upscale_decoder.config.upscale_factor
            if fidelity_asked:
                raise ValueError(
                    f"`fidelity` needs the reference image at the output's resolution, which does not exist when the "
                    f"upscale decoder produces the x{decoder_upscale} image: pass `fidelity=0`."
                )
            fidelity = 0.0
        pixels, alphas = self.prepare_image(image, upscale / decoder_upscale, device, True, tile_size, tile_overlap)
        batch_size = pixels.shape[0]
        for name, value in (
            ("prompt", prompt),
            ("negative_prompt", negative_prompt),
            ("prompt_embeds", prompt_embeds),
            ("negative_prompt_embeds", negative_prompt_embeds),
        ):
            if isinstance(value, (list, torch.Tensor)) and len(value) != batch_size:
                raise ValueError(
                    f"`{name}` has {len(value)} entries but `image` holds {batch_size} image(s): pass one entry per "
                    "image, or a single string for all."
                )
        out_height, out_width = pixels.shape[-2] * decoder_upscale, pixels.shape[-1] * decoder_upscale
        if decoder_upscale > 1:
            alphas = _resize_alphas(alphas, (out_height, out_width))

        # 4. Encode the prompt, and the negative-quality prompt when any step uses guidance (cached across calls)
        if prompt_embeds is None and not isinstance(prompt, list):
            prompt = [prompt or ""] * batch_size
        uses_guidance = max(guidance_scale, guidance_scale_start or 1.0) > 1
        (
            prompt_embeds,
            prompt_attention_mask,
            negative_prompt_embeds,
            negative_prompt_attention_mask,
        ) = self.encode_prompt(
            prompt,
            uses_guidance,
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
        reference_latents, tiles = self._encode_condition(pixels, tile_size, tile_overlap)
        condition_latents = reference_latents.repeat_interleave(num_images_per_prompt, dim=0)

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

        # 8. Prepare extra step kwargs: the condition for restoration guidance, generators for stochastic samplers
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, restoration_guidance, condition_latents)

        # 9. Denoising loop: the velocity tile by tile, blended, then one scheduler step on the whole latent
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps) * len(tiles), desc="denoising") as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                if guidance_scale_start is not None:  # SUPIR's linear guidance in sigma
                    sigma = float(self.scheduler.sigmas[start_index + i])
                    self._guidance_scale = self._scheduled_guidance(
                        sigma, sigma_max, guidance_scale, guidance_scale_start
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
                        self.guidance_scale,
                    )

                velocity = tiles.blend(predict, progress=progress_bar)
                if "condition_latents" in extra_step_kwargs:
                    extra_step_kwargs["condition_latents"] = condition_latents
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

        # 10. Decode tile by tile, put back what the VAE loses of the reference (fidelity), crop the padding, fix
        # the colours toward the (cleaned) input; never return non-finite values
        if output_type == "latent":
            result = latents
        else:
            result = self._vae_decode(latents, tiles, upscale_decoder=decoder_upscale > 1)
            result = result[:, :, :out_height, :out_width]
            if fidelity > 0:  # reference - decode(encode(reference))
                round_trip = self._vae_decode(reference_latents, tiles)[:, :, :out_height, :out_width]
                residual = (pixels - round_trip).repeat_interleave(num_images_per_prompt, dim=0)
                result = (result + fidelity * residual).clamp(0.0, 1.0)
            if color_fix is not None:
                reference = pixels
                if decoder_upscale > 1:
                    reference = F.interpolate(pixels, size=(out_height, out_width), mode="bicubic", align_corners=False)
                result = apply_color_fix(result, reference.repeat_interleave(num_images_per_prompt, dim=0), color_fix)
        if not torch.isfinite(result).all():
            raise RuntimeError(
                f"The {'latents' if output_type == 'latent' else 'restored images'} hold NaN or infinite values: the "
                "model's weights are likely broken (e.g. saved from a diverged training run) or float16 overflowed. "
                "Check the weights with torch.isfinite, or load the pipeline in float32 or bfloat16."
            )
        if output_type != "latent":
            result = self._postprocess(result, alphas, num_images_per_prompt, output_type)

        # 11. Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (result,)
        return SanaRestorationPipelineOutput(images=result)

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
            if alpha is not None:
                rgb = np.concatenate([rgb, alpha.permute(1, 2, 0).float().cpu().numpy()], axis=2)
            outputs.append(PIL.Image.fromarray((rgb * 255.0).round().clip(0, 255).astype(np.uint8)))
        return outputs
