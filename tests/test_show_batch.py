"""tools/show_batch.py: the printed samples are the training loader's, brackets mark exactly the predicted tokens."""
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.masking import IGNORE_INDEX
from data.preprocess import preprocess
from tests.launch import ROOT, env
from tools.show_batch import DOCUMENT_SEPARATOR, main, render_document, visible
from trainer.core.cli import run_cli
from trainer.core.parallel import ParallelContext
from trainer.pretraining.config import load_config
from trainer.pretraining.inputs import build_inputs, resolve_tokenizer

BRACKETS = re.compile(r"\[\[(.*?)\]\]")


@pytest.fixture(scope="module")
def prefixes(demo_corpus, bpe_tokenizer, spm_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("show_batch")
    out = {}
    for name, tok in (("bpe", bpe_tokenizer), ("spm", spm_tokenizer)):
        preprocess([demo_corpus.path], tok.path, root / name, workers=1)
        out[name] = str(root / name)
    return out


RECIPES = {"bpe": "configs/pretrain/roberta_debug.yaml", "spm": "configs/pretrain/deberta_v3_debug.yaml"}


def args_of(prefixes, kind, *overrides):
    return ["--config", RECIPES[kind], f"data.prefix={prefixes[kind]}", *overrides]


def shown(capsys, argv):
    """{global index: (sample line text, input line text)} and the step lines, from an in-process main()."""
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    samples, inputs = {}, {}
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind in ("sample", "input"):
            index, _, text = rest.partition(": ")
            (samples if kind == "sample" else inputs)[int(index)] = text
    assert samples.keys() == inputs.keys()
    return {i: (samples[i], inputs[i]) for i in samples}, [line for line in lines if line.startswith("step ")]


def loader_steps(prefixes, kind, steps, *overrides):
    """The training loader's rows of steps 1..steps, read step after step (no positioning by the tool)."""
    cfg = load_config(RECIPES[kind], [f"data.prefix={prefixes[kind]}", *overrides])
    ctx = ParallelContext(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                          device=torch.device("cpu"))
    tokenizer = resolve_tokenizer(cfg)
    loader = build_inputs(cfg, ctx, tokenizer).loader
    batches = [loader.next_step() for _ in range(steps)]
    merged = [{k: torch.cat([b[k] for b in step]) for k in step[0]} for step in batches]
    return tokenizer, merged


def segments(tokenizer, ids, selected):
    """(outside, inside, outside, ...) texts of a row's maximal selected runs, each decoded on its own (as
    the printed line splits at its brackets: empty outside pieces at the ends when a run is there)."""
    cuts = [0] + [k for k in range(1, len(ids)) if selected[k] != selected[k - 1]] + [len(ids)]
    if selected[0]:
        cuts = [0] + cuts
    pieces = [tokenizer.decode(ids[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return pieces + [""] if selected[-1] else pieces


def bare(text):
    """Text without its whitespace, shown or not (the tool moves spaces at a bracket's inside outside it)."""
    return re.sub(r"\s|\\[ntr]", "", visible(text))


def bracketed(pieces):
    """(outside, inside, outside, ...) pieces joined into the line they should print as. The printed line is
    compared whole with it: splitting it at "[[" / "]]" is ambiguous where the text itself has a bracket
    next to a run ('[[["' opens a run then has '["', or has '[' then opens one)."""
    return "".join(piece + ("[[", "]]")[k % 2] for k, piece in enumerate(pieces[:-1])) + pieces[-1]


def check_rows(tokenizer, batch, printed):
    """Every printed row is the loader's: same indices; brackets around exactly the labelled runs; the
    input line is input_ids decoded. Returns how many rows could be compared piece by piece."""
    assert sorted(printed) == batch["sample_index"].tolist()
    compared = 0
    for row, index in enumerate(batch["sample_index"].tolist()):
        sample, given = printed[index]
        keep = batch["attention_mask"][row].numpy() > 0
        inputs, labels = batch["input_ids"][row].numpy()[keep], batch["labels"][row].numpy()[keep]
        selected = labels != IGNORE_INDEX
        assert selected.any()
        assert given == visible(tokenizer.decode(inputs))
        original = np.where(selected, labels, inputs)
        assert bare(BRACKETS.sub(r"\1", sample)) == bare(tokenizer.decode(original))
        expected = [bare(s) for s in segments(tokenizer, original, selected)]
        if any("\ufffd" in s for s in expected):
            continue  # a run boundary inside a multi-byte character: widened (test_a_run_inside_a_character...)
        assert bare(sample) == bracketed(expected), (sample, expected)
        compared += 1
    return compared


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_brackets_are_exactly_the_labelled_tokens_of_step_1(prefixes, kind, capsys):
    printed, steps = shown(capsys, args_of(prefixes, kind, "--n", "8"))
    tokenizer, (batch,) = loader_steps(prefixes, kind, 1)
    assert steps == ["step 1: 8 samples, global indices 0..7"]
    assert check_rows(tokenizer, batch, printed) >= 6


def test_step_2_shows_what_step_2_trains_on_under_a_masking_curriculum(prefixes, capsys):
    curriculum = ["data.mask_prob_schedule=[[0, 0.15], [1, 0.5]]"]  # step 2 masks at 0.5
    printed, _ = shown(capsys, args_of(prefixes, "bpe", *curriculum, "--n", "8", "--step", "2"))
    tokenizer, (first, second) = loader_steps(prefixes, "bpe", 2, *curriculum)
    assert set(printed).isdisjoint(first["sample_index"].tolist())
    check_rows(tokenizer, second, printed)
    predicted = (second["labels"] != IGNORE_INDEX).sum() / (second["attention_mask"] > 0).sum()
    assert predicted > 0.35  # the curriculum's rate of step 2, not step 1's 0.15


def test_a_short_step_continues_into_the_next_under_a_token_budget(prefixes, capsys):
    budget = ["data.packing=doc_sentences", "train.tokens_per_step=256", "train.batch_warmup_steps=4",
              "train.batch_warmup_start=0.5"]
    printed, steps = shown(capsys, args_of(prefixes, "spm", *budget, "--n", "12", "--step", "2"))
    tokenizer, batches = loader_steps(prefixes, "spm", 6, *budget)
    later = batches[1:]
    indices = [i for b in later for i in b["sample_index"].tolist()][:12]
    assert sorted(printed) == indices and len(steps) >= 2 and steps[0].startswith("step 2: ")
    for batch in later:
        rows = [r for r, i in enumerate(batch["sample_index"].tolist()) if i in printed]
        if rows:
            part = {k: v[rows] for k, v in batch.items()}
            check_rows(tokenizer, part, {i: printed[i] for i in part["sample_index"].tolist()})


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_the_input_line_shows_the_mask_token_where_labels_were_masked(prefixes, kind, capsys):
    printed, _ = shown(capsys, args_of(prefixes, kind, "--n", "8"))
    tokenizer, (batch,) = loader_steps(prefixes, kind, 1)
    mask_text = tokenizer.decode([tokenizer.mask_id])
    total = 0
    for row, index in enumerate(batch["sample_index"].tolist()):
        masked = int((batch["input_ids"][row] == tokenizer.mask_id).sum())
        assert printed[index][1].count(mask_text) == masked
        assert printed[index][0].count(mask_text) == 0  # the original text has none here
        total += masked
    assert total > 0


def test_packed_documents_show_the_boundaries(prefixes, capsys):
    packed = ["data.packing=packed_documents", "data.seq_length=256"]
    printed, _ = shown(capsys, args_of(prefixes, "spm", *packed, "--n", "8"))
    tokenizer, (batch,) = loader_steps(prefixes, "spm", 1, *packed)
    documents = batch["attention_mask"].amax(dim=1).tolist()
    assert max(documents) > 1
    for index, count in zip(batch["sample_index"].tolist(), documents):
        sample, given = printed[index]
        assert sample.count(DOCUMENT_SEPARATOR) == given.count(DOCUMENT_SEPARATOR) == count - 1
        assert given.split(DOCUMENT_SEPARATOR)[-1].startswith("[CLS]")


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_a_run_inside_a_character_is_widened_to_the_character(kind, bpe_tokenizer, spm_tokenizer):
    tokenizer = bpe_tokenizer if kind == "bpe" else spm_tokenizer
    ids = tokenizer.encode("a 中文 b")
    pieces = [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    inside = [k for k in range(1, len(ids)) if pieces[k].endswith("\ufffd")]
    assert inside, "the test needs 中 cut into byte tokens"
    selected = np.zeros(len(ids), dtype=bool)
    selected[inside[0]] = True  # the character's second byte token only
    assert render_document(tokenizer, ids, selected).replace(" ", "") == "a[[中]]文b"
    selected[:] = False
    selected[inside[0] - 1] = True  # the first byte token only
    assert render_document(tokenizer, ids, selected).replace(" ", "") == "a[[中]]文b"


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_brackets_in_the_text_next_to_a_run(kind, bpe_tokenizer, spm_tokenizer):
    """Literal brackets beside a run (as in code docstrings: `parts=["TestClass", ...]`) compare exactly."""
    tokenizer = bpe_tokenizer if kind == "bpe" else spm_tokenizer
    ids = np.array(tokenizer.encode('parts=["TestClass", "test_foo"]], x[[y]]'))
    sensitivity_checks = 0
    for seed in range(20):
        selected = np.random.default_rng(seed).random(len(ids)) < 0.4
        if not selected.any():
            continue
        line = render_document(tokenizer, ids, selected)
        expected = [bare(s) for s in segments(tokenizer, ids, selected)]
        assert bare(line) == bracketed(expected), (line, expected)
        # The comparison can fail: a visible token taken out of its run moves its characters across a
        # `[[` or `]]`. Only tokens without brackets of their own are flipped: with a literal `[` the
        # notation itself is ambiguous (`parts=` + run `["T` and `parts=[` + run `"T` both print
        # `parts=[[["T]]`), and the ambiguity is what the exact comparison above is for.
        plain = [k for k in np.flatnonzero(selected)
                 if bare(piece := tokenizer.decode([int(ids[k])])) and not set(piece) & set("[]")]
        flipped = selected.copy()
        flipped[plain[:1]] = False
        if plain and flipped.any():
            sensitivity_checks += 1
            assert bare(line) != bracketed([bare(s) for s in segments(tokenizer, ids, flipped)])
    assert sensitivity_checks >= 10, sensitivity_checks


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/pretrain/no_such.yaml"], "no_such.yaml"),
    (["--config", RECIPES["bpe"], "data.no_such_key=1"], "no_such_key"),
    (["--config", RECIPES["bpe"], "--step", "0"], "--step 0"),
    (["--config", RECIPES["bpe"], "--n", "0"], "--n 0"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_run_dir_shows_the_step_after_the_latest_checkpoint(prefixes, tmp_path, capsys):
    """A real 2-step run (one process) with a checkpoint at step 2: --run-dir shows step 3, as --step 3 does."""
    overrides = [f"data.prefix={prefixes['bpe']}", f"run.dir={tmp_path}", "run.name=r", "train.steps=2",
                 "checkpoint.every_steps=2", "eval.every_steps=0", "optim.warmup_steps=1"]
    done = subprocess.run([sys.executable, "-m", "trainer.pretrain", "--config", RECIPES["bpe"], *overrides],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    from_run, steps = shown(capsys, ["--run-dir", str(tmp_path / "r"), "--n", "8"])
    from_step, _ = shown(capsys, args_of(prefixes, "bpe", "--n", "8", "--step", "3"))
    assert steps == ["step 3: 8 samples, global indices 16..23"]
    assert from_run == from_step
