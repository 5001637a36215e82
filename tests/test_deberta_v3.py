"""DeBERTaV3: DeBERTa towers under replaced token detection with GDES, built by the registry
(`deberta_v3`): the loss contract, gradient routing, Hugging Face export, TP=2 against TP=1."""

import dataclasses
import warnings
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers

from data.errors import UserError
from models import deberta_v3
from models.config import DebertaConfig, RTDConfig
from models.deberta import DebertaForMaskedLM, DebertaModel
from models.deberta_hf import DroppedOnExportWarning
from models.deberta_v3 import DebertaV3DiscriminatorHead
from models.layers import predicted_positions
from models.registry import MODEL_SIZES, build_config, build_model
from models.rtd import ReplacedTokenDetection, RTDDiscriminator, total_loss
from tests.launch import free_port, tensor_parallel_group
from tests.parity import (assert_rtd_loss_terms_by_hand, favour_token_, has_grad, masked_batch, merged_grads,
                          metric_counts, mlm_labels, no_grad, padded_ids, perturb_, sharded_pair)

SEQ = 16
VOCAB = 99  # padded to 128: rows 99..127 are vocabulary padding
MASK_ID = 4
PAD_ID = 0  # DebertaConfig's default pad_token_id


def v3_config(vocab: int = VOCAB, tp_size: int = 1, **overrides) -> RTDConfig:
    """The registry's debug size (discriminator 2 x 64, generator 1 x 64 with EMD), dropout off."""
    return build_config("deberta_v3", "debug", vocab_size=vocab, seq_length=SEQ, tp_size=tp_size,
                        hidden_dropout=0.0, attention_dropout=0.0, **overrides)


def v3_model(seed: int = 0, perturb: bool = True, **overrides) -> ReplacedTokenDetection:
    torch.manual_seed(seed)
    model = build_model(v3_config(**overrides)).eval()
    if perturb:
        perturb_(model, seed + 3)
    return model


def rtd_batch(lengths=(SEQ, 11, 4), seed: int = 1, first_index: int = 100, vocab: int = VOCAB):
    """What the data pipeline gives: ids masked (100% mask token), labels, mask, sample indices."""
    gen = torch.Generator().manual_seed(seed)  # one stream: the ids, then the labelled positions
    original, attention_mask = padded_ids(lengths, SEQ, vocab, PAD_ID, low=5, seed=gen)
    labels = mlm_labels(original, attention_mask, gen, always=1)
    return masked_batch(original, attention_mask, labels, MASK_ID, first_index)


def word_tables(model: ReplacedTokenDetection):
    """(E_G, E_Delta) of a gdes model."""
    return model.generator.embeddings.word.weight, model.discriminator.embeddings.word.gdes_delta.weight


# --------------------------------------------------------------------------------- registry
def test_registry_builds_debertav3_towers_at_debug():
    cfg = build_config("deberta_v3", "debug", vocab_size=1000, seq_length=64)
    assert cfg.backbone == "deberta" and isinstance(cfg.generator, DebertaConfig)
    assert (cfg.embedding_sharing, cfg.rtd_weight, cfg.temperature) == ("gdes", 50.0, 1.0)
    gen, disc = cfg.generator, cfg.discriminator
    assert (disc.num_layers, disc.hidden_size, gen.num_layers, gen.hidden_size) == (2, 64, 1, 64)
    assert gen.enhanced_mask_decoder and not disc.enhanced_mask_decoder
    assert gen.padded_vocab_size == disc.padded_vocab_size == 1024 and disc.max_position_embeddings == 512

    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, ReplacedTokenDetection)
    assert type(model.generator) is DebertaForMaskedLM
    assert isinstance(model.discriminator, RTDDiscriminator)
    assert type(model.discriminator.backbone) is DebertaModel
    assert isinstance(model.discriminator.head, DebertaV3DiscriminatorHead)
    # No absolute positions in the discriminator: only the word table is shared; the generator's
    # position table is the EMD's.
    assert model.discriminator.embeddings.position is None
    assert model.generator.embeddings.position.weight.shape == (512, 64)
    assert model.shared_tables == deberta_v3.deberta_v3_shared_tables(cfg) == ("word",)
    assert model.discriminator_embeddings == "backbone.embeddings"
    names = set(dict(model.named_parameters()))
    assert "discriminator.backbone.embeddings.word.gdes_delta.weight" in names
    assert not any(n.startswith("discriminator.backbone.lm_head") for n in names)  # no dead MLM head
    assert RTDConfig(**dataclasses.asdict(cfg)) == cfg  # the trainer's saved form rebuilds it


