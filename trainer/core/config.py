"""Config machinery for every run here: typed dataclasses, loaded from YAML plus `key.sub=value` overrides.

The dataclasses are the source of truth. YAML files mirror them; an unknown key or a value of the
wrong type is rejected with the key's dotted name. The sections every run shares (run, zero,
parallel, checkpoint, log) live here; pretraining's and fine-tuning's own sections live with them
(trainer/pretraining/config.py, trainer/finetuning/config.py).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from data.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RunSection:
    name: str = "debug"
    """The run lives in {dir}/{name}/: config.yaml, metrics.jsonl, tb/, checkpoints/, tokenizer/."""
    dir: str = "runs"


@dataclass
class ZeroSection:
    stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    param_persistence_threshold: int = 100000
    """ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's
    stage3_param_persistence_threshold); 0 partitions everything (the tests use it at tiny sizes)."""


@dataclass
class ParallelSection:
    tensor: int = 1
    """Tensor-parallel degree (megatron-core); the world size must be a multiple of it."""


@dataclass
class CheckpointSection:
    every_steps: int = 1000
    """Save every N optimizer steps (and at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Number of recent checkpoints kept; older ones are deleted. 0 keeps all."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last save (0: off); global rank 0's clock."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, whatever keep_last says (0: off)."""
    resume: bool = True
    """Continue from the newest good checkpoint in the run directory if one exists; false starts over."""
    load: Optional[str] = None
    """Resume from this checkpoint (a global_stepN directory, or a checkpoints directory) instead."""
    preemption_timeout_s: float = 600.0
    """After SIGTERM/SIGUSR1, exit with status 76 if the step and checkpoint take longer than this."""


@dataclass
class LogSection:
    every_steps: int = 10
    """Write metrics.jsonl / TensorBoard every N steps (and on step 1 and the last step)."""


def _choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _plain(value: Any) -> Any:
    """Tuples become lists so that yaml.safe_dump / json can write the config."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def get_key(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------- building from plain data

def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds dataclass `cls` from nested dicts, rejecting unknown keys and wrong types by dotted name."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise UserError(f"unknown config key {where}{unknown[0]}; valid keys under {prefix or 'the top level'}: "
                        f"{', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        return _finite_float(value, key)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads labels: [0, 1] or run.name=2024 as numbers; a name is text
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"{key} must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise UserError(f"{key} must be an integer, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{key} must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _finite_float(value: Any, key: str) -> float:
    """Every float field is a finite number: NaN would pass every `<=` check below and inf would poison
    the schedule, so both are refused here, once for all sections."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3, and an override reads nan or inf, as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, float):
        raise UserError(f"{key} must be of type float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise UserError(f"{key}={value} must be a finite number (not NaN or infinity)")
    return value


# ----------------------------------------------------------------------------- YAML and overrides

def parse_override(text: str) -> Tuple[List[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Optional[str], overrides: Sequence[str], cls: type) -> Any:
    """YAML file (optional) + overrides -> validated dataclass."""
    data: Dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        cfg = from_dict(cls, data)
    except UserError as err:
        raise UserError(f"{path}: {err}" if path else str(err)) from None
    cfg.validate()
    return cfg


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

