"""The shape of the product code that docs/architecture.md promises: the modules import one
another without a circle (imports inside functions count), and every function fits on a
screen; and what every command shares at its exit."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

MODULES = {path.stem: path for path in ROOT.glob("*.py")}
MAX_FUNCTION_LINES = 50


def imports(name: str) -> set[str]:
    """The product modules that module `name` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & MODULES.keys() - {name}


def circle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports from `start` back to itself, or None."""
    paths = [[start]]
    seen = set()
    while paths:
        path = paths.pop()
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


def test_the_product_modules_import_one_another_without_a_circle():
    graph = {name: imports(name) for name in MODULES}
    assert {"train", "config", "predict", "export", "onnx_model"} <= graph.keys()
    circles = [c for c in (circle_through(name, graph) for name in sorted(graph)) if c]
    assert circles == []


def test_the_circle_finder_finds_a_circle():
    assert circle_through("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle_through("a", {"a": {"b"}, "b": set()}) is None


def test_the_torch_free_modules_import_nothing_that_needs_torch():
    """serve.py answers from an ONNX export without torch: what it imports at the top (and
    onnx_model and images) must not reach torch."""
    for name in ("onnx_model", "images", "cli", "atomic"):
        tree = ast.parse(MODULES[name].read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"torch", "dataset", "model", "predict", "export"}, name


def test_every_product_function_fits_on_a_screen():
    long = []
    for name, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_architecture_page_draws_the_imports_as_they_are():
    """docs/architecture.md's graph: every import between product modules but cli and atomic."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    drawn = set()
    for line in page.split("```mermaid", 1)[1].split("```", 1)[0].splitlines():
        if "-->" in line:
            a, b = (part.strip() for part in line.split("-->"))
            drawn.add((a, b))
    real = {(name, other) for name in MODULES for other in imports(name) - {"cli", "atomic"}}
    assert drawn == real


def frozen_at_exit(code: str) -> bool:
    """Whether the garbage collector's objects were frozen when a Python process running `code`
    (from the project's folder) exited."""
    # registered first, the probe runs after every handler the code registers (last first)
    probe = "import atexit, gc; atexit.register(lambda: print(gc.get_freeze_count() > 0)); "
    shown = subprocess.run(
        [sys.executable, "-c", probe + code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return shown.stdout.split()[-1] == "True"


def test_a_command_freezes_what_is_left_for_the_garbage_collector_at_exit():
    assert frozen_at_exit("import cli; cli.run_cli(lambda argv: None, [])")


def test_importing_the_modules_alone_leaves_the_garbage_collector_as_it_is():
    assert not frozen_at_exit("import cli, dataset")