def test_registry_sizes_follow_the_paper():
    # (discriminator layers, hidden, heads, FFN, generator layers): same width, half the depth.
    sizes = {"xsmall": (12, 384, 6, 1536, 6), "small": (6, 768, 12, 3072, 3),
             "base": (12, 768, 12, 3072, 6), "large": (24, 1024, 16, 4096, 12)}
    for size, (layers, hidden, heads, ffn, gen_layers) in sizes.items():
        cfg = build_config("deberta_v3", size, vocab_size=128100, seq_length=512, tp_size=2)
        for tower, depth in ((cfg.discriminator, layers), (cfg.generator, gen_layers)):
            assert (tower.num_layers, tower.hidden_size, tower.num_heads, tower.intermediate_size) == (
                depth, hidden, heads, ffn), size
            # DeBERTaV3 attention
            assert (tower.position_buckets, tower.max_relative_positions) == (256, 512)
            assert tower.share_att_key and tower.norm_rel_ebd == "layer_norm"
            assert tower.pos_att_type == ["p2c", "c2p"] and not tower.position_biased_input
            assert tower.padded_vocab_size == 128128 and tower.type_vocab_size == 0
        assert cfg.generator.enhanced_mask_decoder and not cfg.discriminator.enhanced_mask_decoder
    assert set(MODEL_SIZES["deberta_v3"]) == {"debug", "xsmall", "small", "base", "large"}


def test_registry_overrides_and_validation():
    cfg = build_config("deberta_v3", "debug", vocab_size=100, seq_length=16, pad_token_id=1,
                       embedding_sharing="es", rtd_weight=10, generator={"enhanced_mask_decoder": False})
    assert cfg.generator.pad_token_id == cfg.discriminator.pad_token_id == 1
    assert (cfg.embedding_sharing, cfg.rtd_weight) == ("es", 10.0)
    assert not cfg.generator.enhanced_mask_decoder
    with pytest.raises(UserError, match="deberta discriminator has no MLM head"):
        build_config("deberta_v3", "debug", vocab_size=100, seq_length=16, enhanced_mask_decoder=True)
    with pytest.raises(UserError, match="'hidden_dim' is not a deberta config field"):
        build_config("deberta_v3", "debug", vocab_size=100, seq_length=16, hidden_dim=8)
    with pytest.raises(UserError, match="needs generator.hidden_size"):
        build_config("deberta_v3", "debug", vocab_size=100, seq_length=16, generator={"hidden_size": 32})
    # ELECTRA keeps its own defaults.
    assert build_config("electra", "debug", vocab_size=100, seq_length=16).embedding_sharing == "es"


# ---------------------------------------------------------------------- forward contract
def test_predicted_logits_go_through_the_emd():
    model = v3_model()
    generator, batch = model.generator, rtd_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    predicted = batch["labels"] != -100
    with torch.no_grad():
        local = generator.predicted_logits(ids, mask, predicted_positions(batch["labels"]))  # (N, Vp)
        full = generator.logits(ids, mask)  # (B, T, V), through the EMD
        encoder_only = generator._vocab_logits(generator.encode(ids, mask))[predicted]
    assert local.shape == (int(predicted.sum()), 128)
    torch.testing.assert_close(local[:, :VOCAB], full[predicted], atol=1e-6, rtol=0)
    assert torch.all(local[:, VOCAB:] == torch.finfo(local.dtype).min)
    assert not torch.allclose(local, encoder_only, atol=1e-3)  # the EMD does change them


def test_forward_contract_and_loss_terms_by_hand():
    model = v3_model()
    model.sampling_seed = 1234
    batch = rtd_batch(seed=4)
    favour_token_(model, batch, 7)
    out = model(**batch)
    assert set(out["loss_sums"]) == {"mlm", "rtd"}
    assert out["loss_weights"] == {"mlm": 1.0, "rtd": 50.0}
    assert out["normalizers"] == {"mlm": "predicted", "rtd": "tokens"}
    assert_rtd_loss_terms_by_hand(model, batch, out, seed=1234, vocab=VOCAB, rtd_weight=50.0)


