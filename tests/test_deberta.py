"""DeBERTa: parity with Hugging Face DebertaV2, the enhanced mask decoder, the MLM loss contract,
fp32 attention scores, config, registry, and TP=2 against TP=1."""

import warnings
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from data.errors import UserError
from models.config import DebertaConfig, pad_vocab_size
from models.deberta import DebertaForMaskedLM, DebertaModel, key_padding_mask, relative_position_buckets
from models.deberta_hf import DroppedOnExportWarning, from_hf_state_dict, hf_config, to_hf_state_dict
from models.parallel import ParallelLayers, partition_dims
from models.registry import build_config, build_model
from tests import parity
from tests.launch import free_port, tensor_parallel_group
from tests.parity import (LEGACY_MLM_HEAD, assert_reloads_unchanged, merged_grads, mlm_labels, rename_modules,
                          sharded_pair)

VOCAB = 99


def tiny_config(**overrides) -> DebertaConfig:
    fields = dict(
        vocab_size=VOCAB,
        padded_vocab_size=pad_vocab_size(VOCAB, 128),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        enhanced_mask_decoder=False,
    )
    fields.update(overrides)
    return DebertaConfig(**fields)


def perturb_(model: torch.nn.Module, seed: int = 3):
    """parity.perturb_; the vocabulary-padding rows stay zero as in a trained model (their logits are masked)."""
    parity.perturb_(model, seed)
    with torch.no_grad():
        model.embeddings.word.weight[VOCAB:].zero_()
        model.lm_head.bias[VOCAB:].zero_()


def tiny_model(seed: int = 0, **overrides) -> DebertaForMaskedLM:
    torch.manual_seed(seed)
    model = DebertaForMaskedLM(tiny_config(**overrides), ParallelLayers(1)).eval()
    perturb_(model, seed + 3)
    return model


