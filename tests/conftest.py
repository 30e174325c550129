"""Shared test settings."""

import pytest
import torch

from msae.lm import LoadedLM, load_lm


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The app's page set-up (explorer.state.setup) sets the process's torch threads (MSAE_APP_THREADS, default 1);
    AppTest runs the pages inside the test process, so restore the count after each test for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lm() -> LoadedLM:
    """The built-in SmolLM2 on the CPU in float32: the reference path, whose activations the tests' tolerances and
    figures were set on (bf16 has tests of its own that say what it changes)."""
    return load_lm("smollm2-135m", device="cpu", precision="float32")
