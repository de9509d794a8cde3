"""Lazy attribute access for package ``__init__`` modules (PEP 562), so that importing a package does not import torch.

Used by ``diffusers_restore`` and ``diffusers_restore.data``; it imports nothing heavy itself.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(package: str, attributes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return the ``(__getattr__, __dir__)`` pair for `package`, where `attributes` maps each public name to the
    submodule (relative to `package`) that defines it. A name is imported on first access and then cached in the
    package's namespace."""

    def __getattr__(name: str) -> Any:
        if name in attributes:
            value = getattr(importlib.import_module(f".{attributes[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(attributes))

    return __getattr__, __dir__
