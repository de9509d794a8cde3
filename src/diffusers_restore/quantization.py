# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Quantized weights for a restoration pipeline, the diffusers way: the recommended quantization configs.

`pipeline_quantization_config("int8")` is what ``sana-restore restore --quantize int8``, the app and
``examples/train_paired.py`` pass to ``from_pretrained``; any other diffusers `PipelineQuantizationConfig` works too::

    pipe = SanaRestorationPipeline.from_pretrained(
        "org/sana-restore", quantization_config=pipeline_quantization_config("nf4"), dtype=torch.bfloat16
    )

Modes (the values of ``--quantize``):

* ``"int8"``: int8 weight-only with torchao (`Int8WeightOnlyConfig`: one scale per output row, activations stay in
  the pipeline's dtype). Runs on CPU and GPU; quantized pipelines save and load back (safetensors).
* ``"nf4"``: 4-bit NormalFloat with bitsandbytes (QLoRA's format: blocks of 64, double-quantized scales, compute in
  the pipeline's dtype). diffusers' bitsandbytes quantizer needs a GPU (CUDA, XPU or MPS), so this mode does not run
  on a CPU-only machine.

Only `QUANTIZED_COMPONENTS` are quantized: the transformer and the text encoder hold nearly all the weights (SANA 1.6B
and Gemma-2-2B against DC-AE's 0.3B). Both backends quantize `nn.Linear` layers only; convolutions, normalisations and
embeddings keep the pipeline's dtype. In the transformer, `TRANSFORMER_MODULES_TO_NOT_CONVERT` also stay in full
precision; each is small, and each one's error reaches every block or the output directly:

* ``projection``: the condition projection (the 1x1 layer over the concatenated noisy and degraded latents). It is a
  convolution, so no backend would touch it, but it is listed because a LoRA run trains it fully and saves it beside
  the adapter: it must stay an ordinary parameter.
* ``caption_projection``: the text embedding's projection into the transformer (matched by ``projection`` anyway,
  diffusers' skip names being substrings of module paths).
* ``time_embed``: the timestep embedding and the AdaLN modulation it produces for every block.
* ``proj_out``: the output layer that produces the velocity. It has 2240 x 32 weights in SANA 1.6B; on the bundled
  restorer quantizing it to nf4 costs about 10 dB of PSNR against the unquantized output.

The VAE, the degradation removal stage and the upscale decoder are not quantized: they are convolutional, and they
decide the output's pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the functions that need it, so that the CLI's --help stays instant
    import torch

__all__ = [
    "QUANTIZATION_MODES",
    "QUANTIZED_COMPONENTS",
    "TRANSFORMER_MODULES_TO_NOT_CONVERT",
    "pipeline_quantization_config",
    "quantization_unavailable",
    "text_encoder_quantization_config",
    "transformer_quantization_config",
    "weight_bytes",
]

#: ``--quantize`` values: no quantization, torchao int8 weight-only, bitsandbytes nf4.
QUANTIZATION_MODES = ("none", "int8", "nf4")
#: The pipeline components `pipeline_quantization_config` quantizes.
QUANTIZED_COMPONENTS = ("transformer", "text_encoder")
#: Transformer modules kept in the pipeline's dtype (see the module docstring for why each).
TRANSFORMER_MODULES_TO_NOT_CONVERT = ("projection", "caption_projection", "time_embed", "proj_out")

# package, oldest release (setup.py's `quantization` extra says why)
_BACKEND = {"int8": ("torchao", "0.16.0"), "nf4": ("bitsandbytes", "0.45.2")}


def quantization_unavailable(mode: str, device: str | torch.device | None = None) -> str | None:
    """Why `mode` cannot be used here, as one line that starts with the mode ("nf4 needs a GPU: ..."), or `None`.

    Args:
        mode: one of `QUANTIZATION_MODES`.
        device: where the pipeline will run (``None``: not checked). ``"nf4"`` needs a GPU; ``"int8"`` runs anywhere.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; choose one of {', '.join(QUANTIZATION_MODES)}.")
    if mode == "none":
        return None
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    package, minimum = _BACKEND[mode]
    try:
        installed = version(package)
    except PackageNotFoundError:
        installed = None
    if installed is None or Version(installed) < Version(minimum):
        found = "it is not installed" if installed is None else f"found {installed}"
        return f"{mode} needs {package} >= {minimum} ({found}): pip install -U {package}"
    import torch

    if mode == "nf4" and device is not None and torch.device(device).type == "cpu":
        return "nf4 needs a GPU: diffusers' bitsandbytes quantizer does not run on the CPU (int8 does)"
    return None


def _check_available(mode: str) -> None:
    reason = quantization_unavailable(mode)
    if reason is not None:
        raise ImportError(f"Quantization mode {reason}.")


def transformer_quantization_config(mode: str, dtype: torch.dtype | None = None):
    """The diffusers quantization config of the restoration transformer (`ConcatConditionedTransformer`, or a plain
    `SanaTransformer2DModel`) for `mode`, skipping `TRANSFORMER_MODULES_TO_NOT_CONVERT`; `None` for ``"none"``.

    Pass it as `quantization_config` to the transformer's `from_pretrained`. `dtype` is the compute dtype of nf4
    (default bfloat16).

    Raises:
        ImportError: the backend is not installed (see `quantization_unavailable`).
    """
    if mode == "none":
        return None
    _check_available(mode)
    skip = list(TRANSFORMER_MODULES_TO_NOT_CONVERT)
    if mode == "int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(version=2), modules_to_not_convert=skip)
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(**_nf4_kwargs(dtype), llm_int8_skip_modules=skip)


def text_encoder_quantization_config(mode: str, dtype: torch.dtype | None = None):
    """The transformers quantization config of the text encoder (Gemma-2) for `mode`; `None` for ``"none"``.

    Unlike the transformer's, this one also runs on a CPU for ``"nf4"`` (transformers' bitsandbytes quantizer has no
    GPU requirement). Every linear layer is quantized; the token embedding and the norms stay in `dtype`.

    Raises:
        ImportError: the backend is not installed (see `quantization_unavailable`).
    """
    if mode == "none":
        return None
    _check_available(mode)
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig(version=2))
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**_nf4_kwargs(dtype))


def _nf4_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    import torch

    return dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype or torch.bfloat16,
    )


def pipeline_quantization_config(
    mode: str,
    dtype: torch.dtype | None = None,
    components: tuple[str, ...] | list[str] = QUANTIZED_COMPONENTS,
):
    """The `PipelineQuantizationConfig` for `SanaRestorationPipeline.from_pretrained(..., quantization_config=...)`
    that quantizes `components` (the transformer and the text encoder by default) with `mode`; `None` for
    ``"none"``.

    Args:
        mode: ``"none"``, ``"int8"`` (torchao, CPU and GPU) or ``"nf4"`` (bitsandbytes; GPU for the transformer).
        dtype: the pipeline's dtype (pass the same `dtype` to `from_pretrained`; default and recommended: bfloat16,
            what both backends are built for). nf4 computes in it.
        components: a subset of `QUANTIZED_COMPONENTS`.

    Raises:
        ImportError: the backend is not installed. ValueError: an unknown mode or component.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}; choose one of {', '.join(QUANTIZATION_MODES)}.")
    unknown = sorted(set(components) - set(QUANTIZED_COMPONENTS))
    if unknown:
        raise ValueError(f"Cannot quantize {unknown}: the quantized components are {list(QUANTIZED_COMPONENTS)}.")
    if mode == "none":
        return None
    from diffusers import PipelineQuantizationConfig

    builders = {"transformer": transformer_quantization_config, "text_encoder": text_encoder_quantization_config}
    return PipelineQuantizationConfig(quant_mapping={name: builders[name](mode, dtype) for name in components})


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes that `module`'s parameters and buffers occupy as stored, quantized ones included.

    A torchao tensor subclass counts its inner tensors (int8 data, scales); a bitsandbytes 4-bit parameter its packed
    data and its quantization state (block scales, code book, nested statistics); an 8-bit one its data and row
    scales. A tensor shared by several modules is counted once. (`ModelMixin.get_memory_footprint` counts a
    quantized tensor at its logical dtype instead.)
    """
    import torch

    seen: set[int] = set()

    def tensor_bytes(tensor: torch.Tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = tensor.__tensor_flatten__()
            return sum(tensor_bytes(getattr(tensor, name)) for name in names)
        key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            return 0
        seen.add(key)
        total = tensor.numel() * tensor.element_size()
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            total += sum(tensor_bytes(value) for value in _quant_state_tensors(quant_state))
        scales = getattr(tensor, "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += tensor_bytes(scales)
        return total

    return sum(tensor_bytes(tensor) for tensor in [*module.parameters(), *module.buffers()])


def _quant_state_tensors(quant_state) -> list[torch.Tensor]:
    import torch

    tensors = [getattr(quant_state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        tensors += _quant_state_tensors(nested)
    return [tensor for tensor in tensors if isinstance(tensor, torch.Tensor)]
