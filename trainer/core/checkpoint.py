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

Every manifest carries a commit sequence number. A plain resume loads the checkpoint `latest`
names (the newest commit when `latest` is missing or names no committed checkpoint, with a warning),
verified against its manifest (missing, truncated or corrupted files); a bad one is skipped with a
warning naming the problem and the commit before it is tried. Retention counts commits, not step
numbers: after a resume from an earlier step (`checkpoint.load=.../global_step200` with step 300 on
disk) the first save removes the later steps of the abandoned timeline, so nothing resumes from them
again. A `checkpoint.load` is applied once: the manifests' meta records the loaded checkpoint a
timeline began from (LOADED_FROM), and the same command run again resumes the run's own newest
checkpoint of that timeline. Export (trainer/convert/export.py) picks its checkpoint with the same finder. The client state
carries step, consumed samples and tokens, the data loader's state, the resolved config and the
tokenizer fingerprint.
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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from data.errors import UserError
from trainer.core.config import CheckpointSection
from trainer.core.metrics import write_atomic as _write_atomic
from trainer.core.parallel import from_rank0
from trainer.core.safe_load import safe_torch_load, weights_only_loads
from trainer.core.schedule import configured_base_lrs, restore_scheduled_lr

logger = logging.getLogger(__name__)
TAG = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
UNIVERSAL = "universal"  # conversions for a resume under another layout (trainer/core/elastic.py)
COMMIT = "commit"  # the manifest's commit sequence number: retention and resume follow commit order
LOADED_FROM = "loaded_from"  # meta: the checkpoint.load checkpoint (resolved path) the run's timeline began from


