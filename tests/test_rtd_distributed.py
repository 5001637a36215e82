"""Replaced token detection (ELECTRA and DeBERTaV3 towers, GDES) under ZeRO-3 and TP, real processes.

With dropout off, the numbers may not depend on the layout: ZeRO-3 must gather the generator's
embedding table that the discriminator reads through GDES, and the Gumbel sampling of replacements
is keyed by (seed, global sample index), not by the vocabulary partition or the rank.
"""
from __future__ import annotations

import json
import sys

import pytest

from launch import as_overrides, deepspeed_cmd, metrics, python_tool, run, torchrun_cmd, train_records

pytestmark = pytest.mark.distributed


RECIPES = ["configs/pretrain/electra_debug.yaml", "configs/pretrain/deberta_v3_debug.yaml"]


def args(prefix, runs, name, recipe, **extra):
    values = {"data.prefix": prefix, "data.valid_fraction": 0.0, "run.dir": runs, "run.name": name,
              "train.steps": 3, "train.seed": 5, "log.every_steps": 1, "checkpoint.every_steps": 0,
              "eval.every_steps": 0, "optim.warmup_steps": 1, "optim.lr": 2e-3,
              "model.overrides": "{embedding_sharing: gdes, hidden_dropout: 0.0, attention_dropout: 0.0}"}
    return ["--config", recipe] + as_overrides(values, **extra)


def assert_same_steps(a, b):
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_mlm", "loss_rtd", "grad_norm"):
            # fp32 sums in another order: 1e-5 absolute, or 2e-6 relative for the grad norm (~20)
            assert a[step][key] == pytest.approx(b[step][key], rel=2e-6, abs=1e-5), (step, key)
        assert a[step]["replaced_ratio"] == b[step]["replaced_ratio"]  # the same sampled replacements


