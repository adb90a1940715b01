"""Small modules stay small (the anchors' per-file budget) and the README commands stay true."""
from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "sift_compiler").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"


def test_readme_and_ci_use_the_make_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
