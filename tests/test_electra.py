"""ELECTRA towers against Hugging Face, and replaced token detection: embedding sharing (gradients),
sampling, labels, the loss contract, TP independence, config and registry."""

import dataclasses
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import transformers

from data.errors import UserError
from models import electra
from models.config import ElectraConfig, RobertaConfig, RTDConfig, pad_vocab_size
from models.deberta_v3 import DebertaV3DiscriminatorHead
from models.electra import ElectraDiscriminator, ElectraGenerator
from models.layers import rows_at
from models.parallel import ParallelLayers
from models.registry import MODEL_SIZES, build_config, build_model, build_rtd
from models.roberta import RobertaForMaskedLM
from models.rtd import ReplacedTokenDetection, RTDDiscriminator, sample_replacements, total_loss
from tests.launch import free_port, tensor_parallel_group
from tests.parity import (assert_reloads_unchanged, assert_rtd_loss_terms_by_hand, favour_token_, has_grad,
                          masked_batch, merged_grads, metric_counts, mlm_labels, no_grad, padded_ids, perturb_,
                          sharded_pair)

SEQ = 16
VOCAB = 99
MASK_ID = 4


def tower(**overrides) -> ElectraConfig:
    fields = dict(
        vocab_size=VOCAB, padded_vocab_size=pad_vocab_size(VOCAB, 128), hidden_size=32, num_layers=2,
        num_heads=4, intermediate_size=37, max_position_embeddings=SEQ, embedding_size=24,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    fields.update(overrides)
    return ElectraConfig(**fields)


def rtd_config(sharing: str, **overrides) -> RTDConfig:
    """A narrow generator (H=16, E=24) and a discriminator (H=32, E=24): both project E -> H."""
    return RTDConfig(tower(hidden_size=16, num_heads=2, intermediate_size=20), tower(),
                     embedding_sharing=sharing, **overrides)


def rtd_model(sharing: str, seed: int = 0, **overrides) -> ReplacedTokenDetection:
    torch.manual_seed(seed)
    return build_rtd(rtd_config(sharing, **overrides), ParallelLayers(1)).eval()


def padded_batch(lengths=(SEQ, 11, 4), seed: int = 1, pad_id: int = 0):
    return padded_ids(lengths, SEQ, VOCAB, pad_id, low=5, seed=seed)


def rtd_batch(lengths=(SEQ, 11, 4), seed: int = 1, first_index: int = 100):
    """What the data pipeline gives: ids masked (100% mask token), labels, mask, sample indices."""
    original, attention_mask = padded_batch(lengths, seed)
    return masked_batch(original, attention_mask, mlm_labels(original, attention_mask, seed + 1), MASK_ID,
                        first_index)


# ----------------------------------------------------------------------- parity with Hugging Face
def test_discriminator_matches_hugging_face(tmp_path):
    torch.manual_seed(0)
    cfg = tower()
    model = ElectraDiscriminator(cfg, ParallelLayers(1)).eval()
    perturb_(model)
    hf_sd = electra.tower_to_hf_state_dict(model.state_dict(), cfg, "discriminator")
    assert hf_sd["electra.embeddings.word_embeddings.weight"].shape == (VOCAB, 24)  # padding trimmed
    hf = transformers.ElectraForPreTraining(electra.tower_hf_config(cfg, "discriminator")).eval()
    result = hf.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        ours = model.rtd_logits(input_ids, attention_mask)
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    assert ours.shape == theirs.shape == (3, SEQ)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert_reloads_unchanged(hf, tmp_path, input_ids, attention_mask, theirs)


def test_generator_matches_hugging_face():
    torch.manual_seed(0)
    cfg = tower(hidden_size=16, num_heads=2, intermediate_size=20, activation="relu")
    model = ElectraGenerator(cfg, ParallelLayers(1)).eval()
    perturb_(model)
    hf = transformers.ElectraForMaskedLM(electra.tower_hf_config(cfg, "generator")).eval()
    hf_sd = electra.tower_to_hf_state_dict(model.state_dict(), cfg, "generator")
    result = hf.load_state_dict(hf_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert hf.generator_lm_head.weight is hf.electra.embeddings.word_embeddings.weight  # still tied

    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        ours = model.logits(input_ids, attention_mask)
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    assert ours.shape == theirs.shape == (3, SEQ, VOCAB)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("component", ["generator", "discriminator"])
def test_tower_state_dicts_round_trip(component):
    torch.manual_seed(0)
    cfg = tower()
    model = (ElectraGenerator if component == "generator" else ElectraDiscriminator)(cfg, ParallelLayers(1))
    perturb_(model)
    with torch.no_grad():  # padding rows are zero in a trained model: never predicted nor sampled
        model.embeddings.word.weight[VOCAB:].zero_()
        if component == "generator":
            model.lm_head.bias[VOCAB:].zero_()
    ours = model.state_dict()
    hf_sd = electra.tower_to_hf_state_dict(ours, cfg, component)
    back = electra.tower_from_hf_state_dict(hf_sd, cfg, component)
    assert back.keys() == ours.keys()
    for key in ours:
        assert torch.equal(back[key], ours[key]), key
    with pytest.raises(KeyError, match="unexpected Hugging Face"):
        electra.tower_from_hf_state_dict({"electra.pooler.dense.weight": torch.zeros(1)}, cfg, component)


def test_gdes_discriminator_exports_merged_embeddings():
    model = rtd_model("gdes")
    perturb_(model)  # E_Delta is no longer zero
    cfg = model.config
    batch = rtd_batch()
    sd = model.state_dict()
    hf_sd = electra.to_hf_state_dict(sd, cfg)  # the discriminator by default
    merged = sd["generator.embeddings.word.weight"] + sd["discriminator.embeddings.word.gdes_delta.weight"]
    word_key = "electra.embeddings.word_embeddings.weight"
    torch.testing.assert_close(hf_sd[word_key], merged[:VOCAB], atol=0, rtol=0)

    hf = transformers.ElectraForPreTraining(electra.hf_config(cfg)).eval()
    hf.load_state_dict(hf_sd, strict=True)
    with torch.no_grad():
        ours = model.discriminator.rtd_logits(batch["input_ids"], batch["attention_mask"])
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    # Both towers from Hugging Face back into an RTD model: E_Delta = E_D - E_G.
    hf_gen = electra.to_hf_state_dict(sd, cfg, component="generator")
    with torch.no_grad():
        for table in (hf_gen[word_key], hf_sd[word_key]):
            table[VOCAB:].zero_()
    back = electra.from_hf_state_dict({"generator": hf_gen, "discriminator": hf_sd}, cfg)
    assert back.keys() == sd.keys()
    for key in sd:
        rows = slice(None, VOCAB) if sd[key].shape[:1] == (128,) else slice(None)
        torch.testing.assert_close(back[key][rows], sd[key][rows], atol=1e-7, rtol=0, msg=key)

    es_cfg = rtd_config("es")
    with pytest.raises(ValueError, match="differs from the generator's"):
        electra.from_hf_state_dict({"generator": hf_gen, "discriminator": hf_sd}, es_cfg)


# ---------------------------------------------------------------------------- embedding sharing
def _tables(model: ReplacedTokenDetection):
    gen = model.generator.embeddings
    return gen.word.weight, gen.position.weight


def test_gdes_routes_rtd_to_delta_and_mlm_to_shared_table():
    fresh = rtd_model("gdes")
    deltas = [fresh.discriminator.embeddings.word.gdes_delta.weight,
              fresh.discriminator.embeddings.position.gdes_delta.weight]
    assert all(not d.any() for d in deltas)  # E_Delta starts at zero: E_D = E_G at init
    assert "discriminator.embeddings.word.gdes_delta.weight" in dict(fresh.named_parameters())

    model = rtd_model("gdes")
    perturb_(model)
    word_g, position_g = _tables(model)
    disc = model.discriminator.embeddings
    word_d, position_d = disc.word.gdes_delta.weight, disc.position.gdes_delta.weight
    assert word_d.shape == word_g.shape and position_d.shape == position_g.shape
    assert getattr(word_d, "tensor_model_parallel", False)  # partitioned like E_G
    ids = rtd_batch()["input_ids"]
    # The discriminator's effective table is E_G + E_Delta, in its lookups and as exported.
    torch.testing.assert_close(disc.word(ids), F.embedding(ids, word_g + word_d), atol=1e-7, rtol=0)
    torch.testing.assert_close(disc.word.weight, word_g + word_d, atol=0, rtol=0)
    merged = model.merged_discriminator_embeddings()
    torch.testing.assert_close(merged["word"], word_g + word_d, atol=0, rtol=0)
    torch.testing.assert_close(merged["position"], position_g + position_d, atol=0, rtol=0)

    out = model(**rtd_batch())
    out["loss_sums"]["rtd"].backward(retain_graph=True)
    assert no_grad(word_g) and no_grad(position_g)  # stop-gradient on E_G
    assert has_grad(word_d) and has_grad(position_d)
    model.zero_grad()
    out["loss_sums"]["mlm"].backward()
    assert has_grad(word_g) and has_grad(position_g)
    assert no_grad(word_d) and no_grad(position_d)


def test_es_shares_one_table_that_both_losses_update():
    model = rtd_model("es")
    names = dict(model.named_parameters())
    assert not any(n.startswith(("discriminator.embeddings.word", "discriminator.embeddings.position"))
                   for n in names)
    assert model.discriminator.embeddings.word.source is model.generator.embeddings.word
    word, position = _tables(model)
    out = model(**rtd_batch())
    out["loss_sums"]["rtd"].backward(retain_graph=True)
    assert has_grad(word) and has_grad(position)
    rtd_grad = word.grad.clone()
    model.zero_grad()
    out["loss_sums"]["mlm"].backward()
    assert has_grad(word) and has_grad(position)
    assert not torch.allclose(word.grad, rtd_grad)


def test_none_keeps_separate_tables():
    model = rtd_model("none")
    word_g, position_g = _tables(model)
    disc = model.discriminator.embeddings
    word_d, position_d = disc.word.weight, disc.position.weight
    assert word_d is not word_g and not torch.equal(word_d, word_g)
    out = model(**rtd_batch())
    out["loss_sums"]["rtd"].backward(retain_graph=True)
    assert has_grad(word_d) and has_grad(position_d) and no_grad(word_g) and no_grad(position_g)
    model.zero_grad()
    out["loss_sums"]["mlm"].backward()
    assert has_grad(word_g) and has_grad(position_g) and no_grad(word_d) and no_grad(position_d)


@pytest.mark.parametrize("sharing", ["none", "es", "gdes"])
def test_rtd_gradient_never_reaches_the_generator(sharing):
    model = rtd_model(sharing)
    perturb_(model)
    out = model(**rtd_batch())
    out["loss_sums"]["rtd"].backward()
    shared = {"embeddings.word.weight", "embeddings.position.weight"} if sharing == "es" else set()
    leaked = [n for n, p in model.generator.named_parameters() if n not in shared and not no_grad(p)]
    assert not leaked
    assert all(has_grad(p) for n, p in model.discriminator.named_parameters() if "token_type" not in n)


# ------------------------------------------------------------------------------------- sampling
def _logits(rows: int, seed: int = 0, vocab: int = VOCAB, padded: int = 128) -> torch.Tensor:
    logits = torch.randn(rows, padded, generator=torch.Generator().manual_seed(seed))
    logits[:, vocab:] = torch.finfo(torch.float32).min  # what the generator gives
    return logits


def test_sampling_is_keyed_by_seed_and_sample_index():
    layers = ParallelLayers(1)
    logits, counts = _logits(9), torch.tensor([4, 0, 5])
    def draw(index, seed=7):
        return sample_replacements(logits, counts, torch.tensor(index), seed, 1.0, VOCAB, layers)

    first = draw([10, 11, 12])
    assert torch.equal(first, draw([10, 11, 12]))
    changed = draw([10, 11, 13])  # only the third sample's rows change
    assert torch.equal(changed[:4], first[:4]) and not torch.equal(changed[4:], first[4:])
    assert not torch.equal(draw([10, 11, 12], seed=8), first)
    # A sample's replacements do not depend on what else is in the micro-batch.
    alone = sample_replacements(logits[4:], torch.tensor([5]), torch.tensor([12]), 7, 1.0, VOCAB, layers)
    assert torch.equal(alone, first[4:])


def test_sampling_never_draws_vocabulary_padding():
    logits = torch.zeros(64, 128)
    logits[:, VOCAB:] = 1e4  # as if the padding were not masked: it would win every draw
    sampled = sample_replacements(logits, torch.tensor([32, 32]), torch.tensor([0, 1]), 0, 1.0, VOCAB,
                                  ParallelLayers(1))
    assert sampled.max() < VOCAB
    assert len(set(sampled.tolist())) > 20  # and the real ids are drawn uniformly


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampling_follows_softmax_with_temperature(temperature):
    vocab = 6
    low = torch.finfo(torch.float32).min  # the two padded ids
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, low, low])
    n = 4000
    logits, counts = row.expand(n, -1), torch.ones(n, dtype=torch.long)
    sampled = sample_replacements(logits, counts, torch.arange(n), 5, temperature, vocab, ParallelLayers(1))
    frequencies = torch.bincount(sampled, minlength=8).float() / n
    expected = torch.cat([torch.softmax(row[:vocab] / temperature, dim=0), torch.zeros(2)])
    torch.testing.assert_close(frequencies, expected, atol=0.025, rtol=0)


