"""The project's own consolidated model file: one fp32 state dict, loadable without DeepSpeed.

`tools/convert_checkpoint.py --format native` writes it from a training checkpoint (TP shards merged,
ZeRO partitions gathered); fine-tuning and continued pretraining start from it. Layout of the file
(`torch.save` of a dict):

    format:      "encoder-native"      version: 1
    model:       registry name ("roberta", "deberta", "electra", "deberta_v3")
    config:      dataclasses.asdict(config): the registry config, padded vocabulary included
    state_dict:  the full (TP=1) fp32 state dict of registry.build_model(config), generator and
                 discriminator included for RTD models
    meta:        free-form provenance (source checkpoint, step, dtype trained in, ...)
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from data.errors import UserError

FORMAT = "encoder-native"
VERSION = 1
FILENAME = "model.pt"


@dataclasses.dataclass
class NativeModel:
    name: str
    config: Any
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    training_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The run's resolved pretraining config when read from a training checkpoint (its model card's
    recipe); not saved in the native file."""

    def build(self, layers=None, sampling_seed: int = 0) -> torch.nn.Module:
        """The registry model with these weights (TP=1 unless `layers` says otherwise; RTD: its generator's
        samples keyed by `sampling_seed`, a run's train.seed)."""
        from models.registry import build_model
        model = build_model(self.config, layers, sampling_seed=sampling_seed)
        model.load_state_dict(self.state_dict)
        return model


def config_from_dict(name: str, fields: dict[str, Any]):
    """Rebuilds a registry config from dataclasses.asdict() output (nested RTD towers included)."""
    from models.config import REMOVED_RTD_FIELDS
    from models.registry import get_spec

    config_class = get_spec(name).config_class
    if isinstance(fields, dict) and config_class.__name__ == "RTDConfig":  # files written before a removal
        fields = {k: v for k, v in fields.items() if k not in REMOVED_RTD_FIELDS}
    return config_class(**fields)


def save_native(path: str | os.PathLike, name: str, config, state_dict: dict[str, torch.Tensor],
                meta: dict[str, Any] | None = None) -> Path:
    """Writes `path` (a file, or a directory that gets FILENAME) atomically; tensors stored as fp32."""
    path = Path(path)
    if path.suffix != ".pt":
        path.mkdir(parents=True, exist_ok=True)
        path = path / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "version": VERSION, "model": name, "config": dataclasses.asdict(config),
        "state_dict": {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                       for k, v in state_dict.items()},
        "meta": dict(meta or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_native(path: str | os.PathLike) -> NativeModel:
    """Reads a file written by save_native (or a directory holding FILENAME)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"{path}: no native model file here; write one with "
                        f"tools/convert_checkpoint.py --format native")
    try:  # tensors and containers only: a file from elsewhere is data, never code
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>|(Unsupported operand \d+)", str(err))
        what = next((g for g in what.groups() if g), None) if what else str(err).strip().splitlines()[-1]
        what = what.replace("Unsupported operand", "pickle opcode")
        raise UserError(f"{path}: refused to load: it would build or call {what}, which a native model "
                        f"file never holds (a file from elsewhere is data, never code)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a native model file (no format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise UserError(f"{path}: native format version {payload.get('version')} is not supported "
                        f"(this code reads version {VERSION})")
    name = payload["model"]
    return NativeModel(name=name, config=config_from_dict(name, payload["config"]),
                       state_dict=payload["state_dict"], meta=payload.get("meta", {}))
