"""Whole-word masking by a corpus' word-start companion (data/word_starts.py): reading, masking, bad input.

One module fixture writes a token dataset of known words (1-4 tokens each) and its companion
PREFIX.wordstarts.bin/.idx with the sidecar entry preprocessing writes. Word-first tokens are drawn
from the ids the tokenizer does NOT mark as word starts and continuation tokens from those it does,
so the words are known from the ids alone and the tokenizer's id-based whole-word masking would cut
almost every word: only the companion's flags mask them whole.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data.errors import UserError
from data.indexed import indexed_dataset_module, idx_sha256, open_indexed, write_sidecar
from data.loader import MaskedSamples, PretrainLoader
from data.masking import IGNORE_INDEX, MaskingRecipe
from data.packing import build_packed
from data.word_starts import open_word_starts, segmenter_version_problems
from trainer.core.parallel import ParallelContext

SEQ, DOCS, SEED = 32, 60, 11
CTX = ParallelContext(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                      device=torch.device("cpu"))
INSTALLED_JIEBA = "0.42.1"


def _write(prefix: Path, documents, dtype):
    module = indexed_dataset_module()
    builder = module.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def write_corpus(prefix: Path, tok, documents, flags, version: str = INSTALLED_JIEBA, companion: bool = True):
    """PREFIX.bin/.idx/.json of `documents` (uint16) and, with `companion`, PREFIX.wordstarts.* of `flags`."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _write(prefix, documents, np.uint16)
    sidecar = {"tokenizer": {"path": str(tok.path), "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size},
               "documents": len(documents), "tokens": int(sum(len(d) for d in documents)), "dtype": "uint16",
               "idx_sha256": idx_sha256(prefix)}
    if companion:
        _write(Path(f"{prefix}.wordstarts"), flags, np.uint8)
        sidecar["word_starts"] = {"suffix": ".wordstarts", "segmenter": "jieba", "segmenter_version": version,
                                  "idx_sha256": idx_sha256(f"{prefix}.wordstarts")}
    write_sidecar(f"{prefix}.json", sidecar)
    return prefix


def word_ids(tok):
    """(ids for a word's first token, ids for its other tokens): the tokenizer's non-starts and starts."""
    starts = np.asarray(tok.word_start_ids(), dtype=bool)
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[list(tok.special_ids)] = True
    ids = np.arange(tok.vocab_size)
    return ids[~starts & ~special], ids[starts & ~special]


def make_documents(tok, seed: int = 0, count: int = DOCS):
    first, rest = word_ids(tok)
    rng = np.random.default_rng(seed)
    documents, flags = [], []
    for _ in range(count):
        words = [int(rng.integers(1, 5)) for _ in range(int(rng.integers(8, 60)))]  # 1-4 tokens a word
        doc = np.concatenate([np.concatenate([rng.choice(first, 1), rng.choice(rest, n - 1)]) for n in words])
        documents.append(doc)
        flags.append(np.concatenate([[1] + [0] * (n - 1) for n in words]).astype(np.uint8))
    return documents, flags


@pytest.fixture(scope="module")
def corpus(bpe_tokenizer, tmp_path_factory):
    documents, flags = make_documents(bpe_tokenizer)
    prefix = write_corpus(tmp_path_factory.mktemp("wordstarts") / "bin" / "corpus", bpe_tokenizer, documents, flags)
    return prefix


def recipe_for(tok, max_span: int = 1, mask_prob: float = 0.15) -> MaskingRecipe:
    return MaskingRecipe(mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=tuple(tok.special_ids),
                         mask_prob=mask_prob, word_starts=tok.word_start_ids(), max_span=max_span)


def packed(prefix, tok, kind: str, companion: bool = True, first_doc: int = 0, last_doc: int = DOCS):
    dataset = open_indexed(prefix, tok)
    pairs = {"sentence_ends": tok.sentence_end_ids(), "pair_separators": 1, "seed": SEED} if "pair" in kind else {}
    return build_packed(kind, dataset, first_doc, last_doc, SEQ, tok.bos_id, tok.eos_id,
                        word_starts=open_word_starts(prefix, dataset) if companion else None, **pairs)


def true_starts(tok, tokens: np.ndarray) -> np.ndarray:
    """Where a word begins, from the ids alone (a word-first id, a special, or the token after a special)."""
    first, _ = word_ids(tok)
    special = np.isin(tokens, list(tok.special_ids))
    starts = np.isin(tokens, first) | special
    starts[..., 1:] |= special[..., :-1]
    return starts


def check_whole_words(tok, batch, max_span: int):
    """Every word of every row is predicted entirely or not at all; a run of predicted tokens begins at a
    word start, ends before one and (spans of max_span > 1 never touch) holds at most max_span words.
    Returns (predicted, candidates)."""
    tokens = batch["input_ids"].numpy().copy()
    labels = batch["labels"].numpy()
    predicted = labels != IGNORE_INDEX
    tokens[predicted] = labels[predicted]  # the original ids
    real = batch["attention_mask"].numpy() > 0
    starts = true_starts(tok, tokens) | ~real
    candidates = real & ~np.isin(tokens, list(tok.special_ids))
    for row in range(len(tokens)):
        word = np.cumsum(starts[row])
        for w in np.unique(word[predicted[row]]):
            members = (word == w) & candidates[row]
            assert predicted[row][members].all(), f"row {row}: word {w} partly masked"
        padded = np.concatenate([[False], predicted[row], [False]]).astype(np.int8)
        begins, ends = np.flatnonzero(np.diff(padded) == 1), np.flatnonzero(np.diff(padded) == -1)
        for b, e in zip(begins, ends):
            assert starts[row, b], f"row {row}: a predicted run begins inside a word at {b}"
            assert e == len(tokens[row]) or starts[row, e], f"row {row}: a predicted run ends inside a word at {e}"
            if max_span > 1:  # spans never touch (single words may)
                assert starts[row, b:e].sum() <= max_span, f"row {row}: a span of more than {max_span} words"
    return int(predicted.sum()), int(candidates.sum())


# -- reading --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full_sentences", "doc_sentences", "packed_documents", "segment_pair"])
def test_streams_read_flags_as_tokens(corpus, bpe_tokenizer, kind):
    stream = packed(corpus, bpe_tokenizer, kind)
    for i in range(len(stream)):
        tokens, flags = stream.tokens(i), stream.word_starts(i)
        assert flags.dtype == bool and flags.shape == tokens.shape
        special = np.isin(tokens, list(bpe_tokenizer.special_ids))
        assert flags[special].all()
        # a sample that begins or resumes mid-word holds a 0 after the special: otherwise the ids say it all
        after_special = np.zeros_like(special)
        after_special[1:] = special[:-1]
        np.testing.assert_array_equal(flags[~after_special], true_starts(bpe_tokenizer, tokens)[~after_special])
    assert packed(corpus, bpe_tokenizer, kind, companion=False).word_starts(0) is None


def test_open_word_starts_gives_document_flags(corpus, bpe_tokenizer, tmp_path):
    dataset = open_indexed(corpus)
    companion = open_word_starts(corpus, dataset)
    documents, flags = make_documents(bpe_tokenizer)
    for i in (0, 7, DOCS - 1):
        np.testing.assert_array_equal(companion[i], flags[i])
    plain = write_corpus(tmp_path / "plain", bpe_tokenizer, documents, flags, companion=False)
    assert open_word_starts(plain, open_indexed(plain)) is None


# -- masking --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full_sentences", "doc_sentences", "packed_documents", "segment_pair"])
@pytest.mark.parametrize("max_span", [1, 3])
def test_words_are_masked_whole(corpus, bpe_tokenizer, kind, max_span):
    samples = MaskedSamples(packed(corpus, bpe_tokenizer, kind), recipe_for(bpe_tokenizer, max_span), SEQ,
                            bpe_tokenizer.pad_id, SEED)
    predicted = candidates = 0
    for start in range(0, 3 * len(samples), 16):  # three epochs: new masks each
        p, c = check_whole_words(bpe_tokenizer, samples.__getitems__(list(range(start, start + 16))), max_span)
        predicted, candidates = predicted + p, candidates + c
    assert abs(predicted / candidates - 0.15) < 0.02, predicted / candidates


def test_id_based_starts_would_cut_words(corpus, bpe_tokenizer):
    """The check above has teeth: without the companion, the same corpus is masked in pieces of words."""
    samples = MaskedSamples(packed(corpus, bpe_tokenizer, "full_sentences", companion=False),
                            recipe_for(bpe_tokenizer), SEQ, bpe_tokenizer.pad_id, SEED)
    with pytest.raises(AssertionError, match="partly masked|inside a word"):
        for start in range(0, len(samples), 16):
            check_whole_words(bpe_tokenizer, samples.__getitems__(list(range(start, start + 16))), 1)


def test_blend_with_and_without_companion(corpus, bpe_tokenizer, tmp_path):
    """A corpus without a companion keeps the tokenizer's word starts beside one with it, row by row."""
    from data.blending import SampleStream
    documents, flags = make_documents(bpe_tokenizer, seed=1, count=20)
    plain = write_corpus(tmp_path / "plain", bpe_tokenizer, documents, flags, companion=False)
    recipe = recipe_for(bpe_tokenizer)
    stream = SampleStream([packed(corpus, bpe_tokenizer, "doc_sentences"),
                           packed(plain, bpe_tokenizer, "doc_sentences", last_doc=20)], [1, 1], seed=SEED)
    blended = MaskedSamples(stream, recipe, SEQ, bpe_tokenizer.pad_id, SEED)
    alone = MaskedSamples(SampleStream([stream.corpora[1]], seed=SEED), recipe, SEQ, bpe_tokenizer.pad_id, SEED)
    indices = list(range(64))
    batch = blended.__getitems__(indices)
    corpus_ids, samples = stream.locate(indices)
    assert set(corpus_ids.tolist()) == {0, 1}
    for row, (c, s) in enumerate(zip(corpus_ids.tolist(), samples.tolist())):
        if c == 1:  # masked as that corpus alone masks it at the same global index: id-based starts
            alone.stream.locate = lambda positions, s=s: (np.zeros(1, np.int32), np.array([s]))
            own = alone.__getitems__([indices[row]])
            torch.testing.assert_close(batch["labels"][row], own["labels"][0])
    check_whole_words(bpe_tokenizer, {k: v[corpus_ids == 0] for k, v in batch.items()}, 1)


def test_resumed_loader_draws_the_same_masks(corpus, bpe_tokenizer):
    def loader(consumed=0):
        samples = MaskedSamples(packed(corpus, bpe_tokenizer, "packed_documents"), recipe_for(bpe_tokenizer, 3),
                                SEQ, bpe_tokenizer.pad_id, SEED)
        return PretrainLoader(samples, 8, 4, 0, 1, consumed_samples=consumed)
    first = loader()
    batches = [first.next_step() for _ in range(4)]
    resumed = loader(consumed=16)
    for step in (2, 3):
        for a, b in zip(resumed.next_step(), batches[step]):
            for key in a:
                torch.testing.assert_close(a[key], b[key])


def _config(prefix, *extra):
    from trainer.pretraining.config import load_config
    return load_config(None, [f"data.prefix={prefix}", f"data.seq_length={SEQ}", "data.whole_word_mask=true",
                              f"data.cache_dir={Path(prefix).parent / 'cache'}", "train.micro_batch_size=8",
                              "train.global_batch_size=8", *extra])


@pytest.mark.parametrize("max_span", [1, 3])
def test_rtd_generator_masks_words_whole(corpus, bpe_tokenizer, max_span):
    """An ELECTRA run's loader (trainer.pretraining.inputs) masks the generator's input by whole words."""
    from trainer.pretraining.inputs import build_inputs, check_corpora
    from trainer.pretraining.model import build_model_for

    cfg = _config(corpus, "model.name=electra", "model.size=debug", f"data.max_span={max_span}")
    check_corpora(cfg, CTX, bpe_tokenizer)
    inputs = build_inputs(cfg, CTX, bpe_tokenizer)
    predicted = candidates = 0
    for _ in range(6):
        for batch in inputs.loader.next_step():
            p, c = check_whole_words(bpe_tokenizer, batch, max_span)
            predicted, candidates = predicted + p, candidates + c
    assert abs(predicted / candidates - 0.15) < 0.03
    check_whole_words(bpe_tokenizer, inputs.valid.__getitems__([0, 1, 2]), max_span)
    if max_span == 1:
        model, _ = build_model_for(cfg, bpe_tokenizer, CTX)
        out = model(**batch)
        assert int(out["metrics"]["mlm_predicted"]) == int((batch["labels"] != IGNORE_INDEX).sum()) > 0


def test_without_whole_word_mask_the_companion_is_not_read(corpus, bpe_tokenizer):
    from trainer.pretraining.inputs import build_inputs
    cfg = _config(corpus, "data.whole_word_mask=false")
    assert build_inputs(cfg, CTX, bpe_tokenizer).train.stream.has_word_starts is False
    cfg = _config(corpus)
    assert build_inputs(cfg, CTX, bpe_tokenizer).train.stream.has_word_starts is True


# -- bad input ------------------------------------------------------------------------------------------------

def copy_corpus(prefix: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx", ".json", ".wordstarts.bin", ".wordstarts.idx"):
        shutil.copyfile(f"{prefix}{suffix}", dest / f"corpus{suffix}")
    return dest / "corpus"


def _fails_with_exit_2(prefix, bpe_tokenizer, pattern, capsys):
    from trainer.core.cli import run_cli
    from trainer.pretraining.inputs import check_corpora
    with pytest.raises(UserError, match=pattern):
        open_word_starts(prefix, open_indexed(prefix))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda argv: check_corpora(_config(prefix), CTX, bpe_tokenizer))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "corpus.bin" in err[0] and "corpus.wordstarts" in err[0]


def test_missing_companion_exits_2(corpus, bpe_tokenizer, tmp_path, capsys):
    bare = copy_corpus(corpus, tmp_path / "bare")
    Path(f"{bare}.wordstarts.bin").unlink()
    _fails_with_exit_2(bare, bpe_tokenizer, r"corpus\.bin: its word-start companion .*corpus\.wordstarts\.bin "
                                            r"not found .*--word-segmenter jieba", capsys)


def test_companion_of_another_length_exits_2(corpus, bpe_tokenizer, tmp_path, capsys):
    documents, flags = make_documents(bpe_tokenizer)
    longer = [f.copy() for f in flags]
    longer[5] = np.append(longer[5], 1).astype(np.uint8)
    other = write_corpus(tmp_path / "longer" / "corpus", bpe_tokenizer, documents, longer)
    _fails_with_exit_2(other, bpe_tokenizer, r"corpus\.bin: sequence 5 has \d+ tokens, but its word-start "
                                             r"companion .*corpus\.wordstarts\.bin has \d+ flags", capsys)
    fewer = write_corpus(tmp_path / "fewer" / "corpus", bpe_tokenizer, documents, flags[:-1])
    _fails_with_exit_2(fewer, bpe_tokenizer, rf"corpus\.bin has {DOCS} documents, but its word-start companion "
                                             rf".*corpus\.wordstarts\.bin has {DOCS - 1}", capsys)


def test_modified_companion_exits_2(corpus, bpe_tokenizer, tmp_path, capsys):
    edited = copy_corpus(corpus, tmp_path / "edited")
    sidecar = json.loads(Path(f"{edited}.json").read_text())
    sidecar["word_starts"]["idx_sha256"] = "0" * 64
    Path(f"{edited}.json").write_text(json.dumps(sidecar))
    _fails_with_exit_2(edited, bpe_tokenizer, r"corpus\.bin: its word-start companion .*corpus\.wordstarts\.idx "
                                              r"has sha256 .*recorded 000000000000", capsys)


def test_other_segmenter_version_warns_once(corpus, bpe_tokenizer, tmp_path, caplog):
    from trainer.pretraining.inputs import check_corpora
    documents, flags = make_documents(bpe_tokenizer, seed=2, count=10)
    old = write_corpus(tmp_path / "old" / "corpus", bpe_tokenizer, documents, flags, version="0.39")
    older = write_corpus(tmp_path / "older" / "corpus", bpe_tokenizer, documents, flags, version="0.38")
    installed = segmenter_version_problems([corpus]) == []  # jieba installed at the version the fixture names
    problems = segmenter_version_problems([corpus, old, older])
    assert any("but jieba 0.42.1 is installed" in p for p in problems) == installed
    assert f"{old} was segmented with jieba 0.39, but {corpus} with jieba 0.42.1" in problems
    blend = f"[[1, {corpus}], [1, {old}], [1, {older}]]"
    with caplog.at_level(logging.WARNING, logger="data.word_starts"):
        check_corpora(_config(corpus, f"data.blend={blend}"), CTX, bpe_tokenizer)
    warnings = [r for r in caplog.records if r.name == "data.word_starts"]
    assert len(warnings) == 1 and "another segmenter version" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data.word_starts"):
        check_corpora(_config(corpus), CTX, bpe_tokenizer)
    assert [r for r in caplog.records if r.name == "data.word_starts"] == []
