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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """``--dist loadgroup``: send every test of an ``xdist_group`` to one worker.

    xdist 3.8 does it by appending ``@group`` to ``item._nodeid``, which pytest 9 no longer reads
    (the node id is ``item._id``): every group was split across the workers, so two workers held
    the largest models at once and group-shared compiles ran twice. This sets the suffix where
    pytest reads it, after xdist's own hook, and stops the run if the suffix still does not show.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)
        if groups and not item.nodeid.endswith(suffix):
            raise pytest.UsageError(f"{item.nodeid}: its xdist_group {groups} cannot be set with this pytest and "
                                    "pytest-xdist; update tests/conftest.py before running with --dist loadgroup")


@pytest.fixture(scope="session", autouse=True)
def _registry_left_as_found():
    """Tests that register transforms or pipelines remove them (`registry.temporary_transform`)."""
    from sift_compiler.registry import pipeline_names, transform_names
    before = (transform_names(), pipeline_names())
    yield
    assert (transform_names(), pipeline_names()) == before, "a test left a registration in the global registry"
