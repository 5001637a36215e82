"""Static masking (data/static_masks.py): N masked copies written at preprocessing, read back by the loader.

One module fixture preprocesses the demo corpus through tools/preprocess_data.py with --static-masks 3;
the tests read its companion PREFIX.static_masks.bin/.idx directly, through the packed streams and the
loader, through trainer.pretraining.inputs, and damage copies of it for the bad-input errors.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.blending import SampleStream
from data.errors import UserError
from data.indexed import indexed_dataset_module, open_indexed
from data.loader import MaskedSamples, PretrainLoader
from data.masking import IGNORE_INDEX
from data.packing import build_packed
from data.static_masks import (NOT_PREDICTED, RECIPE_KEYS, StaticMaskOptions, StaticMasks, check_static_masks,
                               STATIC_MASK_STREAM, companion_prefix, recipe_for, write_static_masks)
from trainer.core.parallel import ParallelContext

COPIES, SEED, SEQ = 3, 7, 64
CTX = ParallelContext(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                      device=torch.device("cpu"))
RECIPE = {"mask_prob": 0.15, "mask_token_prob": 0.8, "random_token_prob": 0.1, "whole_word_mask": False,
          "max_span": 1}


@pytest.fixture(scope="module")
def corpus(demo_corpus, bpe_tokenizer, tmp_path_factory):
    from tools.preprocess_data import main
    prefix = tmp_path_factory.mktemp("static") / "bin" / "corpus"
    assert main(["--input", str(demo_corpus.path), "--tokenizer", str(bpe_tokenizer.path), "--output-prefix",
                 str(prefix), "--workers", "1", "--static-masks", str(COPIES), "--mask-seed", str(SEED)]) == 0
    return prefix


def companion(prefix):
    return indexed_dataset_module().IndexedDataset(str(companion_prefix(prefix)))


def copy_corpus(prefix: Path, dest: Path, with_companion: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    suffixes = [".bin", ".idx", ".json"] + ([".static_masks.bin", ".static_masks.idx"] if with_companion else [])
    for suffix in suffixes:
        shutil.copyfile(f"{prefix}{suffix}", dest / f"corpus{suffix}")
    return dest / "corpus"


# -- preprocessing ------------------------------------------------------------------------------------------

def test_preprocessing_writes_n_differently_masked_copies(corpus, bpe_tokenizer):
    tok = bpe_tokenizer
    data, masks = open_indexed(corpus), companion(corpus)
    n = len(data)
    assert len(masks) == COPIES * n
    assert (masks.sequence_lengths == np.tile(data.sequence_lengths, COPIES)).all()
    entry = json.loads(Path(f"{corpus}.json").read_text())["static_masks"]
    assert {k: entry[k] for k in ("copies", "seed", *RECIPE_KEYS)} == {"copies": COPIES, "seed": SEED, **RECIPE}
    original = np.concatenate([data.get(j) for j in range(n)]).astype(np.int64)
    copies = [np.concatenate([masks.get(k * n + j) for j in range(n)]).astype(np.int64) for k in range(COPIES)]
    special = np.isin(np.arange(tok.vocab_size), tok.special_ids)
    for values in copies:
        predicted = values != NOT_PREDICTED
        assert set(np.unique(values[~predicted])) == {NOT_PREDICTED}
        assert predicted.mean() == pytest.approx(0.15, abs=0.01)
        fed = values[predicted]
        kept, as_mask = fed == original[predicted], fed == tok.mask_id
        assert as_mask.mean() == pytest.approx(0.8, abs=0.02)
        assert kept.mean() == pytest.approx(0.1, abs=0.02)  # (a random id equal to the original counts here too)
        assert not special[fed[~as_mask]].any(), "random replacements are never special ids"
    for a in range(COPIES):
        for b in range(a + 1, COPIES):
            overlap = ((copies[a] >= 0) & (copies[b] >= 0)).mean()
            assert overlap < 0.05, (a, b, overlap)  # independent 15% masks overlap on about 2%


def test_masks_are_drawn_per_document_and_deterministic(corpus, bpe_tokenizer, tmp_path):
    data, masks = open_indexed(corpus), companion(corpus)
    n, recipe = len(data), recipe_for(bpe_tokenizer, RECIPE)
    for k, j in [(0, 0), (2, 5), (1, n - 1)]:  # each document masked alone with its own generator
        rng = np.random.default_rng(np.random.SeedSequence([SEED, k, j, STATIC_MASK_STREAM]))  # (seed, copy, doc)
        inputs, labels = recipe.apply(data.get(j), rng)
        expected = np.where(labels != IGNORE_INDEX, inputs, NOT_PREDICTED)
        assert (masks.get(k * n + j) == expected).all(), (k, j)
    same = write_static_masks(corpus, tmp_path / "same", bpe_tokenizer, StaticMaskOptions(COPIES, SEED))
    for suffix in (".bin", ".idx"):
        assert Path(f"{tmp_path / 'same'}{suffix}").read_bytes() == Path(f"{corpus}.static_masks{suffix}").read_bytes()
    assert same["idx_sha256"] == json.loads(Path(f"{corpus}.json").read_text())["static_masks"]["idx_sha256"]
    write_static_masks(corpus, tmp_path / "other", bpe_tokenizer, StaticMaskOptions(COPIES, SEED + 1))
    assert Path(f"{tmp_path / 'other'}.bin").read_bytes() != Path(f"{corpus}.static_masks.bin").read_bytes()


def test_failed_preprocessing_leaves_nothing(demo_corpus, bpe_tokenizer, tmp_path, monkeypatch):
    import data.static_masks as static_masks
    from data.preprocess import preprocess

    def fail(*args):
        raise OSError(28, "No space left on device")  # the disk fills while the masks are written
    monkeypatch.setattr(static_masks, "_masked_values", fail)
    with pytest.raises(UserError, match="No space left"):
        preprocess([demo_corpus.path], bpe_tokenizer.path, tmp_path / "corpus", static_masks=StaticMaskOptions(2))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--static-masks -1"):
        StaticMaskOptions(-1)
    with pytest.raises(UserError, match="--mask-token-prob \\+ --random-token-prob"):
        StaticMaskOptions(2, mask_token_prob=0.95)


# -- the loader --------------------------------------------------------------------------------------------

def packed_corpus(prefix, tok, first_doc=0, last_doc=None, packing="full_sentences"):
    data = open_indexed(prefix)
    last = len(data.document_indices) - 1 if last_doc is None else last_doc
    return build_packed(packing, data, first_doc, last, SEQ, tok.bos_id, tok.eos_id)


def first_index_of(stream: SampleStream, sample: int, epoch: int) -> int:
    g = np.arange(epoch * len(stream), (epoch + 1) * len(stream))
    return int(g[stream.locate(g)[1] == sample][0])


@pytest.mark.parametrize("packing", ["full_sentences", "doc_sentences"])
def test_loader_reads_copy_epoch_mod_n(corpus, bpe_tokenizer, packing):
    tok = bpe_tokenizer
    packed = packed_corpus(corpus, tok, 0, 40, packing)
    recipe = recipe_for(tok, RECIPE)
    samples = MaskedSamples(packed, recipe, SEQ, tok.pad_id, seed=3, static_masks=[StaticMasks(corpus)])
    stream = samples.stream
    long_enough = np.flatnonzero(packed.sample_lengths() >= SEQ // 2)  # a few tokens may all go unmasked
    for sample in (long_enough[0], long_enough[len(long_enough) // 2], long_enough[-1]):
        by_epoch = {e: samples[first_index_of(stream, sample, e)] for e in (0, 1, COPIES)}
        assert all(int(b["sample_index"]) // len(stream) == e for e, b in by_epoch.items())
        torch.testing.assert_close(by_epoch[0], by_epoch[COPIES] | {"sample_index": by_epoch[0]["sample_index"]})
        assert not torch.equal(by_epoch[0]["labels"], by_epoch[1]["labels"])
        tokens = torch.from_numpy(packed.tokens(sample))
        length = len(tokens)
        for e, batch in by_epoch.items():  # the stored values of copy e mod N, read over the sample's span
            values = torch.from_numpy(StaticMasks(corpus).values(packed, sample, e % COPIES))
            labels, inputs = batch["labels"][:length], batch["input_ids"][:length]
            assert torch.equal(labels, torch.where(values >= 0, tokens, IGNORE_INDEX))
            assert torch.equal(inputs, torch.where(values >= 0, values, tokens))
            special = torch.isin(tokens, torch.tensor(tok.special_ids))
            assert special.sum() >= 2 and (labels[special] == IGNORE_INDEX).all(), "<s>, </s>, separators"
            assert (batch["labels"][length:] == IGNORE_INDEX).all() and (batch["input_ids"][length:] == tok.pad_id).all()
            assert int(batch["attention_mask"].sum()) == length


def test_packed_span_reads_the_documents_masks(corpus, bpe_tokenizer):
    """FULL-SENTENCES samples cross documents: the values at each token are its document's."""
    tok = bpe_tokenizer
    data, masks = open_indexed(corpus), companion(corpus)
    packed = packed_corpus(corpus, tok, 0, 30)
    values = np.concatenate([StaticMasks(corpus).values(packed, s, 2)[1:-1] for s in range(len(packed))])
    expected = []
    for j in range(30):
        expected.extend(masks.get(2 * len(data) + j).tolist() + [NOT_PREDICTED])  # </s> between documents
    assert values.tolist() == expected[:-1]


