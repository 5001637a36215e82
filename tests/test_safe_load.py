"""No code runs from a file this project reads: a malicious pickle placed where each reader reads
(conversion, embedding_stats, resume's model states / optimizer states / RNG file, checkpoint.load,
fine-tuning's model.init) is refused with a one-line error naming the file, exit 2, and its payload
(which would create a marker file) never runs. The project's own files still load."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.errors import UserError
from launch import as_overrides, run
from trainer.core.safe_load import WEIGHTS_ONLY, safe_torch_load

TAG = "global_step2"


class Payload:
    """Unpickling this runs `touch marker` (what an attacker's file would do, less harmfully)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path, zip_format: bool = True) -> None:
    """A model-states-shaped pickle with the payload inside; the manifest made to match it (an
    attacker who can replace a file can rewrite the manifest too), so the load really happens."""
    torch.save({"module": {}, "model_config": {}, "payload": Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    for tag_dir in path.parents:
        manifest = tag_dir / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            data["files"][str(path.relative_to(tag_dir))] = {
                "size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            manifest.write_text(json.dumps(data))
            return


def train_args(prefix: Path, runs: Path, name: str, steps: int = 2, **extra) -> list:
    values = {"data.prefix": prefix, "data.seq_length": 32, "data.valid_fraction": 0.0, "model.name": "electra",
              "model.size": "debug", "run.dir": runs, "run.name": name, "train.steps": steps,
              "train.micro_batch_size": 2, "train.global_batch_size": 2, "optim.warmup_steps": 0,
              "checkpoint.every_steps": 2, "eval.every_steps": 0, "zero.stage": 1}
    return [sys.executable, "-m", "trainer.pretrain", *as_overrides(values, **extra)]


@pytest.fixture(scope="module")
def trained(demo_corpus, bpe_tokenizer, tmp_path_factory):
    """(data prefix, runs dir): one 2-step ELECTRA run at ZeRO-1 (model states, optimizer partition, RNG file)."""
    from data.preprocess import preprocess

    root = tmp_path_factory.mktemp("safe_load")
    prefix = root / "bin" / "corpus"
    preprocess([demo_corpus.path], bpe_tokenizer.path, prefix, workers=1)
    run(train_args(prefix, root / "runs", "own"))
    return prefix, root / "runs"


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the trained run under tmp_path/runs/NAME, and the marker the payload would create."""
    prefix, runs = trained
    shutil.copytree(runs / "own", tmp_path / "runs" / "own", ignore=shutil.ignore_patterns("run.lock"))
    return prefix, tmp_path / "runs", tmp_path / "code_ran"


def assert_refused(proc: subprocess.CompletedProcess, victim: Path, marker: Path) -> None:
    assert not marker.exists(), "the payload ran"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and str(victim) in errors[0] and "posix.system" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_own_files_load_and_foreign_types_are_refused(trained, tmp_path):
    _, runs = trained
    files = sorted((runs / "own" / "checkpoints" / TAG).rglob("*.pt"))
    assert {f.name for f in files} == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                       "rank0.pt"}
    for path in files:
        assert isinstance(safe_torch_load(path), dict)
    rng = runs / "own" / "checkpoints" / TAG / "rng" / "rank0.pt"
    with pytest.raises(UserError, match=r"rank0.pt: refused to load: .*numpy"):
        safe_torch_load(rng, allowed=WEIGHTS_ONLY)  # model weights files get no allowlist at all
    for zip_format in (True, False):
        path = tmp_path / f"evil_{zip_format}.pt"
        write_malicious(path, tmp_path / "code_ran", zip_format)
        with pytest.raises(UserError, match=rf"{path}: refused to load: .*posix\.system"):
            safe_torch_load(path)
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_convert_refuses(copy, victim):
    """tools/convert_checkpoint.py's reader: our own load of the model states, DeepSpeed's zero_to_fp32
    (which passes weights_only=False) for the optimizer partitions."""
    from trainer.convert.export import read_checkpoint

    _, runs, marker = copy
    path = runs / "own" / "checkpoints" / TAG / victim
    write_malicious(path, marker)
    with pytest.raises(UserError, match=rf"{path}: refused to load: .*posix\.system"):
        read_checkpoint(path.parent)
    assert not marker.exists()


def test_embedding_stats_refuses(copy):
    _, runs, marker = copy
    path = runs / "own" / "checkpoints" / TAG / "mp_rank_00_model_states.pt"
    write_malicious(path, marker)
    proc = run([sys.executable, "tools/embedding_stats.py", "--checkpoint", runs / "own" / "checkpoints"], check=False)
    assert_refused(proc, path, marker)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "rng/rank0.pt"])
def test_resume_refuses(copy, victim):
    """Model states: DeepSpeed's engine.load_checkpoint; the RNG file: our checkpoint manager."""
    prefix, runs, marker = copy
    path = runs / "own" / "checkpoints" / TAG / victim
    write_malicious(path, marker, zip_format=victim != "rng/rank0.pt")  # legacy format: no static scan
    proc = run(train_args(prefix, runs, "own", steps=4), check=False)
    assert_refused(proc, path, marker)


def test_checkpoint_load_refuses_a_malicious_optimizer_partition(copy):
    """checkpoint.load=DIR into a new run; the model states are genuine, so DeepSpeed goes on to read
    the ZeRO optimizer partition, through the same checkpoint engine."""
    prefix, runs, marker = copy
    tag_dir = runs / "own" / "checkpoints" / TAG
    path = tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    write_malicious(path, marker)
    proc = run(train_args(prefix, runs, "other", steps=4, checkpoint__load=tag_dir), check=False)
    assert_refused(proc, path, marker)


def test_finetune_init_refuses_native_and_hf_files(tmp_path):
    from transformers import RobertaConfig

    from trainer.finetuning.initial_model import load_initial_model
    from trainer.convert.hf_import import read_hf_dir

    marker = tmp_path / "code_ran"
    native = tmp_path / "model.pt"
    write_malicious(native, marker)
    with pytest.raises(UserError, match=rf"{native}: refused to load: .*posix\.system"):
        load_initial_model(str(native))
    hf = tmp_path / "hf"
    RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37).save_pretrained(hf)
    write_malicious(hf / "pytorch_model.bin", marker)
    with pytest.raises(UserError, match=r"pytorch_model.bin: refused to load: .*posix\.system"):
        load_initial_model(str(hf))
    with pytest.raises(UserError, match=r"pytorch_model.bin: refused to load: .*posix\.system"):
        read_hf_dir(hf)  # tools/convert_checkpoint.py --from-hf
    assert not marker.exists()



def test_resume_under_another_zero_stage_refuses_before_ds_to_universal_runs_code(copy):
    """A changed layout converts the checkpoint with DeepSpeed's ds_to_universal (torch.load with
    weights_only=False throughout): it runs with every load restricted, and names the file at fault."""
    prefix, runs, marker = copy
    path = runs / "own" / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    write_malicious(path, marker)
    proc = run(train_args(prefix, runs, "own", steps=4, zero__stage=2), check=False)
    assert "converting to a universal checkpoint" in proc.stdout + proc.stderr
    assert_refused(proc, path, marker)
