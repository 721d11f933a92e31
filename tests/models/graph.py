"""Dependency ordering with the standard library's ``graphlib``.

Edges point from a service to the services it needs: ``add_dependency(a,
b)`` means *a* needs *b*. Conditions are plain ints (``Condition`` values).
"""

from __future__ import annotations

import graphlib
from collections.abc import Callable, Iterable

from fastorch.errors import CycleError


class RefGraph:
    """A dict-of-dicts dependency graph ordered by ``graphlib``."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        # sid -> {dependency: condition}
        self.deps: dict[int, dict[int, int]] = {}
        # sid -> {dependent: condition}
        self.rdeps: dict[int, dict[int, int]] = {}

    def add_node(self, sid: int, name: str) -> None:
        """Add a service without edges."""
        self.names[sid] = name
        self.deps[sid] = {}
        self.rdeps[sid] = {}

    def _reaches(self, src: int, dst: int) -> list[int] | None:
        """A path of dependency edges from *src* to *dst*, or ``None``."""
        parent: dict[int, int | None] = {src: None}
        todo = [src]
        while todo:
            node = todo.pop()
            if node == dst:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])  # type: ignore[arg-type]
                return path[::-1]
            for nxt in self.deps[node]:
                if nxt not in parent:
                    parent[nxt] = node
                    todo.append(nxt)
        return None

    def add_dependency(self, sid: int, on: int, condition: int = 0) -> None:
        """Say *sid* needs *on*; raise ``CycleError`` and change nothing if
        the edge would close a cycle."""
        path = self._reaches(on, sid)
        if path is not None:
            cycle = [sid, *path]
            raise CycleError([self.names[s] for s in cycle])
        self.deps[sid][on] = condition
        self.rdeps[on][sid] = condition

    def remove_dependency(self, sid: int, on: int) -> bool:
        """Drop the edge; ``False`` if there was none."""
        if on not in self.deps[sid]:
            return False
        del self.deps[sid][on]
        del self.rdeps[on][sid]
        return True

    def _sorter(self, nodes: Iterable[int] | None = None, reverse: bool = False):
        keep = set(self.deps) if nodes is None else set(nodes)
        edges = self.rdeps if reverse else self.deps
        ts: graphlib.TopologicalSorter = graphlib.TopologicalSorter()
        for sid in keep:
            ts.add(sid, *(d for d in edges[sid] if d in keep))
        return ts

    def find_cycle(self) -> list[str] | None:
        """A cycle as names, first name repeated last; ``None`` for a DAG."""
        try:
            self._sorter().prepare()
        except graphlib.CycleError as exc:
            # graphlib lists the cycle against the edge direction
            return [self.names[s] for s in reversed(exc.args[1])]
        return None

    def levels(self) -> list[list[int]]:
        """Topological levels: level 0 needs nothing; sids ascending."""
        ts = self._sorter()
        ts.prepare()
        out = []
        while ts.is_active():
            batch = sorted(ts.get_ready())
            out.append(batch)
            ts.done(*batch)
        return out

    def startable(
        self, candidates: Iterable[int], holds: Callable[[int, int], bool]
    ) -> list[int]:
        """The *candidates* whose every dependency condition holds."""
        return sorted(
            s
            for s in candidates
            if all(holds(on, cond) for on, cond in self.deps[s].items())
        )

    def dependents_closure(self, sids: Iterable[int]) -> set[int]:
        """*sids* and everything that transitively depends on them."""
        seen = set(sids)
        todo = list(seen)
        while todo:
            for dep in self.rdeps[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    def stop_order(self, sids: Iterable[int] | None = None) -> list[int]:
        """The closure of *sids* over dependents, dependents first."""
        nodes = set(self.deps) if sids is None else self.dependents_closure(sids)
        return list(self._sorter(nodes, reverse=True).static_order())

    def affected(self, sid: int) -> list[int]:
        """The transitive dependents of *sid*, dependents first."""
        nodes = self.dependents_closure([sid]) - {sid}
        return list(self._sorter(nodes, reverse=True).static_order())

    def is_stop_order(self, order: list[int], nodes: set[int]) -> bool:
        """Whether *order* lists exactly *nodes*, each before its deps."""
        if len(order) != len(nodes) or set(order) != nodes:
            return False
        pos = {s: i for i, s in enumerate(order)}
        return all(
            pos[s] < pos[on] for s in nodes for on in self.deps[s] if on in nodes
        )

    def is_cycle(self, cycle: list[str], extra: tuple[int, int] | None = None) -> bool:
        """Whether *cycle* (names, first repeated last) follows real edges,
        in one direction, optionally counting the edge *extra* too."""
        if len(cycle) < 2 or cycle[0] != cycle[-1]:
            return False
        by_name = {n: s for s, n in self.names.items()}
        try:
            path = [by_name[n] for n in cycle]
        except KeyError:
            return False
        if len(set(path[:-1])) != len(path) - 1:
            return False

        def edge(a: int, b: int) -> bool:
            return b in self.deps[a] or (a, b) == extra

        pairs = list(zip(path, path[1:], strict=False))
        return all(edge(a, b) for a, b in pairs) or all(edge(b, a) for a, b in pairs)
