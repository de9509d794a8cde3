# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Degradation specs: one string names any degradation of the package, wherever a degradation is chosen (make-pairs,
``PairedDataset``, ``sana-restore evaluate``, the training script, the app).

``name[:value[,value...]]`` fixes some parameters (positional, or ``key=value``) and draws the others per image:
``gaussian_noise:25``, ``jpeg:20``, ``gaussian_blur:7``, ``downscale:2``, ``colour_jitter:0.1,-0.1``,
``random[:n]`` (n distinct single degradations), ``realesrgan[:scale]``, ``realesrgan_light[:scale]``, ``identity``
(the image unchanged); a numeric value written ``low..high`` is drawn per image from that range
(``jpeg:quality=30..90``); ``a|b|c`` picks one alternative per image; ``model:DIR;NAME:MU_BIN:SIGMA_BIN[,...]`` runs a learned degradation model. Every
numeric parameter has an accepted range (:data:`~.degradation_ops.PARAMETER_RANGES`; ``random`` takes 1 to 6,
``realesrgan`` scales 1 to 8, model severity bins 0 to 127) and a value outside it is refused when the spec is
parsed, with the range in the message.

The degradations themselves live in :mod:`.degradation_ops` (the single ones), :mod:`.realesrgan` and
:mod:`.severity`; prompts from their records in :mod:`.degradation_prompts`. Their public names are importable from
here too. Everything needs only PIL and numpy (a model spec imports torch when it runs).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..image_io import load_rgb, to_rgb
from ..severity_bins import SEVERITY_BINS
from .degradation_ops import (
    ALIASES,
    DEGRADATIONS,
    PARAMETER_RANGES,
    Record,
    RngLike,
    area_downsample_pair,
    as_rng,
    colour_jitter,
    downscale,
    gaussian_blur,
    gaussian_noise,
    jpeg,
    make_record,
    poisson_noise,
    random_degradation,
)
from .degradation_prompts import GENERIC_PROMPT, degradation_prompt
from .realesrgan import (
    REALESRGAN,
    REALESRGAN_LIGHT,
    RealESRGANConfig,
    circular_lowpass_kernel,
    random_realesrgan_kernel,
    realesrgan_degradation,
)
from .severity import blockiness, blur_sigma, noise_sigma, severity

__all__ = [
    "DEGRADATIONS",
    "GENERIC_PROMPT",
    "IDENTITY",
    "MODEL_PREFIX",
    "PARAMETER_RANGES",
    "PRESETS",
    "ParameterRange",
    "REALESRGAN",
    "REALESRGAN_LIGHT",
    "DegradationSpec",
    "RealESRGANConfig",
    "apply_degradation_spec",
    "area_downsample_pair",
    "blockiness",
    "blur_sigma",
    "circular_lowpass_kernel",
    "colour_jitter",
    "degradation_prompt",
    "downscale",
    "gaussian_blur",
    "gaussian_noise",
    "get_degradation_fn",
    "jpeg",
    "load_rgb",
    "noise_sigma",
    "parse_degradation_spec",
    "parse_model_degradation",
    "poisson_noise",
    "random_degradation",
    "random_realesrgan_kernel",
    "realesrgan_degradation",
    "records_to_json",
    "severity",
    "to_rgb",
]

ONE_OF = "one_of"
"""Name of a parsed ``a|b|c`` spec: one alternative is drawn uniformly per image."""

PRESETS = ("random", "realesrgan", "realesrgan_light")
"""Composite degradations accepted wherever a spec is: ``random[:n]``, ``realesrgan``, ``realesrgan_light``."""

IDENTITY = "identity"
"""The spec that leaves the image unchanged (record ``{"name": "identity"}``): in a training mixture it teaches a
restorer to leave clean images alone, e.g. ``identity|gaussian_noise|jpeg``."""

RANGE_SEPARATOR = ".."