# -------------------------------------------------------------------------------------- GDES
def test_gdes_routes_rtd_to_delta_and_mlm_to_the_generator_table():
    fresh = v3_model(perturb=False)
    assert not word_tables(fresh)[1].any()  # E_Delta starts at zero: E_D = E_G at init

    model = v3_model()
    e_g, e_delta = word_tables(model)
    assert e_delta.shape == e_g.shape == (128, 64) and e_delta.any()
    disc = model.discriminator.embeddings
    ids = rtd_batch()["input_ids"]
    # The discriminator's effective table is E_G + E_Delta, in its lookups and as exported.
    torch.testing.assert_close(disc.word(ids), F.embedding(ids, e_g + e_delta), atol=1e-7, rtol=0)
    torch.testing.assert_close(disc.word.weight, e_g + e_delta, atol=0, rtol=0)
    merged = model.merged_discriminator_embeddings()
    assert set(merged) == {"word"}
    torch.testing.assert_close(merged["word"], e_g + e_delta, atol=0, rtol=0)

    out = model(**rtd_batch())
    out["loss_sums"]["rtd"].backward(retain_graph=True)
    assert no_grad(e_g) and has_grad(e_delta)  # stop-gradient on E_G
    model.zero_grad()
    out["loss_sums"]["mlm"].backward()
    assert has_grad(e_g) and no_grad(e_delta)


@pytest.mark.parametrize("sharing", ["none", "es", "gdes"])
def test_rtd_gradient_never_reaches_the_generator(sharing):
    model = v3_model(embedding_sharing=sharing)
    out = model(**rtd_batch())
    out["loss_sums"]["rtd"].backward()
    shared = {"embeddings.word.weight"} if sharing == "es" else set()
    leaked = [n for n, p in model.generator.named_parameters() if n not in shared and not no_grad(p)]
    assert not leaked
    assert all(has_grad(p) for p in model.discriminator.parameters())
    if sharing == "es":  # one table, which the RTD loss does update
        assert has_grad(model.generator.embeddings.word.weight)


# ------------------------------------------------------------------------------ Hugging Face
def test_discriminator_exports_as_debertav2model_with_merged_embeddings():
    model = v3_model()
    cfg, sd = model.config, model.state_dict()
    batch = rtd_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()

    hf_sd = deberta_v3.deberta_v3_to_hf_state_dict(sd, cfg)  # the discriminator by default
    e_g, e_delta = word_tables(model)
    torch.testing.assert_close(hf_sd["embeddings.word_embeddings.weight"], (e_g + e_delta)[:VOCAB].detach(),
                               atol=0, rtol=0)
    hf = transformers.DebertaV2Model(deberta_v3.deberta_v3_hf_config(cfg)).eval()
    result = hf.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        ours = model.discriminator.backbone.encode(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        our_logits = model.discriminator.rtd_logits(ids, mask)
    # Only real tokens: HF also masks padded queries, whose outputs nobody reads.
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)

    # The RTD head, exported apart, applied to Hugging Face's states gives our logits.
    head = deberta_v3.deberta_v3_rtd_head_state_dict(sd, cfg)
    assert set(head) == {f"mask_predictions.{m}.{p}" for m in ("LayerNorm", "dense", "classifer")
                         for p in ("weight", "bias")}
    x = F.layer_norm(theirs[:, :1] + theirs, (64,), head["mask_predictions.LayerNorm.weight"],
                     head["mask_predictions.LayerNorm.bias"], cfg.discriminator.layer_norm_eps)
    x = F.gelu(F.linear(x, head["mask_predictions.dense.weight"], head["mask_predictions.dense.bias"]))
    their_logits = F.linear(x, head["mask_predictions.classifer.weight"],
                            head["mask_predictions.classifer.bias"]).squeeze(-1)
    torch.testing.assert_close(our_logits[real], their_logits[real], atol=1e-5, rtol=0)


