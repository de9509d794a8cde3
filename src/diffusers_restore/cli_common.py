"""What the ``sana-restore`` commands share: one-line user errors, the ``--model`` and ``--device`` checks, loading a
:class:`SanaRestorationPipeline`, and checking an output location, all done before any image is touched.

Both :mod:`diffusers_restore.cli` and :mod:`diffusers_restore.demo` import this module; it imports neither of them.
Heavy libraries (torch, diffusers) are imported inside the functions that need them.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

BUNDLED = "bundled"
"""The ``--model`` value naming the small restorer shipped inside the package (:data:`BUNDLED_MODEL_DIR`)."""

BUNDLED_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "sana-restore-tiny")
"""The bundled restorer: a complete ``SanaRestorationPipeline`` folder (rebuilt by ``examples/build_bundled_model.py``
in the source repository)."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSource:
    """Where ``--model`` points: a local pipeline folder or a Hub repo id."""

    name: str
    """What the user passed (``bundled``, a path or a repo id), for messages."""
    location: str
    """The folder path or the repo id handed to ``from_pretrained``."""
    is_local: bool


def resolve_model(model: str) -> ModelSource:
    """Check ``--model`` without loading anything: an existing pipeline folder, ``bundled``, or a Hub repo id.

    Raises:
        CLIError: a path that does not exist, a file, a folder without ``model_index.json``, a missing bundled
            restorer, or a string that is neither a path nor a repo id.
    """
    expanded = os.path.expanduser(model)
    if model == BUNDLED and not os.path.exists(expanded):
        if not os.path.isfile(os.path.join(BUNDLED_MODEL_DIR, "model_index.json")):
            raise CLIError(
                f"--model bundled: this installation has no bundled restorer ({BUNDLED_MODEL_DIR} is missing or "
                "incomplete); reinstall diffusers-restore, or rebuild it from the source repository with "
                "`python examples/build_bundled_model.py`."
            )
        return ModelSource(model, BUNDLED_MODEL_DIR, is_local=True)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "model_index.json")):
            raise CLIError(
                f"--model '{model}' is a folder but not a pipeline (no model_index.json): pass the folder that "
                "SanaRestorationPipeline.save_pretrained wrote."
            )
        return ModelSource(model, expanded, is_local=True)
    if os.path.exists(expanded):
        raise CLIError(f"--model '{model}' is a file: pass a pipeline folder or a Hub repo id (org/name).")
    if not _REPO_ID.match(model) or model.startswith((".", "/", "~")):
        raise CLIError(f"--model path '{model}' does not exist: pass an existing pipeline folder or a Hub repo id.")
    return ModelSource(model, model, is_local=False)


def load_pipeline(source: ModelSource, dtype=None, device: str | None = None, revision: str | None = None,
                  cpu_offload: bool = False, quantize: str = "none"):
    """Load a :class:`SanaRestorationPipeline` from `source` (see :func:`resolve_model`), turning failures into
    one-line `CLIError`s: a broken local folder gets the pipeline's own diagnosis, a Hub id the network/offline one.

    Args:
        source: the checked ``--model``.
        dtype: the weights' torch dtype (``None``: as saved).
        device: where to move the pipeline (ignored with `cpu_offload`).
        revision: Hub revision (branch, tag or commit); meaningless for a folder.
        cpu_offload: ``enable_model_cpu_offload(device=device)`` instead of ``.to(device)``.
        quantize: ``"none"``, ``"int8"`` or ``"nf4"``: the transformer and the text encoder load with
            :func:`~diffusers_restore.quantization.pipeline_quantization_config` (check it first with
            :func:`resolve_device`).
    """
    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging
    from packaging.version import Version
    from transformers.utils import logging as transformers_logging

    from .pipelines.pipeline_sana_restoration import SanaRestorationPipeline
    from .quantization import pipeline_quantization_config

    if not sys.stderr.isatty():  # progress bars only for a person at a terminal, not in logs
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {}
    if dtype is not None:  # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns)
        kwargs["dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"] = dtype
    if revision and not source.is_local:
        kwargs["revision"] = revision
    if quantize != "none":
        kwargs["quantization_config"] = pipeline_quantization_config(quantize, dtype or torch.bfloat16)
    try:
        pipe = SanaRestorationPipeline.from_pretrained(source.location, **kwargs)
    except Exception as error:  # every loading failure becomes one actionable line
        reason = " ".join(str(error).split()) or type(error).__name__
        if source.is_local:
            where = "" if source.location in reason else f"cannot load the pipeline folder {source.location}: "
            raise CLIError(f"--model '{source.name}': {where}{reason}") from error
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise CLIError(
                f"--model '{source.name}' is not a local folder and the Hub is offline (HF_HUB_OFFLINE=1) with no "
                "cached copy: download it on a connected machine (hf download) or pass a local folder."
            ) from error
        raise CLIError(f"--model '{source.name}': could not load it from the Hub ({type(error).__name__}: "
                       f"{reason}).") from error
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif device is not None:
        pipe.to(device)
    return pipe


