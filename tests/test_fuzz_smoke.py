"""The `make fuzz` generator on a few dozen fixed examples: random MLPs, CNNs (residual adds,
concatenations, grouped and depthwise convs) and attention blocks (tied weights) pass every check
of `fuzz_models.check` under every transform, and most of them compile (a refusal is not a pass:
a generator or compiler that refused everything would otherwise pass)."""
from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st

from fuzz_models import TRANSFORMS, cases, check

EXAMPLES = 20
AT_LEAST_OK = 16   # all 20 fixed examples compile and pass today; a few refusals may come with generator changes


def test_random_models_pass_every_check(tmp_path_factory):
    kinds = Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(), transform=st.sampled_from(TRANSFORMS))
    def run(case, transform):
        spec, sparsity, options, seed = case
        outcome = check(spec, transform, sparsity, str(tmp_path_factory.mktemp("fuzz")), seed, options)
        assert not outcome.failed, f"{outcome.kind}: {outcome.detail}\ncase = {case!r}"
        kinds[outcome.kind] += 1

    run()
    assert kinds["ok"] >= AT_LEAST_OK, f"only {kinds['ok']} of {EXAMPLES} random models compiled and passed: {dict(kinds)}"