def padded_batch(cfg: DebertaConfig, length: int, lengths=None, seed: int = 1):
    """Ids of rows of different lengths (default: full, about half, one token), right-padded."""
    lengths = lengths if lengths is not None else (length, length // 2 + 1, 1)
    return parity.padded_ids(lengths, length, cfg.vocab_size, cfg.pad_token_id, low=3, seed=seed)


# ----------------------------------------------------------------------------- relative positions
@pytest.mark.parametrize("buckets, max_distance", [(256, 512), (16, 64), (4, 7), (-1, 512)])
def test_relative_position_buckets_match_hugging_face(buckets, max_distance):
    length = 1100  # past max_distance: the far log buckets and the clipping both show
    ours = relative_position_buckets(length, buckets, max_distance)
    reference = torch.zeros(1, length, 1)  # HF reads only the length of its arguments
    theirs = hf_deberta.build_relative_position(reference, reference, buckets, max_distance)[0]
    assert torch.equal(ours, theirs)
    if buckets > 0:  # exact distances near zero, a logarithmic ladder up to buckets - 1
        assert ours[buckets // 2, 0] == buckets // 2 and ours[0, buckets // 2] == -(buckets // 2)
        assert ours[max_distance - 1, 0] == buckets - 1


def test_relative_indices_are_cached_per_length_and_device():
    model = tiny_model()
    first = model.encoder.relative_indices(7, torch.device("cpu"))
    assert model.encoder.relative_indices(7, torch.device("cpu")) is first
    assert model.encoder.relative_indices(8, torch.device("cpu"))[0].shape == (8, 8)


# ----------------------------------------------------------------------------- Hugging Face parity
PARITY_CASES = {
    # DeBERTaV3 attention (256 log buckets, shared keys, normalised table), c2p only.
    "c2p-buckets256-shared-norm-len7": (7, dict(pos_att_type=["c2p"])),
    # DeBERTa-v2 style: clipped distances, separate position projections, raw table, absolute input.
    "both-clipped-separate-raw-biased-len128": (128, dict(
        position_buckets=-1, max_relative_positions=48, share_att_key=False, norm_rel_ebd="none",
        position_biased_input=True, type_vocab_size=2)),
    # Full V3 defaults at 512: distances past 128 fall into the log buckets.
    "both-buckets256-shared-norm-len512": (512, dict()),
    # Separate projections with log buckets; clipping past 64 and p2c only.
    "p2c-buckets16-separate-norm-len128": (128, dict(
        pos_att_type=["p2c"], position_buckets=16, max_relative_positions=64, share_att_key=False)),
    # No relative attention at all: BERT-like attention with absolute positions.
    "content-only-biased-len7": (7, dict(relative_attention=False, pos_att_type=[],
                                          position_biased_input=True)),
}


@pytest.mark.parametrize("case", PARITY_CASES)
def test_matches_hugging_face(case):
    length, overrides = PARITY_CASES[case]
    model = tiny_model(**overrides)
    cfg = model.config
    input_ids, attention_mask = padded_batch(cfg, length)
    real = attention_mask.bool()

    backbone = transformers.DebertaV2Model(hf_config(cfg, component="backbone")).eval()
    result = backbone.load_state_dict(to_hf_state_dict(model.state_dict(), cfg, component="backbone"))
    assert not result.missing_keys and not result.unexpected_keys
    mlm = transformers.DebertaV2ForMaskedLM(hf_config(cfg)).eval()
    hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    assert hf_sd["deberta.embeddings.word_embeddings.weight"].shape == (VOCAB, 32)  # padding trimmed
    result = mlm.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    with torch.no_grad():
        ours_hidden = model.encode(input_ids, attention_mask)
        theirs_hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        ours_logits = model.logits(input_ids, attention_mask)
        theirs_logits = mlm(input_ids=input_ids, attention_mask=attention_mask).logits
    assert ours_logits.shape == theirs_logits.shape == (3, length, VOCAB)
    # Only real tokens: HF also masks padded queries, whose outputs nobody reads.
    torch.testing.assert_close(ours_hidden[real], theirs_hidden[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_logits[real], theirs_logits[real], atol=1e-5, rtol=0)


def test_saved_hugging_face_model_loads_without_missing_keys(tmp_path):
    model = tiny_model(share_att_key=False)
    cfg = model.config
    input_ids, attention_mask = padded_batch(cfg, 9)
    classes = {"mlm": transformers.DebertaV2ForMaskedLM, "backbone": transformers.DebertaV2Model}
    for component, cls in classes.items():
        hf = cls(hf_config(cfg, component=component)).eval()
        hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg, component=component), strict=True)
        with torch.no_grad():
            before = hf(input_ids=input_ids, attention_mask=attention_mask)[0]
        reloaded = assert_reloads_unchanged(hf, tmp_path / component, input_ids, attention_mask, before)
        assert reloaded.config.share_att_key is False and reloaded.config.position_buckets == 256


def test_hf_state_dict_round_trips_from_both_head_layouts_and_the_backbone():
    model = tiny_model(share_att_key=False, type_vocab_size=2)
    cfg, ours = model.config, model.state_dict()
    hf_sd = to_hf_state_dict(ours, cfg)
    back = from_hf_state_dict(hf_sd, cfg)
    assert back.keys() == ours.keys()
    for key in ours:
        assert torch.equal(back[key], ours[key]), key

    # The legacy head (transformers' default `legacy=True`), with its tied decoder copies.
    legacy = rename_modules(hf_sd, LEGACY_MLM_HEAD)
    legacy["cls.predictions.decoder.weight"] = legacy["deberta.embeddings.word_embeddings.weight"]
    legacy["cls.predictions.decoder.bias"] = legacy["cls.predictions.bias"]
    legacy_config = hf_config(cfg)
    legacy_config.legacy = True
    result = transformers.DebertaV2ForMaskedLM(legacy_config).load_state_dict(legacy, strict=True)
    assert not result.missing_keys and not result.unexpected_keys  # the layout we build is HF's
    back = from_hf_state_dict(legacy, cfg)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)

    # A DebertaV2Model: no head, no "deberta." prefix; everything else restored.
    backbone_sd = to_hf_state_dict(ours, cfg, component="backbone")
    assert not any(key.startswith(("deberta.", "lm_predictions.")) for key in backbone_sd)
    backbone = from_hf_state_dict(backbone_sd, cfg)
    assert set(ours) - set(backbone) == {"lm_head.dense.weight", "lm_head.dense.bias",
                                         "lm_head.norm.weight", "lm_head.norm.bias", "lm_head.bias"}
    assert all(torch.equal(backbone[k], ours[k]) for k in backbone)

    with pytest.raises(KeyError, match="unexpected Hugging Face key"):
        from_hf_state_dict({"deberta.encoder.layer.0.attention.self.qkv.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="vocabulary rows"):
        from_hf_state_dict({"lm_predictions.lm_head.bias": torch.zeros(VOCAB + 1)}, cfg)


def test_emd_export_drops_the_position_table_and_says_so():
    model = tiny_model(enhanced_mask_decoder=True)
    cfg = model.config
    with pytest.warns(DroppedOnExportWarning, match="embeddings.position.weight"):
        hf_sd = to_hf_state_dict(model.state_dict(), cfg)
    assert not any("position_embeddings" in key for key in hf_sd)
    hf = transformers.DebertaV2ForMaskedLM(hf_config(cfg)).eval()
    hf.load_state_dict(hf_sd, strict=True)
    # A checkpoint that carries a position table (microsoft's releases do) restores it.
    table = model.embeddings.position.weight.detach()
    back = from_hf_state_dict({**hf_sd, "deberta.embeddings.position_embeddings.weight": table}, cfg)
    assert torch.equal(back["embeddings.position.weight"], table)
    # Without EMD (and without absolute input positions) nothing is dropped and nothing is warned.
    plain = tiny_model()
    assert plain.embeddings.position is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", DroppedOnExportWarning)
        to_hf_state_dict(plain.state_dict(), plain.config)


def test_backbone_alone_is_the_mlm_model_without_head_and_emd_table():
    mlm = tiny_model(enhanced_mask_decoder=True)
    backbone = DebertaModel(mlm.config, ParallelLayers(1)).eval()
    expected = {k for k in mlm.state_dict() if not k.startswith("lm_head.")} - {"embeddings.position.weight"}
    assert set(backbone.state_dict()) == expected
    backbone.load_state_dict({k: v for k, v in mlm.state_dict().items() if k in expected}, strict=True)
    input_ids, attention_mask = padded_batch(mlm.config, 9)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode(input_ids, attention_mask),
                                   mlm.encode(input_ids, attention_mask), atol=0, rtol=0)
    with warnings.catch_warnings():  # nothing of the backbone lacks a Hugging Face counterpart
        warnings.simplefilter("error", DroppedOnExportWarning)
        hf_sd = to_hf_state_dict(backbone.state_dict(), mlm.config, component="backbone")
    hf = transformers.DebertaV2Model(hf_config(mlm.config, component="backbone"))
    hf.load_state_dict(hf_sd, strict=True)


# ----------------------------------------------------------------------------- enhanced mask decoder
def full_relative_table(encoder):
    """The whole (2k, H) relative table, normalised as the encoder does (the encoder itself passes the
    layers only the rows a length reaches)."""
    table = encoder.relative_embeddings.weight
    return encoder.relative_norm(table) if encoder.relative_norm is not None else table


def layer_by_hand(layer, kv, query, attention_mask, table, cfg):
    """One DeBERTa layer written out from the layer's weights: keys/values from `kv`, queries from
    `query`, c2p/p2c from explicit (i, j) indexing of the whole (2k, H) relative table."""
    B, T, H = kv.shape
    nh, hs = cfg.num_heads, cfg.head_size
    att = layer.attention

    def heads(x):  # (..., T, H) -> (..., nh, T, hs)
        return x.view(*x.shape[:-1], nh, hs).transpose(-3, -2)

    q, k, v = heads(att.query(query)), heads(att.key(kv)), heads(att.value(kv))
    pos_key = heads((att.pos_key or att.key)(table))  # (nh, 2k, hs)
    pos_query = heads((att.pos_query or att.query)(table))
    span = cfg.relative_span
    delta = relative_position_buckets(T, cfg.position_buckets, cfg.max_relative_distance)  # (T, T)
    c2p_row = (delta + span).clamp(0, 2 * span - 1)  # [i, j]: bucket of i - j
    p2c_row = (-delta.T + span).clamp(0, 2 * span - 1)  # [i, j]: minus the bucket of j - i
    scores = torch.einsum("bhid,bhjd->bhij", q, k)
    scores = scores + torch.einsum("bhid,hijd->bhij", q, pos_key[:, c2p_row])
    scores = scores + torch.einsum("bhjd,hijd->bhij", k, pos_query[:, p2c_row])
    scores = scores / (hs * 3) ** 0.5
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
    x = layer.attention_norm(query + att.output(context))
    return layer.ffn_norm(x + layer.ffn(x))


def test_emd_by_hand():
    model = tiny_model(enhanced_mask_decoder=True, emd_layers=2, share_att_key=False, num_layers=3)
    cfg = model.config
    input_ids, attention_mask = padded_batch(cfg, 12)
    real = attention_mask.bool()
    with torch.no_grad():
        # H_{L-1}: the embeddings through all layers but the last, by the model's public pieces.
        x = model.embeddings(input_ids)
        padding = key_padding_mask(attention_mask)
        table, indices = model.encoder.relative_inputs(12, x.device)
        for layer in model.encoder.layers[:-1]:
            x = layer(x, padding, table, indices)
        last, full = model.encoder.layers[-1], full_relative_table(model.encoder)
        torch.testing.assert_close(  # the encoder is the last layer once more, query = kv
            model.encode(input_ids, attention_mask)[real],
            layer_by_hand(last, x, x, attention_mask, full, cfg)[real], atol=1e-5, rtol=0)

        query = x + model.embeddings.position.weight[:12]  # H_{L-1} + absolute positions
        for _ in range(2):  # each pass's output is the next pass's query; keys/values stay H_{L-1}
            query = layer_by_hand(last, x, query, attention_mask, full, cfg)
        torch.testing.assert_close(model.mlm_hidden(input_ids, attention_mask)[real], query[real],
                                   atol=1e-5, rtol=0)
        expected = model.lm_head(query, model.embeddings.word.weight)[..., :VOCAB]
        torch.testing.assert_close(model.logits(input_ids, attention_mask)[real], expected[real],
                                   atol=1e-5, rtol=0)


def test_emd_off_is_encoder_then_head_and_emd_on_changes_the_logits():
    off = tiny_model()
    input_ids, attention_mask = padded_batch(off.config, 16)
    with torch.no_grad():
        hidden = off.encode(input_ids, attention_mask)
        head = off.lm_head(hidden, off.embeddings.word.weight)[..., :VOCAB]
        torch.testing.assert_close(off.logits(input_ids, attention_mask), head, atol=0, rtol=0)

    on = tiny_model(enhanced_mask_decoder=True)  # off's weights plus a position table
    on.load_state_dict({**off.state_dict(), "embeddings.position.weight": on.embeddings.position.weight})
    with torch.no_grad():
        torch.testing.assert_close(on.encode(input_ids, attention_mask), hidden, atol=0, rtol=0)
        change = (on.logits(input_ids, attention_mask) - head)[attention_mask.bool()].abs()
    assert change.mean() > 1e-2  # a thousand times the parity tolerance


def test_emd_gradient_reaches_the_position_table_and_last_layer():
    model = tiny_model(enhanced_mask_decoder=True).train()
    input_ids, attention_mask = padded_batch(model.config, 10)
    model(input_ids, attention_mask, mlm_labels(input_ids, attention_mask))["loss_sum"].backward()
    assert model.embeddings.position.weight.grad[:10].abs().sum() > 0
    assert torch.all(model.embeddings.position.weight.grad[10:] == 0)


# ----------------------------------------------------------------------------- loss, padding, dtypes
def test_loss_matches_cross_entropy_and_padded_vocabulary_gets_nothing():
    model = tiny_model(enhanced_mask_decoder=True)
    with torch.no_grad():  # without masking, these would take almost all the probability
        model.lm_head.bias[VOCAB:] = 100.0
    input_ids, attention_mask = padded_batch(model.config, 16)
    labels = mlm_labels(input_ids, attention_mask)
    out = model(input_ids, attention_mask, labels)
    full = model.logits(input_ids, attention_mask)
    expected = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out["loss_sum"], expected, atol=1e-5, rtol=1e-5)
    assert out["num_predicted"].dtype == torch.long and out["num_predicted"].ndim == 0
    assert int(out["num_predicted"]) == int((labels != -100).sum())
    out["loss_sum"].backward()
    assert torch.all(model.embeddings.word.weight.grad[VOCAB:] == 0)
    assert torch.all(model.lm_head.bias.grad[VOCAB:] == 0)


