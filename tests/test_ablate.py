"""tools/ablate.py: one study end to end at --scale tiny (shared by the tests below), its resume, and the
refusals; trainer/core/flops.py's count against a hand computation."""
import json
import shutil
import sys

import pytest

from tests.launch import ROOT, run
from tools import ablate
from trainer.core.flops import training_flops_per_token

pytestmark = pytest.mark.distributed  # launches the trainer


def _ablate(*args, check=True):
    return run([sys.executable, ROOT / "tools" / "ablate.py", *args], timeout=900, check=check)


@pytest.fixture(scope="module")
def study(demo_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "schedule"
    proc = _ablate("schedule", "--out", out, "--scale", "tiny", "--corpus", demo_corpus.path)
    return out, proc, demo_corpus.path


def test_study_runs_every_arm_with_seeds_and_a_random_init_row(study):
    out, proc, _ = study
    result = json.loads((out / "results.json").read_text())
    assert result["arm_order"] == ["joint", "two_stage"]
    for name in ("joint", "two_stage"):
        row = result["arms"][name]
        assert row["steps"] == ablate.SCALES["tiny"].steps
        assert row["tokens"] == row["steps"] * 8 * 64  # token-budget steps: the same tokens in every arm
        assert len(row["finetune"]["values"]) == 3 and 0.0 <= row["finetune"]["mean"] <= 1.0
        assert 0.0 <= row["probe"] <= 1.0 and len(row["probe_random"]) == 3
        assert row["valid_rtd_auc"] is not None and row["valid_rtd_auc_peak"] >= row["valid_rtd_auc"]
        assert 1 <= row["valid_rtd_auc_peak_step"] <= row["steps"]
        config = (out / "arms" / name / "pretrain.yaml").read_text()
        assert f"rtd_schedule: {name}" in config
    assert len(result["random_init"]["electra"]["finetune"]["values"]) == 3
    table = (out / "results.md").read_text()
    for label in ("| joint | electra | 6 |", "| two_stage | electra | 6 |", "| random init (electra) |"):
        assert label in table
    assert "Paper: ELECTRA" in table and "(equal tokens)" in table
    for png in ("loss.png", "downstream.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "budget 512 tokens per step" in proc.stdout and "epochs for joint" in proc.stdout
    assert (out / ".gitignore").read_text().split() == ["arms/", "data/", "data.log"]


def test_a_rerun_continues_with_the_arms_not_yet_done(study):
    out, _, corpus = study
    result = json.loads((out / "results.json").read_text())
    del result["arms"]["two_stage"]  # as if the study had been killed after its first arm
    (out / "results.json").write_text(json.dumps(result))
    shutil.rmtree(out / "arms" / "two_stage" / "finetune")
    launches = (out / "arms" / "joint" / "pretrain.log").read_text().count("$ ")
    proc = _ablate("schedule", "--out", out, "--scale", "tiny", "--corpus", corpus)
    assert "joint: done before" in proc.stdout
    assert "two_stage: pretraining" not in proc.stdout  # its finished run is reused, only fine-tuning reruns
    assert "two_stage: word order" in proc.stdout
    assert (out / "arms" / "joint" / "pretrain.log").read_text().count("$ ") == launches
    assert "two_stage" in json.loads((out / "results.json").read_text())["arms"]


@pytest.mark.parametrize("args, message", [
    (["no-such-study"], "unknown study 'no-such-study'; the studies: input-formats, static-masking"),
    (["schedule", "joint:train.steps=50"], "override joint:train.steps would make the arms unequal in compute"),
    (["generator-size", "gen_1:model.overrides.generator.hidden_size=8"],
     "gen_1:model.overrides.generator.hidden_size would make the arms unequal in compute"),
    (["schedule", "train.rtd_schedule=joint"], "schedule varies train.rtd_schedule between its arms"),
    (["schedule", "nope:train.seed=1"], "schedule has no arm 'nope'"),
    (["schedule", "run.name=x"], "override run.name is set by this tool"),
    (["schedule", "--scale", "huge"], "--scale 'huge' is not one of tiny, small"),
])
def test_bad_input_exits_2_naming_it(tmp_path, args, message):
    proc = _ablate(*args[:1], "--out", tmp_path / "o", *args[1:], check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "arms").exists()


def test_a_directory_of_another_study_or_version_is_refused(study, tmp_path):
    out, _, corpus = study
    proc = _ablate("rtd-vs-mlm", "--out", out, "--scale", "tiny", "--corpus", corpus, check=False)
    assert proc.returncode == 2 and "holds another study (study: 'schedule' there, 'rtd-vs-mlm' now)" in proc.stderr
    moved = tmp_path / "old"
    moved.mkdir()
    ident = json.loads((out / "study.json").read_text())
    (moved / "study.json").write_text(json.dumps({**ident, "version": ablate.VERSION - 1}))
    proc = _ablate("schedule", "--out", moved, "--scale", "tiny", "--corpus", corpus, check=False)
    assert proc.returncode == 2 and f"version: {ablate.VERSION - 1} there, {ablate.VERSION} now" in proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = _ablate("schedule", "--out", tmp_path / "full", "--scale", "tiny", check=False)
    assert proc.returncode == 2 and "is not empty and holds no study.json" in proc.stderr


def test_flops_count_matches_a_hand_computation():
    from models.registry import build_config

    seq, vocab = 128, 1000
    cfg = build_config("roberta", "debug", vocab, seq)  # 2 layers, H 64, FFN 128, vocab padded to 1024
    H, I, V = 64, 128, cfg.padded_vocab_size
    per_layer = 2 * (4 * H * H + 2 * H * I) + 4 * seq * H
    head = 2 * (H * H + H * V)
    assert training_flops_per_token(cfg, seq, 0.15) == pytest.approx(3 * (2 * per_layer + 0.15 * head))
    electra = build_config("electra", "debug", vocab, seq)
    g, d = electra.generator, electra.discriminator
    tower = lambda c: c.num_layers * (2 * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
                                      + 4 * seq * c.hidden_size) + 2 * c.embedding_size * c.hidden_size * (
                                          c.embedding_size != c.hidden_size)  # the E -> H projection
    gen_head = 2 * (g.hidden_size * g.embedding_size + g.embedding_size * V)
    expected = 3 * (tower(g) + 0.15 * gen_head + tower(d) + 2 * (d.hidden_size ** 2 + d.hidden_size))
    assert training_flops_per_token(electra, seq, 0.15) == pytest.approx(expected)
    bigger = build_config("electra", "debug", vocab, seq, generator={"hidden_size": 64, "num_heads": 4,
                                                                    "intermediate_size": 128})
    assert training_flops_per_token(bigger, seq) > training_flops_per_token(electra, seq)


def test_equal_flops_arms_get_steps_in_proportion():
    """rtd-vs-mlm's MLM arm is cheaper per token, so it trains more steps for the same FLOPs."""
    study = ablate.STUDIES["rtd-vs-mlm"]
    assert study.equal_flops
    steps = ablate.matched_steps(study, 400, {"electra_rtd": 3.0e6, "mlm": 2.0e6})
    assert steps == {"electra_rtd": 400, "mlm": 600}
    common, per_arm = ablate.split_overrides(study, ["optim.lr=1e-3", "mlm:optim.lr=2e-3"])
    assert common == ["optim.lr=1e-3"] and per_arm == {"electra_rtd": [], "mlm": ["optim.lr=2e-3"]}
