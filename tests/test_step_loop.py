"""The step loop's own bookkeeping (trainer/core/loop.py); the loop itself runs in every training test."""
import pytest
import torch

from trainer.core.loop import BadStepGuard, LogWindow, TrainingDiverged
from trainer.core.step import Accumulator


def test_bad_step_guard_counts_skips_resets_on_a_good_step_and_stops_at_the_limit():
    guard = BadStepGuard(limit=3, skipped=5, in_a_row=1, where="seed 2 ")  # as restored from a checkpoint
    guard.update(True, 10)
    guard.update(False, 11)
    assert (guard.skipped, guard.in_a_row) == (6, 0)
    guard.update(True, 12)
    guard.update(True, 13)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .* seed 2 step 14"):
        guard.update(True, 14)
    assert guard.skipped == 9


def _step(loss: float, tokens: float, samples: float) -> dict:
    acc = Accumulator()
    acc.add({"loss_sum": torch.tensor(loss)})
    acc.counts = {"predicted": torch.tensor(2.0, dtype=torch.float64)}
    return {"acc": acc, "tokens": torch.tensor(tokens), "samples": torch.tensor(samples)}


def test_log_window_keeps_finite_steps_losses_and_every_steps_tokens():
    window = LogWindow()
    window.add(_step(4.0, 10, 2), bad=False)
    window.add(_step(float("nan"), 30, 6), bad=True)  # skipped: its tokens were read, its loss is not kept
    assert float(window.acc.terms["mlm"]) == 4.0
    assert float(window.acc.counts["predicted"]) == 2.0
    assert (float(window.tokens), float(window.samples)) == (40.0, 8.0)
    rates = window.rates()
    assert rates["tokens_per_sec"] == pytest.approx(5 * rates["samples_per_sec"])