# --------------------------------------------------------------------------------------------------- device


def resolve_device(device: str | None, dtype: str | None = None, cpu_offload: bool = False, quantize: str = "none"):
    """Check ``--device``, ``--dtype``, ``--cpu-offload`` and ``--quantize`` against this machine before any model is
    loaded.

    Args:
        device: a torch device string, or ``None`` for ``cuda`` when available, else ``cpu``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None`` (bfloat16 on CUDA or with quantized weights,
            float32 otherwise).
        cpu_offload: model CPU offload was asked for: it needs accelerate and an accelerator to offload to.
        quantize: ``"none"``, ``"int8"`` or ``"nf4"``: its backend must be installed, and nf4 needs a GPU (the
            models run on the accelerator under ``--cpu-offload``).

    Returns:
        ``(device string, torch dtype)``.

    Raises:
        CLIError: a malformed device, an accelerator this machine does not have (or an index past its count),
            CPU offload without an accelerator, or a quantization whose backend is missing or cannot run on the
            device.
    """
    import torch

    given = device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise CLIError(f"--device '{device}' is not a torch device ({error}); use e.g. cpu, cuda or cuda:1.") from error
    if parsed.type != "cpu":
        if parsed.type == "mps":
            available, count = torch.backends.mps.is_available(), 1
        else:
            backend = getattr(torch, parsed.type, None)
            available = bool(getattr(backend, "is_available", lambda: False)())
            count = int(getattr(backend, "device_count", lambda: 1)()) if available else 0
        if not available:
            detail = " (this torch build has no CUDA)" if parsed.type == "cuda" and torch.version.cuda is None else ""
            raise CLIError(f"--device {device}: no {parsed.type} device is available on this machine{detail}; "
                           "use --device cpu.")
        if parsed.index is not None and parsed.index >= count:
            raise CLIError(f"--device {device}: this machine has {count} {parsed.type} device(s) "
                           f"(indices 0 to {count - 1}).")
    if cpu_offload:
        try:
            import accelerate  # noqa: F401
        except ImportError as error:
            raise CLIError("--cpu-offload needs the accelerate package: pip install accelerate.") from error
        if parsed.type == "cpu":
            why = f"--device is {given}" if given is not None else "this machine has none"
            raise CLIError("--cpu-offload keeps the models on the CPU and moves each one to an accelerator while it "
                           f"runs: it needs an accelerator device, and {why}.")
    if quantize != "none":
        from .quantization import quantization_unavailable

        reason = quantization_unavailable(quantize, parsed)
        if reason is not None:
            raise CLIError(f"--quantize {reason}.")
    dtype_name = dtype or ("bfloat16" if parsed.type == "cuda" or quantize != "none" else "float32")
    return device, getattr(torch, dtype_name)


# --------------------------------------------------------------------------------------------------- output


def prepare_output_dir(path: str, option: str = "-o") -> str:
    """Create the output folder `path` (with its parents) and check that a file can be written in it.

    Returns:
        The folder's real path.

    Raises:
        CLIError: `path` is a file, cannot be created, or is not writable (e.g. read-only, or under ``/proc``).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{option} '{path}' is a file, not a folder.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CLIError(f"{option} '{path}': cannot create the output folder ({error.strerror or error}).") from error
    try:  # the only reliable writability test (os.access ignores read-only mounts and root's rights)
        handle, probe = tempfile.mkstemp(prefix=".sana-restore-write-test-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise CLIError(f"{option} '{path}': the output folder is not writable ({error.strerror or error}).") from error
    return os.path.realpath(path)


def prepare_output_file(path: str, option: str = "-o") -> str:
    """Check that the file `path` can be written (its folder is created and probed by :func:`prepare_output_dir`).

    Returns:
        The file's absolute path.

    Raises:
        CLIError: `path` is a folder, or its folder cannot be created or written.
    """
    if os.path.isdir(path):
        raise CLIError(f"{option} '{path}' is a folder: pass a file name such as demo.png.")
    folder = prepare_output_dir(os.path.dirname(os.path.abspath(path)), option)
    return os.path.join(folder, os.path.basename(path))
