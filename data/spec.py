"""`DataSpec`: the validated, hashable description of a synthetic data source.

A spec fully determines both the generative model (transition tables, Zipf
permutation, ...) and every sequence it produces, so it is what pipelines store
as artifact properties (see :func:`data.generators.describe`) and rebuild with
:meth:`DataSpec.from_dict`.

Kind-specific parameters default to ``None`` and are filled in per kind at
construction; passing a parameter that does not apply to the chosen kind is an
error (it would otherwise be silently ignored).

=========  ==========================================================
kind       parameters (default)
=========  ==========================================================
uniform    --
zipf       ``exponent`` (1.0)
markov     ``order`` (1), ``temperature`` (1.0)
copy       ``prefix_length`` (``seq_len // 2``)
mixture    ``components`` (required), ``weights`` (equal)
=========  ==========================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Mapping, Optional, Tuple

from model.checks import int_problem

KINDS = ("uniform", "zipf", "markov", "copy", "mixture")

#: Markov tables have ``vocab_size ** order`` rows (one per context) ...
MAX_TABLE_ROWS = 2**22
#: ... and ``vocab_size ** (order + 1)`` probabilities in total.
MAX_TABLE_ENTRIES = 2**25
#: Tokens are emitted as int32.
MAX_VOCAB_SIZE = 2**31 - 1
#: Seeds must fit an int64 (MLMD custom properties) and be non-negative
#: (``np.random.SeedSequence``).
MAX_SEED = 2**63 - 1

# Per-kind parameters and their defaults (callables get the partially built spec).
_KIND_PARAMS = {
    "uniform": {},
    "zipf": {"exponent": 1.0},
    "markov": {"order": 1, "temperature": 1.0},
    "copy": {"prefix_length": None},  # default depends on seq_len
    "mixture": {"components": None, "weights": None},
}
_ALL_PARAMS = ("order", "temperature", "exponent", "prefix_length", "components", "weights")

# Keys that `describe()` adds on top of `to_dict()`; `from_dict` ignores them.
DERIVED_KEYS = frozenset(
    {
        "optimal_loss",
        "optimal_loss_is_exact",
        "optimal_loss_upper_bound",
        "optimal_loss_unit",
        "block_size",
        "generator_version",
    }
)


class DataSpecError(ValueError):
    """Invalid `DataSpec` field. ``.field`` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"DataSpec.{field}: {message}")


