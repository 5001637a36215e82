"""tools/preprocess_data.py --word-segmenter jieba: the word-start companion PREFIX.wordstarts.bin/.idx,
its sidecar entry, whole-word static masks from it, and what a failure or a missing jieba leaves."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jieba = pytest.importorskip("jieba")

from data.errors import UserError  # noqa: E402
from data.indexed import indexed_dataset_module, open_indexed, read_sidecar  # noqa: E402
from data.preprocess import preprocess  # noqa: E402
from data.segmenter import load_segmenter  # noqa: E402
from data.static_masks import NOT_PREDICTED  # noqa: E402
from data.tokenizer_train import train_bpe  # noqa: E402
from tools.preprocess_data import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = ["我们在2024年3月15日去了北京大学，参加了Machine Learning研讨会！价格是3.14元。",
        "他说：“你好 world” C++和Python3都很好。\n自然语言处理是人工智能的一个重要方向。",
        "今天天气很好，我们去公园散步。中文分词对于全词掩码非常重要，鬱龘之谜尚未解开。"]
LONG = "。".join(DOCS) * 4  # longer than --max-document-bytes below: tokenized in pieces, one document


def write_corpus(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    """A Chinese corpus, a tiny BPE on it, and the corpus preprocessed by the tool with 2 workers,
    jieba word starts and 2 whole-word static-mask copies."""
    tmp = tmp_path_factory.mktemp("zh_preprocess")
    docs = DOCS * 20 + [LONG]
    corpus = write_corpus(tmp / "zh.jsonl", docs)
    tok = train_bpe(iter(docs), 300, tmp / "tok")
    prefix = tmp / "out" / "zh"
    assert main(["--input", str(corpus), "--tokenizer", str(tok.path), "--output-prefix", str(prefix),
                 "--workers", "2", "--word-segmenter", "jieba", "--max-document-bytes", "600",
                 "--static-masks", "2", "--whole-word-mask", "--mask-prob", "0.3"]) == 0
    return prefix, tok, docs


def companion(prefix):
    return indexed_dataset_module().IndexedDataset(f"{prefix}.wordstarts")


def test_companion_has_a_flag_per_token_as_the_segmenter_computes(zh):
    prefix, tok, docs = zh
    tokens, flags = open_indexed(prefix), companion(prefix)
    assert flags[0].dtype == np.uint8 and len(flags) == len(tokens) == len(docs)
    assert np.array_equal(flags.sequence_lengths, tokens.sequence_lengths)
    assert np.array_equal(flags.document_indices, tokens.document_indices)
    segmenter = load_segmenter("jieba")
    for i in range(len(DOCS)):
        [(ids, begins, ends)] = tok.encode_batch_offsets([docs[i]])
        assert np.array_equal(tokens[i], ids)
        assert flags[i].tolist() == segmenter.token_flags(docs[i], begins, ends).tolist()
    assert set(np.unique(flags[len(docs) - 1]).tolist()) == {0, 1}  # the long document, in pieces
    assert read_sidecar(prefix)["split_documents"] == 1


def test_sidecar_records_the_segmenter(zh):
    prefix, _, _ = zh
    entry = read_sidecar(prefix)["word_starts"]
    sha = hashlib.sha256(Path(f"{prefix}.wordstarts.idx").read_bytes()).hexdigest()
    assert entry == {"suffix": ".wordstarts", "segmenter": "jieba", "segmenter_version": jieba.__version__,
                     "idx_sha256": sha}
    assert jieba.__version__ == "0.42.1"


def test_whole_word_static_masks_never_mask_part_of_a_jieba_word(zh):
    prefix, tok, docs = zh
    masks = indexed_dataset_module().IndexedDataset(f"{prefix}.static_masks")
    n = len(docs)
    partial, masked_words, runs = 0, 0, 0
    for copy in range(2):
        for i in range(len(DOCS)):
            predicted = masks[copy * n + i] != NOT_PREDICTED
            runs += int(predicted[0]) + int((predicted[1:] & ~predicted[:-1]).sum())
            [(_, begins, ends)] = tok.encode_batch_offsets([docs[i]])
            start = 0
            for word in jieba.lcut(docs[i]):
                hit = predicted[(begins < start + len(word)) & (ends > start)]
                start += len(word)
                if word.strip() and hit.any():
                    masked_words += 1
                    partial += not hit.all()
    assert masked_words > 10 and partial == 0
    # word-sized units: many separate masked runs (the tokenizer's own word starts, at spaces only,
    # would make each space-free stretch of Chinese one unit: a handful of runs)
    assert runs >= 15, runs


def test_failure_leaves_no_companion_or_partial_files(zh, tmp_path):
    _, tok, _ = zh
    (tmp_path / "in").mkdir()
    good = write_corpus(tmp_path / "in" / "a.jsonl", DOCS)
    bad = tmp_path / "in" / "b.jsonl"
    bad.write_text(json.dumps({"text": DOCS[0]}, ensure_ascii=False) + "\n{not json\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="b.jsonl:2"):  # after a.jsonl's shard was merged
        preprocess([good, bad], tok.path, out / "zh", workers=1, word_segmenter="jieba")
    assert list(out.iterdir()) == []


def test_missing_jieba_exits_2_naming_the_install(zh, tmp_path):
    _, tok, _ = zh
    corpus = write_corpus(tmp_path / "zh.jsonl", DOCS)
    code = ("import sys, runpy; sys.modules['jieba'] = None; "  # `import jieba` now raises ImportError
            f"sys.argv = ['preprocess_data.py', '--input', {str(corpus)!r}, '--tokenizer', {str(tok.path)!r}, "
            f"'--output-prefix', {str(tmp_path / 'out' / 'zh')!r}, '--word-segmenter', 'jieba']; "
            "runpy.run_path('tools/preprocess_data.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "pip install -e '.[zh]'" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
