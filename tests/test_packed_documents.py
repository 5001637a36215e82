"""data.packing=packed_documents: rows of whole documents by best fit, document ids in attention_mask,
masking that stays inside documents, the collator's id check, the loader's packing efficiency, resumption."""
import numpy as np
import pytest
import torch

from data.blending import SampleStream
from data.loader import MaskedSamples, PretrainLoader, check_document_ids
from data.masking import IGNORE_INDEX, MaskingRecipe, sample_rng
from data.packing import PACKING_WINDOW, PackedDocuments, best_fit_rows, build_packed
from data.sample_cache import SampleIndexCache, dataset_identity
from tests.indexed import write_indexed

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIALS = (BOS, PAD, EOS, UNK, MASK)
VOCAB = 300
SEQ = 64


def recipe(**kw):
    return MaskingRecipe(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(documents, IndexedDataset, prefix): long-tailed lengths (most far shorter than a row), an
    empty document, a one-token one and one spanning several rows."""
    rng = np.random.default_rng(7)
    lengths = np.minimum(rng.lognormal(2.8, 1.0, size=400).astype(np.int64), 5 * SEQ)
    lengths[:3] = [0, 1, 3 * SEQ + 5]
    docs = [rng.integers(5, VOCAB, size=n).astype(np.int64) for n in lengths]
    prefix = tmp_path_factory.mktemp("packed") / "c"
    return docs, write_indexed(prefix, docs), str(prefix)


def packed(corpus, kind="packed_documents", seq=SEQ):
    docs, dataset, _ = corpus
    return build_packed(kind, dataset, 0, len(docs), seq, BOS, EOS)


def split_row(tokens, ids):
    """The framed documents of a row, by its ids: [(id, tokens)]."""
    return [(k, tokens[ids == k]) for k in range(1, int(ids.max()) + 1)]


# ----------------------------------------------------------------------------- rows

def test_best_fit_decreasing_places_each_item_in_the_tightest_row():
    # longest first: 7 -> row 0 (room 3), 6 -> row 1 (room 4), 5 -> row 2 (room 5), 4 -> row 1 (room 0),
    # 3 -> row 0 (room 0), 3 -> row 2 (room 2), 2 -> row 2 (room 0)
    assert best_fit_rows(np.array([6, 5, 4, 3, 2, 7, 3]), 10).tolist() == [1, 2, 1, 0, 2, 0, 2]
    rng = np.random.default_rng(0)
    framed = rng.integers(3, 40, size=2000)
    rows = best_fit_rows(framed, 64)
    fill = np.bincount(rows, weights=framed)
    assert fill.max() <= 64 and sorted(set(rows.tolist())) == list(range(len(fill)))
    assert framed.sum() / (64 * len(fill)) > 0.97  # first-fit-decreasing bound on such sizes


def test_rows_hold_every_document_once_in_order_and_fill_better_than_doc_sentences(corpus):
    docs = corpus[0]
    rows = packed(corpus)
    assert isinstance(rows, PackedDocuments) and rows.seq_length == SEQ
    rebuilt = {}
    lengths = rows.sample_lengths()
    for r in range(len(rows)):
        tokens, ids = rows.tokens(r), rows.document_ids(r)
        assert len(tokens) == len(ids) == lengths[r] <= SEQ
        for k, (piece_index, (_, framed)) in enumerate(zip(rows.pieces(r), split_row(tokens, ids))):
            assert framed[0] == BOS and framed[-1] == EOS and not np.isin(framed[1:-1], SPECIALS).any()
            rebuilt.setdefault(int(rows.document[piece_index]), []).append(framed[1:-1])
        # a row's documents in corpus order
        assert np.all(np.diff(rows.document[rows.pieces(r)]) >= 0)
    # every token of every non-empty document once, its pieces in order
    assert {d: np.concatenate(p).tolist() for d, p in rebuilt.items()} == {
        d: doc.tolist() for d, doc in enumerate(docs) if len(doc)}
    # the long document cut into full pieces (<s> + SEQ - 2 + </s>) and a last short one
    long_pieces = [len(p) for p in rebuilt[2]]
    assert long_pieces == [SEQ - 2] * 3 + [5 + 3 * 2]
    # real tokens / row tokens, rows at seq_length, against doc_sentences' one document a row
    alone = packed(corpus, "doc_sentences")
    efficiency = lengths.sum() / (len(rows) * SEQ)
    assert lengths.sum() == alone.sample_lengths().sum(), "the same framed tokens"
    assert efficiency > 0.97 and efficiency > 1.5 * alone.sample_lengths().sum() / (len(alone) * SEQ)


def test_rows_stay_within_windows_of_documents(tmp_path):
    docs = [np.full(10, 5 + (i % 200)) for i in range(PACKING_WINDOW + 7)]  # framed 12: 5 a row
    dataset = write_indexed(tmp_path / "w", docs)
    rows = build_packed("packed_documents", dataset, 0, len(docs), SEQ, BOS, EOS)
    windows = [set((rows.document[rows.pieces(r)] // PACKING_WINDOW).tolist()) for r in range(len(rows))]
    assert all(len(w) == 1 for w in windows), "no row mixes two windows"
    assert len(rows) == -(-PACKING_WINDOW // 5) + 2


def test_packed_index_is_cached_and_reused(corpus, tmp_path):
    docs, dataset, prefix = corpus
    cache = SampleIndexCache(tmp_path / "cache")
    a = build_packed("packed_documents", dataset, 0, len(docs), SEQ, BOS, EOS, cache, dataset_identity(prefix))
    again = SampleIndexCache(tmp_path / "cache")
    b = build_packed("packed_documents", dataset, 0, len(docs), SEQ, BOS, EOS, again, dataset_identity(prefix))
    assert len(cache.built) == 1 and again.built == [] and again.loaded == cache.built
    assert all(np.array_equal(a.tokens(r), b.tokens(r)) and np.array_equal(a.document_ids(r), b.document_ids(r))
               for r in range(len(a)))
    build_packed("doc_sentences", dataset, 0, len(docs), SEQ, BOS, EOS, again, dataset_identity(prefix))
    assert len(again.built) == 1, "another packing, another index"


def test_config_accepts_packed_documents():
    from trainer.pretraining.config import load_config

    assert load_config(None, ["data.prefix=x", "data.packing=packed_documents"]).data.packing == "packed_documents"


# ----------------------------------------------------------------------------- batches

def test_batches_carry_document_ids(corpus):
    rows = packed(corpus)
    samples = MaskedSamples(SampleStream([rows], seed=3), recipe(), SEQ, PAD, seed=3, pad_to_multiple_of=8)
    batch = samples.__getitems__(list(range(16)))
    mask, ids = batch["attention_mask"].numpy(), batch["input_ids"].numpy()
    check_document_ids(mask)
    assert mask.dtype == np.int64 and mask.max() > 2, "rows of several documents"
    _, sample_ids = samples.stream.locate(np.arange(16))
    for b, s in enumerate(sample_ids.tolist()):
        n = len(rows.tokens(s))
        assert np.array_equal(mask[b, :n], rows.document_ids(s)) and not mask[b, n:].any()
        starts = np.flatnonzero(np.diff(np.r_[0, mask[b]]) > 0)  # each document begins with <s>
        assert (batch["labels"][b, starts] == IGNORE_INDEX).all() and (ids[b, starts] == BOS).all()
    # other packings keep a 0/1 mask
    plain = MaskedSamples(SampleStream([packed(corpus, "doc_sentences")], seed=3), recipe(), SEQ, PAD, seed=3)
    assert plain.__getitems__(list(range(16)))["attention_mask"].max() == 1


def test_collator_refuses_malformed_document_ids(corpus):
    check_document_ids(np.array([[1, 1, 2, 3, 3, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]))
    for row in ([2, 2, 3, 0], [1, 3, 3, 0], [1, 2, 1, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, -1, 0]):
        with pytest.raises(ValueError, match="malformed document ids in row 1"):
            check_document_ids(np.array([[1, 1, 1, 0], row]))

    class Broken(PackedDocuments):  # a corrupt index: the second row skips an id
        def document_ids(self, index):
            ids = super().document_ids(index)
            return ids + (ids > 1) if index == self._broken else ids

    docs, dataset, _ = corpus
    rows = Broken(dataset, 0, len(docs), SEQ, BOS, EOS)
    samples = MaskedSamples(SampleStream([rows], seed=1, shuffle=False), recipe(), SEQ, PAD, seed=1)
    rows._broken = next(r for r in range(len(rows)) if len(rows.pieces(r)) > 2)
    samples.__getitems__([0])  # an intact row passes
    with pytest.raises(ValueError, match=rf"malformed document ids in row 1 \(global sample {rows._broken}\)"):
        samples.__getitems__([0, rows._broken])


@pytest.mark.parametrize("whole_word,max_span", [(True, 3), (False, 4)])
def test_words_and_spans_never_cross_a_document(corpus, whole_word, max_span):
    starts = np.zeros(VOCAB, dtype=bool)
    starts[5::3] = True  # words of ~3 tokens
    rows = packed(corpus)
    stream = SampleStream([rows], seed=2)
    # every maskable unit masked: the spans' tiling shows, and each document must start its own
    r = recipe(word_starts=starts if whole_word else None, max_span=max_span, mask_prob=1.0)
    batch = MaskedSamples(stream, r, SEQ, PAD, seed=2).__getitems__(list(range(48)))
    tokens = batch["labels"].numpy()
    chosen, ids = tokens != IGNORE_INDEX, batch["attention_mask"].numpy()
    _, sample_ids = stream.locate(np.arange(48))
    longest, documents = 0, 0
    for b, s in enumerate(sample_ids.tolist()):
        row = rows.tokens(s)
        word = np.cumsum(starts[row] | np.isin(row, SPECIALS)) if whole_word else np.arange(len(row))
        for k in range(1, int(ids[b].max()) + 1):
            inside = np.flatnonzero(ids[b] == k)[1:-1]  # the document without <s> and </s>
            units = np.unique(word[inside], return_index=True)[1]  # first token of each unit
            picked = chosen[b, inside][units]
            documents += 1
            # the document's first unit opens a span: a span running on from the previous document would
            # put an unmasked unit here whenever the previous document ended inside a block
            assert picked[0], (b, k)
            runs = np.diff(np.flatnonzero(np.diff(np.r_[0, picked.astype(int), 0])).reshape(-1, 2), axis=1)
            assert runs.max() <= max_span
            longest = max(longest, int(runs.max()))
            if whole_word:  # each word wholly chosen or not
                assert all(len(set(chosen[b, inside][word[inside] == w].tolist())) == 1 for w in word[inside])
    assert documents > 100 and longest == max_span


def test_a_single_document_row_masks_as_before():
    """Document ids of one document per row reproduce the masks drawn without them."""
    starts = np.zeros(VOCAB, dtype=bool)
    starts[5::4] = True
    rng = np.random.default_rng(1)
    lengths = rng.integers(8, 97, size=12)
    tokens = np.full((12, 96), PAD)
    for b, n in enumerate(lengths):
        tokens[b, :n] = np.r_[BOS, rng.integers(5, VOCAB, size=n - 2), EOS]
    ones = (np.arange(96)[None] < lengths[:, None]).astype(np.int64)
    for r in (recipe(word_starts=starts, max_span=3), recipe(max_span=2), recipe()):
        draws = [r.draws(sample_rng(4, b, 0), n) for b, n in enumerate(lengths)]
        a, b = r.apply_batch(tokens, lengths, draws), r.apply_batch(tokens, lengths, draws, documents=ones)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ----------------------------------------------------------------------------- loader

def step_batches(samples, steps, dp_size, start=0, **kw):
    """Each step's micro-batches of every rank, put back in global order."""
    loaders = [PretrainLoader(samples, dp_rank=r, dp_size=dp_size, consumed_samples=start, **kw)
               for r in range(dp_size)]
    out = []
    for _ in range(steps):
        batches = [mb for loader in loaders for mb in loader.next_step()]
        width = max(mb["input_ids"].shape[1] for mb in batches)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
        merged = {k: torch.cat([pad(mb[k]) if mb[k].dim() == 2 else mb[k] for mb in batches]) for k in batches[0]}
        order = torch.argsort(merged["sample_index"])
        out.append({k: v[order] for k, v in merged.items()})
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("tokens_per_step", [0, 400])
def test_resumed_packed_loader_yields_the_same_batches_at_any_dp_size(corpus, tokens_per_step):
    samples = MaskedSamples(SampleStream([packed(corpus)], seed=5), recipe(word_starts=np.arange(VOCAB) % 3 == 0,
                                                                          max_span=2), SEQ, PAD, seed=5)
    kw = dict(global_batch=8, micro_batch=2, tokens_per_step=tokens_per_step)
    reference, _ = step_batches(samples, 6, dp_size=1, **kw)
    first, state = step_batches(samples, 3, dp_size=2, **kw)
    rest, _ = step_batches(samples, 3, dp_size=4, start=state["consumed_samples"], **kw)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(reference, first + rest) for k in a)
    assert max(int(s["attention_mask"].max()) for s in reference) > 1


def test_loader_reports_packing_efficiency(corpus):
    def efficiency(kind, dp_size):
        samples = MaskedSamples(SampleStream([packed(corpus, kind)], seed=6), recipe(), SEQ, PAD, seed=6,
                                pad_to_multiple_of=8)
        loaders = [PretrainLoader(samples, 8, 2, r, dp_size) for r in range(dp_size)]
        figures = []
        for _ in range(4):
            batches = [mb for loader in loaders for mb in loader.next_step()]
            real = sum(int((mb["attention_mask"] != 0).sum()) for mb in batches)
            cells = sum(mb["attention_mask"].numel() for mb in batches)
            assert all(loader.last_step_packing_efficiency == pytest.approx(real / cells) for loader in loaders)
            figures.append(real / cells)
        return np.mean(figures)

    packed_rows = efficiency("packed_documents", 2)
    assert packed_rows > 0.97 and packed_rows > efficiency("doc_sentences", 1) + 0.1
