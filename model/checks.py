"""The checks every validated settings object shares (model config, data
spec, pipeline settings, Trainer config, components): one notion of "an
integer in range" (a bool is not one, nor is 3.0) and the one list of
training precisions. Each caller raises its own error type with the field
named; these return the problem in words."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

#: Training precisions: "auto" (mixed_bfloat16 on GPU, float32 on CPU),
#: "float32", "bf16", "float8" (Keras float8 training of the Dense layers).
PRECISIONS = ("auto", "float32", "bf16", "float8")


def int_problem(value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> Optional[str]:
    """What is wrong with `value` as an integer in [minimum, maximum], or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f"must be an integer, got {value!r} ({type(value).__name__})"
    if minimum is not None and value < minimum:
        return f"must be >= {minimum}, got {value}"
    if maximum is not None and value > maximum:
        return f"must be <= {maximum}, got {value}"
    return None


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None,
              error: Callable[[str], Exception] = ValueError) -> int:
    """`value` as an int; else raises `error("<name>: <problem>")`."""
    problem = int_problem(value, minimum, maximum)
    if problem:
        raise error(f"{name}: {problem}")
    return int(value)
