"""Replaced token detection (ELECTRA and DeBERTaV3 towers, GDES) under ZeRO-3 and TP, real processes.

With dropout off, the numbers may not depend on the layout: ZeRO-3 must gather the generator's
embedding table that the discriminator reads through GDES, and the Gumbel sampling of replacements
is keyed by (seed, global sample index), not by the vocabulary partition or the rank.
"""
from __future__ import annotations

import sys

import pytest

from launch import deepspeed_cmd, python_tool, run, torchrun_cmd, train_records

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("rtd_pipeline")
    python_tool("build_demo_corpus.py", "--output", root / "corpus.jsonl", "--max-mb", "0.5")
    python_tool("train_tokenizer.py", "--input", root / "corpus.jsonl", "--type", "bpe", "--vocab-size", "600",
                "--output", root / "tok")
    python_tool("preprocess_data.py", "--input", root / "corpus.jsonl", "--tokenizer", root / "tok",
                "--output-prefix", root / "bin" / "corpus", "--workers", "1")
    return str(root / "bin" / "corpus")


RECIPES = ["configs/pretrain/electra_debug.yaml", "configs/pretrain/deberta_v3_debug.yaml"]


def args(prefix, runs, name, recipe, **extra):
    values = {"data.prefix": prefix, "data.valid_fraction": 0.0, "run.dir": runs, "run.name": name,
              "train.steps": 3, "train.seed": 5, "log.every_steps": 1, "checkpoint.every_steps": 0,
              "eval.every_steps": 0, "optim.warmup_steps": 1, "optim.lr": 2e-3,
              "model.overrides": "{embedding_sharing: gdes, hidden_dropout: 0.0, attention_dropout: 0.0}"}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["--config", recipe] + [f"{k}={v}" for k, v in values.items()]


def assert_same_steps(a, b):
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_mlm", "loss_rtd", "grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], abs=1e-5), (step, key)
        assert a[step]["replaced_ratio"] == b[step]["replaced_ratio"]  # the same sampled replacements


@pytest.mark.parametrize("recipe", RECIPES)
def test_rtd_gdes_zero3_equals_zero1(data_prefix, tmp_path, recipe):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0), against ZeRO-1."""
    run(deepspeed_cmd(2, args(data_prefix, tmp_path, "z1", recipe, zero__stage=1)))
    run(deepspeed_cmd(2, args(data_prefix, tmp_path, "z3", recipe, zero__stage=3, zero__param_persistence_threshold=0)))
    z1, z3 = train_records(tmp_path / "z1"), train_records(tmp_path / "z3")
    assert_same_steps(z1, z3)
    assert {"generator_accuracy", "rtd_accuracy", "replaced_ratio", "loss_mlm", "loss_rtd"} <= set(z1[1])


@pytest.mark.parametrize("recipe", RECIPES[1:])  # ELECTRA at TP=2: tests/test_electra.py's in-process spawn
def test_rtd_gdes_tensor_parallel_equals_single_process(data_prefix, tmp_path, recipe):
    run([sys.executable, "-m", "trainer.pretrain", *args(data_prefix, tmp_path, "tp1", recipe)])
    run(torchrun_cmd(2, args(data_prefix, tmp_path, "tp2", recipe, parallel__tensor=2, train__micro_batch_size=2)))
    assert_same_steps(train_records(tmp_path / "tp1"), train_records(tmp_path / "tp2"))
