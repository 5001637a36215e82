"""Config values and user JSON that used to end in a traceback (or be accepted): non-finite floats in
either config, and JSON nested deeper than the parser goes in every file a user hands us. Each is a
one-line UserError naming the key or the file:line (exit 2 from the command line)."""
from __future__ import annotations

import json

import pytest

from data.errors import UserError
from data.indexed import read_sidecar, sidecar_path
from data.jsonio import loads, read_json_object
from data.reading import ReadOptions, iter_texts
from data.tasks import read_rows
from data.tokenizer import load_tokenizer
from trainer.pretraining.config import load_config
from trainer.finetuning.config import load_finetune_config
from trainer.convert.hf_import import read_hf_dir

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError, not a ValueError
FINETUNE_REQUIRED = ["model.init=m", "data.train=t.tsv", "data.validation=v.tsv"]


# ----------------------------------------------------------------------------- non-finite floats

@pytest.mark.parametrize("override", [
    "optim.lr=nan", "optim.lr=inf", "optim.min_lr=-inf", "optim.eps=nan", "optim.weight_decay=inf",
    "optim.betas=[0.9, nan]", "train.grad_clip=inf", "checkpoint.every_minutes=inf",
    "checkpoint.preemption_timeout_s=nan", "train.collective_timeout_s=inf", "optim.generator_lr=inf",
    "data.blend=[[inf, x]]", "probe.l2=inf",
])
def test_pretraining_rejects_non_finite_floats(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^{key.replace('.', '[.]')}(\[\d\])*=.* must be a finite number"):
        load_config(None, ["data.prefix=x", override])


@pytest.mark.parametrize("override", [
    "optim.lr=inf", "optim.lr=nan", "train.epochs=inf", "sift.weight=nan", "sift.noise_std=inf",
    "optim.warmup_ratio=nan", "model.classifier_dropout=nan", "train.collective_timeout_s=nan",
])
def test_finetuning_rejects_non_finite_floats(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^{key.replace('.', '[.]')}=.* must be a finite number"):
        load_finetune_config(None, FINETUNE_REQUIRED + [override])


def test_a_non_finite_float_in_a_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {prefix: x}\noptim: {lr: .nan}\n")
    with pytest.raises(UserError, match=rf"^{path}: optim[.]lr=nan must be a finite number"):
        load_config(str(path))


def test_the_command_line_prints_one_line_and_exits_2(capsys):
    from trainer.core.cli import run_cli
    from trainer.pretraining.train import main

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["data.prefix=x", "optim.lr=nan"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: optim.lr=nan must be a finite number (not NaN or infinity)\n"


@pytest.mark.parametrize("value", ["0", "-5"])
def test_collective_timeout_must_be_positive(value):
    with pytest.raises(UserError, match="train.collective_timeout_s=.* must be positive"):
        load_config(None, ["data.prefix=x", f"train.collective_timeout_s={value}"])
    with pytest.raises(UserError, match="train.collective_timeout_s=.* must be positive"):
        load_finetune_config(None, FINETUNE_REQUIRED + [f"train.collective_timeout_s={value}"])


def test_finite_floats_still_load():
    cfg = load_config(None, ["data.prefix=x", "optim.lr=1e-3", "train.collective_timeout_s=20"])
    assert cfg.optim.lr == 1e-3 and cfg.train.collective_timeout_s == 20.0
    assert load_config(None, ["data.prefix=x"]).train.collective_timeout_s == 1800.0
    assert load_finetune_config(None, FINETUNE_REQUIRED).train.collective_timeout_s == 1800.0


# ----------------------------------------------------------------------------- deeply nested JSON

def test_loads_turns_deep_nesting_into_a_decode_error_with_a_position():
    with pytest.raises(json.JSONDecodeError, match="nested 100000 levels deep") as err:
        loads(DEEP)
    assert (err.value.lineno, err.value.colno) == (1, 100_000)  # the deepest '['
    assert loads('{"a": "[[[[", "b": [1]}') == {"a": "[[[[", "b": [1]}


def test_task_file_line_too_deep_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "ok", "label": 1}\n{"sentence": ' + DEEP + ', "label": 0}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: not a JSON line \(nested 100001 levels deep"):
        list(read_rows(path, "auto", None))


def test_corpus_line_too_deep_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": ' + DEEP + '}\n{"text": "four"}\n')
    with pytest.raises(UserError, match=rf"^{path}:3: malformed JSON \(column 100009: nested 100001 levels deep"):
        list(iter_texts([path]))
    assert list(iter_texts([path], ReadOptions(skip_bad_lines=True))) == ["one", "two", "four"]


def test_sidecar_too_deep_names_the_file(tmp_path):
    prefix = tmp_path / "corpus"
    sidecar_path(prefix).write_text('{"format_version": 1,\n "x": ' + DEEP + '}\n')
    with pytest.raises(UserError, match=rf"^{sidecar_path(prefix)}:2: not valid JSON .*nested .*preprocess_data"):
        read_sidecar(prefix)


def test_tokenizer_meta_too_deep_names_the_file(tmp_path):
    (tmp_path / "tokenizer_meta.json").write_text(DEEP)
    with pytest.raises(UserError, match=r"tokenizer_meta\.json:1: not valid JSON .*retrain the tokenizer"):
        load_tokenizer(tmp_path)


def test_hugging_face_config_too_deep_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{\n"model_type": "roberta",\n"x": ' + DEEP + "}")
    with pytest.raises(UserError, match=r"config\.json:3: not valid JSON"):
        read_hf_dir(tmp_path)


def test_read_json_object_wants_an_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match=rf"^{path}: expected a JSON object, found list; fix it"):
        read_json_object(path, "fix it")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match=rf"^{path}: not valid JSON \(not UTF-8 at byte 7\)"):
        read_json_object(path, "fix it")
