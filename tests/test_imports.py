"""The package's imports flow one way: no import cycle anywhere in src/ (function-local imports count), and the
core (src/sparsegrad/*.py) imports only torch, safetensors, tqdm and the standard library, never the product."""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
CORE_ALLOWED = {"torch", "safetensors", "tqdm", "sparsegrad"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (anywhere in the file), absolute."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x` names a module
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        edges[name] = {m for m in imports_of(path) if m in files and m != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_src():
    edges = graph()
    assert "sparsegrad.finetune.loop" in edges and edges["sparsegrad.finetune.cli"]  # the walk sees the package
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_only_torch_safetensors_tqdm_and_stdlib():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    core = [*(SRC / "sparsegrad").glob("*.py"), *(SRC / "sparsegrad" / "io").glob("*.py")]
    for path in sorted(p for p in core if p.name != "__main__.py"):  # the CLI entry
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top in CORE_ALLOWED | stdlib, f"{path.name} imports {name}"
            assert not name.startswith("sparsegrad.finetune"), f"{path.name} imports the product ({name})"