@dataclass(frozen=True)
class ParameterRange:
    """A spec parameter written ``low..high`` (e.g. ``jpeg:quality=30..90``): drawn per image, uniformly from
    ``[low, high]`` (integers inclusive for integer parameters)."""

    low: float
    high: float
    integer: bool = False

    def draw(self, rng: np.random.Generator) -> float | int:
        if self.integer:
            return int(rng.integers(int(self.low), int(self.high) + 1))
        return float(rng.uniform(self.low, self.high))

    def __str__(self) -> str:
        if self.integer:
            return f"{int(self.low)}{RANGE_SEPARATOR}{int(self.high)}"
        return f"{self.low:g}{RANGE_SEPARATOR}{self.high:g}"

MODEL = "model"
MODEL_PREFIX = "model:"
"""A learned degradation (GenDeg's synthetic pairs): ``model:DIR;NAME:MU_BIN:SIGMA_BIN[,...]`` runs the
:class:`~diffusers_restore.SanaDegradationPipeline` saved in ``DIR`` (``train_paired.py --direction degrade``) with one
of the listed requests (degradation name and GenDeg severity bins, 0-127), drawn per image; e.g.
``model:./my-degrader;jpeg:10:8,gaussian_noise:12:20``. It combines with ``|`` like any spec."""

_DEGRADERS: dict[str, Any] = {}  # one loaded degradation model per folder and process


def parse_model_degradation(spec: str) -> DegradationSpec:
    """Parse ``model:DIR;NAME:MU_BIN:SIGMA_BIN[,...]`` (see :data:`MODEL_PREFIX`).

    Raises:
        ValueError: no folder or no request, a malformed request or bin, or a folder without ``model_index.json``.
    """
    folder, _, requests = spec[len(MODEL_PREFIX):].partition(";")
    parsed = []
    for request in filter(None, (part.strip() for part in requests.split(","))):
        parts = request.split(":")
        try:
            name, mu_bin, sigma_bin = parts[0], int(parts[1]), int(parts[2])
            if len(parts) != 3 or not name or not (0 <= mu_bin < SEVERITY_BINS and 0 <= sigma_bin < SEVERITY_BINS):
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"degrader request {request!r}: expected NAME:MU_BIN:SIGMA_BIN with bins in 0-127, e.g. "
                             "'jpeg:10:8'.") from None
        parsed.append((name, mu_bin, sigma_bin))
    if not folder or not parsed:
        raise ValueError(f"{spec!r}: a model degradation needs a folder and at least one request, e.g. "
                         "'model:./my-degrader;jpeg:10:8' (make-pairs: --degrader-request NAME:MU_BIN:SIGMA_BIN).")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"{spec!r}: no model_index.json in {folder} (a SanaDegradationPipeline folder written by "
                         "train_paired.py --direction degrade).")
    return DegradationSpec(MODEL, {"folder": folder, "requests": tuple(parsed)})


def _model_degrade(image: Image.Image, spec: DegradationSpec, rng: np.random.Generator
                   ) -> tuple[Image.Image, list[Record]]:
    """Degrade `image` with the model of a parsed model spec; the request and the model's seed come from `rng`.
    The output has the input's size and RGB mode."""
    import torch

    from ..pipelines.pipeline_sana_degradation import SanaDegradationPipeline

    folder = spec.params["folder"]
    if folder not in _DEGRADERS:
        _DEGRADERS[folder] = SanaDegradationPipeline.from_pretrained(folder)
        _DEGRADERS[folder].set_progress_bar_config(disable=True)
    requests = spec.params["requests"]
    name, mu_bin, sigma_bin = requests[int(rng.integers(len(requests)))]
    generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
    degraded = _DEGRADERS[folder](to_rgb(image), degradation=name, mu_bin=mu_bin, sigma_bin=sigma_bin,
                                  generator=generator).images[0].convert("RGB")
    if degraded.size != image.size:
        degraded = degraded.resize(image.size, Image.Resampling.BICUBIC)
    return degraded, [make_record(name, model=folder, mu_bin=mu_bin, sigma_bin=sigma_bin)]

# Positional parameters of each degradation in a spec, with their types.
_SPEC_PARAMETERS: dict[str, tuple[tuple[str, type], ...]] = {
    "gaussian_noise": (("sigma", float), ("gray", bool)),
    "poisson_noise": (("scale", float), ("gray", bool)),
    "jpeg": (("quality", int),),
    "gaussian_blur": (("kernel_size", int), ("sigma", float)),
    "downscale": (("factor", float), ("down_interpolation", str), ("up_interpolation", str)),
    "colour_jitter": (("brightness", float), ("contrast", float)),
    "random": (("num_degradations", int),),
    "realesrgan": (("scale", int),),
    "realesrgan_light": (("scale", int),),
    IDENTITY: (),
}