def test_blended_corpus_epochs(corpus, bpe_tokenizer):
    """A blended stream reads each corpus' own epoch: the k-th position of corpus c is in its epoch k // n_c."""
    small, large = packed_corpus(corpus, bpe_tokenizer, 0, 6), packed_corpus(corpus, bpe_tokenizer, 6, 60)
    stream = SampleStream([small, large], [0.5, 0.5], seed=1)
    g = np.arange(4 * len(stream))
    corpus_ids, epochs = stream.locate(g)[0], stream.corpus_epochs(g)
    for c, n in ((0, len(small)), (1, len(large))):
        assert (epochs[corpus_ids == c] == np.arange((corpus_ids == c).sum()) // n).all()
    assert epochs[corpus_ids == 0].max() > epochs[corpus_ids == 1].max()  # the small corpus repeats


def test_resumed_loader_reads_the_same_masks(corpus, bpe_tokenizer):
    tok = bpe_tokenizer
    packed = packed_corpus(corpus, tok, 0, 12)
    samples = MaskedSamples(packed, recipe_for(tok, RECIPE), SEQ, tok.pad_id, seed=5,
                            static_masks=[StaticMasks(corpus)])
    steps = 2 * COPIES * len(packed) // 8 + 1  # several epochs: every copy, and copies again
    uninterrupted = PretrainLoader(samples, 8, 4, 0, 1)
    batches = [uninterrupted.next_step() for _ in range(steps)]
    for k in (1, steps // 2):
        resumed = PretrainLoader(samples, 8, 4, 0, 1, consumed_samples=8 * k)
        for step in range(k, steps):
            for a, b in zip(resumed.next_step(), batches[step]):
                torch.testing.assert_close(a, b)


def test_trainer_inputs_use_static_masks(corpus, bpe_tokenizer):
    from trainer.pretraining.config import load_config
    from trainer.pretraining.inputs import build_inputs, check_corpora

    cfg = load_config(None, [f"data.prefix={corpus}", "data.masking=static", f"data.seq_length={SEQ}",
                             f"data.cache_dir={corpus.parent / 'cache'}", "data.valid_fraction=0.05"])
    check_corpora(cfg, CTX, bpe_tokenizer)
    inputs = build_inputs(cfg, CTX, bpe_tokenizer)
    stored = StaticMasks(corpus)
    train = inputs.loader.next_step()[0]
    for row, g in enumerate(train["sample_index"].tolist()):
        c, s = inputs.train.stream.locate([g])
        values = stored.values(inputs.train.stream.corpora[0], int(s[0]), 0)
        assert torch.equal(train["labels"][row, :len(values)] >= 0, torch.from_numpy(values >= 0))
    held = inputs.valid.stream.corpora[0]
    batch = inputs.valid.__getitems__([0, len(inputs.valid) + 0])  # fixed: copy 0 in any "epoch"
    values = torch.from_numpy(stored.values(held, 0, 0))
    for row in (0, 1):
        assert torch.equal(batch["labels"][row, :len(values)] >= 0, values >= 0)


def test_rtd_model_trains_on_stored_masks(corpus, bpe_tokenizer):
    """ELECTRA's generator reads the stored masked input and predicts exactly the stored positions."""
    from trainer.pretraining.config import load_config
    from trainer.pretraining.inputs import build_inputs
    from trainer.pretraining.model import build_model_for

    cfg = load_config(None, [f"data.prefix={corpus}", "data.masking=static", f"data.seq_length={SEQ}",
                             f"data.cache_dir={corpus.parent / 'cache'}", "model.name=electra", "model.size=debug",
                             "train.micro_batch_size=4", "train.global_batch_size=4"])
    batch = build_inputs(cfg, CTX, bpe_tokenizer).loader.next_step()[0]
    model, _ = build_model_for(cfg, bpe_tokenizer, CTX)
    out = model(**batch)
    assert int(out["metrics"]["mlm_predicted"]) == int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    loss = sum(out["loss_sums"].values())
    assert torch.isfinite(loss)
    loss.backward()


# -- bad input -----------------------------------------------------------------------------------------------

def test_missing_or_stale_companion(corpus, bpe_tokenizer, tmp_path):
    bare = copy_corpus(corpus, tmp_path / "bare", with_companion=False)
    with pytest.raises(UserError, match=r"corpus\.static_masks\.bin and .*corpus\.static_masks\.idx not found; "
                                        r".*--static-masks N"):
        check_static_masks(bare, RECIPE)
    from trainer.pretraining.config import load_config
    from trainer.pretraining.inputs import check_corpora
    cfg = load_config(None, [f"data.prefix={bare}", "data.masking=static"])
    with pytest.raises(UserError, match=r"^data\.masking=static: .*corpus\.static_masks\.bin and .*not found"):
        check_corpora(cfg, CTX, bpe_tokenizer)  # the trainer's rank 0, before anything is written
    stale = copy_corpus(corpus, tmp_path / "stale")
    sidecar = json.loads(Path(f"{stale}.json").read_text())
    del sidecar["static_masks"]
    Path(f"{stale}.json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match=r"corpus\.json records no static masks.*--static-masks N"):
        check_static_masks(stale, RECIPE)


@pytest.mark.parametrize("key, value", [("mask_prob", 0.2), ("random_token_prob", 0.05),
                                        ("whole_word_mask", True), ("max_span", 3)])
def test_recipe_mismatch_names_the_key(corpus, key, value):
    with pytest.raises(UserError, match=rf"^data\.{key}={value}, but the static masks of .* were drawn with "
                                        rf"{RECIPE[key]}; set data\.{key}={RECIPE[key]} or preprocess again with "
                                        rf"--{key.replace('_', '-')}$"):
        check_static_masks(corpus, {**RECIPE, key: value})


def test_tampered_companion(corpus, bpe_tokenizer, tmp_path):
    cut = copy_corpus(corpus, tmp_path / "cut")
    with open(f"{cut}.static_masks.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=r"corpus\.static_masks\.bin: 1000 bytes, but corpus\.static_masks\.idx says"):
        check_static_masks(cut, RECIPE)
    # well formed, the same sizes, but sequences 0 and 1 trade a token: only the recorded sha256 tells
    edited = copy_corpus(corpus, tmp_path / "edited")
    idx = Path(f"{edited}.static_masks.idx")
    raw = bytearray(idx.read_bytes())
    sequences = int(np.frombuffer(bytes(raw[18:26]), np.uint64)[0])
    lengths = np.frombuffer(bytes(raw[34:34 + 8]), np.int32) + np.array([1, -1], np.int32)
    raw[34:42] = lengths.tobytes()
    pointer = 34 + 4 * sequences + 8  # sequence 1's byte offset
    raw[pointer:pointer + 8] = (np.frombuffer(bytes(raw[pointer:pointer + 8]), np.int64) + 4).tobytes()
    idx.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"corpus\.static_masks\.idx: sha256 .* recorded .*modified"):
        check_static_masks(edited, RECIPE)
    # another number of copies than the sidecar records
    other = copy_corpus(corpus, tmp_path / "other")
    write_static_masks(other, companion_prefix(other), bpe_tokenizer, StaticMaskOptions(COPIES - 1, SEED))
    with pytest.raises(UserError, match=rf"corpus\.static_masks\.idx: \d+ documents, but {COPIES} copies of"):
        check_static_masks(other, RECIPE)


def test_config_refuses_pair_packing_and_unknown_masking():
    from trainer.pretraining.config import load_config
    for packing in ("segment_pair", "sentence_pair"):
        with pytest.raises(UserError, match=rf"data\.masking=static does not support data\.packing={packing}"):
            load_config(None, ["data.prefix=x", "data.masking=static", f"data.packing={packing}"])
    with pytest.raises(UserError, match=r"data\.masking='sometimes' is not one of dynamic, static"):
        load_config(None, ["data.prefix=x", "data.masking=sometimes"])
    assert load_config(None, ["data.prefix=x"]).data.masking == "dynamic"
