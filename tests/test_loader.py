"""DOC-SENTENCES, blending, the sample-index cache, batch masking (whole words, spans) and loader resumption."""
import threading
import time

import numpy as np
import pytest
import torch

from data.blending import SampleStream, blend_counts
from data.loader import MaskedSamples, PretrainLoader
from data.masking import IGNORE_INDEX, MaskingRecipe, sample_rng
from data.packing import DocSentences, build_packed, split_ranges
from data.sample_cache import SampleIndexCache, dataset_identity
from tests.indexed import write_indexed

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIALS = (BOS, PAD, EOS, UNK, MASK)
VOCAB = 300


def random_documents(seed, count, max_length):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_length, size=count)
    lengths[:3] = [0, 1, 3 * max_length]  # empty, tiny, and one spanning several samples
    return [rng.integers(5, VOCAB, size=n).astype(np.int64) for n in lengths]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three small corpora (documents, IndexedDataset, prefix) with different document lengths."""
    root = tmp_path_factory.mktemp("corpora")
    out = []
    for i, (count, max_length) in enumerate([(60, 90), (40, 30), (25, 200)]):
        docs = random_documents(i, count, max_length)
        out.append((docs, write_indexed(root / f"c{i}", docs), str(root / f"c{i}")))
    return out


def recipe(**kw):
    return MaskingRecipe(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, **kw)


# ----------------------------------------------------------------------------- DOC-SENTENCES

@pytest.mark.parametrize("seq_length", [8, 32, 100])
def test_doc_sentences_never_cross_a_document(corpora, seq_length):
    docs, dataset, _ = corpora[0]
    first, last = 2, len(docs)
    packed = DocSentences(dataset, first, last, seq_length, BOS, EOS)
    samples = [packed.tokens(i) for i in range(len(packed))]
    assert all(s[0] == BOS and s[-1] == EOS and 3 <= len(s) <= seq_length for s in samples)
    assert not any(np.isin(s[1:-1], SPECIALS).any() for s in samples), "no separator inside a sample"
    # each sample is a piece of exactly its own document, and the pieces rebuild the documents in order
    rebuilt = {}
    for i, s in enumerate(samples):
        rebuilt.setdefault(int(packed.document[i]), []).extend(s[1:-1].tolist())
    expected = {d: docs[d].tolist() for d in range(first, last) if len(docs[d])}
    assert rebuilt == expected
    # a document shorter than a sample gives one short sample; only a document's last piece is short
    short = [d for d in range(first, last) if 0 < len(docs[d]) < seq_length - 2]
    assert short and all(len(samples[list(packed.document).index(d)]) == len(docs[d]) + 2 for d in short)
    lengths = packed.sample_lengths()
    assert lengths.tolist() == [len(s) for s in samples]
    full_pieces = [i for i in range(len(samples) - 1) if packed.document[i] == packed.document[i + 1]]
    assert all(lengths[i] == seq_length for i in full_pieces)


def test_train_valid_test_split_by_documents():
    assert split_ranges(100, 0.1, 0.05) == (85, 95)
    assert split_ranges(10, 0.01, 0.01) == (8, 9)  # at least one document each
    assert split_ranges(10, 0.0) == (10, 10)
    with pytest.raises(Exception, match="no training documents"):
        split_ranges(4, 0.5, 0.5)


# ----------------------------------------------------------------------------- sample-index cache

def test_sample_index_cache_is_reused_and_rebuilt_when_parameters_change(corpora, tmp_path):
    docs, dataset, prefix = corpora[0]
    identity = dataset_identity(prefix)
    cache = SampleIndexCache(tmp_path / "cache")
    a = build_packed("doc_sentences", dataset, 0, 50, 32, BOS, EOS, cache, identity)
    assert len(cache.built) == 1
    again = SampleIndexCache(tmp_path / "cache")  # a later run, or another rank of the node
    b = build_packed("doc_sentences", dataset, 0, 50, 32, BOS, EOS, again, identity)
    assert again.built == [] and again.loaded == cache.built, "the cached index is reused"
    assert isinstance(b.begin, np.memmap) and np.array_equal(a.begin, b.begin)
    assert all(np.array_equal(a.tokens(i), b.tokens(i)) for i in range(len(a)))
    build_packed("doc_sentences", dataset, 0, 50, 48, BOS, EOS, again, identity)  # another seq_length
    build_packed("doc_sentences", dataset, 0, 49, 32, BOS, EOS, again, identity)  # another split
    build_packed("full_sentences", dataset, 0, 50, 32, BOS, EOS, again, identity)  # another packing
    assert len(again.built) == 3 and len(set(again.built) | set(cache.built)) == 4


def test_non_building_ranks_wait_for_the_index(corpora, tmp_path):
    _, dataset, prefix = corpora[1]
    waiter = SampleIndexCache(tmp_path / "cache", builds=False, wait_s=30, poll_s=0.01)
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        p=build_packed("doc_sentences", dataset, 0, 30, 16, BOS, EOS, waiter, dataset_identity(prefix))))
    thread.start()
    time.sleep(0.2)
    assert thread.is_alive() and not waiter.loaded, "a non-building rank waits"
    builder = SampleIndexCache(tmp_path / "cache")
    build_packed("doc_sentences", dataset, 0, 30, 16, BOS, EOS, builder, dataset_identity(prefix))
    thread.join(10)
    assert len(builder.built) == 1 and waiter.built == [] and waiter.loaded == builder.built
    assert not list((tmp_path / "cache").glob(".*tmp*")), "no temporary directory left behind"


# ----------------------------------------------------------------------------- blending

def packed_corpora(corpora, seq_length=32, kind="doc_sentences"):
    return [build_packed(kind, ds, 0, len(docs), seq_length, BOS, EOS) for docs, ds, _ in corpora]


def test_blending_follows_the_weights(corpora):
    weights = [0.5, 0.3, 0.2]
    stream = SampleStream(packed_corpora(corpora), weights, seed=3)
    n = len(stream)
    assert blend_counts(weights, n).sum() == n
    corpus, samples = stream.locate(np.arange(3 * n))
    for start in range(0, 3 * n - 200, 97):  # every window of 200 samples, across epoch boundaries too
        share = np.bincount(corpus[start:start + 200], minlength=3) / 200
        assert np.allclose(share, weights, atol=0.02), (start, share)
    # each corpus reads its own samples, each exactly once per own epoch, shuffled
    for c, packed in enumerate(stream.corpora):
        mine = samples[corpus == c]
        size = len(packed)
        assert sorted(mine[:size].tolist()) == list(range(size)) and mine[:size].tolist() != list(range(size))
    # the blended stream is a function of (seed, g) only
    again = SampleStream(packed_corpora(corpora), weights, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(again.locate(np.arange(5 * n, 6 * n)),
                                                     stream.locate(np.arange(5 * n, 6 * n))))


# ----------------------------------------------------------------------------- batch masking

def words_of(tokens, starts, specials=SPECIALS):
    """Word index of every position: a word starts at a word-start token or after a special."""
    special = np.isin(tokens, specials)
    begin = starts[tokens] | special
    begin[1:] |= special[:-1]
    return np.cumsum(begin) - 1, special


def masked_runs(chosen):
    edges = np.diff(np.r_[0, chosen.astype(int), 0])
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def random_batch(seed, batch=16, width=128):
    rng = np.random.default_rng(seed)
    tokens = np.full((batch, width), PAD)
    lengths = rng.integers(8, width + 1, size=batch)
    for b, n in enumerate(lengths):
        tokens[b, :n] = np.r_[BOS, rng.integers(5, VOCAB, size=n - 2), EOS]
        tokens[b, rng.integers(1, n - 1, size=2)] = EOS  # document separators inside a sample
    return tokens, lengths


@pytest.mark.parametrize("whole_word,max_span", [(False, 1), (True, 1), (False, 3), (True, 3)])
def test_batch_masking_units_spans_and_specials(whole_word, max_span):
    starts = np.zeros(VOCAB, dtype=bool)
    starts[5::4] = True  # a quarter of the ids begin a word: words of ~4 tokens
    r = recipe(word_starts=starts if whole_word else None, max_span=max_span)
    tokens, lengths = random_batch(0)
    draws = [r.draws(sample_rng(5, b, 0), n) for b, n in enumerate(lengths)]
    inputs, labels = r.apply_batch(tokens, lengths, draws)
    chosen = labels != IGNORE_INDEX
    candidates = (~np.isin(tokens, SPECIALS)).sum()
    assert chosen.sum() / candidates == pytest.approx(0.15, abs=0.03)
    assert not np.isin(tokens[chosen], SPECIALS).any(), "special token selected"
    assert (inputs[np.isin(tokens, SPECIALS)] == tokens[np.isin(tokens, SPECIALS)]).all()
    longest = 0
    for b in range(len(tokens)):
        unit = words_of(tokens[b], starts)[0] if whole_word else np.arange(tokens.shape[1])
        if whole_word:  # every word is wholly chosen or wholly not
            for w in np.unique(unit[chosen[b]]):
                assert chosen[b][unit == w].all(), (b, w)
        for begin, end in masked_runs(chosen[b]) if max_span > 1 else ():  # single units may touch
            length = len(np.unique(unit[begin:end]))
            assert length <= max_span, (b, begin, end)
            longest = max(longest, length)
    assert max_span == 1 or longest == max_span, "spans up to max_span occur"


def test_batch_mask_depends_on_the_global_index_only(corpora):
    stream = SampleStream(packed_corpora(corpora[:2]), [0.6, 0.4], seed=1)
    starts = np.zeros(VOCAB, dtype=bool)
    starts[5::3] = True
    samples = MaskedSamples(stream, recipe(word_starts=starts, max_span=2), 32, PAD, seed=9)
    whole = samples.__getitems__(list(range(40, 56)))
    for part in ([47], [52, 41, 44], list(range(48, 56))):
        piece = samples.__getitems__(part)
        rows = [g - 40 for g in part]
        for key in ("input_ids", "labels", "attention_mask", "sample_index"):
            assert torch.equal(piece[key], whole[key][rows]), key


def test_batches_padded_to_their_longest_sample_are_the_fixed_width_ones_cut(corpora):
    """doc_sentences with pad_to_multiple_of: the width is the longest sample rounded up; tokens,
    labels and masks are exactly the first columns of the seq_length-wide batch."""
    stream = SampleStream(packed_corpora(corpora[1:2], seq_length=64), [1.0], seed=1)  # documents < 30 tokens
    starts = np.zeros(VOCAB, dtype=bool)
    starts[5::3] = True
    masking = recipe(word_starts=starts, max_span=2)
    fixed = MaskedSamples(stream, masking, 64, PAD, seed=9)
    dynamic = MaskedSamples(stream, masking, 64, PAD, seed=9, pad_to_multiple_of=8)
    widths = set()
    for start in range(0, 30, 2):
        part = [start, start + 1]
        wide, narrow = fixed.__getitems__(part), dynamic.__getitems__(part)
        longest = int(wide["attention_mask"].sum(1).max())
        width = narrow["input_ids"].shape[1]
        assert width == -(-longest // 8) * 8, (part, longest, width)
        widths.add(width)
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(narrow[key], wide[key][:, :width]), key
        assert not wide["attention_mask"][:, width:].any()
    assert len(widths) > 1, f"the corpus should give batches of several widths: {widths}"


def test_whole_words_of_real_tokenizers(bpe_tokenizer, spm_tokenizer):
    text = ["Return the indices of the maximum values along an axis, unlike numpy.argmax, tokenizers split "
            "uncommonly long identifiers like getattribute_recursively into several pieces."] * 8
    for tokenizer in (bpe_tokenizer, spm_tokenizer):
        ids = np.asarray(tokenizer.encode_batch(text)[0], dtype=np.int64)
        tokens = np.tile(np.r_[tokenizer.bos_id, ids, tokenizer.eos_id], (8, 1))
        starts = tokenizer.word_start_ids()
        r = MaskingRecipe(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                          special_ids=tuple(tokenizer.special_ids), word_starts=starts)
        lengths = np.full(8, tokens.shape[1])
        _, labels = r.apply_batch(tokens, lengths, [r.draws(sample_rng(0, b, 0), tokens.shape[1]) for b in range(8)])
        chosen = labels != IGNORE_INDEX
        special = np.isin(tokens[0], tokenizer.special_ids)
        begin = starts[tokens[0]] | special
        begin[1:] |= special[:-1]
        word = np.cumsum(begin) - 1
        assert (np.bincount(word) > 1).any(), "the text has words of several tokens"
        for b in range(8):
            for w in np.unique(word[chosen[b]]):
                assert chosen[b][word == w].all()
        assert chosen.any() and not chosen[:, special].any()


# ----------------------------------------------------------------------------- resumption

def step_batches(samples, steps, dp_size, start=0, **kw):
    """Per step: the global indices and input_ids every rank reads (rank order), and the micro-batch counts."""
    loaders = [PretrainLoader(samples, consumed_samples=start, dp_rank=r, dp_size=dp_size, **kw)
               for r in range(dp_size)]
    out = []
    for _ in range(steps):
        per_rank = [loader.next_step() for loader in loaders]
        assert len({len(b) for b in per_rank}) == 1, "every rank runs as many micro-batches"
        assert all(len(mb["sample_index"]) <= kw["micro_batch"] for b in per_rank for mb in b)
        batches = [mb for b in per_rank for mb in b]
        indices = torch.cat([mb["sample_index"] for mb in batches])
        order = torch.argsort(indices)
        out.append({k: torch.cat([mb[k] for mb in batches])[order] for k in batches[0]})
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("mode", ["full_fixed", "doc_budget", "blend_budget"])
def test_resumed_loader_yields_the_same_batches_at_any_dp_size(corpora, mode):
    kind = "full_sentences" if mode == "full_fixed" else "doc_sentences"
    parts = packed_corpora(corpora if mode == "blend_budget" else corpora[:1], seq_length=32, kind=kind)
    stream = SampleStream(parts, [0.5, 0.3, 0.2][:len(parts)], seed=4)
    samples = MaskedSamples(stream, recipe(max_span=2), 32, PAD, seed=4)
    kw = dict(global_batch=8, micro_batch=2, tokens_per_step=0 if mode == "full_fixed" else 200)
    reference, _ = step_batches(samples, 6, dp_size=1, **kw)
    first, state = step_batches(samples, 3, dp_size=2, **kw)
    rest, _ = step_batches(samples, 3, dp_size=4, start=state["consumed_samples"], **kw)
    steps = first + rest
    assert all(torch.equal(a[k], b[k]) for a, b in zip(reference, steps) for k in a)
    starts = [int(s["sample_index"][0]) for s in reference]
    assert all(torch.equal(s["sample_index"], torch.arange(a, a + len(s["sample_index"])))
               for a, s in zip(starts, reference)), "steps take consecutive global indices"
    if kw["tokens_per_step"]:
        tokens = [int(s["attention_mask"].sum()) for s in reference]
        assert all(200 - 32 < t <= 200 for t in tokens), tokens
        assert len({len(s["sample_index"]) for s in reference}) > 1, "short samples make larger steps"


def test_loader_workers_give_the_same_batches(corpora):
    stream = SampleStream(packed_corpora(corpora[:1]), seed=2)
    samples = MaskedSamples(stream, recipe(), 32, PAD, seed=2)
    kw = dict(global_batch=8, micro_batch=2, dp_rank=1, dp_size=2, tokens_per_step=160)
    plain, workers = PretrainLoader(samples, **kw), PretrainLoader(samples, num_workers=2, **kw)
    for _ in range(3):
        a, b = plain.next_step(), workers.next_step()
        assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert plain.consumed_samples == workers.consumed_samples


def test_words_agree_with_hugging_face_offsets(bpe_tokenizer):
    """Our words (word-start marks) group byte-level BPE tokens exactly as HF's whole-word collator does
    from offsets. (For SentencePiece, HF's offsets include the '▁', leave no gap between words, and its
    collator sees one word per text; test_whole_words_of_real_tokenizers covers ours there.)"""
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    text = ["Return the indices of the maximum values, unlike numpy.argmax; tokenizers split  uncommonly "
            "long identifiers like getattribute_recursively (into) pieces: 3.14 x2 -- done."]
    for tokenizer in (bpe_tokenizer,):
        hf = AutoTokenizer.from_pretrained(str(tokenizer.path))
        enc = hf(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = np.array(enc["input_ids"][0])
        hf_words, _ = DataCollatorForLanguageModeling._calc_word_ids_and_prob_mask(
            np.array(enc["offset_mapping"]), np.array(enc["special_tokens_mask"]))
        ours = words_of(ids, tokenizer.word_start_ids(), tokenizer.special_ids)[0]
        real = hf_words[0] != -1
        pairs = {(int(a), int(b)) for a, b in zip(hf_words[0][real], ours[real])}
        assert len(pairs) == len(set(hf_words[0][real])) == len(set(ours[real])), tokenizer.type
        assert len(pairs) < real.sum(), "some word has several tokens"
