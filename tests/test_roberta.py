"""RoBERTa: parity with Hugging Face transformers, the MLM loss contract, init, config and registry."""


import pytest
import torch
import torch.nn.functional as F
import transformers

from data.errors import UserError
from models.config import RobertaConfig, pad_vocab_size
from models.parallel import ParallelLayers
from models.registry import MODEL_SIZES, build_config, build_model
from models.roberta import RobertaForMaskedLM, from_hf_state_dict, hf_config, position_ids, to_hf_state_dict
from tests.parity import assert_reloads_unchanged, mlm_labels, padded_ids, perturb_

SEQ = 16


def tiny_config(**overrides) -> RobertaConfig:
    fields = dict(
        vocab_size=99,
        padded_vocab_size=pad_vocab_size(99, 128),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=37,
        max_position_embeddings=SEQ + 2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return RobertaConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> RobertaForMaskedLM:
    torch.manual_seed(seed)
    return RobertaForMaskedLM(tiny_config(**overrides), ParallelLayers(1)).eval()


def padded_batch(cfg: RobertaConfig, lengths=(SEQ, 11, 4), seed: int = 1):
    """Ids of rows of different lengths, right-padded with pad_token_id, and their mask."""
    return padded_ids(lengths, SEQ, cfg.vocab_size, cfg.pad_token_id, low=3, seed=seed)


def test_position_ids_follow_hf_roberta():
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert position_ids(ids, 1).tolist() == [[2, 3, 4, 5, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_logits_match_hugging_face(tmp_path):
    model = tiny_model()
    perturb_(model)
    cfg = model.config
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    assert hf_sd["roberta.embeddings.word_embeddings.weight"].shape == (99, 32)  # padding trimmed
    assert hf_sd["lm_head.bias"].shape == (99,)

    hf = transformers.RobertaForMaskedLM(hf_config(cfg)).eval()
    result = hf.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert hf.lm_head.decoder.weight is hf.roberta.embeddings.word_embeddings.weight  # still tied

    input_ids, attention_mask = padded_batch(cfg)
    with torch.no_grad():
        ours = model.logits(input_ids, attention_mask)
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    assert ours.shape == theirs.shape == (3, SEQ, 99)
    # Padded positions too: both give padding position row pad_token_id and mask the same keys.
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert_reloads_unchanged(hf, tmp_path, input_ids, attention_mask, theirs)


def test_hf_state_dict_round_trips():
    model = tiny_model()
    perturb_(model)
    with torch.no_grad():  # padding rows are zero in a trained model: their logits are masked
        model.embeddings.word.weight[99:].zero_()
        model.lm_head.bias[99:].zero_()
    ours = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(ours, model.config), model.config)
    assert back.keys() == ours.keys()
    for key in ours:
        assert torch.equal(back[key], ours[key]), key
    fresh = RobertaForMaskedLM(model.config, ParallelLayers(1))
    fresh.load_state_dict(back, strict=True)

    with pytest.raises(KeyError, match="unexpected Hugging Face key"):
        from_hf_state_dict({"roberta.encoder.layer.0.crossattention.x.weight": torch.zeros(1)}, model.config)


def test_padded_vocabulary_never_gets_probability():
    model = tiny_model()
    with torch.no_grad():  # without masking, these would take almost all the probability
        model.lm_head.bias[99:] = 100.0
    input_ids, attention_mask = padded_batch(model.config)
    labels = mlm_labels(input_ids, attention_mask)
    predicted = labels != -100

    out = model(input_ids, attention_mask, labels)
    logits = model.logits(input_ids, attention_mask)  # (B, T, 99), trimmed
    expected = F.cross_entropy(logits[predicted], labels[predicted], reduction="sum")
    torch.testing.assert_close(out["loss_sum"], expected, atol=1e-5, rtol=1e-5)
    assert out["num_predicted"].dtype == torch.long and out["num_predicted"].ndim == 0
    assert int(out["num_predicted"]) == int(predicted.sum())

    out["loss_sum"].backward()
    assert torch.all(model.embeddings.word.weight.grad[99:] == 0)
    assert torch.all(model.lm_head.bias.grad[99:] == 0)
    assert model.lm_head.bias.grad[:99].abs().sum() > 0


def test_loss_matches_cross_entropy_over_full_logits():
    model = tiny_model(seed=4)
    perturb_(model)
    input_ids, attention_mask = padded_batch(model.config, seed=5)
    labels = mlm_labels(input_ids, attention_mask, seed=6)
    out = model(input_ids, attention_mask, labels)
    full = model.logits(input_ids, attention_mask)
    expected = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out["loss_sum"], expected, atol=1e-5, rtol=1e-5)


def test_fully_padded_row_gives_no_nan_and_changes_nothing():
    model = tiny_model()
    perturb_(model)
    input_ids, attention_mask = padded_batch(model.config, lengths=(SEQ, 0, 7))
    labels = mlm_labels(input_ids, attention_mask)
    assert not (labels[1] != -100).any()

    logits = model.logits(input_ids, attention_mask)
    assert torch.isfinite(logits).all()
    alone = model.logits(input_ids[2:], attention_mask[2:])
    torch.testing.assert_close(logits[2:], alone, atol=1e-6, rtol=1e-6)

    out = model(input_ids, attention_mask, labels)
    out["loss_sum"].backward()
    assert torch.isfinite(out["loss_sum"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # A batch with nothing to predict: zero loss, zero count, still differentiable.
    out = model(input_ids[1:2], attention_mask[1:2], labels[1:2])
    assert out["loss_sum"].item() == 0.0 and int(out["num_predicted"]) == 0
    out["loss_sum"].backward()


def test_initialisation():
    torch.manual_seed(0)
    model = build_model(build_config("roberta", "debug", vocab_size=1000, seq_length=64))
    cfg = model.config
    for name in ("embeddings.word.weight", "layers.0.attention.query.weight", "layers.1.ffn.down.weight"):
        weight = dict(model.named_parameters())[name]
        if name == "embeddings.word.weight":
            weight = torch.cat([weight[: cfg.pad_token_id], weight[cfg.pad_token_id + 1 : cfg.vocab_size]])
        assert abs(weight.std().item() - 0.02) < 0.001, name
        assert abs(weight.mean().item()) < 0.001, name
    assert torch.all(model.layers[0].attention.query.bias == 0)
    assert torch.all(model.layers[1].ffn.down.bias == 0)
    assert torch.all(model.lm_head.bias == 0)
    assert torch.all(model.layers[0].attention_norm.weight == 1)
    assert torch.all(model.layers[0].attention_norm.bias == 0)
    assert torch.all(model.embeddings.word.weight[cfg.pad_token_id] == 0)
    assert torch.all(model.embeddings.word.weight[cfg.vocab_size :] == 0)
    assert torch.all(model.embeddings.position.weight[cfg.pad_token_id] == 0)
    # The MLM head's decoder is the word embedding itself, not a copy.
    assert "lm_head.decoder.weight" not in model.state_dict()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_dropout_is_active_in_training_only():
    model = tiny_model(hidden_dropout=0.1, attention_dropout=0.1)
    input_ids, attention_mask = padded_batch(model.config)
    with torch.no_grad():
        assert torch.equal(model.logits(input_ids, attention_mask), model.logits(input_ids, attention_mask))
        model.train()
        assert not torch.equal(model.logits(input_ids, attention_mask), model.logits(input_ids, attention_mask))


def test_config_validation():
    assert pad_vocab_size(99, 128, 1) == 128
    assert pad_vocab_size(128, 128, 1) == 128
    assert pad_vocab_size(129, 128, 2) == 256
    assert pad_vocab_size(600, 128, 1) == pad_vocab_size(600, 128, 2) == pad_vocab_size(600, 128, 8) == 640
    assert pad_vocab_size(50265, 128, 8) == 50304  # the same rows at every TP degree up to 128
    assert pad_vocab_size(100, 8, 3) == 120  # lcm(8, 3) = 24
    with pytest.raises(UserError, match="hidden_size .* num_heads"):
        tiny_config(hidden_size=30)
    with pytest.raises(UserError, match="padded_vocab_size"):
        tiny_config(padded_vocab_size=64)
    with pytest.raises(UserError, match="hidden_dropout must be float"):
        tiny_config(hidden_dropout="0.1")
    with pytest.raises(UserError, match="activation"):
        tiny_config(activation="swish")
    assert tiny_config(padded_vocab_size=None).padded_vocab_size == 99


def test_registry():
    base = build_config("roberta", "base", vocab_size=50265, seq_length=512)
    assert (base.num_layers, base.hidden_size, base.num_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert base.padded_vocab_size == 50304 and base.max_position_embeddings == 514
    large = build_config("roberta", "large", vocab_size=50265, seq_length=512, tp_size=4, hidden_dropout=0.0)
    assert (large.num_layers, large.hidden_size, large.num_heads) == (24, 1024, 16)
    assert large.padded_vocab_size == 50304 and large.hidden_dropout == 0.0
    assert set(MODEL_SIZES["roberta"]) == {"debug", "xsmall", "small", "base", "large"}

    with pytest.raises(UserError, match="model.size 'huge'.*debug, xsmall, small, base, large"):
        build_config("roberta", "huge", vocab_size=100, seq_length=16)
    with pytest.raises(UserError, match="model.name 'gpt'.*roberta"):
        build_config("gpt", "base", vocab_size=100, seq_length=16)
    with pytest.raises(UserError, match="'hidden_dim' is not a roberta config field; valid: .*hidden_size"):
        build_config("roberta", "debug", vocab_size=100, seq_length=16, hidden_dim=8)
    with pytest.raises(UserError, match="'padded_vocab_size' is not"):
        build_config("roberta", "debug", vocab_size=100, seq_length=16, padded_vocab_size=256)
