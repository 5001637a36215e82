"""Fine-tuning: GLUE metrics, task files, user errors, classifier heads against Hugging Face, the
demo task builder, and 2-rank DeepSpeed launches of trainer.finetune (two seeds, SiFT on), one of
them preempted and continued."""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.errors import UserError
from data.tasks import TaskFormat, collate, encode, label_ids, label_names, read_examples
from launch import BIN, ROOT, env, free_port, run
from models.classification import (SequenceClassifier, backbone_from_native, config_from_hf, from_hf_state_dict,
                                   hf_config, to_hf_state_dict)
from models.config import DebertaConfig
from models.native import save_native
from models.registry import build_config, build_model
from trainer.finetuning.task_metrics import accuracy, average_ranks, f1, matthews_corrcoef, pearson, spearman, task_metrics


# ----------------------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values():
    preds, labels = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 1, 1, 0])  # TP 2, FP 1, FN 1, TN 2
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    # three classes: (c s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (4*6 - 12) / sqrt(24 * 22)
    assert matthews_corrcoef([0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2]) == pytest.approx(12 / math.sqrt(528))
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction: 0, as scikit-learn
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    assert average_ranks(np.array([3, 1, 2, 2])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    m = task_metrics("classification", 2, np.array([[0.1, 0.9], [2.0, 1.0]]), np.array([1, 1]))
    assert m == {"accuracy": 0.5, "mcc": 0.0, "f1": pytest.approx(2 / 3)}
    r = task_metrics("regression", 1, np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert r["spearman"] == pytest.approx(1.0) and r["mse"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- task files
def test_reading_tsv_csv_jsonl_and_headerless_files(tmp_path):
    (tmp_path / "mrpc.tsv").write_text('label\tsentence1\tsentence2\n1\tHe said "yes\tShe said no\n0\ta\tb\n')
    (tmp_path / "sst.csv").write_text('sentence,label\n"a, quoted, text",pos\nplain,neg\n')
    (tmp_path / "stsb.jsonl").write_text('{"sentence1": "x", "sentence2": "y", "label": 3.8}\n\n'
                                         '{"sentence1": "p", "sentence2": "q", "label": 0}\n')
    (tmp_path / "cola.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                                       "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n")
    pair = read_examples(tmp_path / "mrpc.tsv", TaskFormat())
    assert [e.texts for e in pair] == [('He said "yes', "She said no"), ("a", "b")]  # bare quotes kept
    single = read_examples(tmp_path / "sst.csv", TaskFormat())
    assert single[0].texts == ("a, quoted, text",) and label_names(single, TaskFormat()) == ["neg", "pos"]
    sts = read_examples(tmp_path / "stsb.jsonl", TaskFormat(kind="regression"))
    assert label_ids(sts, TaskFormat(kind="regression"), []).tolist() == pytest.approx([3.8, 0.0])
    cola_format = TaskFormat(columns=["source", "label", "original_label", "sentence"])
    cola = read_examples(tmp_path / "cola.tsv", cola_format)
    assert cola[1].texts == ("The more we study verbs, the crazier they get get.",) and cola[1].label == "0"
    assert label_ids(cola, cola_format, label_names(cola, cola_format)).tolist() == [1, 0]
    assert cola[1].where.endswith("cola.tsv:2")


def test_bad_task_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nmissing a field\n")
    with pytest.raises(UserError, match=r"bad\.tsv:3: 1 fields, the header has 2"):
        read_examples(bad, TaskFormat())
    bad.write_text("text1\tscore\nx\t1\n")
    with pytest.raises(UserError, match=r"bad\.tsv:2: no text column among text1, score"):
        read_examples(bad, TaskFormat())
    with pytest.raises(UserError, match=r"bad\.tsv:2: no column 'label'"):
        read_examples(bad, TaskFormat(text_columns=["text1"]))
    bad.write_text("sentence\tlabel\nx\t0.5\ny\tabc\n")
    examples = read_examples(bad, TaskFormat(kind="regression"))
    with pytest.raises(UserError, match=r"bad\.tsv:3: label 'abc' is not a number"):
        label_ids(examples, TaskFormat(kind="regression"), [])
    with pytest.raises(UserError, match=r"bad\.tsv:3: label 'abc' is not one of the classes 0, 1"):
        label_ids(examples[1:], TaskFormat(labels=["0", "1"]), ["0", "1"])
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected a JSON object"):
        read_examples(tmp_path / "bad.jsonl", TaskFormat())
    with pytest.raises(UserError, match=r"nope\.tsv: no such task file"):
        read_examples(tmp_path / "nope.tsv", TaskFormat())


def test_encoding_truncates_longest_first_and_pads(spm_tokenizer, tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"premise": "word " * 40, "hypothesis": "short text",
                                                      "label": "entailment"}) + "\n")
    examples = read_examples(tmp_path / "pairs.jsonl", TaskFormat())
    tok = spm_tokenizer
    task = encode(examples, np.array([0]), tok, max_length=16, pair_separators=2)
    ids = task.ids[0].tolist()
    hypothesis = tok.encode("short text")
    assert len(ids) == 16 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[-1 - len(hypothesis):-1] == hypothesis and ids[-3 - len(hypothesis):-1 - len(hypothesis)] == [tok.eos_id] * 2
    short = encode(examples[:1] * 2, np.array([0, 1]), tok, max_length=64).ids
    batch = collate(dataclasses.replace(task, ids=[task.ids[0], short[0][:5]], labels=np.array([0, 1])), [0, 1],
                    tok.pad_id)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 11
    assert (batch["input_ids"][1, 5:] == tok.pad_id).all() and batch["labels"].tolist() == [0, 1]


# ----------------------------------------------------------------------------- heads and Hugging Face
@pytest.mark.parametrize("name", ["roberta", "deberta", "electra", "deberta_v3"])
def test_classifier_matches_hugging_face_both_ways(name):
    import transformers

    cfg = build_config(name, "debug", vocab_size=100, seq_length=32, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    pretrained = build_model(cfg).eval()
    sd = pretrained.state_dict()
    if name == "deberta_v3":  # GDES: the classifier must see E_D = E_G + E_Delta
        key = "discriminator.backbone.embeddings.word.gdes_delta.weight"
        sd[key] = torch.randn_like(sd[key]) * 0.02
        pretrained.load_state_dict(sd)
    family, tower, backbone = backbone_from_native(name, cfg, sd)
    model = SequenceClassifier(family, tower, num_labels=3, classifier_dropout=0.0)
    model.backbone.load_state_dict(backbone)  # strict: the backbone's keys exactly
    model.eval()
    pad = tower.pad_token_id
    ids = torch.randint(5, 100, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, 15:], mask[0, 15:] = pad, 0

    encoder = {"roberta": lambda: pretrained.encode(ids, mask), "deberta": lambda: pretrained.encode(ids, mask),
               "electra": lambda: pretrained.discriminator.encode(ids, mask),
               "deberta_v3": lambda: pretrained.discriminator.backbone.encode(ids, mask)}[name]
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.encode(ids, mask), encoder(), atol=1e-5, rtol=1e-5)
        ours = model(ids, mask)

    hf = transformers.AutoModelForSequenceClassification.from_config(hf_config(model, ["a", "b", "c"])).eval()
    assert type(hf).__name__ == {"roberta": "RobertaForSequenceClassification",
                                 "electra": "ElectraForSequenceClassification"}.get(
        name, "DebertaV2ForSequenceClassification")
    result = hf.load_state_dict(to_hf_state_dict(model.state_dict(), family, tower), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, ours, atol=1e-4, rtol=1e-4)

    # and back: a Hugging Face classifier -> ours, head included
    back_family, back_config = config_from_hf(hf.config)
    assert back_family == family and dataclasses.asdict(back_config) == dataclasses.asdict(tower)
    back_backbone, back_head = from_hf_state_dict(hf.state_dict(), back_family, back_config)
    again = SequenceClassifier(back_family, back_config, 3, classifier_dropout=0.0).eval()
    again.backbone.load_state_dict(back_backbone)
    again.head.load_state_dict(back_head)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), ours, atol=1e-6, rtol=1e-6)


