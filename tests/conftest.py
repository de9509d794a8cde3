"""Shared pytest set-up: offline, deterministic, quiet."""

import os
import sys

# `hub_server` (the offline Hub stand-in, tests/hub_server.py) is imported by tests here and in examples/: make this
# folder importable whatever pytest's import mode.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

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
    from hub_server import LocalHubServer, hub_endpoint

    with LocalHubServer() as server, hub_endpoint(server.url, timeout=30.0):
        yield server
        assert server.errors == [], "the server raised while handling requests"
