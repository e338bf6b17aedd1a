"""The layering holds: no import cycles, the core imports no build code and no serving framework,
and what a server loads never pulls in the offline build package."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("branched", "handlers", "ray_app", "loadtests")
SERVING = ("ts", "ray", "locust", "fastapi", "starlette", "handlers", "ray_app", "loadtests")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                    found[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, at module level or inside functions, resolved to dotted names."""
    path = MODULES[name]
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _project_edges() -> dict[str, set[str]]:
    return {m: {i for i in _imports(m) if i in MODULES and i != m} for m in MODULES}


def _is_core(name: str) -> bool:
    return name.startswith("branched") and not name.startswith("branched.build") and name != "branched.cli"


def test_there_is_no_import_cycle():
    edges = _project_edges()
    # A package's __init__ re-exporting its own modules is not a cycle between modules.
    edges = {m: {i for i in deps if not (m.startswith(i + ".") and MODULES[i].endswith("__init__.py"))}
             for m, deps in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _is_core(m)))
def test_the_core_imports_no_build_code_and_no_serving_framework(name):
    bad = sorted(i for i in _imports(name)
                 if i.startswith("branched.build") or i == "branched.cli" or i.split(".")[0] in SERVING)
    assert not bad, f"{name} is inference core but imports {bad}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("branched")))
def test_branched_never_imports_an_adapter(name):
    bad = sorted(i for i in _imports(name) if i.split(".")[0] in ("handlers", "ray_app", "loadtests"))
    assert not bad, f"{name} imports the adapters {bad}"


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := sum(1 for _ in open(p))) > 400}
    assert not long, long


@pytest.mark.parametrize("module", ["handlers.branched_handler", "ray_app.app", "branched.serving"])
def test_what_a_server_loads_never_imports_the_build_package(module):
    code = ("import sys, importlib; importlib.import_module(%r); "
            "print(sorted(m for m in sys.modules if m.startswith('branched.build') or m == 'branched.cli'))" % module)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"importing {module} imported {out.stdout.strip()}"