def test_very_low_temperature_takes_the_argmax():
    logits = _logits(40, seed=2)
    sampled = sample_replacements(logits, torch.tensor([40]), torch.tensor([3]), 0, 1e-4, VOCAB,
                                  ParallelLayers(1))
    assert torch.equal(sampled, logits[:, :VOCAB].argmax(dim=-1))


# --------------------------------------------------------------------------- labels and the loss
def test_a_sample_equal_to_the_original_is_labelled_original():
    model = rtd_model("gdes")
    batch = rtd_batch()
    predicted = batch["labels"] != -100
    original = torch.where(predicted, batch["labels"], batch["input_ids"])
    batch["labels"][predicted] = 7  # every predicted position's original token is 7
    original[predicted] = 7
    real = batch["attention_mask"].bool()

    with torch.no_grad():
        model.generator.lm_head.bias[7] = 1e4  # the generator puts all its mass on the original
    out = model(**batch)
    assert int(out["metrics"]["rtd_actual_positives"]) == 0
    logits = model.discriminator.rtd_logits(original, batch["attention_mask"])
    expected = F.binary_cross_entropy_with_logits(logits[real], torch.zeros(int(real.sum())), reduction="sum")
    torch.testing.assert_close(out["loss_sums"]["rtd"], expected, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        model.generator.lm_head.bias[7] = 0.0
        model.generator.lm_head.bias[8] = 1e4  # now every sample differs from the original
    out = model(**batch)
    assert int(out["metrics"]["rtd_actual_positives"]) == int(predicted.sum())


def test_padding_is_excluded_from_the_rtd_loss():
    model = rtd_model("none")
    batch = rtd_batch(lengths=(SEQ, 0, 7))  # one row entirely padding
    out = model(**batch)
    assert int(out["metrics"]["rtd_tokens"]) == SEQ + 7
    # Other ids at the padded positions change the discriminator's logits there, not the loss.
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 50))
    with torch.no_grad():
        logits = model.discriminator.rtd_logits(batch["input_ids"], batch["attention_mask"])
        other_logits = model.discriminator.rtd_logits(other["input_ids"], batch["attention_mask"])
    padding = batch["attention_mask"] == 0
    assert not torch.allclose(logits[padding], other_logits[padding])
    again = model(**other)
    torch.testing.assert_close(again["loss_sums"]["rtd"], out["loss_sums"]["rtd"], atol=1e-5, rtol=1e-5)
    assert metric_counts(again) == metric_counts(out)
    again["loss_sums"]["rtd"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_terms_agree_with_a_hand_computation():
    model = rtd_model("gdes", rtd_weight=50.0, temperature=1.0)
    perturb_(model)
    model.sampling_seed = 1234
    batch = rtd_batch(seed=4)
    favour_token_(model, batch, 7)
    out = model(**batch)
    assert out["loss_weights"] == {"mlm": 1.0, "rtd": 50.0}
    assert out["normalizers"] == {"mlm": "predicted", "rtd": "tokens"}
    assert_rtd_loss_terms_by_hand(model, batch, out, seed=1234, vocab=VOCAB, rtd_weight=50.0)


# ------------------------------------------------------------------ other towers: the RTD interface
class _RobertaGenerator(RobertaForMaskedLM):
    """What a backbone adds to be a generator: logits at the predicted positions."""

    def predicted_logits(self, input_ids, attention_mask, positions):
        return self._vocab_logits(rows_at(self.encode(input_ids, attention_mask), positions))


def test_debertav3_head_formula():
    torch.manual_seed(0)
    cfg = tower()
    head = DebertaV3DiscriminatorHead(cfg, ParallelLayers(1))
    perturb_(head)
    hidden = torch.randn(2, 5, 32)
    x = F.layer_norm(hidden[:, 0:1] + hidden, (32,), head.norm.weight, head.norm.bias, cfg.layer_norm_eps)
    expected = F.linear(F.gelu(F.linear(x, head.dense.weight, head.dense.bias)), head.classifier.weight,
                        head.classifier.bias).squeeze(-1)
    torch.testing.assert_close(head(hidden), expected, atol=1e-6, rtol=1e-6)
    assert head(hidden).shape == (2, 5)


def test_rtd_over_other_towers_with_gdes():
    """A RoBERTa-layout pair with the DeBERTaV3 head: how the DeBERTa towers plug in."""
    torch.manual_seed(0)
    layers = ParallelLayers(1)
    roberta = dict(vocab_size=VOCAB, padded_vocab_size=128, num_layers=1, num_heads=2, intermediate_size=20,
                   max_position_embeddings=SEQ + 2, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0)
    generator = _RobertaGenerator(RobertaConfig(hidden_size=32, **roberta), layers)
    disc_cfg = RobertaConfig(hidden_size=32, **roberta)
    backbone = RobertaForMaskedLM(disc_cfg, layers)
    del backbone.lm_head  # the discriminator has no MLM head
    discriminator = RTDDiscriminator(backbone, DebertaV3DiscriminatorHead(disc_cfg, layers))
    model = ReplacedTokenDetection(generator, discriminator, rtd_config("gdes")).eval()
    assert model.shared_tables == ("word", "position")
    assert model.discriminator_embeddings == "backbone.embeddings"
    perturb_(model)

    out = model(**rtd_batch())
    out["loss_sums"]["rtd"].backward(retain_graph=True)
    assert no_grad(generator.embeddings.word.weight) and no_grad(generator.embeddings.position.weight)
    assert has_grad(backbone.embeddings.word.gdes_delta.weight)
    model.zero_grad()
    out["loss_sums"]["mlm"].backward()
    assert has_grad(generator.embeddings.word.weight) and no_grad(backbone.embeddings.word.gdes_delta.weight)

    gen_sd, disc_sd = model.split_state_dict(model.state_dict())
    merged = generator.embeddings.word.weight + backbone.embeddings.word.gdes_delta.weight
    torch.testing.assert_close(disc_sd["backbone.embeddings.word.weight"], merged, atol=0, rtol=0)
    assert not any("gdes_delta" in key for key in disc_sd)
    rejoined = model.join_state_dicts(gen_sd, disc_sd)
    assert rejoined.keys() == model.state_dict().keys()


# ----------------------------------------------------------------------------------- TP = 2
TP = 2


def _tp_worker(rank: int, port: int):
    with tensor_parallel_group(rank, port, TP):
        # vocab 99 -> rank 1 holds ids 64..127 (35 real); vocab 60 -> rank 1 holds only padding.
        for vocab in (VOCAB, 60):
            cfg = RTDConfig(tower(vocab_size=vocab, hidden_size=16, num_heads=2, intermediate_size=20),
                            tower(vocab_size=vocab, intermediate_size=36), embedding_sharing="gdes")
            reference, parallel, dims = sharded_pair(partial(build_rtd, cfg), rank, TP)
            assert "discriminator.embeddings.word.gdes_delta.weight" in dims

            batch = rtd_batch()
            batch["input_ids"].clamp_(max=vocab - 1)
            labels = batch["labels"]
            batch["labels"] = torch.where(labels == -100, labels, labels.clamp(max=vocab - 1))
            ref_out, tp_out = reference(**batch), parallel(**batch)
            # Same samples at TP=2 (noise per vocabulary id, not per shard): identical labels and counts.
            assert metric_counts(tp_out) == metric_counts(ref_out)
            for key in ("mlm", "rtd"):
                torch.testing.assert_close(tp_out["loss_sums"][key], ref_out["loss_sums"][key],
                                           atol=1e-5, rtol=1e-5)
            total_loss(ref_out, {"predicted": 10, "tokens": 31}).backward()
            total_loss(tp_out, {"predicted": 10, "tokens": 31}).backward()
            merged = merged_grads(parallel, dims, TP)
            for name, param in reference.named_parameters():
                if param.grad is None:
                    assert merged[name] is None, name
                else:
                    torch.testing.assert_close(merged[name], param.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_tp2_matches_tp1():
    mp.spawn(_tp_worker, args=(free_port(),), nprocs=TP, join=True)


# ------------------------------------------------------------------------------ config, registry
def test_registry_sizes_follow_the_paper():
    sizes = {"small": (12, 256, 4, 1024, 128, 64), "base": (12, 768, 12, 3072, 768, 256),
             "large": (24, 1024, 16, 4096, 1024, 256)}
    for size, (layers, hidden, heads, ffn, embedding, gen_hidden) in sizes.items():
        cfg = build_config("electra", size, vocab_size=30522, seq_length=128)
        d, g = cfg.discriminator, cfg.generator
        assert (d.num_layers, d.hidden_size, d.num_heads, d.intermediate_size, d.embedding_size) == (
            layers, hidden, heads, ffn, embedding)
        assert (g.num_layers, g.hidden_size, g.embedding_size) == (layers, gen_hidden, embedding)
        assert g.intermediate_size == 4 * g.hidden_size and g.head_size == 64
        assert d.padded_vocab_size == g.padded_vocab_size == 30592
        assert d.max_position_embeddings == 512 and d.layer_norm_eps == 1e-12 and d.type_vocab_size == 2
        assert (cfg.embedding_sharing, cfg.rtd_weight, cfg.temperature) == ("es", 50.0, 1.0)
    assert set(MODEL_SIZES["electra"]) == {"debug", "small", "base", "large"}

    # ELECTRA-Small is 14M parameters (the shared tables counted once).
    small = build_model(build_config("electra", "small", vocab_size=30522, seq_length=128))
    disc = small.num_parameters() - sum(p.numel() for p in small.generator.parameters())
    assert 13.4e6 < disc + small.generator.embeddings.word.weight.numel() + 512 * 128 < 13.8e6


def test_registry_overrides():
    cfg = build_config("electra", "debug", vocab_size=100, seq_length=16, tp_size=2,
                       generator={"num_layers": 1, "hidden_dropout": 0.2}, hidden_dropout=0.0,
                       embedding_sharing="gdes", rtd_weight=10)
    assert cfg.generator.num_layers == 1 and cfg.discriminator.num_layers == 2
    assert cfg.generator.hidden_dropout == 0.2 and cfg.discriminator.hidden_dropout == 0.0
    assert (cfg.embedding_sharing, cfg.rtd_weight) == ("gdes", 10.0)
    assert cfg.generator.padded_vocab_size == cfg.discriminator.padded_vocab_size == pad_vocab_size(100, 128, 2)
    model = build_model(cfg)
    assert isinstance(model, ReplacedTokenDetection) and model.shared_tables == ("word", "position")
    # The saved form (dataclasses.asdict, as the trainer writes it) rebuilds the same config.
    assert RTDConfig(**dataclasses.asdict(cfg)) == cfg

    with pytest.raises(UserError, match="'hidden_dim' is not a electra config field"):
        build_config("electra", "debug", vocab_size=100, seq_length=16, hidden_dim=8)
    with pytest.raises(UserError, match="'generator.vocab_size' is not a electra tower field"):
        build_config("electra", "debug", vocab_size=100, seq_length=16, generator={"vocab_size": 8})
    with pytest.raises(UserError, match="embedding_sharing 'shared' is unknown"):
        build_config("electra", "debug", vocab_size=100, seq_length=16, embedding_sharing="shared")


def test_config_validation():
    with pytest.raises(UserError, match="needs generator.embedding_size"):
        RTDConfig(tower(embedding_size=16), tower(), embedding_sharing="gdes")
    RTDConfig(tower(embedding_size=16), tower(), embedding_sharing="none")  # no sharing, no constraint
    with pytest.raises(UserError, match="generator.vocab_size"):
        RTDConfig(tower(vocab_size=98), tower(), embedding_sharing="none")
    with pytest.raises(UserError, match="temperature must be > 0"):
        rtd_config("es", temperature=0.0)
    with pytest.raises(UserError, match="rtd_weight must be float"):
        rtd_config("es", rtd_weight="50")
    with pytest.raises(UserError, match="hidden_size .* num_heads"):
        tower(hidden_size=30)
    assert tower(embedding_size=None).embedding_size == 32
    from models.registry import build_config
    with pytest.raises(UserError, match="'generator_mask_token_prob' was removed: set data.mask_token_prob"):
        build_config("electra", "debug", 100, 16, generator_mask_token_prob=1.0)
    # a config saved while the field existed still loads (native files, checkpoints' model_config)
    from models.native import config_from_dict
    saved = dataclasses.asdict(rtd_config("es"))
    assert config_from_dict("electra", {**saved, "generator_mask_token_prob": 1.0}) == rtd_config("es")
