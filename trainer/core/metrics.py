"""Metrics: one JSON object per logged step in metrics.jsonl, and TensorBoard; global rank 0 only."""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        """On resume, records after `resume_step` (logged by a run that died after its last checkpoint,
        or by a timeline abandoned by a resume from an earlier step) are dropped from metrics.jsonl and
        purged from TensorBoard: the files hold one history."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            path = Path(run_dir) / "metrics.jsonl"
            if path.exists():
                cut_history(path, resume_step)
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


def unique_temp(path: Path) -> Path:
    """A temporary name beside `path` that no other writer uses (process id and a random part): two
    processes writing the same file never share a temporary file (open it with mode "x")."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file of a unique name in the same directory (two
    writers never share one), fsynced, then renamed over `path`."""
    tmp = unique_temp(path)
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cut_history(path: Path, last_step: int) -> None:
    """Keep the records of steps <= `last_step` (and drop a line cut short by a kill), atomically:
    the new text goes to a temporary file of a unique name beside `path`, then replaces it."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            logger.warning("%s: dropping a malformed line (%.60s)", path, line)
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        logger.info("%s: dropped %d records after step %d (one history from the resumed step on)", path,
                    dropped, last_step)
    write_atomic(path, "".join(line + "\n" for line in kept))


def _clean(value: Any) -> Any:
    """NaN/Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: Path) -> list:
    """run_dir/metrics.jsonl's records ([] without one); a line cut by a kill is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def first_and_last(records: list, key: str) -> tuple[Optional[float], Optional[float]]:
    values = [r[key] for r in records if r.get(key) is not None]
    return (values[0], values[-1]) if values else (None, None)