def test_layer_wise_lr_decay_groups():
    from trainer.finetuning.train import layer_decay_groups

    config = DebertaConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           max_position_embeddings=64, position_buckets=8, max_relative_positions=16,
                           enhanced_mask_decoder=False)
    model = SequenceClassifier("deberta", config, 2)
    groups = layer_decay_groups(model, weight_decay=0.01, lr=1.0, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.classifier.weight"])] == (1.0, 0.01)
    assert lr_of[id(named["backbone.encoder.layers.1.ffn.up.weight"])] == (0.5, 0.01)
    assert lr_of[id(named["backbone.encoder.layers.0.attention_norm.weight"])] == (0.25, 0.0)
    assert lr_of[id(named["backbone.embeddings.word.weight"])] == (0.125, 0.01)
    assert lr_of[id(named["backbone.encoder.relative_embeddings.weight"])][0] == 0.125
    assert sum(len(g["params"]) for g in groups) == len(named)
    flat = layer_decay_groups(model, weight_decay=0.01, lr=1.0, layer_decay=1.0)
    assert len(flat) == 2 and {g["lr"] for g in flat} == {1.0}


# ----------------------------------------------------------------------------- config and demo task
def test_finetune_config_rejects_mistakes():
    from trainer.finetuning.config import load_finetune_config

    base = ["model.init=x", "data.train=a.tsv", "data.validation=b.tsv"]
    cfg = load_finetune_config("configs/finetune/debug.yaml", base)
    assert cfg.best_metric == "accuracy" and not cfg.sift.enabled
    with pytest.raises(UserError, match="unknown config key sift.lambda"):
        load_finetune_config("configs/finetune/debug.yaml", base + ["sift.lambda=1"])
    with pytest.raises(UserError, match="parallel.tensor=2: fine-tuning runs data-parallel only"):
        load_finetune_config("configs/finetune/debug.yaml", base + ["parallel.tensor=2"])
    with pytest.raises(UserError, match="model.overrides.hidden_size: only hidden_dropout"):
        load_finetune_config("configs/finetune/debug.yaml", base + ["model.overrides={hidden_size: 8}"])
    with pytest.raises(UserError, match="eval.metric='mcc' is not one of"):
        load_finetune_config("configs/finetune/debug.yaml", base + ["data.kind=regression", "eval.metric=mcc"])
    for recipe in Path("configs/finetune").glob("*.yaml"):
        load_finetune_config(str(recipe), base)  # every shipped recipe parses
    # YAML reads CoLA's labels as numbers; class names are text
    assert load_finetune_config("configs/finetune/debug.yaml", base + ["data.labels=[0, 1]"]).data.labels == ["0", "1"]
    with pytest.raises(UserError, match="data.labels\\[0\\] must be str"):
        load_finetune_config("configs/finetune/debug.yaml", base + ["data.labels=[true, 1]"])


def test_random_init_keeps_the_architecture_and_draws_fresh_weights(tmp_path, spm_tokenizer):
    from trainer.finetuning.initial_model import build_classifier, load_initial_model
    from trainer.finetuning.config import load_finetune_config

    cfg_model = build_config("deberta_v3", "debug", vocab_size=spm_tokenizer.vocab_size, seq_length=64,
                             pad_token_id=spm_tokenizer.pad_id)
    torch.manual_seed(0)
    pretrained = build_model(cfg_model).state_dict()
    with torch.no_grad():
        pretrained = {k: v + 0.5 for k, v in pretrained.items()}  # far from any fresh draw
    save_native(tmp_path / "native", "deberta_v3", cfg_model, pretrained)
    base = [f"model.init={tmp_path / 'native'}", "data.train=a.tsv", "data.validation=b.tsv"]
    init = load_initial_model(str(tmp_path / "native"))
    loaded = build_classifier(load_finetune_config("configs/finetune/debug.yaml", base), init, 3, seed=7)
    fresh_cfg = load_finetune_config("configs/finetune/debug.yaml", base + ["model.random_init=true"])
    fresh = build_classifier(fresh_cfg, init, 3, seed=7)
    again = build_classifier(fresh_cfg, init, 3, seed=7)
    other = build_classifier(fresh_cfg, init, 3, seed=8)
    word = "backbone.embeddings.word.weight"
    assert dict(fresh.named_parameters()).keys() == dict(loaded.named_parameters()).keys()  # same architecture
    assert fresh.backbone.config == loaded.backbone.config
    assert torch.equal(loaded.state_dict()[word], init.backbone["embeddings.word.weight"])
    assert not torch.allclose(fresh.state_dict()[word], loaded.state_dict()[word])
    assert abs(float(fresh.state_dict()[word].std()) - cfg_model.discriminator.initializer_range) < 0.005
    for k, v in fresh.state_dict().items():  # drawn from the seed: reproducible, and another seed differs
        assert torch.equal(v, again.state_dict()[k]), k
    assert not torch.equal(fresh.state_dict()[word], other.state_dict()[word])
    with pytest.raises(UserError, match="model.random_init=true needs model.init"):
        load_finetune_config(None, ["data.train=a.tsv", "data.validation=b.tsv", "model.random_init=true"])


def test_build_demo_task_labels_docstrings_by_library(tmp_path):
    from tools.build_demo_task import build_demo_task

    root = tmp_path / "site"
    docs = {}
    for lib, words in (("alpha", "matrix vector"), ("beta", "socket server"), ("gamma", "pixel image")):
        (root / lib).mkdir(parents=True)
        bodies = [f"Compute the {words} number {i} for the caller and return it." for i in range(6)]
        (root / lib / "core.py").write_text("".join(f'def f{i}():\n    """{b}"""\n' for i, b in enumerate(bodies)))
        docs[lib] = bodies
    (root / "delta.py").write_text('"""A single module whose docstring is long enough to keep."""\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for lib in docs for t in docs[lib]))
    summary = build_demo_task(corpus, tmp_path / "task", num_classes=2, per_class=5, validation_fraction=0.3,
                              roots=[root])
    assert summary["classes"] == ["alpha", "beta"] and summary["per_class"] == 5
    rows = [line.split("\t") for split in ("train", "validation")
            for line in (tmp_path / "task" / f"{split}.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 10 and summary["train"] + summary["validation"] == 10
    for text, label in rows:
        assert text in docs[label]  # each docstring labelled with the library it was found in


# ----------------------------------------------------------------------------- 2-rank launch
WORDS = {0: ["array", "matrix", "vector", "dtype", "axis"], 1: ["graph", "node", "edge", "path", "tree"]}


@pytest.mark.parametrize("family", ["roberta", "deberta_v3", "electra"])
def test_mean_pooling_reads_every_real_token_and_ignores_padding(family):
    from models.classification import SequenceClassifier, backbone_from_native

    cfg = build_config(family, "debug", vocab_size=120, seq_length=32, pad_token_id=0)
    torch.manual_seed(0)
    name, backbone_cfg, _ = backbone_from_native(family, cfg, build_model(cfg).state_dict())
    mean = SequenceClassifier(name, backbone_cfg, 3, 0.0, pooling="mean").eval()
    cls = SequenceClassifier(name, backbone_cfg, 3, 0.0, pooling="cls").eval()
    cls.load_state_dict(mean.state_dict())  # the same weights: only what the head reads differs
    ids = torch.tensor([[1, 5, 6, 7, 8, 2, 0, 0], [1, 9, 10, 11, 12, 13, 14, 2]])
    mask = (ids != 0).long()
    with torch.no_grad():
        hidden = mean.backbone.encode(ids, mask)
        expected = torch.stack([hidden[0, :6].mean(0), hidden[1].mean(0)])
        torch.testing.assert_close(mean(ids, mask), mean.head(expected), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cls(ids, mask), cls.head(hidden[:, 0]), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(mean(ids, mask), cls(ids, mask))
        # more padding changes nothing
        padded = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
        torch.testing.assert_close(mean(padded, (padded != 0).long()), mean(ids, mask), rtol=1e-5, atol=1e-6)
        # a change in a middle token moves the mean-pooled logits
        moved = ids.clone()
        moved[0, 3] = 30
        assert not torch.allclose(mean(moved, mask)[0], mean(ids, mask)[0])
    assert mean.describe()["pooling"] == "mean"
    with pytest.raises(UserError, match="pooling 'max' is not one of cls, mean"):
        SequenceClassifier(name, backbone_cfg, 3, pooling="max")
    from models.classification import hf_config
    with pytest.raises(UserError, match="no Hugging Face equivalent"):
        hf_config(mean)


def test_mean_pooling_config_needs_an_export_that_can_hold_it():
    from trainer.finetuning.config import load_finetune_config

    base = ["model.init=x", "data.train=a.tsv", "data.validation=b.tsv"]
    cfg = load_finetune_config("configs/finetune/debug.yaml", base + ["model.pooling=mean", "checkpoint.export=none"])
    assert cfg.model.pooling == "mean"
    assert load_finetune_config("configs/finetune/debug.yaml", base).model.pooling == "cls"
    with pytest.raises(UserError, match="model.pooling=mean has no Hugging Face classifier to export to"):
        load_finetune_config("configs/finetune/debug.yaml", base + ["model.pooling=mean", "checkpoint.export=hf"])
    with pytest.raises(UserError, match="model.pooling"):
        load_finetune_config("configs/finetune/debug.yaml", base + ["model.pooling=max", "checkpoint.export=none"])


@pytest.fixture(scope="module")
def finetune_inputs(tmp_path_factory, spm_tokenizer):
    """A DeBERTaV3 native file, a two-class task, and the overrides of the debug recipe for a 2-rank
    run: two seeds, SiFT on, ZeRO-1, Hugging Face export (run.name is added by each user)."""
    root = tmp_path_factory.mktemp("finetune")
    cfg = build_config("deberta_v3", "debug", vocab_size=spm_tokenizer.vocab_size, seq_length=64,
                       pad_token_id=spm_tokenizer.pad_id)
    torch.manual_seed(0)
    save_native(root / "native", "deberta_v3", cfg, build_model(cfg).state_dict())
    rng = np.random.default_rng(0)

    def rows(n):
        labels = rng.integers(0, 2, n)
        return "sentence\tlabel\n" + "".join(f"the {' '.join(rng.choice(WORDS[y], 5))} here\t{y}\n" for y in labels)

    (root / "train.tsv").write_text(rows(64))
    (root / "validation.tsv").write_text(rows(24))
    overrides = [f"model.init={root / 'native'}", f"data.tokenizer={spm_tokenizer.path}",
                 f"data.train={root / 'train.tsv'}", f"data.validation={root / 'validation.tsv'}",
                 f"run.dir={root / 'runs'}", "train.epochs=2", "train.micro_batch_size=8",
                 "train.global_batch_size=16", "train.seeds=[1,2]", "zero.stage=1", "sift.enabled=true",
                 "sift.weight=2.0", "log.every_steps=1", "optim.lr=2e-3"]
    return root / "runs", overrides


def finetune_cmd(overrides, name: str) -> list:
    return [BIN / "deepspeed", "--num_gpus", 2, "--master_port", free_port(), "--module", "trainer.finetune",
            "--config", "configs/finetune/debug.yaml", *overrides, f"run.name={name}"]


@pytest.fixture(scope="module")
def launched(finetune_inputs):
    """deepspeed --num_gpus 2 --module trainer.finetune, uninterrupted."""
    runs, overrides = finetune_inputs
    proc = run(finetune_cmd(overrides, "ft"))
    return runs / "ft", proc.stdout + proc.stderr


def _records(path: Path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_rank_finetune_writes_metrics_best_checkpoint_and_summary(launched):
    run_dir, output = launched
    best = {}
    for seed in (1, 2):
        records = _records(run_dir / f"seed{seed}")
        train = [r for r in records if "loss" in r]
        assert [r["step"] for r in train] == list(range(1, 9)), "8 steps, logged once (global rank 0)"
        assert all(r["loss_sift"] > 0 and r["loss"] > r["loss_task"] for r in train)
        valid = [r for r in records if "valid_accuracy" in r]
        assert [r["step"] for r in valid] == [4, 8] and {"valid_mcc", "valid_f1"} <= set(valid[0])
        best[seed] = max(r["valid_accuracy"] for r in valid)
        best_dir = run_dir / f"seed{seed}" / "best"
        tag = (best_dir / "latest").read_text()
        assert (best_dir / tag / "manifest.json").is_file()
        assert len([p for p in best_dir.iterdir() if p.name.startswith("global_step")]) == 1, "only the best is kept"
    summary = json.loads((run_dir / "summary.json").read_text())
    values = [best[1], best[2]]
    assert summary["metric"] == "accuracy" and summary["values"] == pytest.approx(values)
    assert summary["mean"] == pytest.approx(np.mean(values)) and summary["std"] == pytest.approx(np.std(values, ddof=1))
    assert f"validation accuracy: {summary['mean']:.4f} ± {summary['std']:.4f}" in output


@pytest.mark.distributed
def test_exported_best_model_loads_in_transformers_with_our_logits(launched):
    import transformers

    run_dir, _ = launched
    seed_dir = run_dir / "seed1"
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(seed_dir / "hf",
                                                                               output_loading_info=True)
    assert type(hf).__name__ == "DebertaV2ForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # ours: the classifier rebuilt from the best DeepSpeed checkpoint's module weights
    tag = (seed_dir / "best" / "latest").read_text()
    states = torch.load(seed_dir / "best" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    describe = states["classifier"]
    ours = SequenceClassifier(describe["family"], DebertaConfig(**describe["config"]), describe["num_labels"],
                              describe["classifier_dropout"])
    ours.load_state_dict(states["module"])
    ours.eval(), hf.eval()
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(seed_dir / "hf")
    texts = ["the graph node edge", "array dtype axis matrix vector and more words here"]
    examples = [dataclasses.make_dataclass("E", ["texts"])((t,)) for t in texts]
    batch = collate(encode(examples, np.array([0, 1]), tok, 32), [0, 1], tok.pad_id)
    with torch.no_grad():
        expected = ours(batch["input_ids"], batch["attention_mask"])
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert hf.config.id2label == {0: "0", 1: "1"}


@pytest.mark.distributed
def test_preempted_finetune_continues_to_the_uninterrupted_result(finetune_inputs, launched):
    """SIGUSR1 to both ranks (as srun delivers it) during seed 1: the seed saves last/ and the job exits
    75. The same command again continues seed 1 from there and runs seed 2: every logged number
    equals the uninterrupted run's. A third time, both seeds are recognised as finished."""
    import psutil

    runs, overrides = finetune_inputs
    reference_dir, _ = launched
    proc = subprocess.Popen(list(map(str, finetune_cmd(overrides, "pre"))), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = runs / "pre" / "seed1" / "metrics.jsonl"
    deadline = time.time() + 180
    # Signal right after seed 1's first step (steps take ~0.1 s here): the seed has 7 more steps, an
    # evaluation and a checkpoint to go, so the stop always lands inside it.
    while not (metrics.is_file() and '"step": 1,' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, "seed 1 did not reach step 1"
        time.sleep(0.02)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "trainer.finetune" in " ".join(p.cmdline()) and "deepspeed.launcher" not in " ".join(p.cmdline())]
    assert len(ranks) == 2
    for rank in ranks:
        rank.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=180)
    assert "SIGUSR1 received: seed 1 saved at step" in output and "exits with return code = 75" in output, output[-3000:]
    seed1 = runs / "pre" / "seed1"
    assert (seed1 / "last" / "latest").is_file() and not (seed1 / "result.json").exists()
    stopped = int((seed1 / "last" / "latest").read_text().removeprefix("global_step"))
    assert 1 <= stopped < 8

    again = run(finetune_cmd(overrides, "pre")).stdout
    assert "seed 1: continuing from" in again and f"at step {stopped + 1}" in again
    assert not (seed1 / "last").exists() and (seed1 / "result.json").is_file()
    for seed in (1, 2):
        ours, reference = _records(runs / "pre" / f"seed{seed}"), _records(reference_dir / f"seed{seed}")
        assert [r["step"] for r in ours] == [r["step"] for r in reference], seed  # each step logged once
        for mine, theirs in zip(ours, reference):
            for key in ("loss", "loss_task", "loss_sift", "valid_accuracy", "valid_mcc"):
                if key in theirs:
                    assert mine[key] == pytest.approx(theirs[key], abs=1e-6), (seed, mine["step"], key)
    summary = json.loads((runs / "pre" / "summary.json").read_text())
    assert summary["values"] == pytest.approx(json.loads((reference_dir / "summary.json").read_text())["values"])

    third = run(finetune_cmd(overrides, "pre")).stdout
    assert "seed 1: finished by an earlier run" in third and "seed 2: finished by an earlier run" in third
    assert json.loads((runs / "pre" / "summary.json").read_text())["values"] == summary["values"]
