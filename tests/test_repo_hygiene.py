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


def _asserts(path: pathlib.Path):
    import ast
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assert):
            yield node


def test_assertions_can_fail():
    """`assert x, y and z` checks only x (the rest is the message); `assert (x, msg)` never fails;
    `pytest.raises(Exception)` passes on any bug. Each one found here once hid a failure."""
    import ast
    files = list((ROOT / "tests").rglob("*.py")) + list((ROOT / "sift_compiler").rglob("*.py"))
    bad = [f"{p.relative_to(ROOT)}:{a.lineno}" for p in files for a in _asserts(p)
           if isinstance(a.test, ast.Tuple) or isinstance(a.msg, (ast.BoolOp, ast.Compare))]
    assert not bad, f"assertions that cannot fail as written: {bad}"
    broad = [str(p.relative_to(ROOT)) for p in files if p.resolve() != pathlib.Path(__file__).resolve()
             and ("raises(Exception" in p.read_text() or "raises(BaseException" in p.read_text())]
    assert not broad, f"name the exception you expect: {broad}"
