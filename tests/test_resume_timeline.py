"""Resume follows `latest`, retention follows commit order, and metrics.jsonl holds one timeline.

On files (no processes): the finder a resume and an export share, pruning after a resume from an
earlier step, malformed manifests. With real processes: train to 6 (checkpoints 2, 4, 6), roll back
with `checkpoint.load=.../global_step4` to step 5 (another learning rate), then a plain resume."""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import pytest

from data.errors import UserError
from data.preprocess import preprocess
from launch import run, train_records
from trainer.core.checkpoint import LOADED_FROM, CheckpointManager, _write_atomic, read_meta, resume_order
from trainer.core.elastic import universal_copy
from trainer.core.config import CheckpointSection
from trainer.convert.export import locate, read_checkpoint
from trainer.core.metrics import cut_history


def make(directory: Path, step: int, keep_last: int = 0, meta=None) -> Path:
    """A committed checkpoint of `step` saved now (the newest commit), then the retention policy."""
    tag = directory / f"global_step{step}"
    (tag / "rng").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * (100 + step))
    (tag / "rng" / "rank0.pt").write_bytes(b"rng")
    manager = CheckpointManager(directory, CheckpointSection(keep_last=keep_last), 0)
    manager._commit(tag, meta or {"dp_size": 1})
    manager._prune()
    return tag


def resumed(directory: Path) -> str:
    return CheckpointManager(directory, CheckpointSection(), 0).find_resume().name


def test_resume_and_export_follow_latest(tmp_path):
    for step in (2, 4, 6):
        make(tmp_path, step)
    (tmp_path / "latest").write_text("global_step4")  # a rollback by hand
    assert resumed(tmp_path) == locate(tmp_path).name == "global_step4"
    (tmp_path / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"bad")
    assert resumed(tmp_path) == "global_step2", "falls back to the commit before, never to the later step"


def test_without_latest_the_newest_commit_wins_not_the_highest_step(tmp_path, caplog):
    make(tmp_path, 6)
    make(tmp_path, 4)  # committed after step 6 (no retention ran in between)
    (tmp_path / "latest").unlink()
    with caplog.at_level(logging.WARNING):
        assert resumed(tmp_path) == locate(tmp_path).name == "global_step4"
    assert "latest is missing" in caplog.text
    (tmp_path / "latest").write_text("global_step99")
    assert resumed(tmp_path) == locate(tmp_path).name == "global_step4"
    assert "names 'global_step99', which is not a committed checkpoint" in caplog.text


def test_pruning_counts_commits_and_drops_the_abandoned_timeline(tmp_path, caplog):
    for step in (10, 20, 30):
        make(tmp_path, step, keep_last=2)
    with caplog.at_level(logging.WARNING):
        make(tmp_path, 25, keep_last=2)  # resumed from step 20, saved at 25
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == ["global_step20", "global_step25"]
    assert "removing checkpoint global_step30" in caplog.text and "abandoned" in caplog.text
    assert (tmp_path / "latest").read_text() == "global_step25"
    assert resume_order(tmp_path) == [tmp_path / "global_step25", tmp_path / "global_step20"]
    make(tmp_path, 30, keep_last=2)  # the new timeline reaches step 30 again
    assert CheckpointManager(tmp_path, CheckpointSection(), 0).committed_tags() == ["global_step25", "global_step30"]


@pytest.mark.parametrize("text, key", [("{}", "'files' is missing"),
                                        ('{"files": {"a.pt": {"size": 3}}, "meta": {}}', "'files.a.pt.sha256'"),
                                        ("[1]", "not a JSON object")])
