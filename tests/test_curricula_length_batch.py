"""The sequence-length curriculum (data.seq_length_schedule) and the batch-size warmup in tokens
(train.batch_warmup_steps / _start): rows of each phase's length from that length's own sample stream, the
token budget of every step against hand-computed values, bitwise resume across a phase change and mid-warmup
(with and without the checkpoint's phase_start), the trainer's inputs wiring, and the bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.blending import SampleStream
from data.errors import UserError
from data.loader import MaskedSamples, PretrainLoader, batch_budget
from data.masking import MaskingRecipe
from data.packing import build_packed
from tests.indexed import write_indexed
from trainer.pretraining.config import load_config

PAD, MASK, VOCAB, SEED = 1, 4, 300, 3
SPECIALS = (0, 1, 2, 3, 4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, VOCAB, size=n).astype(np.int64) for n in rng.integers(10, 150, size=120)]
    return write_indexed(tmp_path_factory.mktemp("length_batch") / "c", docs)


@pytest.fixture(scope="module")
def one_text(tmp_path_factory):
    """One document of 9300 tokens: full_sentences rows of 32 (30 + 2) and of 64 (62 + 2) are all full."""
    doc = np.random.default_rng(1).integers(5, VOCAB, size=9300).astype(np.int64)
    return write_indexed(tmp_path_factory.mktemp("one_text") / "t", [doc])


def samples_at(dataset, length, packing="full_sentences", schedule=()):
    stream = SampleStream([build_packed(packing, dataset, 0, len(dataset.document_indices) - 1, length, 0, 2)],
                          seed=SEED)
    recipe = MaskingRecipe(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, mask_prob=0.15)
    return MaskedSamples(stream, recipe, length, PAD, seed=SEED, pad_to_multiple_of=8, mask_prob_schedule=schedule)


def loader_of(dataset, phases, budget, packing="full_sentences", dp_rank=0, dp_size=1, warmup=(0, 1.0),
              schedule=()):
    """phases: [(n_k, L_k)], n_0 = 0."""
    parts = [samples_at(dataset, length, packing, schedule) for _, length in phases]
    return PretrainLoader(parts[0], 8, 4, dp_rank, dp_size, tokens_per_step=budget,
                          length_phases=[(n, s) for (n, _), s in zip(phases[1:], parts[1:])],
                          batch_warmup_steps=warmup[0], batch_warmup_start=warmup[1])


def steps_of(loader, count):
    return [loader.next_step() for _ in range(count)]


def same(a_steps, b_steps):
    return (len(a_steps) == len(b_steps) and all(
        len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                 for x, y in zip(a, b)) for a, b in zip(a_steps, b_steps)))


def tokens(step):
    return sum(int((b["attention_mask"] != 0).sum()) for b in step)


# ----------------------------------------------------------------------------- sequence length in phases
def test_each_phase_takes_rows_of_its_length_from_its_own_stream_at_constant_tokens(one_text):
    """Steps 1-3 at 32 tokens, 4-6 at 64: full_sentences rows are full, so a 512-token budget takes 16 and
    then 8 rows per step; phase 2's first row is position 0 of the 64-token stream, at global index 48."""
    dataset = one_text
    loader = loader_of(dataset, [(0, 32), (3, 64)], 512)
    steps = steps_of(loader, 6)
    for number, step in enumerate(steps, start=1):
        length = 32 if number <= 3 else 64
        rows = torch.cat([b["attention_mask"] for b in step])
        assert rows.shape == (512 // length, length), number
        assert tokens(step) == 512, number
    assert loader.consumed_samples == 3 * 16 + 3 * 8
    indices = torch.cat([b["sample_index"] for s in steps for b in s])
    assert indices.tolist() == list(range(72)), "global indices stay the run's consumed-sample stream"
    long_stream = samples_at(dataset, 64).stream
    first = steps[3][0]
    for row in range(4):  # unmasked positions hold the 64-token stream's samples 0..3 (its shuffled order)
        corpus, sample = long_stream.locate([row])
        expected = torch.from_numpy(long_stream.tokens(int(corpus[0]), int(sample[0])))
        keep = first["labels"][row] == -100
        assert torch.equal(first["input_ids"][row][keep], expected[keep]), row
    # the short phase reads the 32-token stream from position 0 as a run without the curriculum does
    plain = PretrainLoader(samples_at(dataset, 32), 8, 4, 0, 1, tokens_per_step=512)
    assert same(steps[:3], steps_of(plain, 3))


def test_packed_documents_phases_keep_tokens_per_step_near_the_budget(dataset):
    loader = loader_of(dataset, [(0, 64), (2, 128)], 1024, packing="packed_documents")
    for number, step in enumerate(steps_of(loader, 4), start=1):
        length = 64 if number <= 2 else 128
        assert all(b["attention_mask"].shape[1] <= length for b in step)
        assert any(b["attention_mask"].shape[1] > 64 for b in step) == (number > 2)
        assert 1024 - length < tokens(step) <= 1024, number
        assert 0.5 < loader.last_step_packing_efficiency <= 1.0


def test_without_a_token_budget_every_phase_takes_the_global_batch_and_resumes_bitwise(dataset):
    """BERT's recipe: the same 8 rows per step at 32 then (after step 3) 64 tokens, so tokens per step grow with
    the length; phase 2 reads the 64-token stream from its start at global index 24, and a loader resumed at
    each step (with or without its phase_start) replays the uninterrupted one."""
    def fixed(**kw):
        return loader_of(dataset, [(0, 32), (3, 64)], 0, "doc_sentences", **kw)

    steps = steps_of(fixed(), 6)
    for number, step in enumerate(steps, start=1):
        assert [b["attention_mask"].shape[0] for b in step] == [4, 4], number  # global batch 8, micro-batch 4
        assert max(b["attention_mask"].shape[1] for b in step) <= (32 if number <= 3 else 64), number
    assert any(b["attention_mask"].shape[1] > 32 for step in steps[3:] for b in step)
    assert torch.cat([b["sample_index"] for s in steps for b in s]).tolist() == list(range(48))
    plain = steps_of(loader_of(dataset, [(0, 64)], 0, "doc_sentences"), 1)[0]  # the 64-token stream from 0
    for ours, theirs in zip(steps[3], plain):  # the same rows (masks differ: they follow the global index)
        original = torch.where(ours["labels"] != -100, ours["labels"], ours["input_ids"])
        assert torch.equal(original, torch.where(theirs["labels"] != -100, theirs["labels"], theirs["input_ids"]))
    for taken in (2, 3, 4):
        first = fixed()
        steps_of(first, taken)
        saved = first.state_dict()
        for state in (saved, {"consumed_samples": saved["consumed_samples"], "step": taken}):
            resumed = fixed()
            resumed.load_state_dict(state)
            assert same(steps[taken:], steps_of(resumed, 6 - taken)), (taken, state)


# ----------------------------------------------------------------------------- batch-size warmup
def test_the_warmup_budget_rises_linearly_to_the_budget():
    # T = 1024, N = 4, a = 256: 256 + 768 (s - 1) // 4
    assert [batch_budget(1024, 4, 0.25, s) for s in range(1, 8)] == [256, 448, 640, 832, 1024, 1024, 1024]
    assert [batch_budget(4608, 3, 1 / 6, s) for s in (1, 2, 3, 4)] == [768, 768 + 1280, 768 + 2560, 4608]
    assert batch_budget(1024, 0, 0.25, 1) == batch_budget(1024, 4, 0.25, None) == 1024


def test_steps_take_the_warmup_budget_then_the_full_one(one_text):
    loader = loader_of(one_text, [(0, 32)], 1024, warmup=(4, 0.25))
    counts, budgets = [], []
    for _ in range(6):
        budgets.append(tokens(loader.next_step()))
        counts.append(loader.last_step_samples)
    assert budgets == [256, 448, 640, 832, 1024, 1024]  # full 32-token rows: exactly the budget
    assert counts == [8, 14, 20, 26, 32, 32]


# ----------------------------------------------------------------------------- exact resume
CURRICULUM = dict(phases=[(0, 32), (3, 64), (6, 48)], budget=768, warmup=(4, 0.5), packing="doc_sentences",
                  schedule=[(0, 0.3), (5, 0.1)])


def curriculum_loader(dataset, **kw):
    c = CURRICULUM
    return loader_of(dataset, c["phases"], c["budget"], c["packing"], warmup=c["warmup"], schedule=c["schedule"],
                     **kw)


@pytest.mark.parametrize("taken", [2, 3, 4, 5, 7])  # mid-warmup, at and after each phase change
def test_a_resumed_loader_replays_the_uninterrupted_one_bitwise(dataset, taken):
    reference = curriculum_loader(dataset)
    steps = steps_of(reference, 9)
    first = curriculum_loader(dataset)
    steps_of(first, taken)
    saved = first.state_dict()
    assert ("phase_start" in saved) and saved["consumed_samples"] == sum(len(b["sample_index"]) for s in steps[:taken]
                                                                         for b in s)
    for state in (saved, {**saved, "step": taken}, {"consumed_samples": saved["consumed_samples"]},
                  {"consumed_samples": saved["consumed_samples"], "step": taken}):  # the last two replay the plans
        resumed = curriculum_loader(dataset)
        resumed.load_state_dict(state)
        assert same(steps[taken:], steps_of(resumed, 9 - taken)), state
        assert resumed.state_dict() == reference.state_dict()


def test_data_parallel_ranks_split_each_phase_and_workers_agree(dataset):
    whole = steps_of(curriculum_loader(dataset), 8)
    ranks = [steps_of(curriculum_loader(dataset, dp_rank=r, dp_size=2), 8) for r in (0, 1)]
    for number in range(8):
        mine = [torch.cat([b["sample_index"] for b in ranks[r][number]]) for r in (0, 1)]
        assert torch.cat(mine).tolist() == torch.cat([b["sample_index"] for b in whole[number]]).tolist()
        assert len(ranks[0][number]) == len(ranks[1][number])
    workers = curriculum_loader(dataset, dp_rank=1, dp_size=2)
    workers.num_workers = 1
    assert same(ranks[1], steps_of(workers, 8))


def test_the_trainer_inputs_build_a_stream_per_phase(tiny_bpe_prefix, tmp_path):
    from trainer.core.parallel import ParallelContext
    from trainer.pretraining.inputs import build_inputs, resolve_tokenizer

    cfg = load_config(None, [f"data.prefix={tiny_bpe_prefix}", "data.seq_length=64", "data.packing=full_sentences",
                             "data.seq_length_schedule=[[0, 32], [2, 64]]", "train.tokens_per_step=256",
                             "train.batch_warmup_steps=2", "train.batch_warmup_start=0.5", "train.steps=4",
                             "optim.warmup_steps=0", "train.micro_batch_size=4", f"data.cache_dir={tmp_path}", "data.valid_fraction=0.05"])
    ctx = ParallelContext(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                          device=torch.device("cpu"))
    inputs = build_inputs(cfg, ctx, resolve_tokenizer(cfg))
    shapes = [torch.cat([b["attention_mask"] for b in inputs.loader.next_step()]).shape for _ in range(4)]
    assert shapes == [(4, 32), (6, 32), (4, 64), (4, 64)]  # budgets 128, 192, 256, 256
    assert inputs.valid.seq_length == 64 and inputs.valid[0]["attention_mask"].shape == (64,)


def test_a_run_killed_in_its_second_length_phase_replays_it_bitwise(tiny_bpe_prefix, tmp_path):
    """Real runs (one process each): 12 steps at 32 then (after step 2) 64 tokens, the budget warming up over
    3 steps, checkpoints every 4 steps. A second run of the same command is SIGKILLed once it has logged step 5
    (phase 2, warmup over) and started again: it resumes from its last checkpoint (step 4 or 8) and every
    step's loss and token count, and the final weights, are those of the uninterrupted run."""
    import os
    import signal
    import sys

    from tests.launch import run, start_group, train_records, wait_for_step
    from trainer.convert.export import locate, read_checkpoint

    def command(name):
        values = {"model.name": "deberta_v3", "model.size": "debug", "data.prefix": tiny_bpe_prefix,
                  "data.seq_length": 64, "data.seq_length_schedule": "[[0, 32], [2, 64]]",
                  "data.valid_fraction": 0.0, "data.packing": "packed_documents",
                  "data.mask_prob_schedule": "[[0, 0.3], [3, 0.15]]", "train.tokens_per_step": 384,
                  "train.batch_warmup_steps": 3, "train.batch_warmup_start": 0.5, "run.dir": tmp_path,
                  "run.name": name, "train.steps": 12, "train.micro_batch_size": 4, "train.global_batch_size": 4,
                  "train.seed": 5, "optim.lr": 2e-3, "optim.warmup_steps": 1, "log.every_steps": 1,
                  "checkpoint.every_steps": 4, "eval.every_steps": 0, "zero.stage": 1}
        return [sys.executable, "-m", "trainer.pretrain", *(f"{k}={v}" for k, v in values.items())]

    run(command("reference"))
    reference = train_records(tmp_path / "reference")
    budgets, lengths = [192, 256, 320, 384, 384, 384], [32, 32, 64, 64, 64, 64]  # 192 + 192 (s - 1) // 3
    for step in range(1, 7):
        taken = reference[step]["consumed_tokens"] - (reference[step - 1]["consumed_tokens"] if step > 1 else 0)
        assert budgets[step - 1] - lengths[step - 1] < taken <= budgets[step - 1], step
    proc = start_group(command("killed"))
    wait_for_step(tmp_path / "killed", 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = max(train_records(tmp_path / "killed"))
    assert killed_at < 12, "the run finished before the kill: nothing was tested"
    out = run(command("killed"))
    assert "resumed from" in out.stdout + out.stderr
    resumed = train_records(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 13))
    keys = ("loss", "grad_norm", "consumed_samples", "consumed_tokens")
    for step in range(1, 13):
        assert {k: resumed[step][k] for k in keys} == {k: reference[step][k] for k in keys}, step
    final = read_checkpoint(locate(tmp_path / "reference")).state_dict
    again = read_checkpoint(locate(tmp_path / "killed")).state_dict
    assert final.keys() == again.keys()
    assert [k for k in final if not torch.equal(final[k], again[k])] == []


# ----------------------------------------------------------------------------- bad input
LENGTHS = "data.seq_length_schedule"


@pytest.mark.parametrize("overrides,message", [
    (["train.tokens_per_step=4096", "data.seq_length_schedule=[[10, 128], [50, 512]]"], f"{LENGTHS} must start at"),
    (["train.tokens_per_step=4096", "data.seq_length_schedule=[[0, 128], [50, 256], [50, 512]]"],
     f"{LENGTHS} steps must increase"),
    (["train.tokens_per_step=4096", "data.seq_length_schedule=[[0, 128], [50, 256], [30, 512]]"],
     f"{LENGTHS} steps must increase"),
    (["train.tokens_per_step=4096", "data.seq_length_schedule=[[0, 128], [100, 512]]"],
     f"{LENGTHS} point at step 100 is beyond the run"),
    (["train.tokens_per_step=4096", "data.seq_length_schedule=[[0, 128], [90, 1024]]"],
     f"{LENGTHS} length 1024 (at step 90) must be in [8, data.seq_length=512]"),
    (["train.tokens_per_step=4096", "data.seq_length_schedule=[[0, 4], [90, 512]]"], f"{LENGTHS} length 4"),
    (["train.tokens_per_step=4096", "data.seq_length_schedule=[[0, 128], [90, 512]]", "data.packing=segment_pair",
      "model.name=deberta"], f"{LENGTHS} supports"),
    (["train.batch_warmup_steps=10"], "train.batch_warmup_steps needs train.tokens_per_step"),
    (["train.tokens_per_step=4096", "train.batch_warmup_steps=100"], "train.batch_warmup_steps=100 must be in"),
    (["train.tokens_per_step=4096", "train.batch_warmup_steps=-1"], "train.batch_warmup_steps=-1 must be in"),
    (["train.tokens_per_step=4096", "train.batch_warmup_steps=10", "train.batch_warmup_start=0"],
     "train.batch_warmup_start=0.0 must be in (0, 1]"),
    (["train.tokens_per_step=4096", "train.batch_warmup_steps=10", "train.batch_warmup_start=1.5"],
     "train.batch_warmup_start=1.5 must be in (0, 1]"),
])
def test_bad_curricula_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(None, ["data.prefix=x", "train.steps=100", "data.seq_length=512", *overrides])
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_a_warmup_budget_below_a_row_per_rank_is_refused():
    cfg = load_config(None, ["data.prefix=x", "train.steps=100", "data.seq_length=512", "train.tokens_per_step=4096",
                             "train.micro_batch_size=4", "train.global_batch_size=8",
                             "data.seq_length_schedule=[[0, 128], [5, 512]]", "train.batch_warmup_steps=10",
                             "train.batch_warmup_start=0.125"])
    assert cfg.check_batch(2) == 1  # step 1: 512 >= 128 x 2; step 6 (the 512 phase): 512 + 3584 x 5 // 10 = 2304
    cfg.train.batch_warmup_start = 0.05  # step 1: 205 tokens < 128 x 2
    with pytest.raises(UserError, match="train.batch_warmup_start=0.05 gives step 1"):
        cfg.check_batch(2)


def test_a_bad_length_schedule_exits_2_on_the_command_line(capsys):
    from trainer.core.cli import run_cli
    from trainer.pretraining.train import main

    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["data.prefix=x", "train.steps=100", "data.seq_length=128", "train.tokens_per_step=4096",
                       "data.seq_length_schedule=[[0, 128], [90, 512]]"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.seq_length_schedule length 512") and err.count("\n") == 1