def _as_int(field: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    problem = int_problem(value, minimum, maximum)
    if problem:
        raise DataSpecError(field, problem)
    return int(value)


def _as_positive_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataSpecError(field, f"must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise DataSpecError(field, f"must be finite and > 0, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Settings of a synthetic token source. Immutable, hashable, validated.

    Args:
      kind: one of ``uniform``, ``zipf``, ``markov``, ``copy``, ``mixture``.
      vocab_size: number of token ids; tokens are in ``[0, vocab_size)``.
      seq_len: tokens per sequence (>= 2, so there is at least one target).
      seed: non-negative integer; determines the model and every sequence.
      order: markov context length k (>= 1, ``vocab_size**order <= 2**22``).
      temperature: markov logits are ``N(0, 1) / temperature`` (> 0); small
        temperatures give near-deterministic transitions.
      exponent: zipf exponent ``a`` in ``p(rank r) ∝ (r + 1) ** -a`` (> 0).
      prefix_length: copy task prefix length P, ``1 <= P <= seq_len - 1``.
      components: mixture components: `DataSpec`s or dicts. A dict may omit
        ``vocab_size``/``seq_len`` (inherited from the mixture) and ``seed``
        (defaults to ``mixture.seed + 1 + index``). All components must have
        the mixture's ``vocab_size`` and ``seq_len``.
      weights: mixture weights (>= 0, positive sum; normalised internally);
        default equal weights.
    """

    kind: str
    vocab_size: int
    seq_len: int
    seed: int = 0
    order: Optional[int] = None
    temperature: Optional[float] = None
    exponent: Optional[float] = None
    prefix_length: Optional[int] = None
    components: Optional[Tuple["DataSpec", ...]] = None
    weights: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise DataSpecError("kind", f"unknown kind {self.kind!r}; expected one of {KINDS}")
        put("vocab_size", _as_int("vocab_size", self.vocab_size, 2, MAX_VOCAB_SIZE))
        put("seq_len", _as_int("seq_len", self.seq_len, 2))
        put("seed", _as_int("seed", self.seed, 0, MAX_SEED))

        allowed = _KIND_PARAMS[self.kind]
        for name in _ALL_PARAMS:
            if name not in allowed and getattr(self, name) is not None:
                raise DataSpecError(name, f"does not apply to kind {self.kind!r} (allowed: {sorted(allowed) or 'none'})")
        for name, default in allowed.items():
            if getattr(self, name) is None and default is not None:
                put(name, default)

        if self.kind == "zipf":
            put("exponent", _as_positive_float("exponent", self.exponent))
        elif self.kind == "markov":
            order = _as_int("order", self.order, 1)
            rows = self.vocab_size**order  # exact (Python ints)
            if rows > MAX_TABLE_ROWS:
                raise DataSpecError(
                    "order",
                    f"vocab_size**order = {self.vocab_size}**{order} contexts exceeds the table limit {MAX_TABLE_ROWS}",
                )
            if rows * self.vocab_size > MAX_TABLE_ENTRIES:
                raise DataSpecError(
                    "order",
                    f"vocab_size**(order+1) = {rows * self.vocab_size} table entries exceeds the limit {MAX_TABLE_ENTRIES}",
                )
            put("order", order)
            put("temperature", _as_positive_float("temperature", self.temperature))
        elif self.kind == "copy":
            if self.prefix_length is None:
                put("prefix_length", self.seq_len // 2)
            put("prefix_length", _as_int("prefix_length", self.prefix_length, 1, self.seq_len - 1))
        elif self.kind == "mixture":
            self._validate_mixture(put)

    def _validate_mixture(self, put):
        comps = self.components
        if comps is None or isinstance(comps, (str, bytes, Mapping, DataSpec)):
            raise DataSpecError("components", "mixture needs a non-empty sequence of component specs")
        try:
            comps = list(comps)
        except TypeError:
            raise DataSpecError("components", f"must be a sequence of specs, got {type(comps).__name__}") from None
        if not comps:
            raise DataSpecError("components", "mixture needs at least one component")
        built = []
        for i, comp in enumerate(comps):
            if isinstance(comp, Mapping):
                d = dict(comp)
                d.setdefault("vocab_size", self.vocab_size)
                d.setdefault("seq_len", self.seq_len)
                d.setdefault("seed", self.seed + 1 + i)
                try:
                    comp = DataSpec.from_dict(d)
                except DataSpecError as e:
                    raise DataSpecError(f"components[{i}].{e.field}", str(e)) from None
            elif not isinstance(comp, DataSpec):
                raise DataSpecError(f"components[{i}]", f"must be a DataSpec or dict, got {type(comp).__name__}")
            if comp.vocab_size != self.vocab_size:
                raise DataSpecError(
                    f"components[{i}].vocab_size", f"{comp.vocab_size} != mixture vocab_size {self.vocab_size}"
                )
            if comp.seq_len != self.seq_len:
                raise DataSpecError(f"components[{i}].seq_len", f"{comp.seq_len} != mixture seq_len {self.seq_len}")
            built.append(comp)
        put("components", tuple(built))

        weights = self.weights
        if weights is None:
            weights = [1.0] * len(built)
        if isinstance(weights, (str, bytes)):
            raise DataSpecError("weights", "must be a sequence of numbers")
        try:
            weights = list(weights)
        except TypeError:
            raise DataSpecError("weights", f"must be a sequence of numbers, got {type(weights).__name__}") from None
        if len(weights) != len(built):
            raise DataSpecError("weights", f"has {len(weights)} entries for {len(built)} components")
        out = []
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)) or w < 0:
                raise DataSpecError("weights", f"entry {i} must be a finite number >= 0, got {w!r}")
            out.append(float(w))
        if not sum(out) > 0:
            raise DataSpecError("weights", "must sum to > 0")
        put("weights", tuple(out))

    # ------------------------------------------------------------------ dicts
    def to_dict(self) -> dict:
        """JSON-serialisable settings (only the parameters of this kind)."""
        d = {"kind": self.kind, "vocab_size": self.vocab_size, "seq_len": self.seq_len, "seed": self.seed}
        for name in _KIND_PARAMS[self.kind]:
            value = getattr(self, name)
            if name == "components":
                value = [c.to_dict() for c in value]
            elif name == "weights":
                value = list(value)
            d[name] = value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataSpec":
        """Inverse of `to_dict`; also accepts `describe()` output (derived keys are ignored)."""
        if not isinstance(d, Mapping):
            raise DataSpecError("<dict>", f"expected a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key in DERIVED_KEYS:
                continue
            if key not in fields:
                raise DataSpecError(str(key), f"unknown field (known: {sorted(fields)})")
            kwargs[key] = value
        for required in ("kind", "vocab_size", "seq_len"):
            if required not in kwargs:
                raise DataSpecError(required, "missing")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "DataSpec":
        return cls.from_dict(json.loads(s))
