"""The in-training linear probe (trainer/pretraining/probe.py): the logistic regression, feature extraction and
its data-parallel split, bad task files, and real runs that log probe_accuracy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.errors import UserError
from trainer.pretraining.config import ProbeSection, load_config
from trainer.pretraining.probe import extract_features, fit_linear_probe, load_probe_task, pool

from launch import as_overrides, deepspeed_cmd, metrics, run, train_records


# ----------------------------------------------------------------------------- the logistic regression
def gaussian_classes(n: int, dim: int, classes: int, spread: float, seed: int, draw: int = 0):
    """n points around `classes` centres (fixed by `seed`), labels 0, 1, ... in turn; `draw` seeds the noise."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3.0
    labels = torch.arange(n) % classes
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(1000 + draw), dtype=torch.float64)
    return centres[labels] + spread * noise, labels


def test_separable_classes_are_learned_exactly():
    x, y = gaussian_classes(300, 16, 3, spread=0.3, seed=0)
    vx, vy = gaussian_classes(300, 16, 3, spread=0.3, seed=0, draw=1)  # same classes, new points
    probe = fit_linear_probe(x * 1e3 + 5.0, y, 3, l2=1e-3)  # scale and offset: standardisation removes them
    assert probe.accuracy(x * 1e3 + 5.0, y) == 1.0
    assert probe.accuracy(vx * 1e3 + 5.0, vy) == 1.0


def test_random_labels_give_chance():
    g = torch.Generator().manual_seed(1)
    x, vx = torch.randn(400, 16, generator=g), torch.randn(4000, 16, generator=g)
    y, vy = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (4000,), generator=g)
    probe = fit_linear_probe(x, y, 4, l2=1e-3)
    assert abs(probe.accuracy(vx, vy) - 0.25) < 0.04
    assert probe.accuracy(x, y) > 0.3  # it does fit its training set a little: the fit ran


def test_the_fit_is_bit_identical_on_the_same_features():
    x, y = gaussian_classes(200, 8, 4, spread=2.0, seed=3)  # overlapping: a non-trivial optimum
    a, b = fit_linear_probe(x, y, 4, l2=1e-2), fit_linear_probe(x.clone(), y.clone(), 4, l2=1e-2)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.weight.abs().max() > 0 and 0.5 < a.accuracy(x, y) < 1.0


# ----------------------------------------------------------------------------- features
def tiny_roberta():
    from models.config import RobertaConfig
    from models.parallel import ParallelLayers
    from models.roberta import RobertaForMaskedLM
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50, padded_vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                        intermediate_size=32, max_position_embeddings=18, hidden_dropout=0.0, attention_dropout=0.0)
    return RobertaForMaskedLM(cfg, ParallelLayers(tp_size=1)).eval()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_features_are_per_example_and_split_exactly_over_data_parallel_ranks(pooling):
    model = tiny_roberta()
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 50, size=n) for n in (5, 12, 3, 9, 12, 7, 4)]
    calls = []

    def encode(input_ids, attention_mask):
        calls.append(input_ids.shape[0])
        return model.encode(input_ids, attention_mask)

    cpu = torch.device("cpu")
    with torch.no_grad():
        alone = torch.cat([pool(model.encode(torch.as_tensor(x)[None], torch.ones(1, len(x))), torch.ones(1, len(x)),
                                pooling) for x in ids])
    whole = extract_features(encode, ids, 1, 2, pooling, 0, 1, cpu)
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=0)  # padding changes nothing, rows in order
    calls.clear()
    parts = [extract_features(encode, ids, 1, 2, pooling, rank, 3, cpu) for rank in range(3)]
    # batches of 2, 2, 2, 1 examples over 3 ranks: 2 rounds each, ranks 1 and 2 repeat the last batch
    assert calls == [2, 1, 2, 1, 2, 1]
    assert torch.equal(parts[0] + parts[1] + parts[2], whole)
    assert ((parts[0] != 0).any(1).int() + (parts[1] != 0).any(1).int() + (parts[2] != 0).any(1).int()).eq(1).all()


