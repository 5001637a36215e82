"""Metrics: one JSON object per logged step in metrics.jsonl, and TensorBoard; global rank 0 only."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self._tb.add_scalar(key.replace(".", "/", 1), value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _clean(value: Any) -> Any:
    """NaN/Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def first_and_last(records: list, key: str) -> tuple[Optional[float], Optional[float]]:
    values = [r[key] for r in records if r.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)
