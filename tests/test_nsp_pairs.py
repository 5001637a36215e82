"""Next-sentence prediction: SEGMENT-PAIR / SENTENCE-PAIR samples (data/pairs.py), the NSP head and its
loss (models/nsp.py), its accounting in the step, export, fine-tuning, and one real 2-rank run."""
import json
import sys

import numpy as np
import pytest
import torch
import yaml

from data.errors import UserError
from data.loader import MaskedSamples
from data.masking import IGNORE_INDEX, MaskingRecipe
from data.packing import build_packed
from data.pairs import PairSamples, pair_room, sentences, truncate_pair
from data.sample_cache import SampleIndexCache
from data.tasks import truncate_longest_first
from tests.indexed import write_indexed
from tests.launch import ROOT, deepspeed_cmd, metrics, run

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
DOT, QUOTE = 10, 11  # sentence-ending ids of the hand-made vocabulary ('.' and a closing quote)
VOCAB = 200
TABLE = np.zeros(VOCAB, dtype=bool)
TABLE[[DOT, QUOTE]] = True


def random_documents(count, seed=0):
    """Documents of 0-7 sentences of 1-12 words each ended by '.' (sometimes '."'), ids 20..199."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        doc = []
        for _ in range(rng.integers(0, 8)):
            doc += rng.integers(20, VOCAB, size=rng.integers(1, 13)).tolist() + [DOT]
            if rng.random() < 0.2:
                doc.append(QUOTE)
        docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = random_documents(300)
    docs[5] = list(range(20, 120))  # one sentence longer than any room: cut into pieces
    return docs, write_indexed(tmp_path_factory.mktemp("pairs") / "docs", docs)


def document_ranges(spans):
    return list(zip(spans["doc_begin"].tolist(), spans["doc_end"].tolist()))


def document_of(ranges, begin, length):
    """The document holding stream range [begin, begin + length), asserting it lies in one."""
    for d, (lo, hi) in enumerate(ranges):
        if lo <= begin < hi:
            assert begin + length <= hi, "a span crosses a document end"
            return d
    raise AssertionError(f"no document holds {begin}")


def test_sentence_boundaries_come_from_the_table(tmp_path):
    docs = [[30, 31, DOT, 32, DOT, QUOTE, 33], [], [34, DOT, DOT], [35]]
    spans = sentences(write_indexed(tmp_path / "s", docs), 0, len(docs), TABLE)
    stream = [t for d in docs for t in d]
    got = [stream[b:b + n] for b, n in zip(spans["begin"].tolist(), spans["length"].tolist())]
    # '.' then '"' end once, after the quote; a document end always ends a sentence; documents never mix
    assert got == [[30, 31, DOT], [32, DOT, QUOTE], [33], [34, DOT, DOT], [35]]
    assert spans["document"].tolist() == [0, 0, 0, 2, 3]


CLOSE = 12  # a closing mark in a token of its own (” 」 ）): Tokenizer.sentence_marks code 2
MARKS = TABLE.astype(np.int8)
MARKS[CLOSE] = 2


@pytest.mark.parametrize("chunk", [1 << 24, 1, 2, 3])
def test_closing_tokens_after_an_end_stay_with_their_sentence(tmp_path, monkeypatch, chunk):
    """。 then a separate ” end one sentence after the ”; a closing token elsewhere is an ordinary token, and
    one that starts a document never joins the document before; read in chunks of any size."""
    monkeypatch.setattr("data.pairs._READ_CHUNK", chunk)
    docs = [[30, DOT, CLOSE, CLOSE, 31, 32, CLOSE, DOT, 33, DOT, CLOSE], [CLOSE, 34, DOT], [35, CLOSE, 36]]
    spans = sentences(write_indexed(tmp_path / "s", docs), 0, len(docs), MARKS)
    stream = [t for d in docs for t in d]
    got = [stream[b:b + n] for b, n in zip(spans["begin"].tolist(), spans["length"].tolist())]
    assert got == [[30, DOT, CLOSE, CLOSE], [31, 32, CLOSE, DOT], [33, DOT, CLOSE], [CLOSE, 34, DOT], [35, CLOSE, 36]]
    assert spans["document"].tolist() == [0, 0, 0, 1, 2]
    # a boolean table (no closer code) keeps the old behaviour: the closer starts the next sentence
    old = sentences(write_indexed(tmp_path / "b", docs[:1]), 0, 1, TABLE)
    assert old["length"].tolist() == [2, 6, 2, 1]


def test_segment_pairs_fit_keep_order_and_take_random_b_from_another_document(corpus):
    docs, dataset = corpus
    seq, seps = 24, 2
    pairs = PairSamples("segment_pair", dataset, 0, len(docs), seq, BOS, EOS, TABLE, seps, seed=3)
    spans = sentences(dataset, 0, len(docs), TABLE)
    ranges, stream = document_ranges(spans), np.concatenate([np.asarray(d, np.int64) for d in docs])
    room, labels = pair_room(seq, seps), pairs.next_sentence_labels
    # sentence starts, and the starts of the room-sized pieces of a sentence longer than the room
    boundaries = {b + k * room for b, n in zip(spans["begin"].tolist(), spans["length"].tolist())
                  for k in range(-(-n // room))} | set(spans["doc_end"].tolist())
    assert len(pairs) > 200 and abs(labels.mean() - 0.5) < 0.08
    lengths = pairs.sample_lengths()
    for i in range(len(pairs)):
        a0, na = int(pairs.a_begin[i]), int(pairs.a_length[i])
        b0, nb = int(pairs.b_begin[i]), int(pairs.b_length[i])
        tokens = pairs.tokens(i)
        assert len(tokens) == lengths[i] == na + nb + 2 + seps <= seq and na >= 1 and nb >= 1
        assert tokens.tolist() == [BOS, *stream[a0:a0 + na], EOS, EOS, *stream[b0:b0 + nb], EOS]
        doc_a, doc_b = document_of(ranges, a0, na), document_of(ranges, b0, nb)
        if labels[i] == 0:  # B continues A in its document
            assert b0 == a0 + na and doc_a == doc_b
        else:
            assert doc_b != doc_a and b0 in boundaries  # from a sentence start of another document
    # chunks start at sentence (or piece) starts; A ends at one unless the chunk is a single sentence
    assert np.isin(pairs.a_begin, list(boundaries)).all()
    ends_on_boundary = np.isin(pairs.a_begin + pairs.a_length, list(boundaries))
    assert ends_on_boundary.mean() > 0.5 and not ends_on_boundary.all()
    assert any(document_of(ranges, int(b), 1) == 5 for b in pairs.a_begin)  # the long sentence's pieces


def test_sentence_pairs_are_consecutive_sentences_or_a_random_one(corpus):
    docs, dataset = corpus
    seq, seps = 16, 1
    pairs = PairSamples("sentence_pair", dataset, 0, len(docs), seq, BOS, EOS, TABLE, seps, seed=3)
    spans = sentences(dataset, 0, len(docs), TABLE)
    start_of = {b: k for k, b in enumerate(spans["begin"].tolist())}
    labels = pairs.next_sentence_labels
    assert len(pairs) > 200 and abs(labels.mean() - 0.5) < 0.08
    for i in range(len(pairs)):
        a, b = start_of[int(pairs.a_begin[i])], start_of[int(pairs.b_begin[i])]  # both begin a sentence
        full = spans["length"][a], spans["length"][b]
        # truncated as fine-tuning truncates a pair: longest first, prefixes kept
        want = truncate_longest_first([0] * int(full[0]), [0] * int(full[1]), pair_room(seq, seps))
        assert (int(pairs.a_length[i]), int(pairs.b_length[i])) == tuple(map(len, want))
        assert len(pairs.tokens(i)) <= seq
        if labels[i] == 0:
            assert b == a + 1 and spans["document"][a] == spans["document"][b]
        else:
            assert spans["document"][a] != spans["document"][b]


def test_truncate_pair_is_truncate_longest_first():
    rng = np.random.default_rng(0)
    a, b, room = rng.integers(1, 40, 500), rng.integers(1, 40, 500), rng.integers(2, 50, 500)
    for x, y, r in zip(a, b, room):
        got = truncate_pair(np.array([x]), np.array([y]), int(r))
        want = truncate_longest_first([0] * int(x), [0] * int(y), int(r))
        assert (int(got[0][0]), int(got[1][0])) == (len(want[0]), len(want[1]))


@pytest.mark.parametrize("kind", ["segment_pair", "sentence_pair"])
def test_pairs_are_deterministic_per_seed_and_cached(corpus, tmp_path, kind):
    docs, dataset = corpus
    cache = SampleIndexCache(tmp_path / "cache")
    make = lambda seed, c=None: build_packed(kind, dataset, 0, len(docs), 24, BOS, EOS, c, {"id": 1},
                                             sentence_ends=TABLE, pair_separators=2, seed=seed)
    a, b, other = make(7, cache), make(7, cache), make(8)
    assert len(cache.built) == 1 and len(cache.loaded) == 2  # the second read the first's index
    assert all(np.array_equal(a.tokens(i), b.tokens(i)) for i in range(len(a)))
    assert np.array_equal(a.next_sentence_labels, make(7).next_sentence_labels)
    assert not np.array_equal(a.next_sentence_labels[:50], other.next_sentence_labels[:50])
    table = TABLE.copy()
    table[QUOTE] = False  # another tokenizer's table: another index
    build_packed(kind, dataset, 0, len(docs), 24, BOS, EOS, cache, {"id": 1}, sentence_ends=table,
                 pair_separators=2, seed=7)
    assert len(cache.built) == 2


def test_batches_carry_next_sentence_labels_and_never_mask_separators(corpus):
    docs, dataset = corpus
    pairs = PairSamples("segment_pair", dataset, 0, len(docs), 24, BOS, EOS, TABLE, 2, seed=1)
    recipe = MaskingRecipe(mask_id=MASK, vocab_size=VOCAB, special_ids=(BOS, PAD, EOS, UNK, MASK), mask_prob=0.5)
    samples = MaskedSamples(pairs, recipe, 24, PAD, seed=1)
    batch = samples.__getitems__(list(range(64)))
    ids = [samples.sample_id(g) for g in range(64)]
    assert batch["next_sentence_label"].dtype == torch.int64 and batch["next_sentence_label"].shape == (64,)
    assert batch["next_sentence_label"].tolist() == pairs.next_sentence_labels[ids].tolist()
    for row, sample in enumerate(ids):
        tokens = pairs.tokens(sample)
        specials = np.flatnonzero(np.isin(tokens, [BOS, EOS]))
        assert (batch["input_ids"][row, specials].numpy() == tokens[specials]).all()
        assert (batch["labels"][row, specials] == IGNORE_INDEX).all()


def test_sentence_end_ids_of_a_real_tokenizer(bpe_tokenizer):
    ends = bpe_tokenizer.sentence_end_ids()
    assert ends.shape == (bpe_tokenizer.vocab_size,) and not ends[bpe_tokenizer.special_ids].any()
    for text in (".", "?", "!"):
        assert ends[bpe_tokenizer.token_to_id(text)], text
    for text in (",", "a", "Ġthe"):
        token = bpe_tokenizer.token_to_id(text)
        assert token is not None and not ends[token], text


# ----------------------------------------------------------------------------------------- models
def tiny(name, head, **extra):
    from models.config import DebertaConfig, RobertaConfig
    common = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  hidden_dropout=0.0, attention_dropout=0.0, next_sentence_head=head, **extra)
    if name == "roberta":
        return RobertaConfig(max_position_embeddings=40, **common)
    return DebertaConfig(max_position_embeddings=40, **common)


def build(name, head, seed=0, **extra):
    from models.registry import build_model
    torch.manual_seed(seed)
    return build_model(tiny(name, head, **extra)).eval()


def inputs(name="roberta", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    ids[2, 9:] = tiny(name, False).pad_token_id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3:6] = ids[:, 3:6]
    return ids, mask, labels


@pytest.mark.parametrize("name", ["roberta", "deberta"])
def test_forward_without_the_head_or_its_labels_is_unchanged(name):
    ids, mask, labels = inputs(name)
    plain, headed = build(name, False), build(name, True)
    sd = headed.state_dict()
    assert sorted(k for k in sd if k.startswith("nsp_head.")) == [
        "nsp_head.classifier.bias", "nsp_head.classifier.weight", "nsp_head.pooler.bias", "nsp_head.pooler.weight"]
    plain_sd = plain.state_dict()
    assert set(plain_sd) == {k for k in sd if not k.startswith("nsp_head.")}
    assert all(torch.equal(plain_sd[k], sd[k]) for k in plain_sd)  # the head is drawn last
    with torch.no_grad():
        want = plain(ids, mask, labels)
        for out in (plain(ids, mask, labels, next_sentence_label=torch.tensor([0, 1, 0])), headed(ids, mask, labels)):
            assert set(out) == set(want) == {"loss_sum", "num_predicted", "metrics"}
            assert torch.equal(out["loss_sum"], want["loss_sum"])
            assert {k: int(v) for k, v in out["metrics"].items()} == {k: int(v) for k, v in want["metrics"].items()}


@pytest.mark.parametrize("name", ["roberta", "deberta"])
def test_nsp_loss_and_metrics_against_a_hand_computation(name):
    ids, mask, labels = inputs(name)
    nsp_labels = torch.tensor([0, 1, 1])
    model = build(name, True, nsp_weight=0.5)
    with torch.no_grad():
        out = model(ids, mask, labels, next_sentence_label=nsp_labels)
        mlm = build(name, False)(ids, mask, labels)
        first = model.encode(ids, mask)[:, 0]  # the encoder output (DeBERTa: before the EMD)
        head = model.nsp_head
        logits = torch.tanh(first @ head.pooler.weight.T + head.pooler.bias) @ head.classifier.weight.T \
            + head.classifier.bias
        by_hand = -torch.log_softmax(logits, dim=-1)[torch.arange(3), nsp_labels].sum()
    assert out["loss_weights"] == {"mlm": 1.0, "nsp": 0.5}
    assert out["normalizers"] == {"mlm": "predicted", "nsp": "samples"}
    assert torch.equal(out["loss_sums"]["mlm"], mlm["loss_sum"])
    torch.testing.assert_close(out["loss_sums"]["nsp"], by_hand)
    assert int(out["metrics"]["nsp_correct"]) == int((logits.argmax(-1) == nsp_labels).sum())
    assert int(out["metrics"]["nsp_samples"]) == 3
    assert int(out["metrics"]["mlm_predicted"]) == int(mlm["metrics"]["mlm_predicted"])
    # gradients reach the encoder through the head
    model.train()
    model(ids, mask, labels, next_sentence_label=nsp_labels)["loss_sums"]["nsp"].backward()
    assert model.nsp_head.pooler.weight.grad.abs().sum() > 0
    assert model.embeddings.word.weight.grad.abs().sum() > 0


def test_step_reports_nsp_loss_per_sample_and_accuracy():
    from types import SimpleNamespace
    from trainer.core.step import Accumulator, _counts
    ctx = SimpleNamespace(device=torch.device("cpu"), dp_size=1)
    ids, mask, labels = inputs()
    model = build("roberta", True, nsp_weight=0.5)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "next_sentence_label": torch.tensor([1, 0, 1])}
    counts = _counts([batch], ctx)
    assert float(counts["samples"]) == 3.0
    with torch.no_grad():
        out = model(**batch)
    acc = Accumulator()
    acc.add(out, counts)
    record = acc.reduce(ctx, reduce_counts=True, prefix="valid_")
    predicted = int((labels != IGNORE_INDEX).sum())
    nsp = float(out["loss_sums"]["nsp"]) / 3
    assert record["valid_loss_nsp"] == pytest.approx(nsp)
    assert record["valid_loss_mlm"] == pytest.approx(float(out["loss_sums"]["mlm"]) / predicted)
    assert record["valid_loss"] == pytest.approx(record["valid_loss_mlm"] + 0.5 * nsp)
    assert record["valid_nsp_accuracy"] == pytest.approx(int(out["metrics"]["nsp_correct"]) / 3)


@pytest.mark.parametrize("name", ["roberta", "deberta"])
def test_hf_export_drops_the_head_and_keeps_mlm_logits(name):
    import transformers
    from models.registry import get_spec
    extra = {} if name == "roberta" else {"enhanced_mask_decoder": False}  # HF has no EMD
    model = build(name, True, **extra)
    spec = get_spec(name)
    with pytest.warns(UserWarning, match="no next-sentence-prediction head: dropped nsp_head"):
        hf_sd = spec.to_hf_state_dict(model.state_dict(), model.config)
    assert not any("nsp" in k for k in hf_sd)
    hf_config = spec.hf_config(model.config)
    hf = getattr(transformers, hf_config.architectures[0])(hf_config).eval()
    hf.load_state_dict(hf_sd, strict=True)
    ids, mask, _ = inputs(name)
    with torch.no_grad():
        ours, theirs = model.logits(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["roberta", "deberta"])
def test_fine_tuning_drops_the_head_like_the_mlm_head(name):
    from models.classification import backbone_from_native, build_backbone
    model = build(name, True)
    family, config, backbone = backbone_from_native(name, model.config, model.state_dict())
    assert not config.next_sentence_head and not any(k.startswith("nsp_head.") for k in backbone)
    build_backbone(family, config).load_state_dict(backbone, strict=True)


# ------------------------------------------------------------------------------------------ trainer
def test_pair_formats_are_refused_for_rtd_models():
    from trainer.pretraining.config import load_config
    for name in ("electra", "deberta_v3"):
        with pytest.raises(UserError, match=f"data.packing=segment_pair.*model {name}") as err:
            load_config(None, [f"model.name={name}", "data.packing=segment_pair", "data.prefix=x"])
        assert "\n" not in str(err.value)
    load_config(None, ["model.name=deberta", "data.packing=sentence_pair", "data.prefix=x"])  # accepted
    with pytest.raises(UserError, match="next_sentence_head=true needs .* data.packing"):
        load_config(None, ["model.overrides={next_sentence_head: true}", "data.packing=doc_sentences",
                           "data.prefix=x"])


def test_the_head_follows_data_packing_from_a_native_file(bpe_tokenizer, tmp_path):
    """model.init: a file without the head gets a fresh one for a pair format; a file with one loses it
    for another format (it would get no gradient); every other weight is the file's."""
    from types import SimpleNamespace
    from models.native import save_native
    from models.registry import build_config, build_model
    from trainer.pretraining.config import load_config
    from trainer.pretraining.model import build_model_for
    ctx = SimpleNamespace(tp_size=1, device=torch.device("cpu"))
    for head, packing in ((False, "segment_pair"), (True, "full_sentences")):
        config = build_config("roberta", "debug", vocab_size=bpe_tokenizer.vocab_size, seq_length=64,
                              next_sentence_head=head, pad_token_id=bpe_tokenizer.pad_id)
        torch.manual_seed(1)
        saved = build_model(config).state_dict()
        save_native(tmp_path / f"{head}.pt", "roberta", config, saved)
        cfg = load_config(None, ["data.prefix=x", f"data.packing={packing}", "data.seq_length=64",
                                 f"model.init={tmp_path / f'{head}.pt'}"])
        model, described = build_model_for(cfg, bpe_tokenizer, ctx)
        assert described["next_sentence_head"] is (not head) and (model.nsp_head is None) is head
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in saved.items() if not k.startswith("nsp_head."))


