"""Diagnostics that say whether pretraining learns: histogram ROC AUC, the RTD prior loss, the
unigram accuracy, MLM accuracy, and the plateau warning (trainer/core/diagnostics.py, trainer/core/step.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.registry import build_config, build_model
from models.rtd import AUC_BINS, AUC_LOGIT_RANGE, logit_histogram
from trainer.core.diagnostics import (PlateauWatch, binary_entropy, context_free_accuracy, context_free_counts,
                                      histogram_auc, target_counts, unigram_accuracy)
from trainer.core.run_dir import baseline_lines
from trainer.core.step import Accumulator

CPU = SimpleNamespace(device=torch.device("cpu"), dp_size=1)  # what Accumulator.reduce reads of the context
VOCAB = 99
WIDTH = 2 * AUC_LOGIT_RANGE / AUC_BINS


def exact_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative) + 0.5 P(equal), over all pairs."""
    greater = (positive[:, None] > negative[None, :]).mean()
    equal = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * equal)


def histogram_auc_of(positive: np.ndarray, negative: np.ndarray) -> float | None:
    scores = torch.tensor(np.concatenate([positive, negative]), dtype=torch.float32)
    is_positive = torch.arange(len(scores)) < len(positive)
    return histogram_auc(logit_histogram(scores, is_positive).numpy(), logit_histogram(scores, ~is_positive).numpy())


def test_histogram_auc_equals_the_exact_auc_on_bin_centres_with_ties():
    rng = np.random.default_rng(0)
    centre = lambda bins: -AUC_LOGIT_RANGE + (bins + 0.5) * WIDTH
    positive = centre(rng.integers(120, 140, 300))  # 20 bins for 300 + 200 scores: many ties
    negative = centre(rng.integers(110, 132, 200))
    assert histogram_auc_of(positive, negative) == pytest.approx(exact_auc(positive, negative), abs=1e-12)
    assert 0.6 < exact_auc(positive, negative) < 0.95


def test_histogram_auc_is_close_to_the_exact_auc_on_continuous_scores():
    rng = np.random.default_rng(1)
    positive, negative = rng.normal(1.0, 2.0, 500), rng.normal(-0.5, 2.0, 700)
    assert histogram_auc_of(positive, negative) == pytest.approx(exact_auc(positive, negative), abs=5e-3)
    assert histogram_auc_of(negative, positive) == pytest.approx(1 - exact_auc(positive, negative), abs=5e-3)


def test_histogram_auc_clamps_the_ends_and_is_absent_without_a_class():
    assert histogram_auc_of(np.array([40.0, 17.0]), np.array([16.5, -3.0])) == pytest.approx(0.75)  # one tie at +16
    assert histogram_auc_of(np.array([]), np.array([0.3, -1.0])) is None
    assert histogram_auc_of(np.array([0.3]), np.array([])) is None
    nan = logit_histogram(torch.tensor([float("nan"), 1.0]), torch.tensor([True, False]))
    assert int(nan.sum()) == 1  # a NaN logit is counted (at 0), never an out-of-range index


def rtd_model():
    cfg = build_config("electra", "debug", vocab_size=VOCAB, seq_length=16)
    torch.manual_seed(0)
    return build_model(cfg).eval()  # dropout off: a sample's logits do not depend on its batch


