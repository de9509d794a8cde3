"""Training data for restoration: degradations (PIL/numpy), paired datasets and cached latents (torch).

``diffusers_restore.data.degradations`` needs only PIL and numpy; the torch-based modules (``paired_dataset``,
``latents``) are imported on first attribute access, so ``import diffusers_restore.data`` stays light.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

_LAZY_ATTRIBUTES = {
    # degradations (PIL / numpy)
    "GENERIC_PROMPT": "degradations",
    "DEGRADATIONS": "degradations",
    "REALESRGAN": "degradations",
    "REALESRGAN_LIGHT": "degradations",
    "RealESRGANConfig": "degradations",
    "apply_degradation_spec": "degradations",
    "area_downsample_pair": "degradations",
    "degradation_prompt": "degradations",
    "parse_degradation_spec": "degradations",
    "random_degradation": "degradations",
    "realesrgan_degradation": "degradations",
    "severity": "degradations",
    "load_rgb": "degradations",  # defined in diffusers_restore.image_io
    "to_rgb": "degradations",  # defined in diffusers_restore.image_io
    # paired dataset (torch)
    "PairedDataset": "paired_dataset",
    "PairedDataError": "paired_dataset",
    "collate_fn": "paired_dataset",
    "read_paired_csv": "paired_dataset",
    "validate_paired_csv": "paired_dataset",
    # latent cache (torch, safetensors)
    "CachedLatentDataset": "latents",
    "LatentCacheError": "latents",
    "build_latent_cache": "latents",
    "degrade_latents": "latents",
    # pre-generated pairs
    "make_pairs": "make_pairs",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)


if TYPE_CHECKING:  # pragma: no cover
    from .degradations import (
        DEGRADATIONS,
        GENERIC_PROMPT,
        REALESRGAN,
        REALESRGAN_LIGHT,
        RealESRGANConfig,
        apply_degradation_spec,
        area_downsample_pair,
        degradation_prompt,
        parse_degradation_spec,
        random_degradation,
        realesrgan_degradation,
        load_rgb,
        severity,
        to_rgb,
    )
    from .latents import CachedLatentDataset, LatentCacheError, build_latent_cache, degrade_latents
    from .make_pairs import make_pairs
    from .paired_dataset import PairedDataError, PairedDataset, collate_fn, read_paired_csv, validate_paired_csv
