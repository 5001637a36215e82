"""Checkpoint manager: atomic DeepSpeed checkpoints, verified resume with fallback, retention policy.

Layout (DeepSpeed's own, so `zero_to_fp32.py` and `ds_to_universal` read it):

    checkpoints/global_step{N}/   DeepSpeed's files (mp_rank_*, zero_pp_rank_*, ...)
                                  rng/rank{R}.pt    every rank's python/numpy/torch RNG states
                                  manifest.json     written last: files, sizes, sha256, run meta
    checkpoints/latest            the tag of the newest committed checkpoint

Commit protocol: every rank writes its files, all ranks meet at a barrier, then global rank 0
hashes the files and writes `manifest.json` (temp file, fsync, rename), and only then points
`latest` at the tag. A crash before the manifest leaves an uncommitted directory that resume
ignores and the next save removes; the previous checkpoint stays the one to resume from.

On resume the newest committed checkpoint is verified against its manifest (missing, truncated or
corrupted files); a bad one is skipped with a warning naming the problem and the one before it is
tried. The client state carries step, consumed samples and tokens, the data loader's state, the
resolved config and the tokenizer fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from data.errors import UserError
from trainer.config import CheckpointSection
from trainer.parallel import from_rank0

logger = logging.getLogger(__name__)
TAG = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    data: Dict[str, Any] = field(default_factory=dict)


def tag_of(step: int) -> str:
    return f"global_step{step}"


def step_of(tag: str) -> int:
    match = TAG.match(tag)
    if not match:
        raise UserError(f"{tag} is not a checkpoint tag (global_stepN)")
    return int(match.group(1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def verify(tag_dir: Path) -> Optional[str]:
    """None if the checkpoint matches its manifest, else what is wrong (one line)."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return f"{tag_dir} has no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        return f"{manifest_path} is unreadable: {err}"
    for name, entry in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} has {size} bytes, the manifest says {entry['size']} (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{path} does not match its checksum (corrupted)"
    return None


def read_manifest(tag_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(tag_dir) / MANIFEST).read_text())