@pytest.fixture(scope="module")
def pair_run(demo_corpus, bpe_tokenizer, tmp_path_factory):
    """One 2-rank segment_pair run (token budget, ZeRO-2) of roberta debug, with validation each 2 steps."""
    from data.preprocess import preprocess
    root = tmp_path_factory.mktemp("nsp_run")
    preprocess([demo_corpus.path], bpe_tokenizer.path, root / "corpus", workers=1)
    overrides = {
        "data.prefix": root / "corpus", "data.packing": "segment_pair", "data.seq_length": 64,
        "data.valid_fraction": 0.05, "data.cache_dir": root / "cache",
        "model.name": "roberta", "model.size": "debug", "run.dir": root / "runs", "run.name": "nsp",
        "train.steps": 4, "train.micro_batch_size": 4, "train.global_batch_size": 8, "train.tokens_per_step": 512,
        "optim.warmup_steps": 0, "log.every_steps": 1, "eval.every_steps": 2, "eval.samples": 16,
        "checkpoint.every_steps": 4, "zero.stage": 2,
    }
    run(deepspeed_cmd(2, [f"{k}={v}" for k, v in overrides.items()]))
    return root / "runs" / "nsp"


@pytest.mark.distributed
def test_pair_pretraining_reports_nsp_and_converts(pair_run, tmp_path):
    records = metrics(pair_run)
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    assert len(train) == 4 and len(valid) == 2
    for r in train:
        assert {"loss_mlm", "loss_nsp", "nsp_accuracy"} <= set(r) and 0.0 <= r["nsp_accuracy"] <= 1.0
        assert r["loss"] == pytest.approx(r["loss_mlm"] + r["loss_nsp"])
        assert 0.1 < r["loss_nsp"] < 3.0  # per sample, about ln 2 at the start
    assert {"valid_loss_nsp", "valid_nsp_accuracy", "valid_loss_mlm"} <= set(valid[-1])
    config = yaml.safe_load((pair_run / "config.yaml").read_text())
    assert config["data"]["packing"] == "segment_pair"
    # framed as RoBERTa fine-tunes pairs (<s> A </s></s> B </s>), seeded by the run, with the tokenizer's table
    params = [json.loads(p.read_text()) for p in (pair_run.parent.parent / "cache").glob("segment_pair-*/params.json")]
    assert len(params) == 2 and all(p["pair_separators"] == 2 and p["seed"] == 1234 for p in params)
    tool = [sys.executable, ROOT / "tools" / "convert_checkpoint.py", "--checkpoint", pair_run / "checkpoints"]
    hf = run(tool + ["--output", tmp_path / "hf", "--verify"])
    assert "verify: MLM logits" in hf.stdout and "no next-sentence-prediction head: dropped nsp_head." in hf.stdout
    assert "RobertaForMaskedLM" in hf.stdout
    from trainer.convert.export import locate, read_checkpoint
    native = read_checkpoint(locate(pair_run / "checkpoints"))  # what --format native writes
    assert native.config.next_sentence_head and "nsp_head.pooler.weight" in native.state_dict
