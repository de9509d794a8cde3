# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""SanaDegradationPipeline: the restorer's model class run the other way, clean image -> realistically degraded
image, as GenDeg (CVPR 2025) does with a diffusion model, to make training pairs whose degradations look like real
ones rather than like an analytic formula.

The model is the same `ConcatConditionedTransformer`, trained by `examples/train_paired.py --direction degrade`:
the condition latent is the clean image's, the target the degraded image's, and the prompt names the degradation and
its severity. GenDeg conditions on the pair's severity statistics (mean mu and std sigma of |HQ - LQ| on the [0, 1]
scale, each quantised into 128 bins) through a learned embedding; here they are written into the prompt
(`degrade_prompt`), so that any SANA text encoder carries them and the transformer needs no new module. Everything
else (prompt cache, tiling, sizes, offloading, saving, LoRA) is the restoration pipeline's, with the defaults of this
direction: no negative-quality prompt (pushing away from "low quality" would fight the task), no restoration guidance
toward the input and no colour fix (a degradation may shift colours).
"""

from __future__ import annotations

from typing import Any

from ..severity_bins import SEVERITY_BINS
from .pipeline_sana_restoration import SanaRestorationPipeline, SanaRestorationPipelineOutput

# The name each degradation has in a degrade prompt (the on-the-fly degradations' record names).
DEGRADATION_NAMES = {
    "gaussian_noise": "gaussian noise",
    "poisson_noise": "poisson noise",
    "jpeg": "JPEG compression",
    "gaussian_blur": "blur",
    "downscale": "downscaling",
    "colour_jitter": "colour shift",
    "realesrgan": "real-world degradation",
}
DEGRADE_PROMPT_TEMPLATE = "Degrade with {items}. Severity: mean {mu_bin}, spread {sigma_bin} of 128"


def degrade_prompt(degradations: str | list[str], mu_bin: int, sigma_bin: int) -> str:
    """The prompt a degradation model is trained and called with: which degradations and how severe.

    Args:
        degradations: degradation names (`DEGRADATION_NAMES` keys, e.g. "gaussian_noise", "jpeg"; other text is used
            as it is), one or a list.
        mu_bin, sigma_bin: the severity, as `diffusers_restore.data.degradations.severity` measures it on a pair
            (bins 0-127 of the mean and the spread of |clean - degraded|).

    Returns:
        e.g. "Degrade with gaussian noise and JPEG compression. Severity: mean 23, spread 17 of 128".
    """
    names = [degradations] if isinstance(degradations, str) else list(degradations)
    if not names:
        raise ValueError("degrade_prompt needs at least one degradation name.")
    for value, label in ((mu_bin, "mu_bin"), (sigma_bin, "sigma_bin")):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < SEVERITY_BINS:
            raise ValueError(f"{label} must be an integer bin in [0, {SEVERITY_BINS - 1}], got {value!r}.")
    items = []
    for name in names:
        item = DEGRADATION_NAMES.get(name, name.replace("_", " "))
        if item not in items:
            items.append(item)
    joined = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return DEGRADE_PROMPT_TEMPLATE.format(items=joined, mu_bin=mu_bin, sigma_bin=sigma_bin)


class SanaDegradationPipeline(SanaRestorationPipeline):
    r"""Clean image + degradation request -> degraded image, with a model trained by `train_paired.py --direction
    degrade` (see the module docstring). Same components, loading, saving and call as
    [`SanaRestorationPipeline`]; the folder records `direction: "degrade"`, and each class refuses the other's folders.

    Examples:
        ```py
        >>> from diffusers_restore import SanaDegradationPipeline

        >>> degrader = SanaDegradationPipeline.from_pretrained("path/to/degrader")
        >>> noisy = degrader(clean, degradation="gaussian_noise", mu_bin=12, sigma_bin=10).images[0]
        ```
    """

    direction = "degrade"

    def __call__(
        self,
        image=None,
        prompt: str | list[str] | None = None,
        degradation: str | list[str] | None = None,
        mu_bin: int | None = None,
        sigma_bin: int | None = None,
        negative_prompt: str | list[str] | None = "",
        color_fix: str | None = None,
        fidelity: float | None = None,
        **kwargs: Any,
    ) -> SanaRestorationPipelineOutput | tuple:
        """Degrade `image`. Every argument of [`SanaRestorationPipeline.__call__`] is accepted with its meaning
        (steps, guidance, strength, seeds, tiling, output type, ...); these differ:

        Args:
            image: the clean image(s).
            prompt (`str` or `list[str]`, *optional*): the degradation request as the model was trained on it; built
                from `degradation`, `mu_bin` and `sigma_bin` with `degrade_prompt` when not given.
            degradation (`str` or `list[str]`, *optional*): degradation name(s) for the prompt, e.g. "jpeg".
            mu_bin, sigma_bin (`int`, *optional*): the requested severity bins (0-127; see `degrade_prompt`).
            negative_prompt: defaults to none ("").
            color_fix: defaults to None (a degradation may change colours).
            fidelity: must stay 0 or None: adding the clean image's detail back would undo the degradation.
        """
        request = (degradation, mu_bin, sigma_bin)
        if prompt is None:
            if any(value is None for value in request):
                raise ValueError("Give `prompt`, or `degradation`, `mu_bin` and `sigma_bin` to build it "
                                 "(see `degrade_prompt`).")
            prompt = degrade_prompt(degradation, mu_bin, sigma_bin)
        elif any(value is not None for value in request):
            raise ValueError("Give either `prompt` or `degradation`/`mu_bin`/`sigma_bin`, not both.")
        if fidelity:
            raise ValueError(f"`fidelity` ({fidelity}) adds the input's detail back, which would undo the "
                             "degradation: leave it at 0 for a degradation model.")
        return super().__call__(image=image, prompt=prompt, negative_prompt=negative_prompt, color_fix=color_fix,
                                fidelity=0.0, **kwargs)
