"""SiFT (trainer/finetuning/sift.py): where the perturbation acts, the sign and reach of the adversarial term,
the non-finite skip, and that with SiFT off a fine-tuning run equals a plain PyTorch loop."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launch import run
from models.classification import SequenceClassifier
from models.config import DebertaConfig, RobertaConfig
from models.native import save_native
from models.registry import build_config, build_model
from trainer.finetuning.sift import SiFT, symmetric_kl_sum

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)


def tiny_classifier(family="deberta", num_labels=3, seed=0) -> SequenceClassifier:
    torch.manual_seed(seed)
    if family == "deberta":
        config = DebertaConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_position_embeddings=64, position_buckets=8, max_relative_positions=16,
                               enhanced_mask_decoder=False, **NO_DROPOUT)
    else:
        config = RobertaConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_position_embeddings=40, **NO_DROPOUT)
    model = SequenceClassifier(family, config, num_labels, classifier_dropout=0.0)
    model.train()
    return model


def batch(seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    ids[0, 9:] = 0
    return ids, mask


def test_perturbation_acts_on_the_normalised_embedding_layernorm_input():
    model = tiny_classifier()
    ids, mask = batch()
    seen = {"raw": [], "fed": []}
    model.embedding_norm.register_forward_pre_hook(lambda m, a: seen["raw"].append(a[0].detach().clone()))
    # a large noise, so the ascent gradient dwarfs the 1e-6 in its max-normalisation
    sift = SiFT(model.embedding_norm, noise_std=0.5, step_size=0.01, weight=1.0)
    model.embedding_norm.register_forward_pre_hook(lambda m, a: seen["fed"].append(a[0].detach().clone()))

    clean = model(ids, mask)
    raw, fed = seen["raw"][0], seen["fed"][0]
    # the clean pass feeds LN0(x): per token mean 0 and variance 1, x = the embedding LayerNorm's input
    torch.testing.assert_close(fed, F.layer_norm(raw, raw.shape[-1:], eps=1e-7))
    real = mask.bool()  # padding's zero embedding row normalises to zeros
    torch.testing.assert_close(fed.mean(-1), torch.zeros(fed.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(fed.var(-1, unbiased=False)[real], torch.ones(int(real.sum())), atol=1e-3, rtol=0)
    assert raw.var(-1)[real].max() < 0.01, "raw embeddings (std 0.02) are far from unit scale"

    sift.adversarial_loss(lambda: model(ids, mask), clean, regression=False)
    first, second = seen["fed"][1] - fed, seen["fed"][2] - fed  # the two perturbed passes: LN0(x) + delta
    assert 0.5 < first.abs().max() <= 2 * 0.5 + 1e-6, "initial delta: N(0, 0.5^2) clamped to +-1"
    # one ascent step: delta += step_size * g / (1e-6 + max_h |g|), g the gradient of D(f(LN0(x) + delta),
    # sg(clean)) with respect to delta, recomputed here through a hook of our own
    d = first.clone().requires_grad_(True)
    handle = model.embedding_norm.register_forward_pre_hook(lambda m, a: (fed + d,))
    (g,) = torch.autograd.grad(symmetric_kl_sum(model(ids, mask), clean.detach()), d)
    handle.remove()
    expected = 0.01 * g / (1e-6 + g.abs().amax(-1, keepdim=True))
    torch.testing.assert_close(second - first, expected, atol=1e-6, rtol=1e-4)
    assert (second - first).abs().sum() > 0

    # scale invariance: embeddings 100x larger leave the normalised input and the noise unchanged
    with torch.no_grad():
        model.backbone.embeddings.word.weight.mul_(100.0)
    torch.manual_seed(5)
    clean = model(ids, mask)
    sift.adversarial_loss(lambda: model(ids, mask), clean, regression=False)
    torch.testing.assert_close(seen["fed"][3], fed, atol=1e-4, rtol=0)
    assert (seen["fed"][4] - seen["fed"][3]).abs().max() <= 1.0 + 1e-6


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_adversarial_term_is_positive_and_its_gradient_reaches_the_model(regression):
    model = tiny_classifier("roberta", num_labels=1 if regression else 3)
    ids, mask = batch(1)
    sift = SiFT(model.embedding_norm, noise_std=0.05, step_size=1e-3, weight=2.0)
    clean = model(ids, mask)
    term = sift.adversarial_loss(lambda: model(ids, mask), clean, regression)
    assert term is not None and term.item() > 0
    model.zero_grad()
    term.backward()
    for name in ("backbone.layers.0.attention.query.weight", "backbone.layers.1.ffn.up.weight",
                 "head.out_proj.weight", "backbone.embeddings.norm.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the hook is gone after remove(): the model is the plain one again
    sift.remove()
    torch.testing.assert_close(model(ids, mask), tiny_classifier("roberta", 1 if regression else 3)(ids, mask),
                               atol=0, rtol=0)


def test_symmetric_kl_value_and_gradient():
    p_logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.1, 0.0]], requires_grad=True)
    q_logits = torch.tensor([[0.0, 0.5, 0.0], [0.2, 0.1, 0.0]], requires_grad=True)
    value = symmetric_kl_sum(p_logits, q_logits)
    p, q = F.softmax(p_logits, -1).detach(), F.softmax(q_logits, -1).detach()
    expected = ((p - q) * (p.log() - q.log())).sum()  # KL(p||q) + KL(q||p)
    torch.testing.assert_close(value, expected)
    assert symmetric_kl_sum(q_logits[1:], q_logits[1:]).item() == pytest.approx(0.0, abs=1e-7)
    value.backward()
    # microsoft/DeBERTa's gradient: d/dp of -sum q log p, each side's probabilities held fixed
    torch.testing.assert_close(p_logits.grad, p - q)


def test_non_finite_perturbation_gradient_is_skipped():
    model = tiny_classifier()
    ids, mask = batch()
    sift = SiFT(model.embedding_norm)
    clean = model(ids, mask)
    assert sift.adversarial_loss(lambda: model(ids, mask) * float("inf"), clean, regression=False) is None
    assert sift.skipped == 1
    assert sift.adversarial_loss(lambda: model(ids, mask), model(ids, mask), regression=False) is not None


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, spm_tokenizer):
    """A one-process `python -m trainer.finetune` run with SiFT off (3 steps, dropout off)."""
    root = tmp_path_factory.mktemp("sift_off")
    cfg = build_config("deberta_v3", "debug", vocab_size=spm_tokenizer.vocab_size, seq_length=64,
                       pad_token_id=spm_tokenizer.pad_id, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    save_native(root / "native", "deberta_v3", cfg, build_model(cfg).state_dict())
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "array", "graph", "tensor", "node"]
    lines = ["sentence\tlabel\n"] + [f"{' '.join(rng.choice(words, 6))}\t{i % 2}\n" for i in range(48)]
    (root / "train.tsv").write_text("".join(lines))
    (root / "validation.tsv").write_text("".join(lines[:17]))
    overrides = [f"model.init={root / 'native'}", f"data.tokenizer={spm_tokenizer.path}",
                 f"data.train={root / 'train.tsv'}", f"data.validation={root / 'validation.tsv'}",
                 f"run.dir={root / 'runs'}", "run.name=plain", "train.epochs=1", "train.micro_batch_size=16",
                 "train.global_batch_size=16", "train.seeds=[3]", "optim.lr=1e-3", "optim.layer_decay=0.8",
                 "sift.enabled=false", "classifier_dropout=0.0".join(["model.", ""])]
    run([sys.executable, "-m", "trainer.finetune", "--config", "configs/finetune/debug.yaml", *overrides])
    return root, overrides


@pytest.mark.distributed  # a real one-process DeepSpeed run
def test_with_sift_off_the_loop_equals_plain_finetuning(plain_run):
    """The trainer (DeepSpeed, ZeRO 0, its clipping, layer-decay groups, warmup schedule) against the same
    recipe written as a plain PyTorch loop: the exported weights agree."""
    from safetensors.torch import load_file

    from data.tasks import collate
    from models.classification import to_hf_state_dict
    from trainer.core.engine import warmup_linear_decay
    from trainer.finetuning.initial_model import build_classifier, load_initial_model, resolve_tokenizer
    from trainer.finetuning.task import load_task, step_micro_batches
    from trainer.finetuning.train import layer_decay_groups
    from trainer.finetuning.config import load_finetune_config

    root, overrides = plain_run
    cfg = load_finetune_config("configs/finetune/debug.yaml", overrides)
    init = load_initial_model(cfg.model.init)
    tokenizer = resolve_tokenizer(cfg, init)
    task = load_task(cfg, tokenizer, init)
    model = build_classifier(cfg, init, task.num_labels, seed=3)
    total = len(task.train) // 16  # 3 steps
    optimizer = torch.optim.AdamW(layer_decay_groups(model, 0.01, 1e-3, 0.8), lr=1e-3, betas=(0.9, 0.999),
                                  eps=1e-6, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(round(0.1 * total), total, 0.0))
    model.train()
    for step in range(1, total + 1):
        (indices,) = step_micro_batches(task.train, 3, step, total, 16, 16, 0, 1)
        b = collate(task.train, indices, tokenizer.pad_id)
        loss = F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    exported = load_file(str(root / "runs" / "plain" / "seed3" / "hf" / "model.safetensors"))
    expected = to_hf_state_dict(model.state_dict(), model.family, model.config)
    assert exported.keys() == expected.keys()
    start = to_hf_state_dict(build_classifier(cfg, init, 2, 3).state_dict(), "deberta", model.config)
    moved = 0
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, atol=2e-6, rtol=1e-5, msg=key)
        moved += not torch.equal(value, start[key])
    assert moved > 10, "training changed the weights"
    summary = json.loads((root / "runs" / "plain" / "summary.json").read_text())
    assert summary["seeds"] == [3] and summary["std"] == 0.0
