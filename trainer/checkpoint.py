"""Checkpoint manager: DeepSpeed checkpoints with the run's state, resume, and pruning.

Files are DeepSpeed's own (`{dir}/global_step{N}/...` and `{dir}/latest`), so its tools such as
`zero_to_fp32.py` read them. The client state carries what the loop needs to continue exactly:
step, consumed samples and tokens, the data loader's state, the resolved config and the tokenizer's
fingerprint.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist

from data.errors import UserError
from trainer.config import CheckpointSection

logger = logging.getLogger(__name__)
TAG = re.compile(r"^global_step(\d+)$")


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    data: Dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    def __init__(self, directory: Path, cfg: CheckpointSection, is_main: bool):
        self.directory, self.cfg, self.is_main = Path(directory), cfg, is_main

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0)

    def tags(self):
        """Saved tags, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.directory.iterdir() if (m := TAG.match(p.name))]
        return [name for _, name in sorted(found)]

    def latest_tag(self) -> Optional[str]:
        latest = self.directory / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def save(self, engine, state: TrainState, extra: Dict[str, Any]) -> str:
        tag = f"global_step{state.step}"
        client_state = {"step": state.step, "consumed_samples": state.consumed_samples,
                        "consumed_tokens": state.consumed_tokens, "data": state.data, **extra}
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=True)
        except OSError as err:
            raise UserError(f"cannot write checkpoint {self.directory / tag}: {err.strerror or err}; "
                            f"free space or change run.dir") from None
        if dist.is_initialized():
            dist.barrier()
        if self.is_main:
            self._prune()
        logger.info("saved checkpoint %s", self.directory / tag)
        return tag

    def _prune(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        for tag in self.tags()[:-self.cfg.keep_last]:
            if tag != self.latest_tag():
                shutil.rmtree(self.directory / tag, ignore_errors=True)

    def resume(self, engine) -> Optional[TrainState]:
        """Loads the latest checkpoint if `checkpoint.resume` and one exists; returns its state."""
        if not self.cfg.resume or self.latest_tag() is None:
            return None
        tag = self.latest_tag()
        path, client = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise UserError(f"checkpoint {self.directory / tag} could not be loaded; "
                            f"remove it or set checkpoint.resume=false")
        logger.info("resumed from %s at step %d", path, client["step"])
        return TrainState(step=client["step"], consumed_samples=client["consumed_samples"],
                          consumed_tokens=client["consumed_tokens"], data=client["data"])