class CheckpointManager:
    def __init__(self, directory: Path, cfg: CheckpointSection, rank: int):
        self.directory, self.cfg, self.rank = Path(directory), cfg, rank
        self._last_save_time = time.monotonic()
        self.crash_before_commit = False  # fault injection (debug.crash_in_save_step): die like a SIGKILL

    # ------------------------------------------------------------------ policy
    def due(self, step: int, last_step: int) -> bool:
        """Save at the last step and every `every_steps` (time-based saves come via `time_due`)."""
        return step == last_step or (self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0)

    def time_due(self) -> bool:
        """Global rank 0's clock decides (the trainer all-reduces this with its per-step flags)."""
        minutes = self.cfg.every_minutes
        return minutes > 0 and time.monotonic() - self._last_save_time >= 60.0 * minutes

    def committed_tags(self) -> List[str]:
        """Tags with a manifest, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.directory.iterdir()
                 if (m := TAG.match(p.name)) and (p / MANIFEST).is_file()]
        return [name for _, name in sorted(found)]

    # ------------------------------------------------------------------ save
    def save(self, engine, state: TrainState, extra: Dict[str, Any], meta: Dict[str, Any]) -> str:
        tag = tag_of(state.step)
        tag_dir = self.directory / tag
        error = ""
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if tag_dir.exists():  # an uncommitted leftover, or a re-save of the same step
                    shutil.rmtree(tag_dir)
                probe = self.directory / f".write_probe_{os.getpid()}"
                probe.write_bytes(b"0")
                probe.unlink()
            except OSError as err:
                error = (f"cannot write checkpoints to {self.directory}: {err.strerror or err}; "
                         f"free space or fix permissions (the previous checkpoint is untouched)")
        error = from_rank0(error)
        if error:
            raise UserError(error)

        client_state = {"step": state.step, "consumed_samples": state.consumed_samples,
                        "consumed_tokens": state.consumed_tokens, "skipped_steps": state.skipped_steps,
                        "data": state.data, **extra}
        failed = ""
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
            rng_dir = tag_dir / "rng"
            rng_dir.mkdir(parents=True, exist_ok=True)
            torch.save(_rng_states(), rng_dir / f"rank{self.rank}.pt")
        except (OSError, RuntimeError) as err:
            failed = f"rank {self.rank}: {err}"
        failed = self._any_failure(failed)
        if failed:
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise UserError(f"saving checkpoint {tag_dir} failed ({failed}); free space or fix the "
                            f"directory; the previous checkpoint is still the latest")
        _barrier()  # every rank's files are on disk
        if self.crash_before_commit:
            logger.error("debug.crash_in_save_step: exiting before the commit of %s", tag_dir)
            os._exit(137)
        if self.rank == 0:
            self._commit(tag_dir, meta)
            self._prune()
        _barrier()
        self._last_save_time = time.monotonic()
        logger.info("saved checkpoint %s", tag_dir)
        return tag

    def _any_failure(self, failed: str) -> str:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return failed
        boxes: List[str] = [""] * dist.get_world_size()
        dist.all_gather_object(boxes, failed)
        return "; ".join(b for b in boxes if b)

    def _commit(self, tag_dir: Path, meta: Dict[str, Any]) -> None:
        files = {}
        for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
            files[str(path.relative_to(tag_dir))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"format_version": 1, "tag": tag_dir.name, "created": time.time(), "meta": meta, "files": files}
        _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        _write_atomic(self.directory / "latest", tag_dir.name)  # the commit point

    def _prune(self) -> None:
        """Keep the newest `keep_last` and every `keep_every`-th step; drop uncommitted leftovers."""
        tags = self.committed_tags()
        keep = set(tags[-self.cfg.keep_last:]) if self.cfg.keep_last > 0 else set(tags)
        if self.cfg.keep_every > 0:
            keep |= {t for t in tags if step_of(t) % self.cfg.keep_every == 0}
        for tag in tags:
            if tag not in keep:
                shutil.rmtree(self.directory / tag, ignore_errors=True)
        newest = step_of(tags[-1]) if tags else -1
        for path in self.directory.iterdir():
            match = TAG.match(path.name)
            if match and not (path / MANIFEST).is_file() and int(match.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ resume
    def find_resume(self) -> Optional[Path]:
        """The checkpoint to resume from (verified on global rank 0), or None to start fresh."""
        message, chosen = "", ""
        if self.rank == 0:
            try:
                chosen = str(self._choose() or "")
            except UserError as err:
                message = str(err)
        message = from_rank0(message)
        if message:
            raise UserError(message)
        chosen = from_rank0(chosen)
        return Path(chosen) if chosen else None

    def _choose(self) -> Optional[Path]:
        if self.cfg.load:
            path = Path(self.cfg.load)
            if (path / MANIFEST).is_file() or TAG.match(path.name):
                candidates = [path]
            elif path.is_dir():
                candidates = [path / t for t in reversed(CheckpointManager(path, self.cfg, 0).committed_tags())]
            else:
                raise UserError(f"checkpoint.load={path} does not exist")
            if not candidates:
                raise UserError(f"checkpoint.load={path} holds no committed checkpoint")
        elif self.cfg.resume:
            candidates = [self.directory / t for t in reversed(self.committed_tags())]
            if not candidates:
                return None
        else:
            return None
        for tag_dir in candidates:
            problem = verify(tag_dir)
            if problem is None:
                return tag_dir
            logger.warning("skipping checkpoint %s: %s", tag_dir.name, problem)
        raise UserError(f"no good checkpoint in {candidates[0].parent} (every one failed verification); "
                        f"remove the broken ones or set checkpoint.resume=false to start over")

    def load(self, engine, tag_dir: Path, universal: bool = False) -> TrainState:
        path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                              load_module_strict=True)
        if path is None or client is None:
            raise UserError(f"DeepSpeed could not load {tag_dir}; set checkpoint.resume=false to start over")
        rng_file = tag_dir / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file() and not universal:
            _set_rng_states(torch.load(rng_file, weights_only=False))
        logger.info("resumed from %s at step %d", tag_dir, client["step"])
        return TrainState(step=client["step"], consumed_samples=client["consumed_samples"],
                          consumed_tokens=client["consumed_tokens"],
                          skipped_steps=client.get("skipped_steps", 0), data=client["data"])


def _rng_states() -> Dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: Dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