# ----------------------------------------------------------------------------- bad input
def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_task_files_name_file_and_line(tmp_path):
    good = write(tmp_path / "good.tsv", "sentence\tlabel\na b\t0\nc d\t1\n")
    missing = str(tmp_path / "missing.tsv")
    keyish = str(tmp_path / "data.train")  # a file name that looks like a key keeps its name
    malformed = write(tmp_path / "bad.tsv", "sentence\tlabel\na b\t0\nc d\t1\textra\n")
    not_json = write(tmp_path / "bad.jsonl", '{"sentence": "a", "label": 0}\n{"sentence": \n')
    one = write(tmp_path / "one.tsv", "sentence\tlabel\na b\t0\nc d\t0\n")
    unknown = write(tmp_path / "unknown.tsv", "sentence\tlabel\na b\t2\n")
    cases = [  # (probe.train, probe.validation, the error)
        (missing, good, f"{missing}: no such task file; check probe.train / probe.validation"),
        (write(Path(keyish), "x"), good, f"{keyish}: cannot tell the format .* set probe.format to one of"),
        (good, malformed, f"{malformed}:3: 3 fields, the header has 2"),
        (not_json, good, f"{not_json}:2: not a JSON line"),
        (one, good, f"{one}: only one class \\(0\\); a linear probe needs two or more"),
        (good, unknown, f"{unknown}:2: label '2' is not one of the classes 0, 1; .* probe.labels"),
    ]
    for train, validation, error in cases:
        with pytest.raises(UserError, match=error):
            load_probe_task(ProbeSection(every_steps=1, train=train, validation=validation), None, 16)


def test_config_rejects_an_incomplete_probe():
    base = ["data.prefix=x", "data.seq_length=32"]
    assert load_config(None, base).probe.every_steps == 0  # off by default
    with pytest.raises(UserError, match="probe.train or probe.validation is not"):
        load_config(None, [*base, "probe.every_steps=10"])
    files = [*base, "probe.every_steps=10", "probe.train=a.tsv", "probe.validation=b.tsv"]
    with pytest.raises(UserError, match="probe.pooling='max' is not one of mean, cls"):
        load_config(None, [*files, "probe.pooling=max"])
    with pytest.raises(UserError, match="probe.max_length=64 must be in \\[3, data.seq_length=32\\]"):
        load_config(None, [*files, "probe.max_length=64"])
    with pytest.raises(UserError, match="a linear probe needs a classification task"):
        load_config(None, [*files, "probe.kind=regression"])
    with pytest.raises(UserError, match="unknown config key probe.every"):
        load_config(None, [*base, "probe.every=10"])


# ----------------------------------------------------------------------------- in real runs
@pytest.fixture(scope="module")
def probe_inputs(demo_corpus, spm_tokenizer, tmp_path_factory):
    """A tiny corpus and a two-class task made of its docstrings: does the text mention 'return'?"""
    from data.preprocess import preprocess
    root = tmp_path_factory.mktemp("probe")
    preprocess([demo_corpus.path], spm_tokenizer.path, root / "corpus", workers=1)
    texts = [json.loads(line)["text"].replace("\t", " ").replace("\n", " ")[:200]
             for line in demo_corpus.path.read_text().splitlines()[:120]]
    rows = ["sentence\tlabel"] + [f"{t}\t{int('return' in t)}" for t in texts]
    (root / "train.tsv").write_text("\n".join(rows[:81]) + "\n")
    (root / "validation.tsv").write_text("\n".join(rows[:1] + rows[81:]) + "\n")
    return root


def overrides(root: Path, name: str, **extra) -> list:
    values = {
        "data.prefix": root / "corpus", "data.seq_length": 32, "data.valid_fraction": 0.0,
        "model.size": "debug", "run.dir": root / "runs", "run.name": name,
        "train.steps": 5, "train.micro_batch_size": 4, "train.global_batch_size": 4, "train.seed": 3,
        "optim.warmup_steps": 0, "log.every_steps": 1, "checkpoint.every_steps": 0, "eval.every_steps": 0,
        "probe.every_steps": 2, "probe.train": root / "train.tsv", "probe.validation": root / "validation.tsv",
    }
    return as_overrides(values, **extra)


def probe_records(run_dir: Path) -> dict:
    return {r["step"]: r for r in metrics(run_dir) if "probe_accuracy" in r}


def test_single_process_run_logs_the_probe_at_its_steps_and_the_last(probe_inputs):
    proc = run([sys.executable, "-m", "trainer.pretrain", *overrides(probe_inputs, "mlm", model__name="roberta")])
    records = probe_records(probe_inputs / "runs" / "mlm")
    assert sorted(records) == [2, 4, 5]
    labels = {name: [line.rsplit("\t", 1)[1] for line in (probe_inputs / name).read_text().splitlines()[1:]]
              for name in ("train.tsv", "validation.tsv")}
    train_majority = max("01", key=labels["train.tsv"].count)  # the class a constant predictor would pick
    majority = labels["validation.tsv"].count(train_majority) / len(labels["validation.tsv"])
    for r in records.values():
        assert 0.0 <= r["probe_accuracy"] <= 1.0 and r["probe_train_accuracy"] >= 0.5
        assert r["probe_majority_accuracy"] == majority and r["probe_seconds"] > 0
    assert sorted(train_records(probe_inputs / "runs" / "mlm")) == [1, 2, 3, 4, 5], "training records apart"
    assert "step 4 probe accuracy" in proc.stdout + proc.stderr