def test_generator_exports_as_debertav2formaskedlm():
    model = v3_model(generator={"enhanced_mask_decoder": False})
    cfg = model.config
    batch = rtd_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    hf_sd = deberta_v3.deberta_v3_to_hf_state_dict(model.state_dict(), cfg, component="generator")
    hf = transformers.DebertaV2ForMaskedLM(deberta_v3.deberta_v3_hf_config(cfg, "generator")).eval()
    result = hf.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        ours = model.generator.logits(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == theirs.shape == (3, SEQ, VOCAB)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)

    # With the EMD (the default) Hugging Face has no place for its position table, and says so.
    emd = v3_model()
    with pytest.warns(DroppedOnExportWarning, match="embeddings.position.weight"):
        deberta_v3.deberta_v3_to_hf_state_dict(emd.state_dict(), emd.config, component="generator")


def _zero_vocab_padding(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As in a trained model: the padding rows (never predicted nor sampled) stay zero."""
    return {k: v.clone().index_fill_(0, torch.arange(VOCAB, 128), 0) if v.shape[:1] == (128,) else v
            for k, v in sd.items()}


@pytest.mark.parametrize("emd", [False, True])
def test_hugging_face_round_trip(emd):
    model = v3_model(generator={"enhanced_mask_decoder": emd})
    cfg = model.config
    sd = _zero_vocab_padding(model.state_dict())
    with pytest.warns(DroppedOnExportWarning) if emd else warnings.catch_warnings():
        if not emd:
            warnings.simplefilter("error", DroppedOnExportWarning)
        gen = deberta_v3.deberta_v3_to_hf_state_dict(sd, cfg, component="generator")
    disc = deberta_v3.deberta_v3_to_hf_state_dict(sd, cfg, component="discriminator")
    head = deberta_v3.deberta_v3_rtd_head_state_dict(sd, cfg)
    back = deberta_v3.deberta_v3_from_hf_state_dict(
        {"generator": gen, "discriminator": disc, "rtd_head": head}, cfg)
    # Only the EMD's position table is lost (Hugging Face has no EMD).
    assert set(sd) - set(back) == ({"generator.embeddings.position.weight"} if emd else set())
    assert set(back) <= set(sd)
    for key in back:  # E_Delta = E_D - E_G: exact up to float rounding
        torch.testing.assert_close(back[key], sd[key], atol=1e-7, rtol=0, msg=key)
    result = model.load_state_dict(back, strict=not emd)
    assert result.missing_keys == (["generator.embeddings.position.weight"] if emd else [])

    with pytest.raises(ValueError, match="differs from the generator's"):
        deberta_v3.deberta_v3_from_hf_state_dict({"generator": gen, "discriminator": disc},
                                              dataclasses.replace(cfg, embedding_sharing="es"))
    with pytest.raises(ValueError, match="must be a DebertaV2Model"):
        deberta_v3.deberta_v3_from_hf_state_dict({"generator": gen, "discriminator": gen}, cfg)


# ----------------------------------------------------------------------------------- TP = 2
TP = 2


def _tp_worker(rank: int, port: int):
    with tensor_parallel_group(rank, port, TP):
        # vocab 99 -> rank 1 holds ids 64..127 (35 real); vocab 60 -> rank 1 holds only padding.
        for vocab in (VOCAB, 60):
            reference, parallel, dims = sharded_pair(partial(build_model, v3_config(vocab=vocab, tp_size=TP)), rank, TP)
            assert dims["discriminator.backbone.embeddings.word.gdes_delta.weight"] == 0
            assert dims["generator.embeddings.word.weight"] == 0

            batch = rtd_batch(vocab=vocab)  # same on both ranks
            ref_out, tp_out = reference(**batch), parallel(**batch)
            # Same samples at TP=2 (noise per vocabulary id, not per shard): same labels and counts.
            assert metric_counts(tp_out) == metric_counts(ref_out)
            counts = {"predicted": 10, "tokens": 31}
            ref_loss, tp_loss = total_loss(ref_out, counts), total_loss(tp_out, counts)
            torch.testing.assert_close(tp_loss, ref_loss, atol=1e-5, rtol=1e-5)
            ref_loss.backward()
            tp_loss.backward()
            merged = merged_grads(parallel, dims, TP)
            for name, param in reference.named_parameters():
                assert param.grad is not None, name
                torch.testing.assert_close(merged[name], param.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_tp2_matches_tp1():
    mp.spawn(_tp_worker, args=(free_port(),), nprocs=TP, join=True)
