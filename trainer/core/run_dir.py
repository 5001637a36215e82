"""The run directory {run.dir}/{run.name}/ and the pieces a run builds once: logging and the model.

    config.yaml     the resolved config (also inside every checkpoint)
    metrics.jsonl   one JSON object per logged step (global rank 0)
    tb/             TensorBoard events
    checkpoints/    DeepSpeed checkpoints, `latest` names the newest
    tokenizer/      a copy of the tokenizer the run was trained with
    run.lock        the lock of the run that owns the directory: host, pid and start time (empty when free)

One run per run directory: global rank 0 takes an exclusive `flock` on run.lock before anything
is written and holds it until the process exits (the kernel releases it if the process dies). A
second launch on the same directory exits 2 at once naming the holder, and writes nothing. A lock
file left with a holder in it (the holder was killed) is taken over with a warning.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional


from data.errors import UserError
from data.tokenizer import Tokenizer, load_tokenizer
from trainer.core.config import save_config
from trainer.core.diagnostics import baseline_accuracy, context_test
from trainer.core.metrics import first_and_last, read_metrics
from trainer.core.parallel import ParallelContext, from_rank0
from trainer.core.quiet import quiet_libraries


logger = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    quiet_libraries(is_main)


@dataclass
class RunDirectory:
    path: Path
    is_main: bool

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def prepare(cls, cfg, ctx: ParallelContext, tokenizer: Tokenizer) -> "RunDirectory":
        """Global rank 0 creates the directory, takes its lock (one run per directory), saves the config
        (pretraining or fine-tuning) and copies the tokenizer; others wait, and fail with it."""
        path = Path(cfg.run.dir) / cfg.run.name
        error = ""
        if ctx.is_main:
            try:
                path.mkdir(parents=True, exist_ok=True)
                acquire_run_lock(path)  # first: a second launch on this directory stops here, having written nothing
                save_config(cfg, path / "config.yaml")
                _copy_tokenizer(tokenizer, path / "tokenizer")
            except OSError as err:
                error = f"cannot write run directory {path}: {err.strerror or err}; check run.dir"
            except UserError as err:
                error = str(err)
        error = from_rank0(error)
        if error:
            raise UserError(error)
        return cls(path=path, is_main=ctx.is_main)

    def summary(self) -> Dict[str, Any]:
        if not self.is_main:
            return {}
        records = read_metrics(self.path)
        first, last = first_and_last(records, "loss")
        _, valid = first_and_last(records, "valid_loss")
        lines = [f"run directory: {self.path}", f"tensorboard:   tensorboard --logdir {self.path / 'tb'}",
                 f"checkpoints:   {self.checkpoints}"]
        if first is not None:
            rtd = any("loss_rtd" in r for r in records)
            label = "loss (MLM + RTD):" if rtd else "MLM loss:     "
            lines.append(f"{label} first {first:.4f} -> last {last:.4f}")
            if rtd:
                _, mlm = first_and_last(records, "loss_mlm")
                _, rtd_loss = first_and_last(records, "loss_rtd")
                lines.append(f"last generator MLM loss {mlm:.4f}, RTD loss {rtd_loss:.4f}")
        if valid is not None:
            lines.append(f"valid loss:    {valid:.4f}")
        lines += baseline_lines(records)
        return {"text": "\n".join(lines), "first_loss": first, "last_loss": last, "valid_loss": valid}


@dataclass
class RunLock:
    """The exclusive lock of one run directory, held by this process until it exits."""
    path: Path
    fd: int
    pid: int

    def release(self) -> None:
        """At a clean exit: empty the file (no holder: the next run takes it without a warning) and unlock."""
        if self.fd < 0 or self.pid != os.getpid():  # a forked child inherits the object, not the lock's ownership
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = -1
        _HELD.pop(self.path, None)


_HELD: Dict[Path, RunLock] = {}  # process-wide on purpose: a flock belongs to the process that holds it until exit


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader workers, multiprocessing): close the inherited lock descriptors. A
    flock lasts while any descriptor of it is open, so a worker outliving a SIGKILLed trainer (they poll
    for their parent every few seconds) would keep the run directory locked against the relaunch."""
    for lock in _HELD.values():
        if lock.fd >= 0:
            try:
                os.close(lock.fd)
            except OSError:
                pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def acquire_run_lock(run_dir: Path) -> RunLock:
    """Take `run_dir`'s exclusive lock for the life of this process (again in the same process: the
    held one). Another live holder: UserError naming its host, pid and start time, with nothing written.
    A lock file that still names a holder which no longer holds the lock is taken over with a warning."""
    path = (Path(run_dir) / LOCK_FILE).resolve()
    held = _HELD.get(path)
    if held is not None and held.pid == os.getpid() and held.fd >= 0:
        return held
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UserError(f"cannot open the run lock {path}: {err.strerror or err}; check run.dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_holder(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"run directory {run_dir} is in use by another run ({_describe(holder)}; lock file "
                            f"{path}); wait for it to end or choose another run.name") from None
        raise UserError(f"cannot lock {path}: {err.strerror or err}; run.dir must be on a file system "
                        f"that supports flock") from None
    previous = _read_holder(fd)
    if previous is not None:
        logger.warning("run directory %s: taking over the lock left by %s, which no longer holds it "
                       "(killed?)", run_dir, _describe(previous, holds=False))
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as err:
        os.close(fd)
        raise UserError(f"cannot write the run lock {path}: {err.strerror or err}; check run.dir") from None
    lock = _HELD[path] = RunLock(path, fd, os.getpid())
    atexit.register(lock.release)
    return lock


def _read_holder(fd: int) -> Optional[Dict[str, Any]]:
    """What the lock file says of its holder; None when it is empty (free, or never held)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return {}
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: Optional[Dict[str, Any]], holds: bool = True) -> str:
    """The holder in words; `holds`: it holds the lock now (a gone pid then means a child of it does)."""
    if not holder:
        return "holder not recorded yet" if holds else "an unrecorded holder"
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    text = f"host {host}, pid {pid}, started {holder.get('started', '?')}"
    if holds and host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += f"; pid {pid} is gone, a child process of it still holds the lock"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


BASELINE_KEYS = ("context_free_accuracy", "unigram_accuracy", "hidden_unigram_accuracy", "generator_hidden_accuracy",
                 "mlm_hidden_accuracy")


def baseline_lines(records: list) -> list:
    """The last validation (else training) diagnostics beside their baselines (trainer/core/diagnostics.py)."""
    where = "valid_" if any("valid_loss" in r for r in records) else ""
    last = lambda key: first_and_last(records, where + key)[1]
    label, lines = ("validation" if where else "training"), []
    loss, prior, auc = last("loss_rtd"), last("rtd_prior_loss"), last("rtd_auc")
    if loss is not None and prior is not None:
        auc_text = f", ROC AUC {auc:.3f}" if auc is not None else ""
        lines.append(f"last {label} RTD loss {loss:.4f} vs prior loss {prior:.4f}"
                     f" (always predicting the replaced share){auc_text}")
    record = {key: last(key) for key in BASELINE_KEYS}
    baseline_name, baseline = baseline_accuracy(record)
    unigram = record["unigram_accuracy"]
    unigram_text = (f" (unigram accuracy {unigram:.4f})"
                    if baseline_name != "unigram accuracy" and unigram is not None and abs(unigram - baseline) > 5e-5
                    else "")
    for key, name in (("generator_accuracy", "generator accuracy"), ("mlm_accuracy", "MLM accuracy")):
        accuracy = last(key)
        if accuracy is not None and baseline is not None:
            lines.append(f"last {label} {name} {accuracy:.4f} vs {baseline_name} {baseline:.4f}{unigram_text}")
            hidden, there, hidden_unigram = context_test({**record, key: accuracy})
            differs = abs(hidden - accuracy) > 5e-5 or unigram is None or abs(hidden_unigram - unigram) > 5e-5
            if there == "unigram accuracy there" and differs:  # not when every selected token is [MASK]
                lines.append(f"last {label} {name} where the input hides the target {hidden:.4f} vs unigram "
                             f"accuracy there {hidden_unigram:.4f}")
    return lines


def _copy_tokenizer(tokenizer: Tokenizer, dest: Path) -> None:
    """Copy once; on resume the copy must be the same tokenizer."""
    if dest.exists():
        if load_tokenizer(dest).fingerprint() != tokenizer.fingerprint():
            raise UserError(f"{dest} holds a different tokenizer than {tokenizer.path}; "
                            f"use a new run.name or the run's own tokenizer")
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=dest.parent))
    try:
        tokenizer.save_copy(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
