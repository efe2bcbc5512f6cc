"""Search spaces written on the command line, keyed by spec field names.

One ``--space`` entry per searched field::

    lr=loguniform:1e-4:1e-2        phases=choice:2,3,4      final_sparsity=uniform:0.8:0.95
    alphas=grid:0.95,0.97,0.99     epochs=randint:1:4       centers=choice:min,zero

``randint`` includes both bounds. ``grid`` values are all tried (Ray's grid search, crossed with
``--num-samples`` repeats of the random dimensions). A key must be a field of the job's spec; a
tuple field (``alphas``, ``observers``...) receives each sampled value as a 1-tuple.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


@dataclass(frozen=True)
class Dimension:
    """One searched field: its name, distribution and arguments (bounds or values)."""

    field: str
    dist: str
    args: tuple[Any, ...]

    def to_ray(self) -> Any:
        from ray import tune

        if self.dist == "uniform":
            return tune.uniform(*self.args)
        if self.dist == "loguniform":
            return tune.loguniform(*self.args)
        if self.dist == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # Ray's upper bound is exclusive
        if self.dist == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))


def _field_type(spec_cls: type, name: str) -> tuple[Any, bool]:
    """(scalar type, is_tuple) of a spec field."""
    tp = typing.get_type_hints(spec_cls)[name]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    return tp, False


def parse_dimension(text: str, spec_cls: type) -> Dimension:
    """``field=dist:args`` -> Dimension, checked against ``spec_cls``; ValueError says what is wrong."""
    if "=" not in text or ":" not in text.split("=", 1)[1]:
        raise ValueError(f"space entry {text!r}: write FIELD=DIST:ARGS, e.g. lr=loguniform:1e-4:1e-2")
    name, rest = text.split("=", 1)
    name = name.strip().replace("-", "_")
    dist, _, argtext = rest.partition(":")
    fields = {f.name for f in dataclasses.fields(spec_cls)}
    if name not in fields:
        raise ValueError(f"space entry {text!r}: {name!r} is not a field of {spec_cls.__name__}; "
                         f"fields: {', '.join(sorted(fields))}")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"space entry {text!r}: unknown distribution {dist!r}; known: {', '.join(DISTRIBUTIONS)}")
    scalar, _ = _field_type(spec_cls, name)
    cast = scalar if scalar in (int, float, str) else str
    try:
        if dist in ("choice", "grid"):
            values = tuple(cast(v.strip()) for v in argtext.split(",") if v.strip())
            if not values:
                raise ValueError("no values")
            return Dimension(name, dist, values)
        lo_text, _, hi_text = argtext.partition(":")
        num = int if dist == "randint" else float
        lo, hi = num(lo_text), num(hi_text)
    except ValueError as e:
        raise ValueError(f"space entry {text!r}: cannot read the arguments ({e})") from e
    if lo > hi or (lo == hi and dist != "randint"):
        raise ValueError(f"space entry {text!r}: lower bound {lo} is not below upper bound {hi}")
    if dist == "loguniform" and lo <= 0:
        raise ValueError(f"space entry {text!r}: loguniform needs a positive lower bound")
    if dist in ("uniform", "loguniform") and scalar is int:
        raise ValueError(f"space entry {text!r}: {name} is an integer field; use randint or choice")
    return Dimension(name, dist, (lo, hi))


def parse_space(entries: tuple[str, ...] | list[str], spec_cls: type) -> list[Dimension]:
    """All ``--space`` entries; an empty space or a field given twice is an error."""
    if not entries:
        raise ValueError("the search space is empty: give at least one --space FIELD=DIST:ARGS")
    dims = [parse_dimension(e, spec_cls) for e in entries]
    names = [d.field for d in dims]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"fields searched twice: {', '.join(dup)}")
    return dims


def apply_config(spec: Any, config: dict[str, Any]) -> Any:
    """The spec with one trial's sampled values (tuple fields get a 1-tuple); validated by the spec."""
    changes = {}
    for name, value in config.items():
        _, is_tuple = _field_type(type(spec), name)
        if hasattr(value, "item"):
            value = value.item()  # numpy scalars from samplers
        changes[name] = (value,) if is_tuple and not isinstance(value, tuple) else value
    return dataclasses.replace(spec, **changes)
