"""One run per run directory, with real processes: while another process holds a run directory's
lock, a second launch (one process, or two ranks) exits 2 at once naming the holder and leaves every
file as it was; a lock left by a killed holder is taken over with a warning."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

from data.preprocess import preprocess
from launch import ROOT, deepspeed_cmd, env, run, train_records

pytestmark = pytest.mark.distributed

HOLD = "import sys, time; from trainer.core.run_dir import acquire_run_lock; acquire_run_lock(sys.argv[1]); " \
       "print('locked', flush=True); time.sleep(600)"


def overrides(prefix: Path, runs: Path, steps: int, *extra: str) -> list:
    values = {
        "data.prefix": prefix, "data.seq_length": 32, "data.valid_fraction": 0.0, "model.size": "debug",
        "run.dir": runs, "run.name": "locked", "train.steps": steps, "train.micro_batch_size": 2,
        "train.global_batch_size": 2, "train.seed": 3, "optim.warmup_steps": 0, "log.every_steps": 1,
        "checkpoint.every_steps": 2, "eval.every_steps": 0, "zero.stage": 0,
    }
    return [f"{k}={v}" for k, v in values.items()] + list(extra)


@pytest.fixture(scope="module")
def finished(demo_corpus, bpe_tokenizer, tmp_path_factory) -> Dict[str, Path]:
    """A run of 2 steps (config, metrics, tokenizer copy, a checkpoint), to be copied by each test."""
    root = tmp_path_factory.mktemp("lock")
    preprocess([demo_corpus.path], bpe_tokenizer.path, root / "corpus", workers=1)
    run([sys.executable, "-m", "trainer.pretrain", *overrides(root / "corpus", root / "runs", 2)])
    return {"prefix": root / "corpus", "run": root / "runs" / "locked"}


@pytest.fixture
def runs(finished, tmp_path) -> Path:
    shutil.copytree(finished["run"], tmp_path / "locked")
    return tmp_path


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, through the trainer's own function."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.communicate()[0]
    return proc


def snapshot(directory: Path) -> Dict[str, tuple]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_launch_exits_2_and_touches_nothing(finished, runs):
    holder = hold(runs / "locked")
    try:
        before = snapshot(runs)
        start = time.monotonic()
        proc = run([sys.executable, "-m", "trainer.pretrain", *overrides(finished["prefix"], runs, 4)], timeout=120,
                   check=False)
        elapsed = time.monotonic() - start
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
        assert "in use by another run" in lines[0] and f"pid {holder.pid}" in lines[0]
        assert f"host {socket.gethostname()}" in lines[0] and "started 20" in lines[0]
        assert snapshot(runs) == before, "the second launch wrote nothing"
        assert elapsed < 60, f"took {elapsed:.0f} s: it should stop before building anything"
    finally:
        holder.kill()
        holder.wait()


def test_two_ranks_both_exit_instead_of_hanging(finished, runs):
    holder = hold(runs / "locked")
    try:
        before = snapshot(runs)
        cmd = deepspeed_cmd(2, overrides(finished["prefix"], runs, 4, "train.micro_batch_size=1"))
        proc = run(cmd, timeout=180, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        assert out.count("in use by another run") >= 2, out[-3000:]  # rank 0's decision, on both ranks
        assert snapshot(runs) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_holder_is_taken_over(finished, runs):
    holder = hold(runs / "locked")
    holder.send_signal(signal.SIGKILL)  # the kernel drops the lock; the file still names the holder
    holder.wait()
    assert f'"pid": {holder.pid}' in (runs / "locked" / "run.lock").read_text()
    out = run([sys.executable, "-m", "trainer.pretrain", *overrides(finished["prefix"], runs, 4)])
    assert "taking over the lock" in out.stdout and f"pid {holder.pid}" in out.stdout
    assert "global_step2 at step 2" in out.stdout
    assert sorted(train_records(runs / "locked")) == [1, 2, 3, 4]
    assert (runs / "locked" / "run.lock").read_text() == "", "a clean exit leaves no holder: no warning next time"


FORKING_HOLDER = """
import multiprocessing, os, signal, sys, time
from trainer.core.run_dir import acquire_run_lock
acquire_run_lock(sys.argv[1])
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
open(sys.argv[2], "w").write(str(child.pid))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    """A DataLoader worker (forked) that outlives its SIGKILLed trainer must not hold the run directory."""
    from data.errors import UserError
    from trainer.core.run_dir import acquire_run_lock

    pid_file = tmp_path / "child.pid"
    holder = subprocess.run([sys.executable, "-c", FORKING_HOLDER, str(tmp_path), str(pid_file)], cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    assert holder.returncode == -signal.SIGKILL
    child = int(pid_file.read_text())
    try:
        assert os.path.exists(f"/proc/{child}"), "the forked child outlives its parent"
        lock = acquire_run_lock(tmp_path)  # UserError "in use by another run" while the child holds it
        lock.release()
    except UserError as err:
        pytest.fail(f"the orphaned child kept the lock: {err}")
    finally:
        os.kill(child, signal.SIGKILL)
