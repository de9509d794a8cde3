"""diffusers-restore: SANA as an image restoration model, built from diffusers components.

Heavy submodules (torch, diffusers, transformers) are imported lazily on first attribute access, so that
``diffusers_restore.data.degradations`` stays usable with PIL and numpy alone.
"""

import logging
from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

__version__ = "0.1.0.dev0"


class _OptionalKernelNotices(logging.Filter):
    """diffusers imports bitsandbytes whenever it is installed (the training extra installs it for 8-bit AdamW); on a
    CPU with AVX512-BF16, bitsandbytes then asks the Hub for an optional 4-bit CPU kernel and logs two warnings when it
    cannot get it (offline). This package runs no 4-bit kernel, so those two lines are dropped; every other message of
    these loggers, and 8-bit AdamW, are untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community/quantization-bitsandbytes" not in record.getMessage()


for _logger in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_logger).addFilter(_OptionalKernelNotices())

# public name -> submodule that defines it
_LAZY_ATTRIBUTES = {
    "ConcatConditionedTransformer": "models.transformer_sana_concat",
    "DCUpscaleDecoder": "models.upscale_decoder",
    "grow_dc_decoder": "models.dc_decoder_growth",
    "install_decoder": "pipelines.install_decoder",
    "RestorationGuidedFlowScheduler": "schedulers.scheduling_restoration_guided_flow",
    "RestorationGuidedFlowSchedulerOutput": "schedulers.scheduling_restoration_guided_flow",
    "SanaDegradationPipeline": "pipelines.pipeline_sana_degradation",
    "degrade_prompt": "pipelines.pipeline_sana_degradation",
    "SanaRestorationPipeline": "pipelines.pipeline_sana_restoration",
    "SanaRestorationPipelineOutput": "pipelines.pipeline_sana_restoration",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)


if TYPE_CHECKING:  # pragma: no cover
    from .models.dc_decoder_growth import grow_dc_decoder
    from .models.transformer_sana_concat import ConcatConditionedTransformer
    from .models.upscale_decoder import DCUpscaleDecoder
    from .pipelines.install_decoder import install_decoder
    from .pipelines.pipeline_sana_degradation import SanaDegradationPipeline, degrade_prompt
    from .pipelines.pipeline_sana_restoration import SanaRestorationPipeline, SanaRestorationPipelineOutput
    from .schedulers.scheduling_restoration_guided_flow import (
        RestorationGuidedFlowScheduler,
        RestorationGuidedFlowSchedulerOutput,
    )
