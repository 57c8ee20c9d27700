"""The promises the code makes about its own shape, checked: the layer contract (pyproject.toml,
`[tool.importlinter]`) is kept and would catch a break, no module imports another in a circle or
takes a private name from another, `mypy --strict` is clean, the Stack API needs no pytest, and
the exception tree errors.py draws is the real one.

lint-imports and mypy run as subprocesses, as CI would run them; both come with the test extra
(`pip install -e '.[test]'`, which scripts/test does).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import deque
from pathlib import Path

import pytest

import sandboxd
from sandboxd import errors

PACKAGE = Path(sandboxd.__file__).resolve().parent
ROOT = PACKAGE.parent  # the checkout: pyproject.toml beside the package
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """lint-imports run on the package under `root` with the pyproject.toml there (no cache
    written into the checkout; wide lines, so that an import is never wrapped over two)."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, COLUMNS="500", NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return found


def test_the_layer_contract_is_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "contract", "reported"),
    [
        ("kernel/seccomp.py", "import sandboxd.daemon.supervisor", "layers", "sandboxd.kernel.seccomp -> sandboxd.daemon.supervisor"),
        ("spec/model.py", "from sandboxd.plan import launch", "layers", "sandboxd.spec.model -> sandboxd.plan.launch"),
        ("daemon/logs.py", "import ctypes", "ctypes", "sandboxd.daemon.logs -> ctypes"),
        ("plan/launch.py", "import subprocess", "plan-is-pure", "sandboxd.plan.launch -> subprocess"),
    ],
)
def test_the_contract_breaks_when_a_module_imports_what_it_may_not(tmp_path: Path, module: str, line: str, contract: str, reported: str) -> None:
    shutil.copytree(PACKAGE, tmp_path / "sandboxd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    source = tmp_path / "sandboxd" / module
    assert line not in source.read_text()  # else the import would prove nothing
    source.write_text(source.read_text() + f"\n{line}  # the violation under test\n")
    result = lint_imports(tmp_path, "--contract", contract)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
    assert reported in result.stdout, result.stdout


def test_the_ctypes_contract_names_every_top_level_module_but_the_kernel() -> None:
    [ctypes] = [c for c in contracts() if c["id"] == "ctypes"]
    top = {f"sandboxd.{p.stem}" for p in PACKAGE.iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert set(ctypes["source_modules"]) == top - {"sandboxd.kernel"}  # type: ignore[arg-type]


def imports_between_modules() -> dict[str, set[str]]:
    """Each module of sandboxd and the modules of sandboxd it imports (at any place, typing-only too)."""
    import grimp  # comes with import-linter

    graph = grimp.build_graph("sandboxd")
    return {m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("sandboxd")} for m in graph.modules if m.startswith("sandboxd")}


def cycle_through(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """A shortest import cycle from `start` back to it, or None."""
    paths = deque([[start]])
    seen = {start}
    while paths:
        path = paths.popleft()
        for nxt in sorted(edges[path[-1]]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


def test_no_module_imports_another_in_a_circle() -> None:
    edges = imports_between_modules()
    cycles: list[list[str]] = []
    for module in sorted(edges):
        if any(module in cycle for cycle in cycles):
            continue
        if cycle := cycle_through(module, edges):
            cycles.append(cycle)
    assert cycles == [], "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_no_module_takes_a_private_name_from_another() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                if private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {'.' * node.level}{node.module} import {', '.join(private)}")
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: import {a.name}" for a in node.names if any(part.startswith("_") and not part.endswith("__") for part in a.name.split("."))]
    assert found == [], "\n".join(found)


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "sandboxd"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stack_api_imports_without_pytest() -> None:
    code = "import sys; sys.modules['pytest'] = None; from sandboxd.testing import Stack; print(Stack.__name__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "Stack\n"), result.stderr


def test_the_exception_tree_errors_draws_is_the_real_one() -> None:
    drawn: dict[str, str | None] = {}  # class -> the class it is drawn under (None: at the top)
    for line in (errors.__doc__ or "").splitlines():
        if match := re.fullmatch(r"    (?:(?:│   |    )*[├└]── )?([A-Z]\w+)\s{2,}.*", line):
            drawn[match[1]] = "SandboxdError" if re.search(r"[├└]──", line) else None
    classes = {name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and cls.__module__ == errors.__name__}
    assert set(drawn) == set(classes)
    for name, parent in drawn.items():
        bases = [base.__name__ for base in classes[name].__bases__]
        assert bases == ([parent] if parent else ["Exception"] if name == "SandboxdError" else ["object"]), name
