"""ShapeAnalysis: exported transformers graphs propagate on the meta device, as fake tensors would."""
from __future__ import annotations

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode

from sift_compiler.analyses import shapes
from sift_compiler.capture import capture
from sift_compiler.unit import CompilationUnit
from model_zoo import MODELS


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_meta_propagation_matches_fake_tensors(name):
    """Exported graphs move tensors to devices (``to(device=cpu)``, masks made on the CPU); the
    meta recorder points those at the meta device instead of falling back to fake tensors."""
    case = MODELS[name]()
    gm = capture(case.model, case.args, case.kwargs).module.eval()
    inputs = CompilationUnit(gm, case.args, case.kwargs).flat_inputs()
    meta = shapes._MetaRecorder(gm)
    meta.run(*[x.to("meta") for x in inputs])  # raised "Cannot copy out of meta tensor" before
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = shapes._Recorder(gm)
        fake.run(*[mode.from_tensor(x) for x in inputs])
    assert meta.specs == fake.specs
