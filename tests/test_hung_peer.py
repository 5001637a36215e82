"""A hung peer times out: with one of two ranks stopped (SIGSTOP) mid-training, the other rank's next
collective fails after train.collective_timeout_s and that rank exits non-zero with one line naming
the collective and the timeout, instead of blocking forever. Real processes under torchrun, gloo."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data.preprocess import preprocess
from launch import ROOT, env, torchrun_cmd

pytestmark = pytest.mark.distributed
TIMEOUT_S = 10
MARGIN_S = 20  # the step under way when the peer stopped, and interpreter exit


@pytest.fixture(scope="module")
def data_prefix(demo_corpus, bpe_tokenizer, tmp_path_factory) -> str:
    prefix = tmp_path_factory.mktemp("hung_peer") / "corpus"
    preprocess([demo_corpus.path], bpe_tokenizer.path, prefix, workers=1)
    return str(prefix)


def ranks_of(launcher: psutil.Process, timeout: float = 60) -> dict:
    """RANK -> the process torchrun started for it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for child in launcher.children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if rank is not None and "trainer.pretrain" in " ".join(child.cmdline()):
                found[int(rank)] = child
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun did not start 2 ranks")


def wait_for_training(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until rank 0 has logged step 2: the ranks are past start-up and inside the step loop."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and sum(1 for line in path.read_text().splitlines() if '"step"' in line) >= 2:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"training did not start in {timeout} s")


def test_a_stopped_rank_makes_its_peer_exit_after_the_collective_timeout(data_prefix, tmp_path):
    overrides = {
        "data.prefix": data_prefix, "data.seq_length": 32, "data.valid_fraction": 0.0, "model.size": "debug",
        "run.dir": tmp_path, "run.name": "hung", "train.steps": 100000, "train.micro_batch_size": 2,
        "train.global_batch_size": 4, "log.every_steps": 1, "checkpoint.every_steps": 0, "eval.every_steps": 0,
        "train.collective_timeout_s": TIMEOUT_S,
    }
    cmd = torchrun_cmd(2, [f"{k}={v}" for k, v in overrides.items()])
    log = tmp_path / "launcher.log"  # a file, not a pipe: a full pipe would block rank 0 in a write, not a collective
    with open(log, "w") as sink:
        launcher = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env(), stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    ranks: dict = {}
    try:
        ranks.update(ranks_of(psutil.Process(launcher.pid)))
        wait_for_training(tmp_path / "hung", launcher, log)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        try:
            ranks[0].wait(timeout=TIMEOUT_S + MARGIN_S)  # blocked forever before the timeout existed
        except psutil.TimeoutExpired:
            raise AssertionError(f"rank 0 still running {TIMEOUT_S + MARGIN_S} s after its peer stopped") from None
        waited = time.time() - stopped_at
        ranks[1].kill()  # torchrun's SIGTERM would wait on the stopped process for 30 s
        launcher.wait(timeout=60)
    finally:  # torchrun gives each rank a session of its own: kill them one by one, then the launcher's group
        for rank in ranks.values():
            try:
                rank.kill()  # SIGKILL ends a stopped process too
            except psutil.NoSuchProcess:
                pass
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=30)
    out = log.read_text()
    assert waited >= TIMEOUT_S * 0.9, f"rank 0 left after {waited:.1f} s, before the timeout:\n{out[-4000:]}"
    assert launcher.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-6000:]
    assert f"did not complete within train.collective_timeout_s={TIMEOUT_S} s" in errors[0], errors[0]
    assert "a collective (" in errors[0], errors[0]  # the collective's name, from the traceback
    assert "DistBackendError" not in out and "RuntimeError" not in out, out[-6000:]  # no traceback from rank 0
    # rank 0's own exit status, as torchrun reports it (69: EXIT_PEER_TIMEOUT)
    assert "exitcode:69" in out.replace(" ", ""), out[-4000:]


def test_every_process_group_gets_the_collective_timeout():
    """The world group (DeepSpeed's init) and megatron-core's data- and tensor-parallel groups, which carry
    the gradient all-reduces, all wait train.collective_timeout_s, not their libraries' 10 and 30 minutes."""
    code = ("import torch, torch.distributed as dist\n"
            "from trainer.core.parallel import init_parallel\n"
            "ctx = init_parallel(1, 12.5)\n"
            "for g in (dist.group.WORLD, ctx.dp_group, ctx.tp_group):\n"
            "    print('timeout', g._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert [line for line in out.splitlines() if line.startswith("timeout")] == ["timeout 12.5"] * 3, out
