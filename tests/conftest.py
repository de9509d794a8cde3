"""Shared pytest set-up: offline, deterministic, quiet."""

import os

# The Hub is never reachable from tests; huggingface_hub reads these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seed torch for every test and keep CPU math single-path."""
    try:
        import torch
    except ImportError:  # data tests run without torch
        yield
        return
    torch.manual_seed(0)
    yield
