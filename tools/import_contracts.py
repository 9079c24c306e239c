"""import-linter contract types of our own (`[tool.importlinter]` in pyproject.toml).

`acyclic_modules`: no import cycle between any two modules of the listed packages.
import-linter's own `acyclic_siblings` compares packages as wholes; this one works on
the module graph itself, so a cycle through function-level or `TYPE_CHECKING` imports
(which grimp records like any other import) is reported with its every step.
"""

from __future__ import annotations

from importlinter import Contract, ContractCheck, fields, output

__all__ = ["AcyclicModulesContract"]


class AcyclicModulesContract(Contract):
    type_name = "acyclic_modules"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose):  # type: ignore[no-untyped-def]
        roots = [str(p) for p in self.packages]  # type: ignore[attr-defined]
        modules = sorted(
            m for m in graph.modules if any(m == r or m.startswith(r + ".") for r in roots)
        )
        inside = set(modules)
        edges = {m: sorted(graph.find_modules_directly_imported_by(m) & inside) for m in modules}
        cycles = [c for c in _components(modules, edges) if len(c) > 1]
        examples = [_cycle_through(c, edges) for c in cycles]
        return ContractCheck(kept=not cycles, metadata={"cycles": examples})

    def render_broken_contract(self, check):  # type: ignore[no-untyped-def]
        for cycle in check.metadata["cycles"]:
            output.print_error(" -> ".join([*cycle, cycle[0]]))
            output.new_line()


def _components(modules: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            if i < len(edges[node]):
                work.append((node, i + 1))
                nxt = edges[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                found.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found


def _cycle_through(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    """One concrete cycle inside a strongly connected component (breadth-first back to
    its first module), for the report."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in edges[node]:
            if nxt not in members:
                continue
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return component