@pytest.mark.parametrize("emd", [False, True])
def test_fully_padded_row_gives_no_nan_and_changes_nothing(emd):
    model = tiny_model(enhanced_mask_decoder=emd)
    input_ids, attention_mask = padded_batch(model.config, 16, lengths=(16, 0, 7))
    labels = mlm_labels(input_ids, attention_mask)
    logits = model.logits(input_ids, attention_mask)
    assert torch.isfinite(logits).all()
    alone = model.logits(input_ids[2:], attention_mask[2:])
    torch.testing.assert_close(logits[2:][attention_mask[2:].bool()], alone[attention_mask[2:].bool()],
                               atol=1e-6, rtol=1e-6)
    out = model(input_ids, attention_mask, labels)
    out["loss_sum"].backward()
    assert torch.isfinite(out["loss_sum"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    out = model(input_ids[1:2], attention_mask[1:2], labels[1:2])  # nothing to predict
    assert out["loss_sum"].item() == 0.0 and int(out["num_predicted"]) == 0


def test_attention_scores_are_fp32_in_an_fp16_model():
    model = tiny_model(num_layers=1)
    attention = model.encoder.layers[0].attention
    with torch.no_grad():  # q = k, ~300 per element: q.k/sqrt(3 hs) ~ 1e5 > fp16's max 65504
        attention.query.weight.normal_(0, 300 / 32**0.5)
        attention.key.weight.copy_(attention.query.weight)
    input_ids, attention_mask = padded_batch(model.config, 16)
    with torch.no_grad():
        hidden = model.embeddings(input_ids).half()
        q = attention.query.half()(hidden)[..., :8]  # head 0
        assert torch.isinf((q * attention.scale) @ q.transpose(-1, -2)).any()  # fp16 would overflow
        model.half()
        logits = model.logits(input_ids, attention_mask)
    assert logits.dtype == torch.float16
    assert torch.isfinite(logits[attention_mask.bool()]).all()


def test_dropout_is_active_in_training_only():
    model = tiny_model(hidden_dropout=0.1, attention_dropout=0.1, enhanced_mask_decoder=True)
    input_ids, attention_mask = padded_batch(model.config, 16)
    with torch.no_grad():
        first, second = model.logits(input_ids, attention_mask), model.logits(input_ids, attention_mask)
        assert torch.equal(first, second)
        model.train()
        first, second = model.logits(input_ids, attention_mask), model.logits(input_ids, attention_mask)
        assert not torch.equal(first, second)
        # The relative table gets its own dropout in every layer (and EMD pass), as in DeBERTa.
        dropped = []
        for layer in model.encoder.layers:
            layer.attention.relative_dropout.register_forward_hook(
                lambda module, inputs, output: dropped.append(not torch.equal(inputs[0], output)))
        model.logits(input_ids, attention_mask)
    assert dropped == [True] * (model.config.num_layers + model.config.emd_layers)


# ----------------------------------------------------------------------------- init, config, registry
def test_initialisation_and_parameters():
    torch.manual_seed(0)
    model = build_model(build_config("deberta", "debug", vocab_size=1000, seq_length=64))
    cfg = model.config
    params = dict(model.named_parameters())
    for name in ("embeddings.word.weight", "encoder.relative_embeddings.weight",
                 "encoder.layers.0.attention.query.weight", "encoder.layers.1.ffn.down.weight"):
        weight = params[name][1 : cfg.vocab_size] if name == "embeddings.word.weight" else params[name]
        assert abs(weight.std().item() - 0.02) < 0.001, name
    assert torch.all(model.embeddings.word.weight[cfg.pad_token_id] == 0)
    assert torch.all(model.embeddings.word.weight[cfg.vocab_size :] == 0)
    assert torch.all(model.lm_head.bias == 0)
    # V3 defaults: shared keys (no position projections), LayerNorm on the table, no token types,
    # an absolute table for the EMD only.
    assert model.encoder.layers[0].attention.pos_key is None
    assert model.encoder.relative_norm is not None and model.embeddings.token_type is None
    assert model.encoder.relative_embeddings.weight.shape == (512, 64)  # 2 * 256 buckets
    assert "lm_head.decoder.weight" not in model.state_dict()
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - (1024 + 512) * 64


def test_config_validation():
    with pytest.raises(UserError, match="enhanced_mask_decoder .* position_biased_input false"):
        tiny_config(enhanced_mask_decoder=True, position_biased_input=True)
    with pytest.raises(UserError, match="pos_att_type"):
        tiny_config(pos_att_type=["c2p", "p2p"])
    with pytest.raises(UserError, match="pos_att_type"):
        tiny_config(pos_att_type=["c2p", "c2p"])
    with pytest.raises(UserError, match="pos_att_type must be list"):
        tiny_config(pos_att_type="c2p|p2c")
    with pytest.raises(UserError, match="share_att_key must be bool"):
        tiny_config(share_att_key="true")
    with pytest.raises(UserError, match="position_buckets must be -1"):
        tiny_config(position_buckets=0)
    with pytest.raises(UserError, match="must exceed position_buckets"):
        tiny_config(position_buckets=256, max_relative_positions=100)
    with pytest.raises(UserError, match="relative_attention is false"):
        tiny_config(relative_attention=False)
    with pytest.raises(UserError, match="norm_rel_ebd"):
        tiny_config(norm_rel_ebd="LayerNorm")
    cfg = tiny_config(max_relative_positions=-1, position_buckets=-1)
    assert cfg.max_relative_distance == 512 and cfg.relative_span == 512
    assert tiny_config(pos_att_type=("p2c",)).pos_att_type == ["p2c"]


def test_registry():
    base = build_config("deberta", "base", vocab_size=128100, seq_length=512)
    assert (base.num_layers, base.hidden_size, base.num_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert base.padded_vocab_size == 128128 and base.max_position_embeddings == 512
    assert (base.position_buckets, base.max_relative_positions, base.relative_attention) == (256, 512, True)
    assert base.pos_att_type == ["p2c", "c2p"] and base.norm_rel_ebd == "layer_norm"
    assert base.share_att_key and not base.position_biased_input and base.enhanced_mask_decoder
    assert build_config("deberta", "debug", vocab_size=100, seq_length=128).max_position_embeddings == 512
    assert build_config("deberta", "debug", vocab_size=100, seq_length=1024).max_position_embeddings == 1024
    large = build_config("deberta", "large", vocab_size=128100, seq_length=512, tp_size=8,
                         share_att_key=False)
    assert (large.num_layers, large.hidden_size, large.num_heads) == (24, 1024, 16)
    assert large.intermediate_size == 4096
    assert large.padded_vocab_size == pad_vocab_size(128100, 128, 8) and not large.share_att_key
    xsmall, small = (build_config("deberta", s, vocab_size=100, seq_length=8) for s in ("xsmall", "small"))
    assert (xsmall.num_layers, xsmall.hidden_size, xsmall.num_heads) == (12, 384, 6)
    assert (small.num_layers, small.hidden_size) == (6, 768)
    with pytest.raises(UserError, match="'hidden_dim' is not a deberta config field"):
        build_config("deberta", "debug", vocab_size=100, seq_length=16, hidden_dim=8)
    # RoBERTa keeps its own position layout.
    assert build_config("roberta", "debug", vocab_size=100, seq_length=16).max_position_embeddings == 18


# ----------------------------------------------------------------------------- tensor parallelism
TP = 2
TP_CASES = {
    # separate position projections (both column-parallel), log buckets, EMD with its position table
    "separate-emd": dict(intermediate_size=38, share_att_key=False, position_buckets=8,
                         max_relative_positions=16, enhanced_mask_decoder=True),
    # shared projections, clipped distances, absolute input positions, token types
    "shared-biased": dict(intermediate_size=38, position_buckets=-1, max_relative_positions=6,
                          position_biased_input=True, enhanced_mask_decoder=False, type_vocab_size=2),
}


def _tp_worker(rank: int, port: int):
    with tensor_parallel_group(rank, port, TP):
        for overrides in TP_CASES.values():
            cfg = tiny_config(padded_vocab_size=pad_vocab_size(VOCAB, 64, TP), **overrides)
            reference, parallel, dims = sharded_pair(partial(DebertaForMaskedLM, cfg), rank, TP, perturb_)
            assert dims["encoder.layers.0.attention.query.weight"] == 0
            assert dims["encoder.layers.0.attention.output.weight"] == 1
            assert "encoder.relative_embeddings.weight" not in dims  # replicated on every rank
            assert partition_dims(parallel) == dims

            input_ids, attention_mask = padded_batch(cfg, 12, lengths=(12, 7, 0))  # same on both ranks
            labels = mlm_labels(input_ids, attention_mask)
            ref_out = reference(input_ids, attention_mask, labels)
            tp_out = parallel(input_ids, attention_mask, labels)
            torch.testing.assert_close(tp_out["loss_sum"], ref_out["loss_sum"], atol=1e-5, rtol=1e-5)
            assert int(tp_out["num_predicted"]) == int(ref_out["num_predicted"])
            ref_out["loss_sum"].backward()
            tp_out["loss_sum"].backward()
            merged = merged_grads(parallel, dims, TP)
            for name, param in reference.named_parameters():
                torch.testing.assert_close(merged[name], param.grad, atol=1e-5, rtol=1e-5, msg=name)
            with torch.no_grad():
                torch.testing.assert_close(parallel.logits(input_ids, attention_mask),
                                           reference.logits(input_ids, attention_mask), atol=1e-5, rtol=1e-5)
            assert parallel.num_parameters() == reference.num_parameters()


def test_tp2_matches_tp1():
    mp.spawn(_tp_worker, args=(free_port(),), nprocs=TP, join=True)
