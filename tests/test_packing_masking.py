"""FULL-SENTENCES packing, dynamic masking and the resumable loader, on a small hand-made IndexedDataset."""
import numpy as np
import pytest
import torch

from data.loader import MaskedSamples, PretrainLoader, validation_batches, validation_samples
from data.masking import IGNORE_INDEX, MaskingRecipe, sample_rng
from data.packing import FullSentences, split_documents
from tests.indexed import write_indexed

BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
VOCAB = 200


@pytest.fixture(scope="module")
def documents():
    rng = np.random.default_rng(0)
    lengths = [0, 1, 5, 37, 2, 90, 13, 0, 64, 7, 200, 3]  # includes empty docs and ones longer than a sample
    return [rng.integers(5, VOCAB, size=n).astype(np.int64) for n in lengths]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, documents):
    return write_indexed(tmp_path_factory.mktemp("idx") / "docs", documents)


def packed(indexed, first_doc, last_doc, seq_length):
    d = indexed.document_indices
    return FullSentences(indexed, int(d[first_doc]), int(d[last_doc]), d[1:], seq_length, BOS, EOS)


@pytest.mark.parametrize("seq_length", [8, 16, 50, 512])
def test_full_sentences_keeps_every_token_once(indexed, documents, seq_length):
    p = packed(indexed, 0, len(documents), seq_length)
    samples = [p.tokens(i) for i in range(len(p))]
    assert all(s[0] == BOS and s[-1] == EOS and len(s) <= seq_length for s in samples)
    assert all(len(s) == seq_length for s in samples[:-1])  # only the last sample may be short
    stream = np.concatenate([s[1:-1] for s in samples])
    # the stream is the documents joined by </s>, with no separator after the last one
    expected = []
    for i, doc in enumerate(documents):
        expected.extend(doc.tolist())
        if i < len(documents) - 1:
            expected.append(EOS)
    assert stream.tolist() == expected


def test_split_keeps_documents_apart(indexed, documents):
    train_docs = split_documents(len(documents), 0.25)
    assert train_docs == len(documents) - 3
    train, valid = packed(indexed, 0, train_docs, 32), packed(indexed, train_docs, len(documents), 32)
    tokens = lambda p: np.concatenate([p.tokens(i)[1:-1] for i in range(len(p))])
    n_train = sum(len(d) for d in documents[:train_docs]) + train_docs - 1
    n_valid = sum(len(d) for d in documents[train_docs:]) + (len(documents) - train_docs) - 1
    assert len(tokens(train)) == n_train and len(tokens(valid)) == n_valid
    with pytest.raises(Exception, match="no training documents"):
        split_documents(2, 0.9)


def recipe(**kw):
    return MaskingRecipe(mask_id=MASK, vocab_size=VOCAB, special_ids=(BOS, PAD, EOS, UNK, MASK), **kw)


def test_masking_statistics():
    r = recipe()
    rng = np.random.default_rng(1)
    selected = candidates = masked = randomised = kept = 0
    for i in range(400):
        tokens = np.concatenate([[BOS], rng.integers(5, VOCAB, size=126), [EOS]])
        tokens[rng.integers(1, 127, size=3)] = EOS  # separators inside the sample are special too
        inputs, labels = r.apply(tokens, sample_rng(7, i, 0))
        chosen = labels != IGNORE_INDEX
        assert not np.isin(tokens[chosen], [BOS, PAD, EOS, UNK, MASK]).any(), "special token selected"
        assert (labels[chosen] == tokens[chosen]).all()
        assert (inputs[~chosen] == tokens[~chosen]).all()
        candidates += int((tokens >= 5).sum())
        selected += int(chosen.sum())
        masked += int((inputs[chosen] == MASK).sum())
        changed = chosen & (inputs != MASK) & (inputs != tokens)
        randomised += int(changed.sum())
        kept += int((chosen & (inputs == tokens)).sum())
        assert not np.isin(inputs[changed], [BOS, PAD, EOS, UNK, MASK]).any()
    assert selected / candidates == pytest.approx(0.15, abs=0.005)
    assert masked / selected == pytest.approx(0.8, abs=0.02)
    # a random replacement equals the original with probability 1/195: counted as kept
    assert randomised / selected == pytest.approx(0.1, abs=0.015)
    assert kept / selected == pytest.approx(0.1, abs=0.015)