@pytest.mark.parametrize("recipe", RECIPES)
def test_rtd_gdes_zero3_equals_zero1(tiny_bpe_prefix, tmp_path, recipe):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0), against ZeRO-1."""
    run(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "z1", recipe, zero__stage=1)))
    run(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "z3", recipe, zero__stage=3, zero__param_persistence_threshold=0)))
    z1, z3 = train_records(tmp_path / "z1"), train_records(tmp_path / "z3")
    assert_same_steps(z1, z3)
    assert {"generator_accuracy", "rtd_accuracy", "replaced_ratio", "loss_mlm", "loss_rtd"} <= set(z1[1])
    assert_same_embedding_stats(tmp_path / "z1", tmp_path / "z3")  # ZeRO-3 holds no module weights in its files


def assert_same_embedding_stats(a, b):
    """tools/embedding_stats.py reads both runs' last checkpoints (through conversion's reader) alike."""
    stats = [json.loads(python_tool("embedding_stats.py", "--checkpoint", run / "checkpoints", "--json").stdout)
             for run in (a, b)]
    assert stats[0]["embedding_sharing"] == stats[1]["embedding_sharing"] == "gdes"
    for key in ("generator_avg_cosine", "discriminator_avg_cosine"):
        assert stats[0][key] == pytest.approx(stats[1][key], abs=1e-5), key
    assert stats[0]["generator_avg_cosine"] != stats[0]["discriminator_avg_cosine"]  # E_G + E_Delta moved


@pytest.mark.parametrize("recipe", RECIPES[1:])  # ELECTRA at TP=2: tests/test_electra.py's in-process spawn
def test_rtd_gdes_tensor_parallel_equals_single_process(tiny_bpe_prefix, tmp_path, recipe):
    """Also the learning diagnostics (trainer/core/diagnostics.py): logged, summarised, and equal under TP."""
    evaluated = dict(data__valid_fraction=0.05, eval__every_steps=3, eval__samples=8)
    out = run([sys.executable, "-m", "trainer.pretrain", *args(tiny_bpe_prefix, tmp_path, "tp1", recipe, **evaluated)])
    run(torchrun_cmd(2, args(tiny_bpe_prefix, tmp_path, "tp2", recipe, parallel__tensor=2, train__micro_batch_size=2,
                             **evaluated)))
    tp1, tp2 = train_records(tmp_path / "tp1"), train_records(tmp_path / "tp2")
    assert_same_steps(tp1, tp2)
    diagnostics = {"rtd_auc", "rtd_prior_loss", "rtd_loss_vs_prior", "generator_accuracy", "unigram_accuracy",
                   "context_free_accuracy"}
    assert diagnostics <= set(tp1[3]) and "mlm_accuracy" not in tp1[3]
    valid = {name: [r for r in metrics(tmp_path / name) if "valid_loss" in r] for name in ("tp1", "tp2")}
    assert [r["step"] for r in valid["tp1"]] == [3]
    assert {f"valid_{k}" for k in diagnostics} <= set(valid["tp1"][0])
    for key in ("valid_rtd_auc", "valid_rtd_prior_loss", "valid_generator_accuracy", "valid_unigram_accuracy",
                "valid_context_free_accuracy", "valid_generator_hidden_accuracy", "valid_hidden_unigram_accuracy"):
        assert valid["tp1"][0][key] == pytest.approx(valid["tp2"][0][key], abs=1e-6), key
    assert 0 < valid["tp1"][0]["valid_unigram_accuracy"] < 1 and 0 < valid["tp1"][0]["valid_rtd_prior_loss"] < 0.7
    assert "last validation RTD loss" in out.stdout and "vs context-free accuracy" in out.stdout
    assert_same_embedding_stats(tmp_path / "tp1", tmp_path / "tp2")  # the vocabulary tables merged over TP


def _module_weights(run_dir, step):
    import torch
    path = run_dir / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def test_two_stage_schedule_trains_generator_then_discriminator(tiny_bpe_prefix, tmp_path):
    """ELECTRA's two-stage ablation on DeBERTaV3 towers: steps 1-3 train G alone, D is initialised from
    G, steps 4-6 train D alone with G frozen. ZeRO-3 (2 ranks, everything partitioned) must give the
    same numbers as ZeRO-1 (1 process), which checks the hand-over inside partitioned parameters.
    (Each stage decays its LR linearly to 0 at its last step, as a whole run does at train.steps.)"""
    recipe = RECIPES[1]
    two_stage = dict(train__steps=6, train__rtd_schedule="two_stage", train__generator_steps=3,
                     optim__generator_lr=1e-3)
    run([sys.executable, "-m", "trainer.pretrain",
         *args(tiny_bpe_prefix, tmp_path, "z1", recipe, zero__stage=1, checkpoint__every_steps=1,
               checkpoint__keep_last=0, **two_stage)])
    run(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "z3", recipe, zero__stage=3,
                              zero__param_persistence_threshold=0, **two_stage)))
    z1, z3 = train_records(tmp_path / "z1"), train_records(tmp_path / "z3")
    for step in range(1, 7):
        for key in ("loss", "loss_mlm", "loss_rtd"):
            assert z1[step][key] == pytest.approx(z3[step][key], abs=1e-5), (step, key)
        if step <= 3:  # generator stage: the step's loss is the MLM loss alone
            assert z1[step]["loss"] == pytest.approx(z1[step]["loss_mlm"], rel=1e-6)
        else:  # discriminator stage: lambda x RTD alone (the recipe's rtd_weight is 50)
            assert z1[step]["loss"] == pytest.approx(50 * z1[step]["loss_rtd"], rel=1e-6)

    w = {step: _module_weights(tmp_path / "z1", step) for step in range(1, 7)}
    generator_only = [k for k in w[1] if k.startswith("generator.") and ".embeddings." not in k]
    discriminator = [k for k in w[1] if k.startswith("discriminator.")]
    assert generator_only and discriminator
    for k in discriminator:  # frozen while the generator trains (LR 0: no update, no weight decay)
        assert torch_equal(w[1][k], w[2][k]) and torch_equal(w[2][k], w[3][k]), k
    assert any(not torch_equal(w[1][k], w[2][k]) for k in generator_only)
    for k in generator_only:  # frozen while the discriminator trains
        assert all(torch_equal(w[3][k], w[s][k]) for s in (4, 5, 6)), k
    assert any(not torch_equal(w[4][k], w[5][k]) for k in discriminator)
    layer = "encoder.layers.0.attention.query.weight"
    g3, d3, d4 = w[3]["generator." + layer], w[3]["discriminator.backbone." + layer], w[4]["discriminator.backbone." + layer]
    assert (d3 - g3).abs().max() > 1e-2  # independent initialisations before the hand-over
    assert (d4 - g3).abs().max() < 5e-3  # after it: G's weights plus one discriminator step (lr 2e-3)


def torch_equal(a, b) -> bool:
    import torch
    return torch.equal(a, b)


def test_all_weight_sharing_under_zero3_and_tp2_equals_single_process(tiny_bpe_prefix, tmp_path):
    """ELECTRA's full weight sharing (embedding_sharing all, same-size towers, as tools/ablate.py sets it):
    TP=2 under ZeRO-3 (every parameter partitioned), where the one backbone is gathered and released
    twice per forward, matches one process; its checkpoint converts to the same weights, each tower
    whole (DeepSpeed records the shared names in TP rank 0's files only), and exports to HF.
    (TP=2 x DP=2 on 4 ranks passes too; 2 ranks keep the suite's time.)"""
    from trainer.convert.export import locate, read_checkpoint, verify_hf, write_hf

    recipe, same_size = RECIPES[0], "generator: {hidden_size: 64, num_heads: 4, intermediate_size: 128}"
    sharing = dict(model__overrides=f"{{embedding_sharing: all, {same_size}, hidden_dropout: 0.0, "
                                    f"attention_dropout: 0.0}}", checkpoint__every_steps=3)
    run([sys.executable, "-m", "trainer.pretrain", *args(tiny_bpe_prefix, tmp_path, "ref", recipe, **sharing)])
    run(deepspeed_cmd(2, args(tiny_bpe_prefix, tmp_path, "z3tp2", recipe, zero__stage=3, parallel__tensor=2,
                              zero__param_persistence_threshold=0, **sharing)))
    assert_same_steps(train_records(tmp_path / "ref"), train_records(tmp_path / "z3tp2"))

    ref, z3 = (read_checkpoint(locate(tmp_path / name / "checkpoints")) for name in ("ref", "z3tp2"))
    layer = "layers.1.ffn.up.weight"  # split by TP, partitioned by ZeRO-3
    assert torch_equal(z3.state_dict[f"generator.{layer}"], z3.state_dict[f"discriminator.{layer}"])
    assert z3.state_dict.keys() == ref.state_dict.keys()
    for key, value in ref.state_dict.items():
        assert (z3.state_dict[key] - value).abs().max() < 1e-5, key
    for component in ("generator", "discriminator"):
        write_hf(z3, tmp_path / component, component, None)
        assert verify_hf(z3, tmp_path / component, component) < 1e-4
