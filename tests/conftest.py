"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The app's page set-up (explorer.state.setup) sets the process's torch threads (MSAE_APP_THREADS, default 1);
    AppTest runs the pages inside the test process, so restore the count after each test for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