def rtd_batch(B=4, T=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0
    mask[3, 6:] = 0
    labels = torch.where(torch.rand(B, T, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_index": torch.arange(B)}


def test_rtd_metrics_summed_over_micro_batches_equal_one_batch():
    model, batch = rtd_model(), rtd_batch()
    with torch.no_grad():
        whole = model(**batch)
        halves = [model(**{k: v[s] for k, v in batch.items()}) for s in (slice(0, 2), slice(2, 4))]
    counts = lambda s: {"predicted": (batch["labels"][s] != -100).sum().double(),
                        "tokens": batch["attention_mask"][s].sum().double()}
    one, two = Accumulator(), Accumulator()
    one.add(whole, counts(slice(0, 4)))
    for half, s in zip(halves, (slice(0, 2), slice(2, 4))):
        two.add(half, counts(s))
    m = whole["metrics"]
    assert m["rtd_replaced_histogram"].shape == (AUC_BINS,) and m["rtd_replaced_histogram"].dtype == torch.long
    assert int(m["rtd_replaced_histogram"].sum()) == int(m["rtd_actual_positives"]) > 0
    assert int(m["rtd_original_histogram"].sum()) == int(m["rtd_tokens"]) - int(m["rtd_actual_positives"])
    torch.testing.assert_close(two.metrics["rtd_replaced_histogram"], one.metrics["rtd_replaced_histogram"])
    torch.testing.assert_close(two.metrics["rtd_original_histogram"], one.metrics["rtd_original_histogram"])
    a, b = one.reduce(CPU), two.reduce(CPU)
    assert a["rtd_auc"] == b["rtd_auc"] and 0.0 <= a["rtd_auc"] <= 1.0
    p = float(m["rtd_actual_positives"]) / float(m["rtd_tokens"])
    assert a["rtd_prior_loss"] == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-12)
    assert a["rtd_loss_vs_prior"] == pytest.approx(a["loss_rtd"] / a["rtd_prior_loss"], rel=1e-12)
    assert a["generator_accuracy"] == b["generator_accuracy"] and "mlm_accuracy" not in a


def test_no_replaced_tokens_leave_the_auc_out():
    sums = {"rtd_correct": 10.0, "rtd_tokens": 10.0, "rtd_true_positives": 0.0, "rtd_predicted_positives": 0.0,
            "rtd_actual_positives": 0.0, "mlm_correct": 0.0, "mlm_predicted": 2.0,
            "rtd_replaced_histogram": np.zeros(AUC_BINS), "rtd_original_histogram": np.eye(AUC_BINS)[3] * 10}
    acc = Accumulator()
    acc.add({"loss_sums": {"mlm": torch.tensor(1.0), "rtd": torch.tensor(2.0)}, "loss_weights": {"mlm": 1.0, "rtd": 50.0},
             "normalizers": {"mlm": "predicted", "rtd": "tokens"},
             "metrics": {k: torch.as_tensor(v) for k, v in sums.items()}},
            counts={"predicted": torch.tensor(2.0), "tokens": torch.tensor(10.0)})
    record = acc.reduce(CPU)
    assert "rtd_auc" not in record and "rtd_loss_vs_prior" not in record
    assert record["rtd_prior_loss"] == 0.0 and record["rtd_accuracy"] == 1.0
    assert binary_entropy(1, 2) == pytest.approx(math.log(2)) and binary_entropy(0, 0) is None


def test_unigram_accuracy_of_known_labels():
    first = {"labels": torch.tensor([[5, -100, 5, 7], [7, 5, -100, -100]])}
    second = {"labels": torch.tensor([[9, 9, 9, -100]])}
    counts = target_counts([first], 12)
    assert counts.shape == (12,) and counts[5] == 3 and counts[7] == 2 and counts.sum() == 5
    assert unigram_accuracy(counts.numpy()) == pytest.approx(3 / 5)
    assert unigram_accuracy(np.zeros(12)) is None
    # through the trainer's accumulator, two steps merged into a log window: 9 wins with 3 of 8
    window = Accumulator()
    for batch in (first, second):
        step = Accumulator()
        step.add({"loss_sum": torch.tensor(4.0), "metrics": {"mlm_correct": torch.tensor(1), "mlm_predicted": torch.tensor(4)}})
        step.add_targets([batch], 12)
        step.counts = {"predicted": torch.tensor(4.0), "tokens": torch.tensor(6.0)}
        window.merge(step)
    record = window.reduce(CPU, prefix="valid_")
    assert record["valid_unigram_accuracy"] == pytest.approx(3 / 8)
    assert record["valid_mlm_accuracy"] == pytest.approx(2 / 8) and "valid_generator_accuracy" not in record


@pytest.mark.parametrize("name", ["roberta", "deberta"])
def test_mlm_accuracy_counts_the_argmax_over_the_real_vocabulary(name):
    extra = {"enhanced_mask_decoder": True} if name == "deberta" else {}
    cfg = build_config(name, "debug", vocab_size=VOCAB, seq_length=16, **extra)
    assert cfg.padded_vocab_size > VOCAB
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.lm_head.bias[VOCAB:] = 1e4  # padded columns would win the argmax if they were not masked
    batch = rtd_batch()
    batch.pop("sample_index")
    with torch.no_grad():
        out = model(**batch)
        logits = model.logits(batch["input_ids"], batch["attention_mask"])  # (B, T, V) real vocabulary
    predicted = batch["labels"] != -100
    expected = int((logits.argmax(-1)[predicted] == batch["labels"][predicted]).sum())
    assert int(out["metrics"]["mlm_correct"]) == expected
    assert int(out["metrics"]["mlm_predicted"]) == int(predicted.sum())
    with torch.no_grad():
        token = int(batch["labels"][predicted][0])
        model.lm_head.bias[:VOCAB] = -1e4
        model.lm_head.bias[token] = 1e4  # every prediction is `token` now
        out = model(**batch)
    assert int(out["metrics"]["mlm_correct"]) == int((batch["labels"][predicted] == token).sum()) > 0


def test_plateau_watch_fires_on_the_third_evaluation_and_resets():
    flat = {"valid_loss_rtd": 0.560, "valid_rtd_prior_loss": 0.562, "valid_generator_accuracy": 0.30,
            "valid_unigram_accuracy": 0.05}
    learning = {**flat, "valid_loss_rtd": 0.50}  # 11% below the prior
    watch = PlateauWatch()
    assert watch.update(1, flat) == [] and watch.update(2, flat) == []
    fired = watch.update(3, flat)
    assert len(fired) == 1 and "discriminator is not learning" in fired[0] and "optim.lr" in fired[0]
    assert "optim.generator_lr" in fired[0] and "train.steps" in fired[0]
    assert "\n" not in fired[0]
    assert watch.update(4, flat) == []  # once per streak
    assert watch.update(5, learning) == []  # reset
    assert watch.update(6, flat) == [] and watch.update(7, flat) == []
    assert len(watch.update(8, flat)) == 1
    assert PlateauWatch().update(1, {**flat, "valid_loss_rtd": 0.5560}) == []  # 1.07% below: not flat
    watch = PlateauWatch()
    for step in (1, 2):
        watch.update(step, {**flat, "valid_loss_rtd": 0.60})  # worse than the prior counts as flat
    assert len(watch.update(3, {**flat, "valid_loss_rtd": 0.5570})) == 1


def test_plateau_watch_streaks_continue_across_a_resume():
    """replay(metrics.jsonl's records) restores the streaks: two flat evaluations before a resume and one
    after it warn; a streak that warned before the resume does not warn again."""
    flat = {"valid_loss": 6.0, "valid_loss_rtd": 0.560, "valid_rtd_prior_loss": 0.562}
    history = [{"step": 1, "loss": 6.1}, {"step": 2, **flat}, {"step": 3, "loss": 6.0}, {"step": 4, **flat}]
    watch = PlateauWatch()
    watch.replay(history)
    assert len(watch.update(6, flat)) == 1
    watch = PlateauWatch()
    watch.replay(history + [{"step": 6, **flat}])
    assert watch.update(8, flat) == []
    fresh = PlateauWatch()
    fresh.replay([r for r in history if "valid_loss" not in r])  # training records only: no streak
    assert fresh.update(6, flat) == []


def test_plateau_watch_on_accuracy_at_the_unigram_baseline():
    mlm = {"valid_mlm_accuracy": 0.058, "valid_unigram_accuracy": 0.05}
    watch = PlateauWatch()
    assert watch.update(1, mlm) == [] and watch.update(2, mlm) == []
    fired = watch.update(3, mlm)
    assert len(fired) == 1 and "MLM" in fired[0] and "train.steps" in fired[0]
    watch = PlateauWatch()
    for step in (1, 2):
        assert watch.update(step, mlm) == []
    assert watch.update(3, {**mlm, "valid_mlm_accuracy": 0.07}) == []  # 2 points above: learning
    assert watch.update(4, mlm) == [] and watch.update(5, mlm) == [] and len(watch.update(6, mlm)) == 1
    generator = {"valid_generator_accuracy": 0.05, "valid_unigram_accuracy": 0.05}
    watch = PlateauWatch()
    watch.update(1, generator), watch.update(2, generator)
    fired = watch.update(3, generator)
    assert "generator" in fired[0] and "still learns" not in fired[0]
    learning = {**generator, "valid_loss_rtd": 0.36, "valid_rtd_prior_loss": 0.41}  # the demo's case
    watch = PlateauWatch()
    watch.update(1, learning), watch.update(2, learning)
    fired = watch.update(3, learning)
    assert len(fired) == 1 and "still learns" in fired[0] and "optim.generator_lr" in fired[0]


def test_context_free_accuracy_copies_visible_inputs_and_predicts_the_mode_at_masks():
    """BERT's 80/10/10: a kept token is right by copying it, so a model that reads no context scores above
    the unigram accuracy; with every selected token masked the two baselines are equal."""
    mask = 3
    batch = {"input_ids": torch.tensor([[mask, 8, mask, 6, 2], [mask, mask, 9, 4, 1]]),
             "labels": torch.tensor([[5, 8, 5, 7, -100], [7, 5, 9, 4, -100]])}
    # selected: 8 targets; at [MASK]: 5, 5, 7, 5 (mode 5, 3 of 4); copyable: 8, 9, 4 (kept); 6 for 7 (random)
    counts = context_free_counts([batch], 12, mask)
    masked, copied, hidden = counts["masked_target_counts"], counts["copied_targets"], counts["hidden_target_counts"]
    assert masked.shape == (12,) and masked[5] == 3 and masked[7] == 1 and masked.sum() == 4
    assert float(copied) == 3
    assert hidden[5] == 3 and hidden[7] == 2 and hidden.sum() == 5  # the [MASK]s and the random 6 for 7
    assert context_free_accuracy(masked.numpy(), float(copied), 8) == pytest.approx(6 / 8)
    assert unigram_accuracy(target_counts([batch], 12).numpy()) == pytest.approx(3 / 8)  # 5 wins with 3 of 8
    assert context_free_accuracy(np.zeros(12), 0.0, 0) is None
    # through the accumulator over data-parallel-style sums: the same numbers as a record
    acc = Accumulator()
    acc.add({"loss_sum": torch.tensor(4.0), "metrics": {"mlm_correct": torch.tensor(5), "mlm_predicted": torch.tensor(8)}})
    acc.add_targets([batch], 12, mask)
    acc.counts = {"predicted": torch.tensor(8.0), "tokens": torch.tensor(10.0)}
    record = acc.reduce(CPU, prefix="valid_")
    assert record["valid_context_free_accuracy"] == pytest.approx(6 / 8)
    assert record["valid_unigram_accuracy"] == pytest.approx(3 / 8)
    assert record["valid_hidden_unigram_accuracy"] == pytest.approx(3 / 5)
    # every selected token masked: equal to the unigram accuracy
    all_masked = {"input_ids": torch.where(batch["labels"] != -100, mask, batch["input_ids"]), "labels": batch["labels"]}
    counts = context_free_counts([all_masked], 12, mask)
    masked, copied = counts["masked_target_counts"], counts["copied_targets"]
    assert float(copied) == 0 and torch.equal(counts["hidden_target_counts"], target_counts([all_masked], 12))
    assert context_free_accuracy(masked.numpy(), 0.0, 8) == unigram_accuracy(target_counts([all_masked], 12).numpy())
    without_mask_id = Accumulator()
    without_mask_id.add({"loss_sum": torch.tensor(4.0)})
    without_mask_id.add_targets([batch], 12)
    without_mask_id.counts = {"predicted": torch.tensor(8.0), "tokens": torch.tensor(10.0)}
    assert "context_free_accuracy" not in without_mask_id.reduce(CPU)


@pytest.mark.parametrize("name", ["roberta", "deberta", "electra"])
def test_hidden_accuracy_counts_only_positions_whose_input_is_not_the_target(name):
    """mlm_hidden_correct / mlm_hidden_predicted: the positions a model cannot copy."""
    cfg = build_config(name, "debug", vocab_size=VOCAB, seq_length=16)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model = getattr(model, "generator", model)  # ELECTRA: the generator tower's MLM
    batch = rtd_batch()
    batch.pop("sample_index")
    predicted = batch["labels"] != -100
    kept = predicted & (torch.rand(predicted.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
    batch["input_ids"] = torch.where(predicted & ~kept, 4, batch["input_ids"])  # [MASK] (4) but where kept
    head_bias = model.lm_head.bias
    with torch.no_grad():
        out = model(**batch)
    hidden = predicted & (batch["input_ids"] != batch["labels"])
    assert 0 < int(hidden.sum()) < int(predicted.sum())
    assert int(out["metrics"]["mlm_hidden_predicted"]) == int(hidden.sum())
    token = int(batch["labels"][hidden][0])
    with torch.no_grad():
        head_bias[:VOCAB] = -1e4
        head_bias[token] = 1e4  # every prediction is `token` now
        out = model(**batch)
    assert int(out["metrics"]["mlm_hidden_correct"]) == int((batch["labels"][hidden] == token).sum()) > 0
    assert int(out["metrics"]["mlm_correct"]) == int((batch["labels"][predicted] == token).sum())


def test_plateau_watch_and_summary_read_the_context_free_baseline():
    """An MLM accuracy above the unigram accuracy but at the context-free one is a plateau, and the run's
    summary line names the context-free baseline (older records without it: the unigram accuracy)."""
    copying = {"valid_mlm_accuracy": 0.139, "valid_context_free_accuracy": 0.150, "valid_unigram_accuracy": 0.063}
    watch = PlateauWatch()
    watch.update(1, copying), watch.update(2, copying)
    fired = watch.update(3, copying)
    assert len(fired) == 1 and "context-free accuracy 0.1500" in fired[0] and "MLM" in fired[0]
    learning = {**copying, "valid_mlm_accuracy": 0.17}
    watch = PlateauWatch()
    assert [watch.update(step, learning) for step in (1, 2, 3)] == [[], [], []]
    older = {"valid_mlm_accuracy": 0.139, "valid_unigram_accuracy": 0.063}  # a run from before the metric
    watch = PlateauWatch()
    assert [watch.update(step, older) for step in (1, 2, 3)] == [[], [], []]
    assert baseline_lines([{"step": 1, "loss": 9.0}, {"step": 2, "valid_loss": 6.0, **copying}]) == [
        "last validation MLM accuracy 0.1390 vs context-free accuracy 0.1500 (unigram accuracy 0.0630)"]
    assert baseline_lines([{"step": 2, "valid_loss": 6.0, **older}]) == [
        "last validation MLM accuracy 0.1390 vs unigram accuracy 0.0630"]
    hiding = {**copying, "valid_mlm_hidden_accuracy": 0.061, "valid_hidden_unigram_accuracy": 0.071}
    assert baseline_lines([{"step": 2, "valid_loss": 6.0, **hiding}]) == [
        "last validation MLM accuracy 0.1390 vs context-free accuracy 0.1500 (unigram accuracy 0.0630)",
        "last validation MLM accuracy where the input hides the target 0.0610 vs unigram accuracy there 0.0710"]
    watch = PlateauWatch()  # the direct test: beside the unigram accuracy where the input hides the target
    fired = [m for step in (1, 2, 3) for m in watch.update(step, {**hiding, "valid_mlm_accuracy": 0.5})]
    assert len(fired) == 1 and "where the input hides the target 0.0610" in fired[0] and "0.0710" in fired[0]
    watch = PlateauWatch()
    assert [watch.update(step, {**hiding, "valid_mlm_hidden_accuracy": 0.09}) for step in (1, 2, 3)] == [[], [], []]
    same = {"valid_generator_accuracy": 0.13, "valid_context_free_accuracy": 0.0975, "valid_unigram_accuracy": 0.0975,
            "valid_generator_hidden_accuracy": 0.13, "valid_hidden_unigram_accuracy": 0.0975}
    assert baseline_lines([{"step": 2, "valid_loss": 6.0, **same}]) == [
        "last validation generator accuracy 0.1300 vs context-free accuracy 0.0975"]