def test_missing_probe_file_stops_the_run_before_step_one(probe_inputs):
    proc = run([sys.executable, "-m", "trainer.pretrain",
                *overrides(probe_inputs, "missing", probe__train=probe_inputs / "nope.tsv")], check=False)
    assert proc.returncode == 2
    assert f"error: {probe_inputs / 'nope.tsv'}: no such task file" in proc.stderr
    assert not (probe_inputs / "runs" / "missing").exists(), "nothing half-written"


@pytest.mark.distributed
def test_two_rank_zero3_rtd_run_logs_the_probe(probe_inputs):
    """ZeRO-3 with every parameter partitioned: each forward gathers; the probe reads the discriminator."""
    run(deepspeed_cmd(2, overrides(probe_inputs, "rtd_z3", model__name="deberta_v3", zero__stage=3,
                                   zero__param_persistence_threshold=0, train__global_batch_size=8,
                                   train__steps=3)))
    records = probe_records(probe_inputs / "runs" / "rtd_z3")
    assert sorted(records) == [2, 3]
    assert all(0.0 <= r["probe_accuracy"] <= 1.0 and r["probe_train_accuracy"] >= 0.5 for r in records.values())
    assert sorted(train_records(probe_inputs / "runs" / "rtd_z3")) == [1, 2, 3]


# ----------------------------------------------------------------------------- tools/probe_model.py
def test_average_cosine_matches_all_pairs():
    from tools.probe_model import average_cosine

    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    pairs = [float(unit[i] @ unit[j]) for i in range(7) for j in range(7) if i != j]
    assert abs(average_cosine(x) - sum(pairs) / len(pairs)) < 1e-12
    assert abs(average_cosine(torch.ones(4, 3)) - 1.0) < 1e-12  # collapsed: one direction


def test_probe_model_reports_both_poolings_beside_random_init(probe_inputs, spm_tokenizer, tmp_path, capsys):
    from models.native import save_native
    from models.registry import build_config, build_model
    from tools.probe_model import main, probe_model

    cfg = build_config("deberta_v3", "debug", vocab_size=spm_tokenizer.vocab_size, seq_length=32,
                       pad_token_id=spm_tokenizer.pad_id)
    torch.manual_seed(11)
    native = save_native(tmp_path / "native", "deberta_v3", cfg, build_model(cfg).state_dict())
    train, valid = probe_inputs / "train.tsv", probe_inputs / "validation.tsv"
    results = probe_model(native, train, valid, max_length=32, seeds=(11, 12), tokenizer_dir=spm_tokenizer.path)
    for pooling in ("mean", "cls"):
        rows = results[pooling]["random_init"]
        assert [r["seed"] for r in rows] == [11, 12]
        # random init from seed 11 is the very model saved: same features, same probe
        assert rows[0] == {"seed": 11, **results[pooling]["pretrained"]}
        assert rows[1]["accuracy"] != rows[0]["accuracy"] or rows[1]["cosine"] != rows[0]["cosine"]
        for r in rows:
            assert 0.0 <= r["accuracy"] <= 1.0 and -1.0 <= r["cosine"] <= 1.0
    assert results["mean"]["pretrained"]["cosine"] < results["cls"]["pretrained"]["cosine"]  # [CLS] barely varies
    assert main(["--model", str(native), "--train", str(train), "--validation", str(valid), "--max-length", "32",
                 "--tokenizer", str(spm_tokenizer.path), "--pooling", "mean", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| mean |" in out and "| cls |" not in out and "majority class" in out
    with pytest.raises(UserError, match="--pooling 'max' is not one of mean, cls"):
        probe_model(native, train, valid, poolings=("max",), tokenizer_dir=spm_tokenizer.path)
    with pytest.raises(UserError, match="no tokenizer in"):
        probe_model(native, train, valid)  # nothing beside the saved file
    with pytest.raises(UserError, match="--seeds"):
        main(["--model", str(native), "--train", str(train), "--validation", str(valid), "--seeds", "a,b"])
