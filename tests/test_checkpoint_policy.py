"""Checkpoint retention and the choice of checkpoint to resume from, on real files (no processes)."""
import time

import pytest

from data.errors import UserError
from trainer.core.checkpoint import CheckpointManager, verify
from trainer.core.config import CheckpointSection


def make(directory, step, committed=True):
    tag = directory / f"global_step{step}"
    (tag / "rng").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * (100 + step))
    (tag / "rng" / "rank0.pt").write_bytes(b"rng")
    if committed:
        CheckpointManager(directory, CheckpointSection(), 0)._commit(tag, {"dp_size": 1})
    return tag


def test_retention_keeps_last_k_and_every_jth(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointSection(keep_last=2, keep_every=4), 0)
    for step in range(1, 11):
        make(tmp_path, step)
    (tmp_path / "global_step9" / "manifest.json").unlink()  # an uncommitted save older than the newest
    manager._prune()
    assert manager.committed_tags() == ["global_step4", "global_step8", "global_step10"]
    assert not (tmp_path / "global_step9").exists(), "uncommitted leftovers are removed"
    assert (tmp_path / "latest").read_text() == "global_step10"


def test_keep_last_zero_keeps_everything(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointSection(keep_last=0), 0)
    for step in (1, 2, 3):
        make(tmp_path, step)
    manager._prune()
    assert len(manager.committed_tags()) == 3


def test_resume_choice_falls_back_and_honours_load_and_resume(tmp_path):
    for step in (2, 4, 6):
        make(tmp_path, step)
    make(tmp_path, 8, committed=False)  # a save killed before its commit
    manager = CheckpointManager(tmp_path, CheckpointSection(), 0)
    assert manager.find_resume().name == "global_step6"
    victim = tmp_path / "global_step6" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\xff")  # same size, corrupted content
    assert "checksum" in verify(tmp_path / "global_step6")
    assert manager.find_resume().name == "global_step4"
    (tmp_path / "global_step4" / "rng" / "rank0.pt").unlink()
    assert manager.find_resume().name == "global_step2"
    explicit = CheckpointManager(tmp_path / "elsewhere", CheckpointSection(load=str(tmp_path / "global_step2")), 0)
    assert explicit.find_resume().name == "global_step2"
    assert CheckpointManager(tmp_path, CheckpointSection(resume=False), 0).find_resume() is None
    assert CheckpointManager(tmp_path / "empty", CheckpointSection(), 0).find_resume() is None
    (tmp_path / "global_step2" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="no good checkpoint"):
        manager.find_resume()
    with pytest.raises(UserError, match="does not exist"):
        CheckpointManager(tmp_path, CheckpointSection(load=str(tmp_path / "nope")), 0).find_resume()


def test_time_based_saving(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointSection(every_minutes=0.001), 0)
    assert not CheckpointManager(tmp_path, CheckpointSection(), 0).time_due()
    time.sleep(0.1)
    assert manager.time_due()
    assert manager.due(10, 10) and manager.due(1000, 5000) and not manager.due(7, 5000)
