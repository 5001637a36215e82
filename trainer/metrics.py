"""Metrics: one JSON object per logged step in metrics.jsonl, and TensorBoard; global rank 0 only."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        """On resume, records after `resume_step` (logged by a run that died after its last checkpoint)
        are dropped from metrics.jsonl and purged from TensorBoard: the files hold one history."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            path = Path(run_dir) / "metrics.jsonl"
            if path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= resume_step]
                tmp = path.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)
            self._jsonl = open(path, "a", buffering=1)
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"),
                                     purge_step=resume_step + 1 if resume_step else None)

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
