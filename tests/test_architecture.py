"""The shape of the code, checked from its source: the import graph between the package's layers, no class built
by inheriting from another of ours (composition instead), and files and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "offload"
# The layers below the engine: none of them may import it.
BELOW_ENGINE = ("offload.layout", "offload.optim", "offload.schedule", "offload.storage", "offload.checkpoint",
                "offload.ranks", "offload.config", "offload.errors", "offload.timeline")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer, each with its reason.
LONG_FUNCTIONS = {
    "offload/cli/train.py:run": "the run's lifetime: scratch directory, launch, engine and run log opened in order "
                                "in one try and closed in one finally (split, half-open resources would travel)",
}
# Files allowed to be longer, each with its reason.
LONG_FILES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _runtime_imports(path: Path, module: str) -> set[str]:
    """The offload modules ``path`` imports when it runs (anywhere but under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("offload"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("offload"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _runtime_imports(path, name) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle_within(graph: dict[str, set[str]], prefix: str) -> list[str] | None:
    nodes = {n for n in graph if n.startswith(prefix)}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n] & nodes):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n)):
            return found
    return None


@pytest.mark.parametrize("layer", ["offload.engine.", "offload.schedule."])
def test_no_import_cycle_inside_a_layer(layer):
    assert _cycle_within(_graph(), layer) is None


def test_nothing_below_the_engine_imports_it():
    bad = [(m, i) for m, imports in _graph().items() if m.startswith(BELOW_ENGINE)
           for i in imports if i.startswith("offload.engine")]
    assert bad == []


def test_config_imports_nothing_of_ours():
    assert _graph()["offload.config"] == set()


def test_the_estimate_uses_public_names_only():
    tree = ast.parse((PACKAGE / "estimate.py").read_text())
    private = [f"{node.module}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("offload") for a in node.names if a.name.startswith("_")]
    assert private == []
    assert not any(i.startswith("offload.engine") for i in _graph()["offload.estimate"])


def test_no_class_inherits_from_another_of_ours():
    """Composition, not base classes spread over files: only exceptions, enums and Protocols are subclassed."""
    ours: dict[str, str] = {}
    bases: list[tuple[str, str, list[str]]] = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                ours[node.name] = name
                bases.append((name, node.name, [ast.unparse(b).rpartition(".")[2] for b in node.bases]))
    allowed = ("Error", "Exception", "Warning", "Enum", "Protocol", "NamedTuple", "TypedDict")
    offenders = [f"{module}.{cls}({base})" for module, cls, names in bases for base in names
                 if base in ours and not base.endswith(allowed) and not _is_allowed_base(base, bases, allowed)]
    assert offenders == []


def _is_allowed_base(base: str, bases: list[tuple[str, str, list[str]]], allowed: tuple[str, ...]) -> bool:
    """``base`` is itself an exception (or enum...) of ours: subclassing it is a kind of error, not a mixin."""
    for _, cls, names in bases:
        if cls == base:
            return any(n.endswith(allowed) or n in ("ValueError", "RuntimeError", "OSError", "KeyError",
                                                     "MemoryError", "TypeError") or
                       _is_allowed_base(n, bases, allowed) for n in names if n != base)
    return False


def test_files_and_functions_are_of_a_readable_size():
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES and rel not in LONG_FILES:
            long_files.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                    long_functions.append(f"{rel}:{node.name}: {lines} lines")
    assert long_files == [] and long_functions == []
