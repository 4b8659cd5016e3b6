"""Plain dicts (YAML, JSON) → typed dataclasses, with errors that name the dotted key.

One coercion for every typed record the system reads: the configuration (``jobs/config.py``) and
the facts a snapshot's manifest carries (``feature_store/facts.py``). Supported field types: the
scalars ``int``, ``float``, ``bool``, ``str``; ``Optional[...]`` and unions (the first
alternative that accepts the value); ``Literal[...]`` (choices);
``list[...]``; ``dict[str, ...]``; nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import re
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")

#: Scientific notation that YAML 1.1 leaves a string (no dot, or an unsigned exponent).
_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def from_dict(cls: type[T], data: Any, error: type[Exception] = ValueError,
              prefix: str = "") -> T:
    """Validate ``data`` (a mapping) into dataclass ``cls``; raises ``error`` naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"'{prefix or cls.__name__}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, near[0])}'?)" if near else ""
            raise error(f"unknown key '{_join(prefix, key)}'{hint}; "
                        f"known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], _join(prefix, name), error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"'{_join(prefix, name)}' is required")
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def coerce(tp, value, key: str, error: type[Exception] = ValueError):
    """``value`` as type ``tp`` (see the module docstring), or ``error`` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, error, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        problems = []
        for alt in inner:          # the first alternative that accepts the value
            try:
                return coerce(alt, value, key, error)
            except error as e:
                problems.append(str(e))
        raise error(" or ".join(problems))
    if origin is Literal:
        if value not in args:
            raise error(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{key} must be a mapping, got {value!r}")
        kt, vt = args or (str, str)
        return {coerce(kt, k, f"{key} key", error): coerce(vt, v, f"{key}.{k}", error)
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"{key} must be a list, got {value!r}")
        out = [coerce(args[0], v, f"{key}[{i}]", error) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-3 and 2E5 as strings: it wants a dot and a signed
            # exponent. They are numbers in YAML 1.2, JSON and Python, and what users write.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):    # YAML reads `true` as a bool; Spark settings want "true"
            return "true" if value else "false"
        if isinstance(value, (dt.date, dt.datetime)):   # YAML reads 2026-01-30 as a date
            return value.isoformat()
        if not isinstance(value, (str, int, float)):
            raise error(f"{key} must be a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise error(f"{key}: unsupported type {tp}")
