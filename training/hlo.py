"""The collectives of a compiled XLA program, read from its optimized HLO
text (`compiled.as_text()`): what crosses devices, and how much. Used by the
plan command, the benchmarks and the tests."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import List, Tuple

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

    @property
    def bytes(self) -> int:
        """Result bytes per device."""
        return sum(_BYTES.get(dtype, 1) * math.prod(dims) for dtype, dims in self.shapes)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "computation": self.computation,
                "shapes": [f"{d}[{','.join(map(str, s))}]" for d, s in self.shapes],
                "dims": [list(s) for _, s in self.shapes],
                "bytes": self.bytes, "replica_groups": self.replica_groups}


def _arrays(text: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    return tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                 for dtype, dims in _ARRAY.findall(text) if dtype in _BYTES or "f8" in dtype)


def collectives(hlo_text: str) -> List[Collective]:
    """Every collective instruction of the program (async pairs once)."""
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
        found.append(Collective(kind, name, computation, shapes,
                                groups.group(1) if groups else ""))
    return found


def summary(ops: List[Collective]) -> dict:
    """Count and result bytes per kind."""
    out = {}
    for op in ops:
        entry = out.setdefault(op.kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += op.bytes
    return out
