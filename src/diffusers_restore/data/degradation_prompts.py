# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Training prompts from degradation records: what was applied, said in one of several phrasings."""

from __future__ import annotations

from typing import Sequence

from .degradation_ops import Record, RngLike, as_rng

__all__ = ["GENERIC_PROMPT", "degradation_prompt"]

GENERIC_PROMPT = "Restore this image to high quality"
"""The prompt for an unknown degradation (and the one users give when they do not know what went wrong)."""

# Whole prompts for a single degradation, several phrasings each so that training sees varied text.
_SINGLE_PROMPTS: dict[str, tuple[str, ...]] = {
    "gaussian_noise": (
        "Remove gaussian noise from this image",
        "Remove the noise from this photo",
        "Denoise this image",
        "Clean up the grainy noise in this picture",
    ),
    "poisson_noise": (
        "Remove the shot noise from this low-light photo",
        "Remove the noise from this image",
        "Denoise this low-light image",
        "Clean up the grain in this dark photo",
    ),
    "jpeg": (
        "Remove JPEG compression artifacts, restore sharp details",
        "Remove the blocky compression artifacts from this image",
        "Fix the JPEG artifacts in this photo",
        "Undo the heavy JPEG compression of this picture",
    ),
    "gaussian_blur": (
        "Deblur this image",
        "Remove the blur and restore sharp details",
        "Sharpen this blurry photo",
        "Bring this out-of-focus image back into focus",
    ),
    "downscale": (
        "Upscale this low-resolution image and restore fine details",
        "Restore the fine details lost to downscaling",
        "Increase the resolution of this blurry, pixelated image",
        "Turn this low-resolution photo into a sharp high-resolution one",
    ),
    "area_downsample": (
        "Upscale this low-resolution image and restore fine details",
        "Increase the resolution of this image",
        "Super-resolve this photo, restore sharp textures",
    ),
    "colour_jitter": (
        "Correct the colours of this image",
        "Fix the brightness and contrast of this photo",
        "Restore the natural colours and exposure of this image",
        "Correct the washed-out colours of this picture",
    ),
    "realesrgan": (
        "Restore this low-quality photo: remove blur, noise and compression artifacts",
        "Remove the blur, noise and JPEG artifacts from this image and restore fine details",
        "Enhance this degraded low-resolution image to high quality",
        "Restore this real-world low-quality image with sharp, clean details",
    ),
}
_SINGLE_PROMPTS["realesrgan_light"] = _SINGLE_PROMPTS["realesrgan"]

# Noun phrases used to combine several degradations in one prompt.
_NOUNS: dict[str, tuple[str, ...]] = {
    "gaussian_noise": ("gaussian noise", "sensor noise", "grainy noise"),
    "poisson_noise": ("low-light noise", "shot noise", "photon noise"),
    "jpeg": ("JPEG compression artifacts", "compression artifacts", "JPEG artifacts"),
    "gaussian_blur": ("blur", "defocus blur", "softness"),
    "downscale": ("low-resolution blur", "pixelation", "resolution loss"),
    "area_downsample": ("low-resolution blur", "resolution loss"),
    "colour_jitter": ("the colour cast", "brightness and contrast shifts", "colour distortion"),
    "realesrgan": ("blur, noise and compression artifacts",),
    "realesrgan_light": ("blur, noise and compression artifacts",),
}
_MULTI_TEMPLATES = (
    "Remove {items} from this image",
    "Remove {items}, restore sharp details",
    "Fix {items} in this photo",
    "Restore this image: remove {items}",
    "Clean up {items}; restore this picture to high quality",
)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def degradation_prompt(
    records: Record | Sequence[Record] | None, rng: RngLike = None, generic_probability: float = 0.1
) -> str:
    """A training prompt describing what was applied, in one of several phrasings.

    Args:
        records: a record, a list of records (as returned by the degradations), or ``None``/empty.
        rng: generator or seed (phrasing choice).
        generic_probability: chance of answering :data:`GENERIC_PROMPT` ("Restore this image to high quality")
            even when the degradations are known, so that the model also learns the prompt used when the user does
            not know what went wrong.

    Returns:
        The prompt. Unknown names (custom callables) and an empty record give :data:`GENERIC_PROMPT`.
    """
    rng = as_rng(rng)
    if records is None:
        return GENERIC_PROMPT
    if isinstance(records, dict):
        records = [records]
    names = [r.get("name") for r in records]
    if not names or any(name not in _SINGLE_PROMPTS for name in names) or rng.uniform() < generic_probability:
        return GENERIC_PROMPT
    if len(names) == 1:
        choices = _SINGLE_PROMPTS[names[0]]
        return choices[int(rng.integers(len(choices)))]
    nouns: list[str] = []
    for name in names:
        noun = _NOUNS[name][int(rng.integers(len(_NOUNS[name])))]
        if noun not in nouns:
            nouns.append(noun)
    template = _MULTI_TEMPLATES[int(rng.integers(len(_MULTI_TEMPLATES)))]
    return template.format(items=_join(nouns))