@dataclass(frozen=True)
class DegradationSpec:
    """A parsed spec: the canonical degradation name and the parameters fixed by the spec (others are drawn)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.name == ONE_OF:
            return "|".join(str(option) for option in self.params["options"])
        if self.name == MODEL:
            requests = ",".join(f"{name}:{mu}:{sigma}" for name, mu, sigma in self.params["requests"])
            return f"{MODEL_PREFIX}{self.params['folder']};{requests}"
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{key}={value}" for key, value in self.params.items())


def _known_names() -> str:
    return ", ".join(list(DEGRADATIONS) + list(PRESETS) + [IDENTITY])


def _canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DEGRADATIONS and key not in PRESETS and key != IDENTITY:
        raise ValueError(f"unknown degradation {name!r}; known: {_known_names()}.")
    return key


def _convert(value: str, kind: type, name: str, key: str) -> Any:
    if RANGE_SEPARATOR in value and kind in (int, float):
        low, _, high = value.partition(RANGE_SEPARATOR)
        low, high = _convert(low.strip(), kind, name, key), _convert(high.strip(), kind, name, key)
        if low > high:
            raise ValueError(f"{name}: range {value!r} of {key} must be low{RANGE_SEPARATOR}high with low <= high.")
        return ParameterRange(low, high, integer=kind is int)
    try:
        if kind is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "gray", "grey"):
                return True
            if lowered in ("0", "false", "no", "color", "colour"):
                return False
            raise ValueError
        if kind is int:
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}: parameter {key} must be {kind.__name__}, got {value!r}.") from None


def parse_degradation_spec(spec: str) -> DegradationSpec:
    """Parse ``name[:value[,value...]]``; values are positional in the order of the degradation's parameters or
    ``key=value``. Examples: ``gaussian_noise:25``, ``jpeg:20``, ``downscale:2``, ``gaussian_blur:7``,
    ``colour_jitter:0.1,-0.1``, ``gaussian_noise:sigma=15,gray=true``, ``random``, ``random:2``, ``realesrgan``,
    ``identity``. A numeric value written ``low..high`` is drawn per image from that range (``jpeg:30..90``,
    ``gaussian_blur:sigma=0.5..2``). Alternatives separated by ``|`` pick one of them uniformly per image, e.g.
    ``gaussian_noise|jpeg|downscale:2`` (a training mixture; parameters a spec leaves out are drawn from that
    degradation's range; repeat an alternative to draw it more often).

    Raises:
        ValueError: unknown name (the message lists the known ones), unknown or repeated parameter, a value of the
            wrong type, or a value outside what the degradation accepts (e.g. ``jpeg:0``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a degradation spec must be a non-empty string like 'gaussian_noise:25', got {spec!r}.")
    if "|" in spec:
        parts = [part.strip() for part in spec.split("|")]
        if not all(parts):
            raise ValueError(f"{spec!r}: empty alternative between '|' separators.")
        return DegradationSpec(ONE_OF, {"options": tuple(parse_degradation_spec(part) for part in parts)})
    if spec.strip().startswith(MODEL_PREFIX):
        return parse_model_degradation(spec.strip())
    name_part, _, value_part = spec.strip().partition(":")
    name = _canonical_name(name_part)
    parameters = _SPEC_PARAMETERS[name]
    by_key = dict(parameters)
    params: dict[str, Any] = {}
    if value_part.strip():
        for position, item in enumerate(value_part.split(",")):
            item = item.strip()
            if "=" in item:
                key, _, value = item.partition("=")
                key = key.strip()
                if key not in by_key:
                    raise ValueError(f"{name}: unknown parameter {key!r}; accepted: {', '.join(by_key)}.")
            else:
                if position >= len(parameters):
                    raise ValueError(f"{name} takes at most {len(parameters)} value(s) ({', '.join(by_key)}), "
                                     f"got {spec!r}.")
                key, value = parameters[position][0], item
            if key in params:
                raise ValueError(f"{name}: parameter {key} given twice in {spec!r}.")
            params[key] = _convert(value.strip(), by_key[key], name, key)
    parsed = DegradationSpec(name, params)
    # The degradation's own checks on a tiny probe image, so that a bad value fails here (the messages name it); a
    # range is probed at both ends.
    for end in ("low", "high"):
        fixed = {key: getattr(value, end) if isinstance(value, ParameterRange) else value for key, value in params.items()}
        apply_degradation_spec(Image.new("RGB", (8, 8)), DegradationSpec(name, fixed), np.random.default_rng(0))
    return parsed


def apply_degradation_spec(
    image: Image.Image, spec: str | DegradationSpec, rng: RngLike = None
) -> tuple[Image.Image, list[Record]]:
    """Apply a spec (see :func:`parse_degradation_spec`); parameters the spec leaves out are drawn with `rng`.

    Returns:
        ``(image, records)``: a list of records (one for a single degradation).
    """
    if isinstance(spec, str):
        spec = parse_degradation_spec(spec)
    rng = as_rng(rng)
    if spec.name == ONE_OF:
        options = spec.params["options"]
        return apply_degradation_spec(image, options[int(rng.integers(len(options)))], rng)
    if spec.name == MODEL:
        return _model_degrade(image, spec, rng)
    if spec.name == IDENTITY:
        return image.copy(), [make_record(IDENTITY)]
    if any(isinstance(value, ParameterRange) for value in spec.params.values()):
        spec = DegradationSpec(spec.name, {key: value.draw(rng) if isinstance(value, ParameterRange) else value
                                           for key, value in spec.params.items()})
    if spec.name == "random":
        count = spec.params.get("num_degradations")
        return random_degradation(image, num_degradations=(1, 3) if count is None else count, rng=rng)
    if spec.name in ("realesrgan", "realesrgan_light"):
        config = REALESRGAN if spec.name == "realesrgan" else REALESRGAN_LIGHT
        if "scale" in spec.params:
            config = RealESRGANConfig(**{**config.__dict__, "scale": spec.params["scale"]})
        image, records = realesrgan_degradation(image, rng=rng, config=config)
        records[0]["name"] = spec.name
        return image, records
    image, record = DEGRADATIONS[spec.name](image, rng=rng, **spec.params)
    return image, [record]


def get_degradation_fn(
    degradation: str | DegradationSpec | Callable[..., Any],
) -> Callable[[Image.Image, np.random.Generator], tuple[Image.Image, list[Record]]]:
    """Normalise a degradation choice to ``fn(image, rng) -> (image, records)``.

    Accepts "random", "realesrgan", "realesrgan_light", any spec string, a :class:`DegradationSpec`, or a callable
    ``fn(image, rng)`` returning an image, ``(image, record)`` or ``(image, [records])``.
    """
    if isinstance(degradation, (str, DegradationSpec)):
        spec = parse_degradation_spec(degradation) if isinstance(degradation, str) else degradation
        return functools.partial(_apply_parsed, spec=spec)
    if callable(degradation):
        return functools.partial(_apply_callable, function=degradation)
    raise TypeError(f"degradation must be a spec string or a callable, got {type(degradation).__name__}.")


def _apply_parsed(image: Image.Image, rng: np.random.Generator, spec: DegradationSpec):
    return apply_degradation_spec(image, spec, rng)


def _apply_callable(image: Image.Image, rng: np.random.Generator, function: Callable[..., Any]):
    result = function(image, rng)
    if isinstance(result, Image.Image):
        return result, [{"name": getattr(function, "__name__", "custom"), "params": {}}]
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Image.Image):
        records = result[1]
        if isinstance(records, dict):
            records = [records]
        return result[0], list(records)
    raise TypeError("a degradation callable must return an image or (image, record(s)).")


def records_to_json(records: Sequence[Record]) -> str:
    """Compact, key-sorted JSON of a record list (what datasets and CSV tooling store)."""
    return json.dumps(list(records), sort_keys=True, separators=(",", ":"))
