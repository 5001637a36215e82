import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.errors import UserError
from data.indexed import open_indexed, read_sidecar, token_dtype
from data.preprocess import expand_inputs, preprocess

REPO = Path(__file__).resolve().parents[1]


def corpus_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def output_files(prefix):
    return {suffix: Path(f"{prefix}{suffix}") for suffix in (".bin", ".idx", ".json")}


@pytest.fixture(scope="module")
def demo_prefix(demo_corpus, bpe_tokenizer, tmp_path_factory):
    """The small demo corpus preprocessed in this process (workers=1) with the default chunking."""
    prefix = tmp_path_factory.mktemp("bin") / "nested" / "demo"  # parent directories are created
    summary = preprocess([demo_corpus.path], bpe_tokenizer.path, prefix, workers=1)
    return prefix, summary


def test_round_trip_keeps_documents_and_boundaries(demo_prefix, demo_corpus, bpe_tokenizer):
    prefix, summary = demo_prefix
    texts = corpus_texts(demo_corpus.path)
    dataset = open_indexed(prefix)
    assert len(dataset) == summary.documents == len(texts)
    assert np.array_equal(dataset.document_indices, np.arange(len(texts) + 1))  # one item per document
    assert dataset[0].dtype == np.uint16
    expected = bpe_tokenizer.encode_batch(texts)
    for i in (0, 1, len(texts) // 2, len(texts) - 1):
        assert dataset[i].tolist() == expected[i]
        assert bpe_tokenizer.decode(dataset[i].tolist()) == texts[i]
    assert [d.tolist() for d in dataset[0:len(dataset)]] == expected
    assert int(dataset.sequence_lengths.sum()) == summary.tokens


def test_sidecar_records_tokenizer_and_counts(demo_prefix, demo_corpus, bpe_tokenizer):
    prefix, summary = demo_prefix
    sidecar = read_sidecar(prefix)
    assert sidecar["format_version"] == 1
    assert sidecar["tokenizer"] == {"path": str(bpe_tokenizer.path), "fingerprint": bpe_tokenizer.fingerprint(),
                                    "type": "bpe", "vocab_size": 1000}
    assert (sidecar["documents"], sidecar["tokens"]) == (summary.documents, summary.tokens)
    assert sidecar["inputs"] == [str(demo_corpus.path.resolve())]
    assert sidecar["dtype"] == "uint16" and sidecar["tool"] == "preprocess_data"


def test_worker_count_and_chunking_do_not_change_the_bytes(demo_prefix, demo_corpus, bpe_tokenizer, tmp_path):
    prefix, _ = demo_prefix
    other = tmp_path / "w2"
    preprocess([demo_corpus.path], bpe_tokenizer.path, other, workers=2, chunk_docs=16)
    for suffix, path in output_files(prefix).items():
        assert output_files(other)[suffix].read_bytes() == path.read_bytes(), suffix


def test_mixed_inputs_in_order_with_empty_documents_counted(tmp_path, bpe_tokenizer):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("first line\n\n   \nsecond line with a lone \r inside\n", encoding="utf-8")
    with gzip.open(data / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gzipped ünïcode 😀"}) + "\n\n" + json.dumps({"body": ""}) + "\n")
    (data / "notes.md").write_text("not an input")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "last"}) + "\n", encoding="utf-8")

    assert expand_inputs([data, str(tmp_path / "*.jsonl"), data / "a.txt"]) == [
        (data / "a.txt").resolve(), (data / "sub" / "b.jsonl.gz").resolve(), (tmp_path / "c.jsonl").resolve()]
    summary = preprocess([data, str(tmp_path / "*.jsonl")], bpe_tokenizer.path, tmp_path / "out" / "mix",
                         json_key="body")
    dataset = open_indexed(tmp_path / "out" / "mix")
    decoded = [bpe_tokenizer.decode(dataset[i].tolist()) for i in range(len(dataset))]
    assert decoded == ["first line", "second line with a lone \r inside", "gzipped ünïcode 😀", "last"]
    assert summary.skipped == {"blank line": 1, "empty text": 3}
    assert read_sidecar(tmp_path / "out" / "mix")["skipped"] == summary.skipped


def write_with_bad_line(path, good=20, bad_line='{"text": "unterminated'):
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(good)]
    lines.insert(good - 3, bad_line)  # past the first chunks, so some output was already written
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return good - 2  # its 1-based line number


def test_bad_json_line_names_file_and_line_and_leaves_old_output_intact(tmp_path, bpe_tokenizer):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a good old dataset"}) + "\n")
    prefix = tmp_path / "out" / "corpus"
    preprocess([good], bpe_tokenizer.path, prefix)
    before = {s: p.read_bytes() for s, p in output_files(prefix).items()}

    bad = tmp_path / "bad.jsonl"
    line = write_with_bad_line(bad)
    for workers in (1, 2):
        with pytest.raises(UserError, match=rf"{bad}:{line}: malformed JSON"):
            preprocess([bad], bpe_tokenizer.path, prefix, workers=workers, chunk_docs=4)
        assert {s: p.read_bytes() for s, p in output_files(prefix).items()} == before
        assert sorted(p.name for p in prefix.parent.iterdir()) == ["corpus.bin", "corpus.idx", "corpus.json"]


def test_failure_leaves_no_partial_output(tmp_path, bpe_tokenizer):
    bad = tmp_path / "bad.jsonl"
    line = write_with_bad_line(bad, bad_line='{"title": "no text here"}')
    with pytest.raises(UserError, match=rf"{bad}:{line}: no key 'text'.*--json-key"):
        preprocess([bad], bpe_tokenizer.path, tmp_path / "out" / "corpus", chunk_docs=4)
    assert list((tmp_path / "out").iterdir()) == []


def test_input_and_output_user_errors(tmp_path, bpe_tokenizer):
    with pytest.raises(UserError, match="matches no"):
        preprocess([str(tmp_path / "*.jsonl")], bpe_tokenizer.path, tmp_path / "x")
    with pytest.raises(UserError, match="does not exist"):
        preprocess([tmp_path / "missing.txt"], bpe_tokenizer.path, tmp_path / "x")
    with pytest.raises(UserError, match=r"x\.bin and .*x\.idx missing"):
        open_indexed(tmp_path / "x")
    with pytest.raises(UserError, match=r"x\.json not found"):
        read_sidecar(tmp_path / "x")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"no documents in .*blank\.txt"):
        preprocess([tmp_path / "blank.txt"], bpe_tokenizer.path, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt"]  # nothing half-written
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match=r"latin1\.txt:1: not valid UTF-8"):
        preprocess([tmp_path / "latin1.txt"], bpe_tokenizer.path, tmp_path / "x")


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(65535) is np.uint16
    assert token_dtype(65536) is np.int32


def test_cli_prints_one_line_error_and_exits_2(tmp_path, bpe_tokenizer):
    bad = tmp_path / "bad.jsonl"
    line = write_with_bad_line(bad)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(bad),
         "--tokenizer", str(bpe_tokenizer.path), "--output-prefix", str(tmp_path / "out" / "c"), "--workers", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors == [f"error: {bad}:{line}: malformed JSON (column 10: Unterminated string starting at); "
                      f"fix or remove the line"]
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "out").iterdir()) == []
