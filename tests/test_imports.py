"""The package's import graph: no cycles (function-local imports included), and a light
``import metaopt`` (no plotting, logging or progress-bar packages)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "metaopt"


def _module_name(path: Path, top: Path) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The metaopt module ``name`` refers to: itself, else its longest known prefix (``from
    metaopt.tasks.base import TaskBatch`` -> metaopt.tasks.base; ``metaopt.x.Name`` -> metaopt.x)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the metaopt modules it imports anywhere in its file (top level, inside
    functions, under ``if TYPE_CHECKING``, ``importlib.import_module("...")``), relative
    imports resolved. A package counts as importing what its ``__init__`` imports, and
    importing ``a.b.c`` also runs ``a`` and ``a.b``, except the importing module's own
    packages (already initialising when it runs)."""
    files = {_module_name(p, root.parent): p for p in root.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule`
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]  # importlib.import_module("metaopt.x")
            for name in names:
                target = _resolve(name, modules)
                if target is not None:
                    parts = target.split(".")  # the parent packages' __init__ run first
                    targets.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        # A module's own packages are initialising while it runs (Python imports parents
        # first), so edges to them are no cycle; every other edge counts.
        ancestors = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")) + 1)}
        graph[mod] = targets - ancestors
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (iterative DFS, colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child, 2) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child, 2) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_local_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "metaopt"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from metaopt import a\n")
    (pkg / "a.py").write_text("def f():\n    from metaopt.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph["metaopt.a"] >= {"metaopt.sub.b", "metaopt.sub"}
    assert "metaopt.a" in graph["metaopt.sub.b"]
    assert find_cycle(graph) is not None  # a -> sub.b -> a, through a lazy import


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert {"metaopt.train", "metaopt.loop", "metaopt.distributed", "metaopt.compare"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


HEAVY = ("matplotlib", "tensorboard", "tqdm", "PIL", "scipy", "metaopt.train")


def test_import_metaopt_stays_light() -> None:
    """``import metaopt`` imports torch (and numpy), not the optional or run-time packages;
    ``torch`` itself may import some of them (torch.hub imports tqdm when it is installed),
    so the check is on the modules that ``import metaopt`` adds."""
    code = (
        "import sys, torch; before = set(sys.modules); import metaopt; "
        "added = set(sys.modules) - before; "
        f"print(sorted(h for h in {HEAVY!r} if any(m == h or m.startswith(h + '.') for m in added)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", f"import metaopt imported {out.stdout.strip()}"
