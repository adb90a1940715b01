"""Shared test set-up: one torch thread per xdist worker (2 workers on 2 cores), quiet engines."""
import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
