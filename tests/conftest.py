"""Shared test set-up: one torch thread per xdist worker (2 workers on 2 cores), quiet engines."""
import ctypes
import gc
import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_release_memory():
    torch.manual_seed(0)
    yield
    # Tests build models of up to ~900M parameters; give their memory back to the OS before the
    # next test so two xdist workers fit in the machine's RAM.
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


@pytest.fixture(scope="session", autouse=True)
def _registry_left_as_found():
    """Tests that register transforms or pipelines remove them (`registry.temporary_transform`)."""
    from sift_compiler.registry import pipeline_names, transform_names
    before = (transform_names(), pipeline_names())
    yield
    assert (transform_names(), pipeline_names()) == before, "a test left a registration in the global registry"
