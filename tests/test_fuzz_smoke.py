"""The `make fuzz` generator on a few dozen fixed examples: random MLPs, CNNs (residual adds,
concatenations, grouped and depthwise convs) and attention blocks (tied weights) pass every check
of `fuzz_models.check` under every transform."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from fuzz_models import TRANSFORMS, cases, check


@settings(max_examples=20, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(), transform=st.sampled_from(TRANSFORMS))
def test_random_models_pass_every_check(case, transform, tmp_path_factory):
    spec, sparsity, options, seed = case
    outcome = check(spec, transform, sparsity, str(tmp_path_factory.mktemp("fuzz")), seed, options)
    assert not outcome.failed, f"{outcome.kind}: {outcome.detail}\ncase = {case!r}"
