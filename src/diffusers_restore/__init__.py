"""diffusers-restore: SANA as an image restoration model, built from diffusers components.

Heavy submodules (torch, diffusers, transformers) are imported lazily on first attribute access, so that
``diffusers_restore.data.degradations`` stays usable with PIL and numpy alone.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# public name -> submodule that defines it
_LAZY_ATTRIBUTES = {
    "ConcatConditionedTransformer": "models.transformer_sana_concat",
    "RestorationGuidedFlowScheduler": "schedulers.scheduling_restoration_guided_flow",
    "RestorationGuidedFlowSchedulerOutput": "schedulers.scheduling_restoration_guided_flow",
    "SanaRestorationPipeline": "pipelines.pipeline_sana_restoration",
    "SanaRestorationPipelineOutput": "pipelines.pipeline_sana_restoration",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        module = importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from .models.transformer_sana_concat import ConcatConditionedTransformer
    from .pipelines.pipeline_sana_restoration import SanaRestorationPipeline, SanaRestorationPipelineOutput
    from .schedulers.scheduling_restoration_guided_flow import (
        RestorationGuidedFlowScheduler,
        RestorationGuidedFlowSchedulerOutput,
    )