def test_mask_depends_on_global_index_only(indexed, documents):
    p = packed(indexed, 0, len(documents), 32)
    a = MaskedSamples(p, recipe(), 32, PAD, seed=3)
    b = MaskedSamples(p, recipe(), 32, PAD, seed=3)
    n = len(p)
    assert all(torch.equal(a[g]["input_ids"], b[g]["input_ids"]) for g in range(2 * n))
    # the same packed sample in two epochs gets different masks
    g0 = 5
    g1 = n + [a.sample_id(n + k) for k in range(n)].index(a.sample_id(g0))
    assert a.sample_id(g0) == a.sample_id(g1)
    assert not torch.equal(a[g0]["labels"], a[g1]["labels"])
    # every epoch is a permutation of all samples, and epochs are shuffled differently
    first = [a.sample_id(g) for g in range(n)]
    second = [a.sample_id(n + g) for g in range(n)]
    assert sorted(first) == list(range(n)) == sorted(second) and first != second


def test_padding_and_attention_mask(indexed, documents):
    p = packed(indexed, 0, len(documents), 64)
    s = MaskedSamples(p, recipe(), 64, PAD, seed=0, shuffle=False)
    last = s[len(p) - 1]
    length = len(p.tokens(len(p) - 1))
    assert length < 64
    assert last["attention_mask"][:length].all() and not last["attention_mask"][length:].any()
    assert (last["input_ids"][length:] == PAD).all() and (last["labels"][length:] == IGNORE_INDEX).all()


def consumed_stream(samples, steps, global_batch, micro, dp_size, start=0):
    """The global indices each step reads, over all ranks, with the ranks' loaders."""
    loaders = [PretrainLoader(samples, global_batch, micro, r, dp_size, consumed_samples=start) for r in range(dp_size)]
    out = []
    for _ in range(steps):
        step = []
        for loader in loaders:
            for batch in loader.next_step():
                step.extend(batch["input_ids"].tolist())
        out.append(sorted(map(tuple, step)))
    return out, loaders[0].state_dict()


def test_loader_resumes_and_survives_dp_change(indexed, documents):
    p = packed(indexed, 0, len(documents), 16)
    samples = MaskedSamples(p, recipe(), 16, PAD, seed=11)
    full, state = consumed_stream(samples, 6, global_batch=8, micro=2, dp_size=2)
    assert state == {"consumed_samples": 48}
    head, mid = consumed_stream(samples, 2, global_batch=8, micro=2, dp_size=2)
    tail, _ = consumed_stream(samples, 4, global_batch=8, micro=4, dp_size=1, start=mid["consumed_samples"])
    assert head + tail == full  # resume at step 3 with another DP size and micro batch: same data


def test_validation_is_fixed(indexed, documents):
    p = packed(indexed, 0, len(documents), 16)
    v = validation_samples(p, recipe(), 16, PAD, seed=11)
    one = [b["labels"] for b in validation_batches(v, 10, 4, 0, 1)]
    two = [b["labels"] for b in validation_batches(v, 10, 4, 0, 1)]
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    shards = [torch.cat([b["input_ids"] for b in validation_batches(v, 10, 4, r, 2)]) for r in range(2)]
    assert sum(len(s) for s in shards) == 10


def test_loader_leaves_the_global_rng_alone(indexed, documents):
    """Dropout draws from the global torch RNG; starting a loader (as a resumed run does) must not shift it."""
    p = packed(indexed, 0, len(documents), 16)
    loader = PretrainLoader(MaskedSamples(p, recipe(), 16, PAD, seed=1), 8, 2, 0, 1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    loader.next_step()
    assert torch.equal(torch.rand(3), expected)
