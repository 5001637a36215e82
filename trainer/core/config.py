"""Config machinery for every run here: typed dataclasses, loaded from YAML plus `key.sub=value` overrides.

The dataclasses are the source of truth. YAML files mirror them; an unknown key or a value of the
wrong type is rejected with the key's dotted name, by the one checker the model configs use as well
(models/typed_config.py). The sections every run shares (run, zero, parallel, checkpoint, log) and
`RunConfig`, the base of a run's config, live here; pretraining's and fine-tuning's own sections live with
them (trainer/pretraining/config.py, trainer/finetuning/config.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from data.errors import UserError
from models.typed_config import from_dict

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


# CheckpointSection and pretraining's TrainSection share a shape (documented int fields), not a meaning.
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
    """Resume from this checkpoint (a global_stepN directory, or a checkpoints directory) instead; once: a
    run that has saved since loading it resumes its own newest checkpoint (unless resume is false)."""
    preemption_timeout_s: float = 600.0
    """After SIGTERM/SIGUSR1, exit with status 76 if the step and checkpoint take longer than this."""


@dataclass
class AdamWSection:
    """AdamW's fields, what the DeepSpeed JSON reads (trainer/core/deepspeed_json.py); a run's `optim`
    section extends it (fine-tuning redeclares lr and betas with its defaults, in the same places)."""
    lr: float = 5e-4
    """Peak learning rate, reached after warmup (fairseq RoBERTa-base: 5e-4 at batch 2048)."""
    betas: Tuple[float, float] = (0.9, 0.98)
    """RoBERTa's beta2 = 0.98 is more stable than 0.999 with large batches."""
    eps: float = 1e-6
    weight_decay: float = 0.01
    """Applied to weights only, never to biases or LayerNorm parameters."""


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


@dataclass
class RunConfig:
    """What every run's config has, in the order its config.yaml lists it. Pretraining's and fine-tuning's
    classes redeclare the four `Any` sections with their own types (a redeclared field keeps its place,
    so to_dict's key order is unchanged) and add their other sections after `parallel`."""
    model: Any = None
    run: RunSection = field(default_factory=RunSection)
    data: Any = None
    train: Any = None
    """Has global_batch_size and micro_batch_size (`check_batch`), grad_clip (the DeepSpeed JSON)."""
    optim: Any = None
    zero: ZeroSection = field(default_factory=ZeroSection)
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (fp16 uses DeepSpeed's dynamic loss scaling)."""
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def validate(self) -> None:
        """The checks of the shared sections; a run's class extends it."""
        _choice("precision", self.precision, PRECISIONS)
        _choice("zero.stage", self.zero.stage, (0, 1, 2, 3))

    def require_positive(self, *keys: str) -> None:
        for key in keys:
            if get_key(self, key) <= 0:
                raise UserError(f"{key}={get_key(self, key)} must be positive")

    def require_not_negative(self, *keys: str) -> None:
        for key in keys:
            if get_key(self, key) < 0:
                raise UserError(f"{key}={get_key(self, key)} must not be negative")

    def check_batch(self, data_parallel_size: int) -> int:
        """Returns the gradient-accumulation steps; the global batch must split evenly."""
        per_pass = self.train.micro_batch_size * data_parallel_size
        if self.train.global_batch_size % per_pass:
            raise UserError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x data-parallel size {data_parallel_size} "
                f"= {per_pass}; set train.global_batch_size to a multiple of {per_pass}")
        return self.train.global_batch_size // per_pass

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))


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

