"""Golden curves and expected outputs: a change that alters training or the parts with no Hugging Face
counterpart fails here. tests/golden.py builds both (fixed corpus, recipes, modules); the expected
values live in tests/assets/golden_curves.json and golden_outputs.json. A change that moves them on
purpose regenerates them in the same commit and says why:

    .venv/bin/python -m tests.golden --write

Tolerances, measured on this 2-core machine (torch 2.13.0 CPU, MKL, AVX-512):
- Curves: relative 1e-5 on every per-step value (loss and its terms, grad norm, lr). One thread,
  fp32, dropout off: two runs are bitwise equal, and a family trained alone equals the same family
  trained after the others. What moves the numbers between machines is the kernels' reduction order
  and vectorised math (the init's normal_ too): 1 against 2 torch threads, and AVX-512 against AVX2
  and SSE4.2 kernels (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), differ by at
  most 2.3e-7 relative over the 10 steps (2-4 fp32 ulps; nothing compounds in 10 steps: 1e-6 relative
  noise on every initial weight moves the curves by at most 5.7e-7). 1e-5 leaves 40x that, and still
  catches 1e-4 relative noise on the initial weights in every family (its grad norms move 1.2e-5 to
  7e-5; the losses 1e-6 to 4e-6, so rtol 1e-4 would not).
- Outputs: rtol 1e-4 with atol 1e-6 (the RTD logits and table rows are ~1e-2), as Hugging Face's
  integration tests; across the same kernels they differ by at most 3.6e-7 absolute.
"""
import json
import sys

import pytest
import torch

import golden
from launch import run

CURVE_RTOL = 1e-5
OUTPUT_RTOL, OUTPUT_ATOL = 1e-4, 1e-6


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """Every family trained once, in one subprocess (the trainer starts torch.distributed)."""
    out = tmp_path_factory.mktemp("golden") / "curves.json"
    run([sys.executable, "-m", "tests.golden", "--curves", out], timeout=300)
    return _load(out)


@pytest.fixture(scope="module")
def outputs():
    return golden.module_outputs()


def test_the_corpus_is_the_committed_one():
    expected = _load(golden.CURVES_FILE)
    assert golden.corpus_digest(golden.corpus_documents()) == expected["corpus_sha256"], \
        "tests/golden.py's corpus changed: every curve moves; regenerate and say why"
    assert sorted(expected["families"]) == sorted(golden.FAMILIES)
    assert expected["steps"] == golden.STEPS


@pytest.mark.parametrize("family", list(golden.FAMILIES))
def test_golden_curve(curves, family):
    expected = _load(golden.CURVES_FILE)["families"][family]
    got = curves["families"][family]
    assert sorted(got) == sorted(expected), f"{family}: logged metrics changed"
    if family.startswith(("electra", "deberta_v3")):
        assert {"loss_mlm", "loss_rtd"} <= set(got)
    for metric, values in expected.items():
        torch.testing.assert_close(torch.tensor(got[metric], dtype=torch.float64),
                                   torch.tensor(values, dtype=torch.float64), rtol=CURVE_RTOL, atol=0.0,
                                   msg=lambda m: f"{family} {metric} per step: {m}\n got {got[metric]}")


def test_the_curves_tell_the_families_apart():
    """Each family's curve is its own (a recipe override that did nothing would show here); GDES starts
    where ES does (E_Delta = 0, so the same forward) and departs after the first update."""
    families = _load(golden.CURVES_FILE)["families"]
    losses = {name: tuple(curve["loss"]) for name, curve in families.items()}
    assert len(set(losses.values())) == len(losses), losses
    es, gdes = families["deberta_v3_es"]["loss"], families["deberta_v3_gdes"]["loss"]
    assert gdes[0] == es[0] and gdes[1] != es[1]


@pytest.mark.parametrize("name", list(_load(golden.OUTPUTS_FILE)))
def test_expected_output(outputs, name):
    expected = torch.tensor(_load(golden.OUTPUTS_FILE)[name])
    torch.testing.assert_close(torch.tensor(outputs[name]), expected, rtol=OUTPUT_RTOL, atol=OUTPUT_ATOL)


def test_the_emd_slice_sees_the_position_embedding(monkeypatch):
    """The EMD's query adds absolute positions: without them the committed slice no longer matches."""
    from models.deberta import DebertaEmbeddings

    monkeypatch.setattr(DebertaEmbeddings, "absolute_positions",
                        lambda self, length: torch.zeros(length, self.word.weight.shape[1]))
    changed = golden.emd_outputs()["emd_hidden[0,:3,:3]"]
    expected = torch.tensor(_load(golden.OUTPUTS_FILE)["emd_hidden[0,:3,:3]"])
    assert (changed - expected).abs().max() > 100 * OUTPUT_RTOL
