"""The package's shape: no import cycle (imports inside functions included), the CLI a leaf, and nothing
in the repository pointing at files outside it."""

import ast
import re
import subprocess
from pathlib import Path

import ad_lightning

PACKAGE = Path(ad_lightning.__file__).parent
REPO = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imports_of(path, known) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "ad_lightning.cli" in graph and len(graph) > 30
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_the_cli():
    importers = [name for name, imports in import_graph().items() if "ad_lightning.cli" in imports]
    assert importers == ["ad_lightning.__main__"]


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    files = [REPO / name for name in listed if Path(name).suffix in {".py", ".md", ".yaml", ".toml", ".ipynb", ".txt"}]
    return [path for path in files if path.is_file()] + [p for p in (REPO / "docs").rglob("*.md")]


def test_nothing_points_outside_the_repository():
    """No reference to the team's notes outside the repository, nor to absolute paths of a build machine."""
    outside = re.compile(r"\.\./shared|METHODS\.md|DESIGN\.md|/work/|/root/|/home/\w+/")
    offenders = []
    for path in tracked_text_files():
        if path.name == "test_architecture.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert offenders == []
