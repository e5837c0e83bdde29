"""Print which vlconvert module imports which (module-level and function-level), and any import cycles.

Usage: ``python bench/import_graph.py [vlconvert]`` (the package folder; default: this checkout's).
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the vlconvert modules it imports (``errors`` left out: everything uses it)."""
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlconvert"):
                if node.module in ("vlconvert", "vlconvert.layouts"):
                    package = root if node.module == "vlconvert" else root / "layouts"
                    for alias in node.names:
                        if (package / f"{alias.name}.py").exists() or (package / alias.name).is_dir():
                            graph[module].add(f"{node.module}.{alias.name}")
                else:
                    graph[module].add(node.module)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name.startswith("vlconvert"))
    for module in graph:
        graph[module] -= {module, "vlconvert.errors"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk (each reported once per entry point)."""
    found: list[list[str]] = []
    seen: set[str] = set()

    def walk(node: str, stack: list[str]) -> None:
        if node in stack:
            found.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        for dep in sorted(graph.get(node, ())):
            walk(dep, stack + [node])

    for node in sorted(graph):
        walk(node, [])
    return found


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "vlconvert"
    graph = import_graph(root)
    for module in sorted(graph):
        deps = ", ".join(sorted(d.removeprefix("vlconvert.") for d in graph[module]))
        print(f"{module.removeprefix('vlconvert.')}: {deps}")
    found = cycles(graph)
    print(f"cycles: {len(found)}")
    for cycle in found:
        print("  " + " -> ".join(cycle))


if __name__ == "__main__":
    main()
