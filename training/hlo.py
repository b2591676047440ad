"""The collectives of a compiled XLA program, read from its optimized HLO
text (`compiled.as_text()`): what crosses devices, and how much. Used by the
plan command, the benchmarks and the tests."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional, Tuple

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s(" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")  # unindented headers
_GROUPS = re.compile(r"replica_groups=(\{[0-9,{}]*\}|\[[0-9,]+\]<=\[[0-9,]+\][^,\s]*)")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str                          # one of COLLECTIVES
    name: str                          # the HLO instruction
    computation: str                   # the HLO computation holding it
    shapes: Tuple[Tuple[str, Tuple[int, ...]], ...]  # result arrays: (dtype, dims)
    replica_groups: str
    # Runs per step: the product of the known trip counts of the loops
    # around it (None: a loop without a known count).
    repeats: Optional[int] = 1
    # The conditional branches it sits in, (instruction's computation, branch)
    # outermost first: under lax.cond branch 0 is the false function.
    branches: Tuple[Tuple[str, int], ...] = ()

    @property
    def bytes(self) -> int:
        """Result bytes per device."""
        return sum(_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in self.shapes)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "computation": self.computation,
                "shapes": [f"{d}[{','.join(map(str, s))}]" for d, s in self.shapes],
                "dims": [list(s) for _, s in self.shapes],
                "bytes": self.bytes, "replica_groups": self.replica_groups,
                "repeats": self.repeats, "branches": [b for _, b in self.branches]}


def _arrays(text: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                 for dtype, dims in _ARRAY.findall(text) if dtype in _BYTES or "f8" in dtype)


_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"')
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"true_computation=%?([\w.\-]+), false_computation=%?([\w.\-]+)")
_CALLS = re.compile(r"\b(?:to_apply|calls|condition)=%?([\w.\-]+)")


def _callers(hlo_text: str) -> Dict[str, Tuple[str, str, Optional[int]]]:
    """computation -> (calling computation, "loop" | "branch" | "call", trip count or branch)."""
    parent, computation = {}, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        if " while(" in line:
            body = _BODY.search(line)
            trips = _TRIPS.search(line)
            if body:
                parent[body.group(1)] = (computation, "loop", int(trips.group(1)) if trips else None)
        branches = _BRANCHES.search(line)
        if branches:
            for i, name in enumerate(b.strip().lstrip("%") for b in branches.group(1).split(",")):
                parent[name] = (computation, "branch", i)
        true_false = _TRUE_FALSE.search(line)
        if true_false:
            parent[true_false.group(2)] = (computation, "branch", 0)
            parent[true_false.group(1)] = (computation, "branch", 1)
        for called in _CALLS.findall(line):
            parent.setdefault(called, (computation, "call", None))
    return parent


def collectives(hlo_text: str) -> List[Collective]:
    """Every collective instruction of the program (async pairs once), with
    how often a step runs it."""
    parent = _callers(hlo_text)
    found, computation = [], ""
    for line in hlo_text.splitlines():
        op = _OP.match(line)
        if op is None:
            header = _COMPUTATION.match(line)
            if header:
                computation = header.group(1)
            continue
        name, result, kind, _ = op.groups()
        groups = _GROUPS.search(line)
        shapes = _arrays(result)
        if op.group(4):  # an async start returns (operands, results): keep the results
            shapes = shapes[len(shapes) // 2:]
        repeats, branches, at, seen = 1, [], computation, set()
        while at in parent and at not in seen:
            seen.add(at)
            caller, how, value = parent[at]
            if how == "loop":
                repeats = None if repeats is None or value is None else repeats * value
            elif how == "branch":
                branches.insert(0, (caller, value))
            at = caller
        found.append(Collective(kind, name, computation, shapes,
                                groups.group(1) if groups else "", repeats, tuple(branches)))
    return found


def per_step(ops: List[Collective], branch: int = 0) -> List[Collective]:
    """The collectives one step runs when every conditional takes `branch`
    (or has one branch fewer), e.g. 0: no dispatch overflow, 1: overflow."""
    return [op for op in ops if all(b == branch for _, b in op.branches)]


def summary(ops: List[Collective]) -> dict:
    """Runs and result bytes per kind, per step (a loop of unknown trip
    count counts once)."""
    out = {}
    for op in ops:
        entry = out.setdefault(op.kind, {"count": 0, "bytes": 0})
        n = op.repeats or 1
        entry["count"] += n
        entry["bytes"] += n * op.bytes
    return out
