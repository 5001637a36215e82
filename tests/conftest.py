"""Shared data fixtures: one small demo corpus, and a BPE and a SentencePiece tokenizer trained on it, per session."""
from types import SimpleNamespace

import pytest

from data.tokenizer_train import train_bpe, train_spm
from tools.build_demo_corpus import build_demo_corpus

SMALL_CORPUS_MB = 0.3  # a few hundred docstrings: enough for a 1000-token vocabulary, fast to build
SMALL_VOCAB = 1000


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """A small corpus built from this interpreter's installation: .path, .summary, .max_mb."""
    path = tmp_path_factory.mktemp("corpus") / "demo.jsonl"
    summary = build_demo_corpus(path, max_mb=SMALL_CORPUS_MB)
    return SimpleNamespace(path=path, summary=summary, max_mb=SMALL_CORPUS_MB)


@pytest.fixture(scope="session")
def bpe_tokenizer(demo_corpus, tmp_path_factory):
    return train_bpe([demo_corpus.path], SMALL_VOCAB, tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="session")
def spm_tokenizer(demo_corpus, tmp_path_factory):
    """SentencePiece Unigram, DeBERTa-v3 layout, SMALL_VOCAB ids ([MASK] = SMALL_VOCAB - 1)."""
    return train_spm([demo_corpus.path], SMALL_VOCAB, tmp_path_factory.mktemp("tok") / "spm")


@pytest.fixture(scope="session")
def tiny_bpe_prefix(tmp_path_factory) -> str:
    """The demo pipeline's tools at 0.5 MB, as a user runs them: docstring corpus -> 600-token BPE ->
    IndexedDataset; the prefix, shared by the multi-process tests that train on it."""
    from tests.launch import bpe_pipeline

    return bpe_pipeline(tmp_path_factory.mktemp("tiny_bpe_pipeline"), corpus_mb=0.5, vocab_size=600, workers=1)
