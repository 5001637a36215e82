"""Fault tolerance with real processes: SIGKILL and exact resume, interrupted and corrupted saves,
SIGTERM preemption, NaN steps, and resuming under another data-parallel size."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import ROOT, as_overrides, deepspeed_cmd, env, run, start_group, train_records, wait_for_step

pytestmark = pytest.mark.distributed
LR = 2e-3


def args(prefix, runs: Path, name: str, **extra) -> list:
    values = {
        "data.prefix": prefix, "data.seq_length": 64, "data.valid_fraction": 0.0, "model.size": "debug",
        "run.dir": runs, "run.name": name, "train.steps": 16, "train.micro_batch_size": 4,
        "train.global_batch_size": 8, "train.seed": 3, "optim.lr": LR, "optim.min_lr": LR,
        "optim.warmup_steps": 0, "log.every_steps": 1, "checkpoint.every_steps": 4, "checkpoint.keep_last": 2,
        "eval.every_steps": 0, "zero.stage": 0,
    }
    return as_overrides(values, **extra)


def single(*overrides) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "trainer.pretrain", *overrides], check=False)


def test_save_killed_before_commit_leaves_the_previous_checkpoint(tiny_bpe_prefix, tmp_path):
    crashed = single(*args(tiny_bpe_prefix, tmp_path, "crash", train__steps=12, debug__crash_in_save_step=8))
    assert crashed.returncode == 137
    checkpoints = tmp_path / "crash" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "global_step4"
    assert (checkpoints / "global_step8").is_dir() and not (checkpoints / "global_step8" / "manifest.json").exists()
    out = single(*args(tiny_bpe_prefix, tmp_path, "crash", train__steps=12))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "global_step4 at step 4" in out.stdout
    records = train_records(tmp_path / "crash")
    assert sorted(records) == list(range(1, 13)) and records[5]["consumed_samples"] == 40
    assert (checkpoints / "global_step8" / "manifest.json").exists(), "step 8 saved again and committed"


def test_corrupted_checkpoint_is_skipped(tiny_bpe_prefix, tmp_path):
    first = single(*args(tiny_bpe_prefix, tmp_path, "corrupt", train__steps=8))
    assert first.returncode == 0
    victim = tmp_path / "corrupt" / "checkpoints" / "global_step8" / "mp_rank_00_model_states.pt"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    out = single(*args(tiny_bpe_prefix, tmp_path, "corrupt", train__steps=10))
    assert out.returncode == 0, out.stdout[-3000:]
    assert "skipping checkpoint global_step8" in out.stdout and "truncated" in out.stdout
    assert "resumed from" in out.stdout and "global_step4 at step 4" in out.stdout
    assert train_records(tmp_path / "corrupt")[5]["consumed_samples"] == 40
    # nothing good left: a clear error, not a fresh start over a broken run
    tags = sorted(p.name for p in (tmp_path / "corrupt" / "checkpoints").glob("global_step*"))
    assert tags == ["global_step10", "global_step8"], tags  # keep_last=2 pruned step 4
    for tag in tags:
        (tmp_path / "corrupt" / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    bad = single(*args(tiny_bpe_prefix, tmp_path, "corrupt", train__steps=12))
    assert bad.returncode == 2 and "no good checkpoint" in bad.stderr


def test_sigterm_saves_and_exits_then_resumes(tiny_bpe_prefix, tmp_path):
    proc = start_group(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "term", train__steps=100000,
                                             checkpoint__every_steps=0)))
    wait_for_step(tmp_path / "term", 3, proc)
    # The node's launcher (deepspeed.launcher.launch), as a scheduler or `kill` on the node would: it
    # forwards SIGTERM to the ranks one by one and SIGKILLs a rank still alive 30 s later.
    import psutil
    node_launcher = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                         if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
    sent = time.time()
    node_launcher.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert "SIGTERM received: stopped after step" in output
    deadline = time.time() + 60  # the launcher may return before its ranks finish the checkpoint
    checkpoints = tmp_path / "term" / "checkpoints"
    while time.time() < deadline and not (checkpoints / "latest").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    assert time.time() - sent < 90, "preemption must end in bounded time"
    tag = (checkpoints / "latest").read_text()
    stopped = int(tag.removeprefix("global_step"))
    assert stopped >= 3 and (checkpoints / tag / "manifest.json").is_file()
    run(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "term", train__steps=stopped + 2,
                                    checkpoint__every_steps=0)))
    records = train_records(tmp_path / "term")
    assert sorted(records)[-3:] == [stopped, stopped + 1, stopped + 2]
    assert records[stopped + 1]["consumed_samples"] == 8 * (stopped + 1)


def test_sigterm_exit_status_in_one_process(tiny_bpe_prefix, tmp_path):
    proc = start_group([sys.executable, "-m", "trainer.pretrain",
                        *args(tiny_bpe_prefix, tmp_path, "term1", train__steps=100000, checkpoint__every_steps=0)])
    wait_for_step(tmp_path / "term1", 2, proc)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    assert "SIGUSR1 received" in output


def model_states(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False, map_location="cpu")["module"]


@pytest.mark.parametrize("stage", [0, 1])
def test_nan_step_is_skipped_without_update(tiny_bpe_prefix, tmp_path, stage):
    """A NaN loss at the last step leaves exactly the weights of the step before."""
    common = dict(checkpoint__every_steps=0, zero__stage=stage, optim__weight_decay=0.1)
    skipped = single(*args(tiny_bpe_prefix, tmp_path, "nan", train__steps=4, debug__nan_loss_steps="[4]", **common))
    assert skipped.returncode == 0, skipped.stdout[-3000:]
    clean = single(*args(tiny_bpe_prefix, tmp_path, "clean", train__steps=3, **common))
    assert clean.returncode == 0
    a, b = model_states(tmp_path / "nan", 4), model_states(tmp_path / "clean", 3)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert train_records(tmp_path / "nan")[4]["skipped_steps"] == 1


def test_consecutive_nan_steps_stop_the_run(tiny_bpe_prefix, tmp_path):
    out = single(*args(tiny_bpe_prefix, tmp_path, "diverge", train__steps=10, train__max_bad_steps=3,
                       debug__nan_loss_steps="[2, 3, 4]"))
    assert out.returncode == 3
    assert "3 consecutive steps with a NaN/Inf loss, the last at step 4" in out.stderr


NO_DROPOUT = dict(model__overrides="{hidden_dropout: 0.0, attention_dropout: 0.0}", zero__stage=1)


@pytest.fixture(scope="module")
def layout_runs(tiny_bpe_prefix, tmp_path_factory) -> Path:
    """Shared by the layout-change tests, all ZeRO-1 with dropout off: "straight", 2 ranks for 20 steps
    that never change layout, and "at12", the same run stopped with a checkpoint at step 12."""
    root = tmp_path_factory.mktemp("layout")
    run(deepspeed_cmd(2, args(tiny_bpe_prefix, root, "straight", train__steps=20, checkpoint__every_steps=0,
                              **NO_DROPOUT)))
    run(deepspeed_cmd(2, args(tiny_bpe_prefix, root, "at12", train__steps=12, checkpoint__every_steps=12,
                              **NO_DROPOUT)))
    return root


def continue_from_step_12(layout_runs: Path, tmp_path: Path) -> Path:
    shutil.copytree(layout_runs / "at12", tmp_path / "changed")
    return tmp_path / "changed"


def assert_same_steps(records: dict, reference: dict, steps) -> None:
    """Same global batch, same weights: only the order of the gradient sums differs."""
    for step in steps:
        assert records[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-5), step
        assert records[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], abs=1e-5), step


def test_resume_with_fewer_then_more_data_parallel_ranks(tiny_bpe_prefix, layout_runs, tmp_path):
    """2 ranks -> 1 rank at step 12 -> 2 ranks at step 16, each through a universal checkpoint: the same
    global data position, and the losses of the run that never changed."""
    run_dir = continue_from_step_12(layout_runs, tmp_path)
    out = single(*args(tiny_bpe_prefix, tmp_path, "changed", train__steps=16, checkpoint__every_steps=16, **NO_DROPOUT))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "converting to a universal checkpoint" in out.stdout
    out = run(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "changed", train__steps=20, checkpoint__every_steps=0,
                                    **NO_DROPOUT)))
    assert "converting to a universal checkpoint" in out.stdout
    records = train_records(run_dir)
    assert [records[s]["data_parallel_size"] for s in (12, 13, 16, 17)] == [2, 1, 1, 2]
    assert [records[s]["consumed_samples"] for s in (13, 17)] == [13 * 8, 17 * 8]
    assert_same_steps(records, train_records(layout_runs / "straight"), range(13, 21))


def test_resume_under_another_tp_degree_and_zero_stage(tiny_bpe_prefix, layout_runs, tmp_path):
    """ZeRO-1, TP=1 x DP=2 -> ZeRO-2, TP=2 x DP=1 through a universal checkpoint, in a new run directory
    (checkpoint.load= the other run's step 12). With dropout off the steps after the change equal those of
    a run that never changed layout. The conversion is the new run's: nothing is written beside the
    checkpoint it came from (another run's, possibly read-only or loaded by other runs at once)."""
    source = layout_runs / "at12" / "checkpoints"
    before = sorted(str(p.relative_to(source)) for p in source.rglob("*"))
    out = run(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "branch", train__steps=15, parallel__tensor=2,
                                    checkpoint__every_steps=0, checkpoint__load=source / "global_step12",
                                    **{**NO_DROPOUT, "zero__stage": 2})))
    assert "tp_size 1 -> 2" in out.stdout and "zero_stage 1 -> 2" in out.stdout
    assert sorted(str(p.relative_to(source)) for p in source.rglob("*")) == before
    assert "branch/checkpoints/universal/global_step12-from-" in out.stdout  # loaded from there
    assert list((tmp_path / "branch" / "checkpoints" / "universal").iterdir()) == []  # gone with step 15's save
    records = train_records(tmp_path / "branch")
    assert records[13]["consumed_samples"] == 13 * 8 and records[13]["data_parallel_size"] == 1
    assert_same_steps(records, train_records(layout_runs / "straight"), (13, 14, 15))


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tiny_bpe_prefix, tmp_path):
    """A file-size limit makes checkpoint writes fail with EFBIG, as a full disk would (ENOSPC)."""
    import resource

    assert single(*args(tiny_bpe_prefix, tmp_path, "full", train__steps=4)).returncode == 0
    limit = 512 * 1024  # below the ~1.7 MB model-states file, above metrics and logs

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "trainer.pretrain", *args(tiny_bpe_prefix, tmp_path, "full",
                                                                           train__steps=8)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, preexec_fn=small_disk, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "saving checkpoint" in proc.stderr and "previous checkpoint is still the latest" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, "one line, no traceback"
    checkpoints = tmp_path / "full" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "global_step4"
    assert not (checkpoints / "global_step8").exists()
    again = single(*args(tiny_bpe_prefix, tmp_path, "full", train__steps=8))
    assert again.returncode == 0 and "global_step4 at step 4" in again.stdout
