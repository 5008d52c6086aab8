"""Parameter schemas: every parameter is declared once, here or next to the code that uses it.

A :class:`ParamSpec` carries name, type, default, units, bounds and a description. The same
spec list is used (a) by the ROS nodes to declare parameters with ``ParameterDescriptor``s,
(b) by the pure core to validate a plain dict (for tests, notebooks and ``rt2-bringup``),
and (c) to generate the parameter tables (``python -m rt2_ros.params`` prints them; docs/parameters.md).
Validation errors always name the offending key, so a typo in a YAML file is a one-line fix.
Types follow rclpy's rules exactly (an integer is not a double, ``2`` is refused where ``2.0`` is
expected), so a value that validates here is one the node accepts; ``rt2-bringup --check`` runs
the nodes' whole check of a params file (rt2_ros.nodes.bringup.check_params) without starting them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A parameter value is missing, unknown, of the wrong type or out of range."""


_TYPES = {"bool": bool, "int": int, "double": float, "string": str,
          "double_array": list, "int_array": list, "string_array": list}


@dataclass(frozen=True)
class ParamSpec:
    name: str  # dotted ROS name, e.g. "safety.max_linear_speed"
    type: str  # one of _TYPES
    default: Any
    description: str
    units: str = ""
    low: float | None = None  # inclusive bounds for numbers (each element for arrays)
    high: float | None = None
    choices: tuple[str, ...] | None = None
    length: int | None = None  # exact length for arrays, if fixed

    def __post_init__(self) -> None:
        if self.type not in _TYPES:
            raise ValueError(f"{self.name}: unknown param type {self.type}")

    def validate(self, value: Any) -> Any:
        """Return ``value`` coerced to this spec's type, or raise ConfigError naming the key."""
        key = self.name
        t = self.type
        if t == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true/false, got {value!r}")
            return value
        if t == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            self._check_range(value)
            return value
        if t == "double":
            if isinstance(value, int) and not isinstance(value, bool):
                # As rclpy: a YAML integer is an INTEGER parameter, refused for a DOUBLE one.
                raise ConfigError(f"{key}: expected a floating-point number, got the integer {value!r}; "
                                  f"write {value}.0 (ROS 2 refuses an integer for a double parameter)")
            if isinstance(value, bool) or not isinstance(value, float):
                raise ConfigError(f"{key}: expected a floating-point number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be finite, got {value!r}")
            self._check_range(value)
            return value
        if t == "string":
            if not isinstance(value, str):
                raise ConfigError(f"{key}: expected a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ConfigError(f"{key}: {value!r} is not one of {list(self.choices)}")
            return value
        # arrays
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if self.length is not None and len(value) != self.length:
            raise ConfigError(f"{key}: expected {self.length} values, got {len(value)}")
        elem = {"double_array": "double", "int_array": "int", "string_array": "string"}[t]
        inner = ParamSpec(f"{key}[]", elem, None, "", low=self.low, high=self.high, choices=self.choices)
        if elem == "double" and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}: expected floating-point numbers, got the integers {list(value)!r}; write "
                              f"{[float(v) for v in value]!r} (ROS 2 refuses an integer list for a double array)")
        return [inner.validate(v) for v in value]

    def _check_range(self, value: float) -> None:
        if self.low is not None and value < self.low:
            raise ConfigError(f"{self.name}: {value} is below the minimum {self.low} {self.units}".rstrip())
        if self.high is not None and value > self.high:
            raise ConfigError(f"{self.name}: {value} is above the maximum {self.high} {self.units}".rstrip())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested YAML dicts into dotted keys, as ROS 2 does for ``ros__parameters``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def resolve(specs: Iterable[ParamSpec], values: Mapping[str, Any], *, allow_unknown_prefixes: tuple[str, ...] = ()
            ) -> dict[str, Any]:
    """Validate flat ``values`` against ``specs``; fill defaults; reject unknown keys.

    Keys starting with one of ``allow_unknown_prefixes`` are passed through unvalidated
    (used for sections another schema validates, e.g. the options of an unused backend).
    """
    specs = list(specs)
    by_name = {s.name: s for s in specs}
    unknown = [k for k in values if k not in by_name and not k.startswith(allow_unknown_prefixes)]
    if unknown:
        hints = []
        for k in unknown:
            close = [n for n in by_name if n.split(".")[-1] == k.split(".")[-1]] or \
                difflib.get_close_matches(k, list(by_name), n=1, cutoff=0.8)
            hints.append(f"{k}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(f"unknown parameter(s): {', '.join(sorted(hints))}")
    out = {s.name: s.default for s in specs}
    for k, v in values.items():
        out[k] = by_name[k].validate(v) if k in by_name else v
    return out


def markdown_table(specs: Iterable[ParamSpec], live: frozenset[str] | None = None) -> str:
    """The README parameter table for ``specs``; with ``live``, a column saying which ``ros2 param set`` changes."""
    live_head, live_rule = (" live |", "---|") if live is not None else ("", "")
    rows = [f"| parameter | type | default | units | range |{live_head} description |",
            f"|---|---|---|---|---|{live_rule}---|"]
    for s in specs:
        rng = ""
        if s.choices:
            rng = " / ".join(s.choices)
        elif s.low is not None or s.high is not None:
            rng = f"[{'' if s.low is None else s.low}, {'' if s.high is None else s.high}]"
        live_cell = (" yes |" if s.name in live else " – |") if live is not None else ""
        rows.append(f"| `{s.name}` | {s.type} | `{s.default!r}` | {s.units} | {rng} |{live_cell} {s.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    # `python -m rt2_ros.params`: every node's parameter tables (the same text as docs/parameters.md).
    from rt2_ros.params_doc import render

    print(render(), end="")
