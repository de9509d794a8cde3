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


@pytest.fixture
def hub():
    """A `LocalHubServer` on 127.0.0.1 with this process's huggingface_hub client pointed at it (the `HF_ENDPOINT`
    constants, offline mode lifted); both undone after the test. Fails the test if the server raised."""
    from diffusers_restore.testing_hub import LocalHubServer, hub_endpoint

    with LocalHubServer() as server, hub_endpoint(server.url, timeout=30.0):
        yield server
        assert server.errors == [], "the server raised while handling requests"