# The shape of a config section (int fields with defaults) by coincidence: this is the loop's position.
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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def verify(tag_dir: Path) -> Optional[str]:
    """None if the checkpoint matches its manifest, else what is wrong (one line)."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / MANIFEST).is_file():
        return f"{tag_dir} has no {MANIFEST} (the save did not finish)"
    try:
        manifest = read_manifest(tag_dir)
    except UserError as err:
        return str(err)
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
    """The checkpoint's manifest, its shape checked: UserError naming the file and the key at fault."""
    path = Path(tag_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (the save did not finish)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is unreadable: {getattr(err, 'strerror', None) or err}") from None
    except (ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path} is not valid JSON: {reason}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object")
    for key in ("files", "meta"):
        if not isinstance(manifest.get(key), dict):
            raise UserError(f"{path}: key '{key}' is {'missing' if key not in manifest else 'not an object'}")
    for name, entry in manifest["files"].items():
        for key, kind in (("size", int), ("sha256", str)):
            if not isinstance(entry, dict) or not isinstance(entry.get(key), kind):
                raise UserError(f"{path}: key 'files.{name}.{key}' is missing or not a{'n' if kind is int else ''} "
                                f"{kind.__name__}")
    if not isinstance(manifest.get(COMMIT, 0), int):
        raise UserError(f"{path}: key '{COMMIT}' is not an integer")
    return manifest


def read_meta(tag_dir: Path, keys: Sequence[str]) -> Dict[str, Any]:
    """The manifest's run meta (layout of the save), with `keys` required: UserError naming the file and key."""
    meta = read_manifest(tag_dir)["meta"]
    for key in keys:
        if key not in meta:
            raise UserError(f"{Path(tag_dir) / MANIFEST}: key 'meta.{key}' is missing")
    return meta


@dataclass(frozen=True)
class Committed:
    path: Path
    step: int
    commit: int
    """The commit sequence number (1, 2, ...; 0 for checkpoints written before commits were numbered)."""


def committed(directory: Path) -> List[Committed]:
    """The committed checkpoints of a checkpoints directory in commit order, oldest first.

    Commit order, not step order: after a resume from an earlier step (`checkpoint.load=...step200`
    with step300 on disk) the new saves are the newer commits. A directory whose manifest is
    unreadable or malformed counts as not committed, with a warning naming the file and what is wrong.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if not (TAG.match(path.name) and (path / MANIFEST).is_file()):
            continue
        try:
            manifest = read_manifest(path)
        except UserError as err:
            logger.warning("ignoring checkpoint %s: %s", path.name, err)
            continue
        found.append(Committed(path, step_of(path.name), manifest.get(COMMIT, 0)))
    return sorted(found, key=lambda c: (c.commit, c.step))


def resume_order(directory: Path) -> List[Path]:
    """Where a plain resume (and a conversion of a run) looks, best first: the checkpoint `latest`
    names, then the commits before it, newest first (tried in turn when one fails verification).

    `latest` is the commit point; commits after the one it names (a save that died between its
    manifest and `latest`) are not candidates. When `latest` is missing, unreadable or names no
    committed checkpoint, every commit is a candidate, newest first, with a warning.
    """
    commits = committed(directory)
    if not commits:
        return []
    tags = [c.path.name for c in commits]
    latest = Path(directory) / LATEST
    try:
        named: Optional[str] = latest.read_text().strip()
        problem = f"names {named!r}, which is not a committed checkpoint"
    except FileNotFoundError:
        named, problem = None, "is missing"
    except (OSError, UnicodeDecodeError) as err:
        named, problem = None, f"is unreadable ({getattr(err, 'strerror', None) or err})"
    if named in tags:
        return [c.path for c in reversed(commits[: tags.index(named) + 1])]
    logger.warning("%s %s; using the newest committed checkpoint, %s", latest, problem, tags[-1])
    return [c.path for c in reversed(commits)]


class CheckpointManager:
    def __init__(self, directory: Path, cfg: CheckpointSection, rank: int):
        self.directory, self.cfg, self.rank = Path(directory), cfg, rank
        self._last_save_time = time.monotonic()
        self.loaded_from: Optional[str] = None
        """The `checkpoint.load` checkpoint this run's timeline began from (set by find_resume; carried in
        every save's meta as LOADED_FROM, so a relaunch of the same command resumes the run's own newest
        checkpoint rather than loading that one again)."""
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
        """Tags of the committed checkpoints in commit order, oldest first."""
        return [c.path.name for c in committed(self.directory)]

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
                shutil.rmtree(self.directory / UNIVERSAL / tag, ignore_errors=True)  # converted from the old one
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
        number = max((c.commit for c in committed(self.directory) if c.path != tag_dir), default=0) + 1
        manifest = {"format_version": 1, "tag": tag_dir.name, COMMIT: number, "created": time.time(), "meta": meta,
                    "files": files}
        _write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        _write_atomic(self.directory / LATEST, tag_dir.name)  # the commit point

    def _prune(self) -> None:
        """After a commit: keep the newest `keep_last` commits and every `keep_every`-th step of the
        current timeline; drop the abandoned timeline and uncommitted leftovers.

        The newest commit is the save just made. A checkpoint committed before it at a later step
        belongs to a timeline this run abandoned by resuming from an earlier step: it is removed, so
        that nothing resumes from it again (retention counts commits, not step numbers).
        """
        commits = committed(self.directory)
        if not commits:
            return
        current = commits[-1]
        abandoned = [c for c in commits if c.step > current.step]
        timeline = [c for c in commits if c.step <= current.step]
        keep = {c.path for c in (timeline[-self.cfg.keep_last:] if self.cfg.keep_last > 0 else timeline)}
        if self.cfg.keep_every > 0:
            keep |= {c.path for c in timeline if c.step % self.cfg.keep_every == 0}
        for c in abandoned:
            logger.warning("removing checkpoint %s: a later step of a timeline abandoned when this run resumed "
                           "from an earlier step (the newest commit is %s)", c.path.name, current.path.name)
        for c in commits:
            if c.path not in keep:
                shutil.rmtree(c.path, ignore_errors=True)
        kept = {path.name for path in keep}
        for path in (self.directory / UNIVERSAL).glob("*"):  # conversions of dropped tags, of another run's
            if path.name in kept:  # checkpoint (this run has its own now), ones that died midway, and the
                continue  # `latest_universal` file ds_to_universal writes (the loads name their tag)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for path in self.directory.iterdir():
            if TAG.match(path.name) and not (path / MANIFEST).is_file():
                shutil.rmtree(path, ignore_errors=True)  # uncommitted: a save that died before its manifest

    # ------------------------------------------------------------------ resume
    def find_resume(self) -> Optional[Path]:
        """The checkpoint to resume from (verified on global rank 0), or None to start fresh; sets
        `loaded_from`."""
        message, chosen, loaded_from = "", "", ""
        if self.rank == 0:
            try:
                path, origin = self._choose()
                chosen, loaded_from = str(path or ""), origin or ""
            except UserError as err:
                message = str(err)
        message = from_rank0(message)
        if message:
            raise UserError(message)
        chosen, self.loaded_from = from_rank0(chosen), from_rank0(loaded_from) or None
        return Path(chosen) if chosen else None

    def _choose(self) -> Tuple[Optional[Path], Optional[str]]:
        """(checkpoint to resume, the `checkpoint.load` checkpoint its timeline began from)."""
        if self.cfg.load:
            candidates = self._load_candidates(Path(self.cfg.load))
            own = self._own_descendant(candidates) if self.cfg.resume else None
            if own is not None:
                return own
            chosen = self._first_good(candidates)
            return chosen, str(chosen.resolve())
        if self.cfg.resume:
            chosen = self._first_good(self._own_candidates())
            return chosen, (None if chosen is None else read_manifest(chosen)["meta"].get(LOADED_FROM))
        return None, None

    @staticmethod
    def _load_candidates(path: Path) -> List[Path]:
        if (path / MANIFEST).is_file() or TAG.match(path.name):
            candidates = [path]
        elif path.is_dir():
            candidates = resume_order(path)
        else:
            raise UserError(f"checkpoint.load={path} does not exist")
        if not candidates:
            raise UserError(f"checkpoint.load={path} holds no committed checkpoint")
        return candidates

    def _own_descendant(self, candidates: List[Path]) -> Optional[Tuple[Path, str]]:
        """This run's newest good checkpoint when its timeline began from one of `candidates` (the load
        was applied by an earlier launch of this run, which a requeue after preemption repeats)."""
        names = {str(c.resolve()) for c in candidates}
        for tag_dir in resume_order(self.directory):  # newest first; the manifest is read before hashing
            origin = read_manifest(tag_dir)["meta"].get(LOADED_FROM)
            if origin not in names or str(tag_dir.resolve()) in names:
                return None  # the newest commit began elsewhere (or is the load itself): load as asked
            problem = verify(tag_dir)
            if problem is None:
                logger.warning("checkpoint.load=%s was applied by an earlier launch of this run: resuming its "
                               "own newest checkpoint %s instead (checkpoint.resume=false loads it again)",
                               self.cfg.load, tag_dir.name)
                return tag_dir, origin
            logger.warning("skipping checkpoint %s: %s", tag_dir.name, problem)
        return None

    def _own_candidates(self) -> List[Path]:
        candidates = resume_order(self.directory)
        if not candidates:
            broken = sorted(p.name for p in self.directory.glob("global_step*") if (p / MANIFEST).is_file())
            if broken:  # manifests there, none readable: an error, not a fresh start over a broken run
                raise UserError(f"no good checkpoint in {self.directory} (the manifests of {', '.join(broken)} "
                                f"are malformed); remove the broken ones or set checkpoint.resume=false to "
                                f"start over")
        return candidates

    @staticmethod
    def _first_good(candidates: List[Path]) -> Optional[Path]:
        if not candidates:
            return None
        for tag_dir in candidates:
            problem = verify(tag_dir)
            if problem is None:
                return tag_dir
            logger.warning("skipping checkpoint %s: %s", tag_dir.name, problem)
        raise UserError(f"no good checkpoint in {candidates[0].parent} (every one failed verification); "
                        f"remove the broken ones or set checkpoint.resume=false to start over")

    def load(self, engine, tag_dir: Path, universal: bool = False) -> TrainState:
        configured = configured_base_lrs(engine)  # this config's peak LRs: the load brings the saved ones
        with weights_only_loads(sorted(tag_dir.rglob("*.pt"))):  # DeepSpeed's own torch.loads (universal files)
            path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                  load_module_strict=True)
        if path is None or client is None:
            raise UserError(f"DeepSpeed could not load {tag_dir}; set checkpoint.resume=false to start over")
        restore_scheduled_lr(engine, configured)  # the LR of the config resumed with (trainer/core/schedule.py)
        rng_file = tag_dir / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file() and not universal:
            _set_rng_states(safe_torch_load(rng_file))
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
