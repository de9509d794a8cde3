# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""How this package loads and saves weights: as diffusers does, with its guarantees spelled out and tested.

* Loading prefers safetensors. A pickled file (`.bin`, ...) is read only for a component without safetensors, only
  through torch's weights-only loader (which diffusers and transformers use), and never with `use_safetensors=True`.
* Code in a weight file never runs. The weights-only loader refuses a pickle that holds anything but tensors; the
  failure is reported as `UnsafeWeightsError`, naming the folder and what the pickle tried to load. On torch < 2.6,
  whose weights-only loader can be made to run code (CVE-2025-32434), pickled weights are refused outright, as
  transformers refuses them.
* Saving follows the caller's `safe_serialization` (safetensors by default).

`SafeWeightsModelMixin` applies the rule to a `ModelMixin` subclass (put it before `ModelMixin` in the bases);
`SanaRestorationPipeline.from_pretrained` applies it to a pipeline folder with `weights_loading_kwargs` and
`pickle_refusals_explained`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
from typing import Any, Iterator

from diffusers.utils import is_torch_version

#: Pickled weight file names (the formats torch and diffusers can unpickle).
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")

#: Whether torch's weights-only loader can be trusted with a pickle (torch >= 2.6, CVE-2025-32434).
WEIGHTS_ONLY_LOADER_IS_SAFE = is_torch_version(">=", "2.6")

_OLD_TORCH = (
    "torch < 2.6 can be made to run code from a pickled weight file even with its weights-only loader "
    "(CVE-2025-32434): upgrade torch to 2.6 or later, or use safetensors weights"
)


class UnsafeWeightsError(ValueError):
    """Weights that were not loaded because loading them could run code."""


def weights_loading_kwargs(folder: str | os.PathLike, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` of a diffusers `from_pretrained` of `folder` (a model folder, or a pipeline folder and its component
    subfolders), under the rule above: unchanged on torch >= 2.6; on older torch, `use_safetensors=True`, after
    refusing `use_safetensors=False` and a local component whose weights are pickled only."""
    if WEIGHTS_ONLY_LOADER_IS_SAFE:
        return kwargs
    if kwargs.get("use_safetensors") is False:
        raise UnsafeWeightsError(f"`use_safetensors=False` is refused: {_OLD_TORCH}.")
    for component in (os.fspath(folder), *glob.glob(os.path.join(os.fspath(folder), "*", ""))):
        if not glob.glob(os.path.join(component, "*.safetensors")):
            pickled = [file for pattern in PICKLE_PATTERNS for file in glob.glob(os.path.join(component, pattern))]
            if pickled:
                raise UnsafeWeightsError(f"{sorted(pickled)[0]}: pickled weights are refused: {_OLD_TORCH}.")
    return {**kwargs, "use_safetensors": True}


@contextlib.contextmanager
def pickle_refusals_explained(folder: str | os.PathLike) -> Iterator[None]:
    """Turn the error diffusers or transformers raise when torch's weights-only loader refuses a pickle of `folder`
    (a generic "Unable to load weights") into an `UnsafeWeightsError` that says why; other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not (
            isinstance(cause, pickle.UnpicklingError) and "Weights only load failed" in str(cause)
        ):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        reason = next((line for line in str(cause).splitlines() if "GLOBAL" in line), "")
        raise UnsafeWeightsError(
            f"{os.fspath(folder)}: a pickled weight file holds Python objects besides tensors, so it was refused and "
            f"nothing in it ran{f' ({reason.strip()})' if reason else ''}. Load weights only from sources you trust, "
            "as safetensors."
        ) from None


class SafeWeightsModelMixin:
    """`ModelMixin.from_pretrained` under this module's rule (saving is `ModelMixin`'s, as the caller asks)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """`ModelMixin.from_pretrained` (same arguments), under the loading rule of this module."""
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        kwargs = weights_loading_kwargs(folder, kwargs)
        with pickle_refusals_explained(folder):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
