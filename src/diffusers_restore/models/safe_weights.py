# Copyright 2026 The diffusers-restore authors. Licensed under the Apache License, Version 2.0.
"""Model weights load and save as safetensors only: unpickling a downloaded weight file can run arbitrary code.

`SafetensorsOnlyModelMixin` gives a `ModelMixin` subclass that rule (put it before `ModelMixin` in the bases); the
functions serve loaders that do not go through it (the wrapped SANA transformer, LoRA files, pipeline folders).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable

#: Weight files this package never downloads nor loads (pickles, and framework formats that are not safetensors).
UNSAFE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5", "*.ot")


def refuse_pickle(use_safetensors: bool | None, what: str) -> None:
    """Raise if a caller asks to load `what` from a pickle (`use_safetensors=False`): weights load from
    safetensors only, because unpickling a downloaded file can run arbitrary code."""
    if use_safetensors is False:
        raise ValueError(
            f"`use_safetensors=False` is not supported: {what} load from safetensors only (unpickling a weight file "
            "can run arbitrary code)."
        )


def refuse_pickle_only_folder(folder: str | os.PathLike) -> None:
    """Raise a `ValueError` saying how to convert `folder` when it holds weights in `UNSAFE_WEIGHT_PATTERNS` and no
    `.safetensors` file (instead of diffusers' generic "no file named ... .safetensors"); otherwise do nothing."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder) or glob.glob(os.path.join(folder, "*.safetensors")):
        return
    pickled = sorted(
        os.path.basename(file) for pattern in UNSAFE_WEIGHT_PATTERNS for file in glob.glob(os.path.join(folder, pattern))
    )
    if pickled:
        raise ValueError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}), and weights load from safetensors only "
            "(unpickling can run arbitrary code). Convert the folder once, in an environment you trust with that "
            "file: load it there with `from_pretrained(folder, use_safetensors=False)` (diffusers' own class, or "
            "an older diffusers-restore) and write it back with `save_pretrained(new_folder, "
            "safe_serialization=True)`."
        )


def safetensors_only_kwargs(pretrained_model_name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for a diffusers `from_pretrained` with `use_safetensors=True`, after refusing `use_safetensors=False`
    and a local folder (`subfolder` included) that holds only pickled weights."""
    refuse_pickle(kwargs.get("use_safetensors"), "model weights")
    refuse_pickle_only_folder(os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or ""))
    return {**kwargs, "use_safetensors": True}


class SafetensorsOnlyModelMixin:
    """`from_pretrained` and `save_pretrained` of a `ModelMixin` subclass, restricted to safetensors.

    `save_pretrained` spells out diffusers' arguments because a pipeline's `save_pretrained` / `push_to_hub` passes
    `variant` and `max_shard_size` on to a component only when they appear in its signature.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """`ModelMixin.from_pretrained` from safetensors only: `use_safetensors=False` is refused and a folder that
        holds only pickled weights gets an error that says how to convert it."""
        kwargs = safetensors_only_kwargs(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """`ModelMixin.save_pretrained` in safetensors only: `safe_serialization=False` is refused (a pickled file
        could not be loaded again by this package)."""
        if not safe_serialization:
            raise ValueError(
                f"`safe_serialization=False` is not supported: {type(self).__name__} saves safetensors only (a pickled "
                "checkpoint could not be loaded again, since unpickling can run arbitrary code)."
            )
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=True,
            variant=variant,
            max_shard_size=max_shard_size,
            push_to_hub=push_to_hub,
            **kwargs,
        )
