"""diffusers-restore: SANA as an image restoration model, built from diffusers components.

Heavy submodules (torch, diffusers, transformers) are imported lazily on first attribute access, so that
``diffusers_restore.data.degradations`` stays usable with PIL and numpy alone.
"""

import logging
from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

__version__ = "0.1.0.dev0"


class _DroppedNotices(logging.Filter):
    """Drops the records of one logger whose message contains one of `fragments`; every other record passes."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# diffusers imports bitsandbytes and torchao whenever they are installed (the training extra installs bitsandbytes for
# 8-bit AdamW, `--quantize int8` needs torchao), so their import-time notices would print on every import of this
# package. Dropped here, and only these; nothing they concern is used by the package:
_DROPPED = {
    # on a CPU with AVX512-BF16, bitsandbytes asks the Hub for an optional 4-bit CPU kernel and logs two warnings when
    # it cannot get it (offline)
    "bitsandbytes.backends.cpu.ops": ("kernels-community/quantization-bitsandbytes",),
    "kernels._internals.hf_hub": ("kernels-community/quantization-bitsandbytes",),
    # torchao's MX-FP8 and CUTLASS CUDA kernels do not load into a CPU-only torch (int8 weight-only does not use them)
    "torchao": ("_C_mxfp8", "_C_cutlass"),
    # torchao registers enums with torch.compile the way torch 2.13 deprecates
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
    # diffusers allow-lists torchao classes for unpickling (torch.load); weights here load from safetensors only
    "diffusers.quantizers.torchao.torchao_quantizer": ("Unable to import `torchao` Tensor objects",),
}
for _logger, _fragments in _DROPPED.items():
    logging.getLogger(_logger).addFilter(_DroppedNotices(_fragments))

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
