"""Curricula over steps: the LR schedules (linear as before, cosine, warmup-stable-decay and its decay
shapes, a stable-phase checkpoint continued into a fresh decay) and the masking-rate curriculum
(data.mask_prob_schedule, per optimizer step, exactly resumable); their bad input.

One real pretraining scenario (three short single-process commands): a WSD run with a masking
curriculum against the same run trained stable to step 4, then resumed with the decay and another
masking phase added: every step's loss and LR, and the final weights, are the same."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.blending import SampleStream
from data.errors import UserError
from data.loader import MaskedSamples, PretrainLoader
from data.masking import IGNORE_INDEX, MaskingRecipe
from data.packing import build_packed
from tests.indexed import write_indexed
from trainer.core.schedule import LRCurve, lr_multipliers
from trainer.pretraining.config import load_config


# ----------------------------------------------------------------------------- LR schedules
def old_linear(warmup_steps, total_steps, min_ratio):
    """The linear schedule as it was before optim.schedule existed (a copy on purpose, to pin it bitwise:
    duplicates pairs it with trainer/core/schedule.py)."""
    def multiplier(i):
        s = i + 1
        if s <= warmup_steps:
            return s / warmup_steps
        remaining = max(0, total_steps - s) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * remaining
    return multiplier


def curve_values(curve, warmup, total, min_ratio):
    f = curve.multiplier(warmup, total, min_ratio)
    return [f(i) for i in range(total + 2)]  # LambdaLR's i = step - 1; two steps past the end


@pytest.mark.parametrize("warmup,total,min_ratio", [(0, 10, 0.0), (4, 12, 0.0), (3, 7, 0.1), (10, 10, 0.05),
                                                    (1, 1000, 1 / 3)])
def test_linear_is_bitwise_the_schedule_of_before(warmup, total, min_ratio):
    old = old_linear(warmup, total, min_ratio)
    assert curve_values(LRCurve(), warmup, total, min_ratio) == [old(i) for i in range(total + 2)]
    cfg = load_config(None, ["data.prefix=x"])
    assert (cfg.optim.schedule, cfg.optim.decay_steps, cfg.optim.decay_start_step) == ("linear", 0, 0)
    towers = ["generator", "shared", "discriminator"]
    joint = lr_multipliers(towers, "joint", 0, warmup, total, min_ratio, LRCurve())
    assert all([f(i) for i in range(total)] == [old(i) for i in range(total)] for f in joint)
    if total > 4:  # two_stage: each stage its own linear schedule, as before
        n = total // 2
        gen, _, disc = lr_multipliers(towers, "two_stage", n, warmup, total, min_ratio)
        first, second = old_linear(min(warmup, n), n, min_ratio), old_linear(min(warmup, total - n), total - n,
                                                                             min_ratio)
        assert [gen(i) for i in range(n)] == [first(i) for i in range(n)]
        assert [disc(i) for i in range(n, total)] == [second(i) for i in range(total - n)]


def test_cosine_warms_up_then_follows_a_cosine_to_min_lr():
    half = lambda x: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x))
    assert curve_values(LRCurve("cosine"), 2, 6, 0.1) == pytest.approx(
        [0.5, 1.0, half(0.25), 0.55, half(0.75), 0.1, 0.1, 0.1])
    assert half(0.25) == pytest.approx(0.868198, abs=1e-6) and half(0.75) == pytest.approx(0.231802, abs=1e-6)


# steps 7..10 of a 10-step run, warmup 2, decay 4 (x = 0.25, 0.5, 0.75, 1), min_lr 0
WSD_DECAY = {"linear": [0.75, 0.5, 0.25, 0.0],
             "cosine": [0.853553, 0.5, 0.146447, 0.0],
             "sqrt": [0.866025, 0.707107, 0.5, 0.0],
             "1-sqrt": [0.5, 0.292893, 0.133975, 0.0]}


@pytest.mark.parametrize("shape", sorted(WSD_DECAY))
def test_wsd_warmup_stable_then_the_decay_shape(shape):
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0] + WSD_DECAY[shape] + [0.0, 0.0]
    by_length = curve_values(LRCurve("wsd", decay_steps=4, decay_shape=shape), 2, 10, 0.0)
    by_start = curve_values(LRCurve("wsd", decay_start_step=6, decay_shape=shape), 2, 10, 0.0)
    both = curve_values(LRCurve("wsd", decay_steps=4, decay_start_step=6, decay_shape=shape), 2, 10, 0.0)
    assert by_length == pytest.approx(expected, abs=1e-6) and by_start == by_length == both
    with_min = curve_values(LRCurve("wsd", decay_steps=4, decay_shape=shape), 2, 10, 0.2)
    assert with_min[6:10] == pytest.approx([0.2 + 0.8 * v for v in WSD_DECAY[shape]], abs=1e-6)


def test_wsd_without_decay_holds_and_a_later_decay_start_continues_it():
    stable = curve_values(LRCurve("wsd"), 2, 6, 0.0)
    assert stable == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # the stable run's checkpoint at step 6, continued to step 10 with the decay starting there: the
    # steps it already took follow the same formula, the new ones decay
    continued = curve_values(LRCurve("wsd", decay_start_step=6, decay_shape="1-sqrt"), 2, 10, 0.0)
    assert continued[:6] == stable[:6]
    assert continued[6:10] == pytest.approx(WSD_DECAY["1-sqrt"], abs=1e-6)


def test_two_stage_takes_cosine_within_each_stage():
    towers = ["generator", "shared", "discriminator"]
    gen, shared, disc = lr_multipliers(towers, "two_stage", 4, 2, 10, 0.0, LRCurve("cosine"))
    stage = LRCurve("cosine").multiplier
    assert [gen(i) for i in range(10)] == [stage(2, 4, 0.0)(i) for i in range(4)] + [0.0] * 6
    assert [disc(i) for i in range(10)] == [0.0] * 4 + [stage(2, 6, 0.0)(i) for i in range(6)]
    assert [shared(i) for i in range(10)] == [gen(i) + disc(i) for i in range(10)]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,key", [
    (["optim.schedule=step"], "optim.schedule='step'"),
    (["optim.schedule=wsd", "optim.decay_shape=exp"], "optim.decay_shape='exp'"),
    (["optim.schedule=wsd", "optim.warmup_steps=10", "optim.decay_steps=95"], "optim.decay_steps=95"),
    (["optim.schedule=wsd", "optim.decay_steps=101", "optim.warmup_steps=0"], "optim.decay_steps=101"),
    (["optim.schedule=wsd", "optim.decay_start_step=100"], "optim.decay_start_step=100"),
    (["optim.schedule=wsd", "optim.decay_start_step=150"], "optim.decay_start_step=150"),
    (["optim.schedule=wsd", "optim.warmup_steps=10", "optim.decay_start_step=5"], "optim.decay_start_step=5"),
    (["optim.schedule=wsd", "optim.decay_start_step=50", "optim.decay_steps=20"], "optim.decay_start_step=50"),
    (["optim.schedule=wsd", "optim.decay_steps=-1"], "optim.decay_steps=-1"),
    (["optim.decay_steps=20"], "optim.decay_steps=20"),
    (["optim.schedule=cosine", "optim.decay_shape=1-sqrt"], "optim.decay_shape=1-sqrt"),
    (["optim.schedule=wsd", "model.name=electra", "train.rtd_schedule=two_stage"], "optim.schedule=wsd"),
    (["data.mask_prob_schedule=[[1, 0.3]]"], "data.mask_prob_schedule"),
    (["data.mask_prob_schedule=[[0, 0.3], [50, 0.2], [50, 0.1]]"], "data.mask_prob_schedule"),
    (["data.mask_prob_schedule=[[0, 0.3], [50, 0.2], [40, 0.1]]"], "data.mask_prob_schedule"),
    (["data.mask_prob_schedule=[[0, 0.3], [50, 1.0]]"], "data.mask_prob_schedule"),
    (["data.mask_prob_schedule=[[0, 0.0]]"], "data.mask_prob_schedule"),
    (["data.mask_prob_schedule=[[0, 0.3], [100, 0.1]]"], "data.mask_prob_schedule"),
    (["data.mask_prob_schedule=[[0, 0.3], [20, 0.1]]", "data.masking=static"], "data.mask_prob_schedule"),
])
def test_bad_curricula_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(UserError) as err:
        load_config(None, ["data.prefix=x", "train.steps=100", *overrides])
    assert key in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_bad_schedule_exits_2_on_the_command_line(capsys):
    from trainer.core.cli import run_cli
    from trainer.pretraining.train import main

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["data.prefix=x", "train.steps=100", "optim.schedule=wsd", "optim.decay_steps=200"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optim.decay_steps=200") and err.count("\n") == 1


def test_good_curricula_load():
    cfg = load_config(None, ["data.prefix=x", "train.steps=100", "optim.schedule=wsd", "optim.decay_steps=20",
                             "optim.decay_shape=1-sqrt", "data.mask_prob_schedule=[[0, 0.3], [30, 0.15], [90, 0.05]]"])
    assert cfg.data.mask_prob_schedule == [(0, 0.3), (30, 0.15), (90, 0.05)]
    assert (cfg.optim.schedule, cfg.optim.decay_steps, cfg.optim.decay_shape) == ("wsd", 20, "1-sqrt")


# ----------------------------------------------------------------------------- masking curriculum
PAD, MASK, VOCAB = 1, 4, 300
SPECIALS = (0, 1, 2, 3, 4)
SCHEDULE = [(0, 0.4), (2, 0.1), (4, 0.25)]  # steps 1-2: 40%, 3-4: 10%, 5-: 25%
RATES = {1: 0.4, 2: 0.4, 3: 0.1, 4: 0.1, 5: 0.25, 6: 0.25}


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, VOCAB, size=n).astype(np.int64) for n in rng.integers(20, 200, size=80)]
    dataset = write_indexed(tmp_path_factory.mktemp("curricula") / "c", docs)
    return SampleStream([build_packed("doc_sentences", dataset, 0, len(docs), 64, 0, 2)], seed=3)


def masked(stream, schedule=(), **kw):
    recipe = MaskingRecipe(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, mask_prob=0.15, **kw)
    return MaskedSamples(stream, recipe, 64, PAD, seed=3, mask_prob_schedule=schedule)


def steps_of(loader, count, **kw):
    return [loader.next_step(**kw) for _ in range(count)]


def rate(step_batches):
    labels = torch.cat([b["labels"] for b in step_batches])
    inputs = torch.cat([b["attention_mask"] for b in step_batches])
    candidates = int(inputs.sum()) - 2 * labels.shape[0]  # every doc_sentences row: <s> piece </s>
    return int((labels != IGNORE_INDEX).sum()) / candidates


@pytest.mark.parametrize("tokens_per_step", [0, 900])
def test_the_masking_rate_follows_the_step_and_resumes_exactly(stream, tokens_per_step):
    kw = dict(global_batch=32, micro_batch=8, dp_rank=0, dp_size=1, tokens_per_step=tokens_per_step)
    samples = masked(stream, SCHEDULE)
    loader = PretrainLoader(samples, **kw)
    steps = steps_of(loader, 6)
    for step, batches in enumerate(steps, start=1):
        assert rate(batches) == pytest.approx(RATES[step], abs=0.01), step
    # the same draws at another rate: a constant loader at the phase's rate masks the same rows alike
    constant = PretrainLoader(masked(stream, [(0, 0.1)]), **kw)
    again = steps_of(constant, 4)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(steps[2], again[2]) for k in a)
    assert not torch.equal(steps[0][0]["labels"], again[0][0]["labels"])

    # resumed in phase 2 from the consumed count alone (the step derived), and with the step given
    for state in ({"consumed_samples": sum(len(b["sample_index"]) for s in steps[:3] for b in s)},):
        resumed = PretrainLoader(samples, **kw)
        resumed.load_state_dict(state)
        assert all(torch.equal(a[k], b[k]) for s, r in zip(steps[3:], steps_of(resumed, 3)) for a, b in zip(s, r)
                   for k in a)
        told = PretrainLoader(samples, **kw)
        told.load_state_dict({**state, "step": 3})
        assert all(torch.equal(a[k], b[k]) for s, r in zip(steps[3:], steps_of(told, 3)) for a, b in zip(s, r)
                   for k in a)


def test_the_step_reaches_loader_workers_and_can_be_passed(stream):
    kw = dict(global_batch=16, micro_batch=8, dp_rank=1, dp_size=2)
    samples = masked(stream, SCHEDULE)
    plain = steps_of(PretrainLoader(samples, **kw), 5)
    workers = PretrainLoader(samples, num_workers=1, **kw)
    assert all(torch.equal(a[k], b[k]) for s, w in zip(plain, steps_of(workers, 5)) for a, b in zip(s, w)
               for k in a)
    told = PretrainLoader(samples, **kw)
    told.load_state_dict({"consumed_samples": 16 * 4})
    assert all(torch.equal(a[k], b[k]) for a, b in zip(plain[4], told.next_step(step=5)) for k in a)


# ----------------------------------------------------------------------------- a real run, continued
def pretrain(prefix, runs: Path, name: str, steps: int, *extra: str):
    from tests.launch import run

    values = {"model.name": "deberta_v3", "model.size": "debug", "data.prefix": prefix, "data.seq_length": 32,
              "data.valid_fraction": 0.0, "run.dir": runs, "run.name": name, "train.steps": steps,
              "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.seed": 5, "optim.lr": 2e-3,
              "optim.warmup_steps": 2, "optim.schedule": "wsd", "log.every_steps": 1,
              "checkpoint.every_steps": 4, "eval.every_steps": 0, "zero.stage": 1,
              "data.packing": "packed_documents"}  # document-masked rows resume exactly too
    return run([sys.executable, "-m", "trainer.pretrain", *(f"{k}={v}" for k, v in values.items()), *extra])


def test_a_stable_checkpoint_continues_into_a_decay_and_a_new_masking_phase(tiny_bpe_prefix, tmp_path):
    """Reference: 8 steps, decay after step 4 (1-sqrt), masks 30% / 15% after step 2 / 5% after step 6.
    Continued: 4 stable steps with masks 30% / 15% (checkpoint at step 4, masking phase 2), then the same
    command resumed with train.steps=8, the decay start and the third masking phase."""
    from tests.launch import train_records
    from trainer.convert.export import locate, read_checkpoint

    decay = ["optim.decay_shape=1-sqrt", "optim.min_lr=2e-4"]
    pretrain(tiny_bpe_prefix, tmp_path, "reference", 8, "optim.decay_start_step=4", *decay,
             "data.mask_prob_schedule=[[0, 0.3], [2, 0.15], [6, 0.05]]")
    pretrain(tiny_bpe_prefix, tmp_path, "continued", 4, *decay, "data.mask_prob_schedule=[[0, 0.3], [2, 0.15]]")
    out = pretrain(tiny_bpe_prefix, tmp_path, "continued", 8, "optim.decay_start_step=4", *decay,
                   "data.mask_prob_schedule=[[0, 0.3], [2, 0.15], [6, 0.05]]")
    assert "at step 4" in out.stdout + out.stderr
    reference, continued = train_records(tmp_path / "reference"), train_records(tmp_path / "continued")
    assert sorted(reference) == sorted(continued) == list(range(1, 9))
    assert [continued[s]["loss"] for s in range(1, 9)] == [reference[s]["loss"] for s in range(1, 9)]
    assert all(0.5 < reference[s]["packing_efficiency"] <= 1.0 for s in range(1, 9))  # whole documents per row
    # the logged LR of step s is the one its update used: the multiplier of i = s - 1 steps taken
    peak, floor = 2e-3, 2e-4
    formula = LRCurve("wsd", decay_start_step=4, decay_shape="1-sqrt").multiplier(2, 8, floor / peak)
    for s in range(1, 9):
        assert continued[s]["lr"] == reference[s]["lr"] == pytest.approx(peak * formula(s - 1), rel=1e-12), s
    assert reference[1]["lr"] == pytest.approx(peak / 2) and reference[8]["lr"] == pytest.approx(floor)  # W=2; T
    a, b = (read_checkpoint(locate(tmp_path / name)).state_dict for name in ("reference", "continued"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_a_new_peak_lr_follows_it(tiny_bpe_prefix, tmp_path):
    """optim.lr changed on resume (lowered after a loss spike, say): the steps after the checkpoint follow the
    new peak through the same schedule and the log says so. LambdaLR's state holds the base LRs the saving run
    was built with; loaded as they are, the old peak would go on."""
    from tests.launch import train_records

    pretrain(tiny_bpe_prefix, tmp_path, "lowered", 4)  # warmup 2, then stable at 2e-3 (wsd, no decay)
    out = pretrain(tiny_bpe_prefix, tmp_path, "lowered", 6, "optim.lr=1e-3")  # generator_lr follows lr
    assert "at step 4" in out.stdout + out.stderr
    assert "optim.lr changed since the checkpoint" in out.stdout + out.stderr
    records = train_records(tmp_path / "lowered")
    assert records[3]["lr"] == pytest.approx(2e-3)  # the first launch's
    assert records[5]["lr"] == pytest.approx(1e-3) and records[6]["lr"] == pytest.approx(1e-3)