def test_a_malformed_manifest_is_not_committed(tmp_path, caplog, text, key):
    make(tmp_path, 2)
    make(tmp_path, 4)
    (tmp_path / "global_step4" / "manifest.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        assert resumed(tmp_path) == "global_step2"
    assert f"{tmp_path / 'global_step4' / 'manifest.json'}" in caplog.text and key in caplog.text
    with pytest.raises(UserError, match=f"global_step4/manifest.json: .*{key}"):
        read_checkpoint(locate(tmp_path / "global_step4"))  # conversion: one line, exit 2 from the tool
    (tmp_path / "global_step2" / "manifest.json").write_text(text)
    with pytest.raises(UserError, match="no good checkpoint"):  # not a fresh start over a broken run
        resumed(tmp_path)


def chosen(directory: Path, **section) -> tuple:
    manager = CheckpointManager(directory, CheckpointSection(**section), 0)
    tag = manager.find_resume()
    return tag.name, tag.parent.name, manager.loaded_from


def test_a_load_is_applied_once_then_the_run_resumes_its_own(tmp_path, caplog):
    """checkpoint.load=OTHER: the first launch loads OTHER; a launch after this run saved from it resumes
    this run's newest checkpoint; checkpoint.resume=false, or a timeline not begun from it, loads again."""
    other, own = tmp_path / "other", tmp_path / "own"
    source = make(other, 40)
    load = {"load": str(source)}
    assert chosen(own, **load) == ("global_step40", "other", str(source.resolve()))
    make(own, 42, meta={"dp_size": 1, LOADED_FROM: str(source.resolve())})
    with caplog.at_level(logging.WARNING):
        assert chosen(own, **load) == ("global_step42", "own", str(source.resolve()))
    assert "applied by an earlier launch of this run" in caplog.text
    assert chosen(own, load=str(other)) == ("global_step42", "own", str(source.resolve()))  # a directory load
    assert chosen(own) == ("global_step42", "own", str(source.resolve()))  # carried by a plain resume
    assert chosen(own, resume=False, **load) == ("global_step40", "other", str(source.resolve()))
    make(own, 43, meta={"dp_size": 1, LOADED_FROM: str(source.resolve())})
    (own / "global_step43" / "mp_rank_00_model_states.pt").write_bytes(b"bad")
    with caplog.at_level(logging.WARNING):
        assert chosen(own, **load)[:2] == ("global_step42", "own")  # a corrupted one: the commit before
    assert "skipping checkpoint global_step43" in caplog.text
    make(own, 44, meta={"dp_size": 1})  # a later timeline of this run that did not begin from it
    assert chosen(own, **load)[:2] == ("global_step40", "other")
    assert chosen(own) == ("global_step44", "own", None)


def test_a_conversion_lives_in_the_run_that_needs_it(tmp_path):
    """Another run's checkpoint converts into this run's universal/ (named by its path and manifest), and
    the first own save removes it; an own tag's conversion goes when the tag does."""
    other, own = tmp_path / "other", tmp_path / "own"
    source = make(other, 40)
    foreign = universal_copy(source, own)
    assert foreign.parent == own / "universal" and foreign.name.startswith("global_step40-from-")
    (source / "manifest.json").write_text((source / "manifest.json").read_text() + " ")
    assert universal_copy(source, own) != foreign, "a re-saved source is converted again"
    foreign.mkdir(parents=True)
    (own / "universal" / "global_step42.partial123").mkdir()  # a conversion that died midway
    (own / "universal" / "latest_universal").write_text("global_step42.partial123")  # ds_to_universal's
    make(own, 42)
    assert universal_copy(own / "global_step42", own) == own / "universal" / "global_step42"
    assert list((own / "universal").iterdir()) == []
    (own / "universal" / "global_step42").mkdir()
    make(own, 44, keep_last=1)
    assert list((own / "universal").iterdir()) == []


def test_meta_keys_are_named(tmp_path):
    tag = make(tmp_path, 2, meta={"dp_size": 1})
    with pytest.raises(UserError, match=r"global_step2/manifest.json: key 'meta.tp_size' is missing"):
        read_meta(tag, ("dp_size", "tp_size"))
    with pytest.raises(UserError, match=r"manifest.json: key 'meta.tp_size' is missing"):
        read_checkpoint(tag)


def test_temporary_files_have_unique_names(tmp_path):
    """Two writers of one file at once (two runs, before the lock existed) never share a temporary file."""
    target, metrics = tmp_path / "latest", tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 50)))
    errors = []

    def writer(n: int) -> None:
        try:
            for i in range(300):
                _write_atomic(target, f"global_step{n * 1000 + i}")
                cut_history(metrics, 40)
        except OSError as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cut_history_drops_later_steps_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    cut_history(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def prefix(demo_corpus, bpe_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("timeline") / "corpus"
    preprocess([demo_corpus.path], bpe_tokenizer.path, out, workers=1)
    return out


def pretrain(prefix: Path, runs: Path, steps: int, seed: int, *extra: str):
    values = {
        "data.prefix": prefix, "data.seq_length": 32, "data.valid_fraction": 0.0, "model.size": "debug",
        "run.dir": runs, "run.name": "timeline", "train.steps": steps, "train.micro_batch_size": 2,
        "train.global_batch_size": 2, "train.seed": seed, "optim.lr": 2e-3, "optim.warmup_steps": 0,
        "log.every_steps": 1, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
        "eval.every_steps": 0, "zero.stage": 0,
    }
    return run([sys.executable, "-m", "trainer.pretrain", *(f"{k}={v}" for k, v in values.items()), *extra])


def test_a_rollback_supersedes_the_abandoned_timeline(prefix, tmp_path):
    """The rollback changes train.seed (masks and dropout from step 5 on), so the timelines differ; its
    command run again continues the new timeline."""
    checkpoints = tmp_path / "timeline" / "checkpoints"
    pretrain(prefix, tmp_path, 6, 3)  # checkpoints 2, 4, 6 (keep_last=2: 4 and 6)
    first = train_records(tmp_path / "timeline")
    assert (checkpoints / "latest").read_text() == "global_step6"
    out = pretrain(prefix, tmp_path, 5, 4, f"checkpoint.load={checkpoints / 'global_step4'}")
    assert "global_step4 at step 4" in out.stdout
    assert (checkpoints / "latest").read_text() == "global_step5"
    assert not (checkpoints / "global_step6").exists(), "the abandoned step 6 is gone with the first new save"
    rolled = train_records(tmp_path / "timeline")
    assert sorted(rolled) == [1, 2, 3, 4, 5] and rolled[5]["loss"] != first[5]["loss"]

    # The same command again (as a requeue after preemption runs it): the load was applied, so the run
    # resumes its own newest checkpoint, step 5, and does not roll back to step 4 a second time.
    out = pretrain(prefix, tmp_path, 8, 4, f"checkpoint.load={checkpoints / 'global_step4'}")
    assert "global_step5 at step 5" in out.stdout and "applied by an earlier launch of this run" in out.stdout
    records = train_records(tmp_path / "timeline")  # fails on a step logged twice
    assert sorted(records) == list(range(1, 9)), "one record per step, one timeline"
    assert [records[s]["loss"] for s in range(1, 6)] == [first[s]["loss"] for s in range(1, 5)] + [rolled[5]["loss"]]
    assert CheckpointManager(checkpoints, CheckpointSection(), 0).committed_tags() == ["global_step6", "global_step8"]
    assert locate(tmp_path / "timeline").name == "global_step8"
