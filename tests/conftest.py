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
