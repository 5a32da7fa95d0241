"""The shape of the code: what may import what. Read from the source, so it holds for every path."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at top level or inside a function."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sources("seqforget", "registry", "benchmarks")}


def test_the_core_package_imports_no_benchmark_code():
    for path in sources("seqforget"):
        if "bench" in path.relative_to(ROOT / "seqforget").parts:
            continue
        bad = {m for m in imports(path) if m.startswith(("seqforget.bench", "benchmarks"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_nothing_outside_the_registry_reaches_into_it():
    modules = project_modules()
    for path in sources("seqforget", "benchmarks", "tests"):
        inner = {m for m in imports(path) if m.startswith("registry.") and m in modules}
        assert not inner, f"{path.relative_to(ROOT)} imports registry internals {sorted(inner)}"


def test_the_registry_imports_no_training_code():
    for path in sources("registry"):
        bad = {m for m in imports(path) if m.split(".")[0] in ("seqforget", "torch", "transformers", "peft")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_there_is_no_import_cycle():
    modules = project_modules()
    graph = {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    graph = {n: {m for m in deps if not m.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(trail + [node, dep])
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
