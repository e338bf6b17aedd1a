"""The README's "From Python" code runs: each block is an example script that asserts its own result."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(REPO, "examples")) if f.endswith(".py"))


def _code(path: str) -> str:
    """The script without its module docstring: what the README shows."""
    source = open(path).read()
    doc = ast.get_docstring(ast.parse(source), clean=False)
    end = source.index(doc) + len(doc) + 3 if doc else 0
    return source[end:].strip()


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_asserts_its_result(name):
    proc = subprocess.run([sys.executable, os.path.join("examples", name)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ok:")


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_readme_shows_the_example_as_it_is(name):
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(REPO, "README.md")).read(), re.S)
    assert _code(os.path.join(REPO, "examples", name)) in [b.strip() for b in blocks], \
        f"README.md has no ```python block equal to examples/{name}: update one from the other"
