"""The layering of the project's packages (docs/DESIGN.md, Layout): core at the bottom, everything pointing
down, no cycles. Built from every import statement in the tree (lazy ones inside functions included), so a
new arrow the wrong way fails here, not in a reader's head."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "families", "exporters", "model_store", "serving", "loadtests", "genserve", "benchmarks")

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "families": {"core"},
    "exporters": {"core", "families", "model_store"},
    "model_store": {"core"},
    "serving": {"core", "model_store"},
    "loadtests": {"core"},
    "genserve": {"core", "families", "exporters", "model_store", "serving", "loadtests"},
    # families: the cascade benchmark generates and grades images offline, as `genserve evaluate` does
    "benchmarks": {"core", "families", "exporters", "model_store", "serving", "loadtests", "genserve"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file (relative imports resolved)."""
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            found.add(prefix)
            found |= {f"{prefix}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "protos" not in p.parts or not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))} | \
           {module_name(p): p for p in (ROOT / "core" / "protos").glob("*_pb2*.py")}


MODULES = project_modules()


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are attributes, not modules, dropped)."""
    return {name: {m for m in imported_modules(path) if m in MODULES and m != name} for name, path in MODULES.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_is_below_it(package):
    wrong = sorted(f"{name} imports {dep}" for name, deps in graph().items() if name.split(".")[0] == package
                   for dep in deps if dep.split(".")[0] not in ALLOWED[package] | {package})
    assert wrong == []


def test_no_import_cycles_between_modules():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            # a package's __init__ re-exporting its own modules is not a cycle a reader has to untangle
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_known_arrows():
    """A negative control: the checker finds imports that do exist (else the tests above could pass empty)."""
    edges = graph()
    assert "core.contracts" in edges["model_store.manifest"]
    assert "serving.engine.deployment" in edges["serving.app"]
    assert "core.samplers.registry" in edges["core.samplers.loop"]
