"""One strict type checker for every config here: the model configs (models/config.py, checked in their
`__post_init__`) and the trainer's sections (trainer/core/config.py, built from YAML by `from_dict`).

A value of the wrong type is refused with a UserError naming the key (dotted: `optim.betas[1]`), the type
expected and the value got; an int is accepted (and stored) as a float; every float is finite. It lives
in models/ because that is the lowest layer both users share (models never import trainer/).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from data.errors import UserError


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """How an error message names an annotation: int, float | None, list[str], bool (true or false)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return "bool (true or false)"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def from_dict(cls: type, data: Any, prefix: str = "", *, yaml_scalars: bool = True) -> Any:
    """Builds dataclass `cls` from nested dicts, rejecting unknown keys and wrong types by dotted name.

    yaml_scalars: the data went through YAML, whose scalar guesses are undone where a field's type says
    otherwise (see `coerce`)."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"unknown config key {where}{unknown[0]}; valid keys under {prefix or 'the top level'}: "
                        f"{', '.join(sorted(names))}")
    return cls(**{name: coerce(hints[name], value, f"{prefix}.{name}" if prefix else name, yaml_scalars=yaml_scalars)
                  for name, value in data.items()})


def check_fields(cfg: Any, context: str) -> None:
    """Checks (and normalises: int -> float, tuple -> list) every field of dataclass instance `cfg` against
    its annotation; for `__post_init__` of configs built from keyword arguments. `context` starts the
    message ("model config: hidden_dropout must be float, got '0.1' (str)")."""
    for name, tp in _hints(type(cfg)).items():
        value = getattr(cfg, name)
        try:
            checked = coerce(tp, value, name, yaml_scalars=False)
        except UserError as err:
            raise UserError(f"{context}: {err}") from None
        if checked is not value:
            setattr(cfg, name, checked)


def coerce(tp: Any, value: Any, key: str, *, yaml_scalars: bool, expected: str = "") -> Any:
    """`value` as annotation `tp` wants it, or a UserError naming `key`, the type and the value.

    yaml_scalars undoes PyYAML's (YAML 1.1) guesses: a number written as text (1e-3, nan) is read as a
    float where a float is expected, and a number is read as text where a str is expected (labels: [0, 1],
    run.name=2024). Without it (keyword arguments from code) the value must already have the type."""
    expected = expected or type_name(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, yaml_scalars=yaml_scalars)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(inner, value, key, yaml_scalars=yaml_scalars, expected=expected)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(a, v, f"{key}[{i}]", yaml_scalars=yaml_scalars) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be {expected}, got {value!r} ({type(value).__name__})")
        (inner,) = typing.get_args(tp)
        return [coerce(inner, v, f"{key}[{i}]", yaml_scalars=yaml_scalars) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be {expected}, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        return _finite_float(value, key, yaml_scalars, expected)
    if tp is str and yaml_scalars and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{key} must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def _finite_float(value: Any, key: str, yaml_scalars: bool, expected: str) -> float:
    """Every float field is a finite number: NaN would pass every `<=` check and inf would poison a
    schedule, so both are refused here, once for all configs."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(value, str) and yaml_scalars:  # PyYAML reads 1e-3, and an override nan or inf, as text
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, float):
        raise UserError(f"{key} must be {expected}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise UserError(f"{key}={value} must be a finite number (not NaN or infinity)")
    return value
