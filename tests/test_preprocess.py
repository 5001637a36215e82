import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.errors import UserError
from data.indexed import ShardWriter, indexed_dataset_module, open_indexed, read_sidecar, token_dtype
from data.preprocess import preprocess
from data.reading import expand_inputs

REPO = Path(__file__).resolve().parents[1]


def corpus_texts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def output_files(prefix):
    return {suffix: Path(f"{prefix}{suffix}") for suffix in (".bin", ".idx", ".json")}


def documents(prefix, tok):
    dataset = open_indexed(prefix)
    return [tok.decode(dataset[i].tolist()) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def demo_prefix(demo_corpus, bpe_tokenizer, tmp_path_factory):
    """The small demo corpus preprocessed in this process (workers=1) with the default ranges."""
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
    assert (sidecar["skipped"], sidecar["repaired"], sidecar["txt_docs"]) == ({}, {}, "line")


def test_one_large_file_gives_the_same_bytes_for_any_worker_count(demo_corpus, spm_tokenizer, tmp_path):
    """A single file cut into many ranges, shared by 2 or 3 workers, against one process reading it whole."""
    lines = demo_corpus.path.read_text(encoding="utf-8").splitlines(keepends=True)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(lines * 3), encoding="utf-8")  # ~1 MB, ~1500 documents
    runs = {"w1": dict(workers=1, chunk_bytes=1 << 30), "w2": dict(workers=2, chunk_bytes=40_000),
            "w3": dict(workers=3, chunk_bytes=150_001)}
    for name, kwargs in runs.items():
        summary = preprocess([big], spm_tokenizer.path, tmp_path / name, **kwargs)
        assert summary.documents == 3 * len(lines)
    reference = {s: p.read_bytes() for s, p in output_files(tmp_path / "w1").items() if s != ".json"}
    for name in ("w2", "w3"):
        assert {s: p.read_bytes() for s, p in output_files(tmp_path / name).items() if s != ".json"} == reference
    dataset = open_indexed(tmp_path / "w2")
    assert dataset[len(lines) + 7].tolist() == spm_tokenizer.encode(json.loads(lines[7])["text"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no shards left


def test_shards_are_what_megatron_core_writes(tmp_path):
    docs = [np.array(d, dtype=np.uint16) for d in ([5, 6, 7], [8], [9, 10], [])]
    builder = indexed_dataset_module().IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_document(doc, [doc.size])
    builder.finalize(str(tmp_path / "mc.idx"))
    with ShardWriter(tmp_path / "ours", np.uint16) as shard:
        shard.add(np.concatenate(docs[:2]), np.array([3, 1]))
        shard.add(np.concatenate(docs[2:]), np.array([2, 0]))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"mc{suffix}").read_bytes()
    assert (shard.documents, shard.tokens) == (4, 6)


def test_workers_do_not_import_megatron_or_torch(spm_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("one line\nanother line\n")
    code = f"""
import sys
from data.preprocess import _Task, _init_worker, _run_task
from data.reading import ReadOptions
_init_worker({str(spm_tokenizer.path)!r}, ReadOptions(), 1)
result = _run_task(_Task({str(tmp_path / 'a.txt')!r}, "txt", True, 0, 22, None, 22, {str(tmp_path / 'shard')!r}))
assert (result.documents, result.newlines) == (2, 2), result
print(sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "torch")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_mixed_inputs_in_order_with_empty_documents_counted(tmp_path, bpe_tokenizer):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_bytes("\ufefffirst line\n\n   \nsecond line with a lone \r inside\r\n".encode())
    with gzip.open(data / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gzipped ünïcode 😀"}) + "\n\n" + json.dumps({"body": ""}) + "\n")
    (data / "notes.md").write_text("not an input")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "last"}), encoding="utf-8")  # no final newline

    assert expand_inputs([data, str(tmp_path / "*.jsonl"), data / "a.txt"]) == [
        (data / "a.txt").resolve(), (data / "sub" / "b.jsonl.gz").resolve(), (tmp_path / "c.jsonl").resolve()]
    summary = preprocess([data, str(tmp_path / "*.jsonl")], bpe_tokenizer.path, tmp_path / "out" / "mix",
                         json_key="body")
    assert documents(tmp_path / "out" / "mix", bpe_tokenizer) == [
        "first line", "second line with a lone \r inside", "gzipped ünïcode 😀", "last"]
    assert summary.skipped == {"empty": 4}
    assert read_sidecar(tmp_path / "out" / "mix")["skipped"] == summary.skipped


def test_blank_line_separated_txt_documents(tmp_path, bpe_tokenizer):
    paragraphs = ["\n".join(f"paragraph {i} line {j}" for j in range(i % 4 + 1)) for i in range(300)]
    text = "\n\n".join(paragraphs).replace("paragraph 7 line", "\n \t\n\nparagraph 7 line", 1)
    (tmp_path / "p.txt").write_text("\n\n" + text + "\n   \n", encoding="utf-8")
    with gzip.open(tmp_path / "p.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text.replace("\n", "\r\n"))
    # ranges and blocks that would cut paragraphs in two, were they not moved to blank lines
    for name, chunk in (("p.txt", 1 << 20), ("p.txt", 997), ("p.txt", 1499), ("p.txt.gz", 997)):
        summary = preprocess([tmp_path / name], bpe_tokenizer.path, tmp_path / "out", txt_docs="blank-line",
                             chunk_bytes=chunk)
        assert documents(tmp_path / "out", bpe_tokenizer) == paragraphs, (name, chunk)
        assert summary.skipped == {}
    line_docs = preprocess([tmp_path / "p.txt"], bpe_tokenizer.path, tmp_path / "lines")
    assert line_docs.documents == 750 and line_docs.skipped == {"empty": 305}


def test_documents_without_tokens_are_skipped_and_counted(tmp_path, spm_tokenizer):
    (tmp_path / "a.txt").write_text("first\n▁▁\nthird\n")  # sentencepiece drops trailing "▁": no tokens
    summary = preprocess([tmp_path / "a.txt"], spm_tokenizer.path, tmp_path / "out")
    assert documents(tmp_path / "out", spm_tokenizer) == ["first", "third"]
    assert summary.skipped == {"no tokens": 1} and read_sidecar(tmp_path / "out")["skipped"] == {"no tokens": 1}


def test_invalid_utf8_is_replaced_and_counted_or_rejected_with_strict(tmp_path, bpe_tokenizer):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"".join(b"fine line %d\n" % i for i in range(40)) + b"caf\xe9 au lait\nlast \xff\xfe\n")
    summary = preprocess([bad], bpe_tokenizer.path, tmp_path / "out", chunk_bytes=100)
    docs = documents(tmp_path / "out", bpe_tokenizer)
    assert docs[40:] == ["caf\ufffd au lait", "last \ufffd\ufffd"] and len(docs) == 42
    assert summary.repaired == {"invalid utf-8 replaced": 2} and summary.skipped == {}
    with pytest.raises(UserError, match=r"latin1\.txt:41: not valid UTF-8 \(byte 4 of the line\).*--strict"):
        preprocess([bad], bpe_tokenizer.path, tmp_path / "strict", strict=True, chunk_bytes=100)
    escaped = tmp_path / "surrogate.jsonl"
    escaped.write_text('{"text": "ok"}\n{"text": "lone \\ud800 surrogate"}\n')
    summary = preprocess([escaped], bpe_tokenizer.path, tmp_path / "out")
    assert documents(tmp_path / "out", bpe_tokenizer)[1] == "lone \ufffd surrogate"
    assert summary.repaired == {"invalid utf-8 replaced": 1}
    with pytest.raises(UserError, match=r"surrogate\.jsonl:2: lone surrogate"):
        preprocess([escaped], bpe_tokenizer.path, tmp_path / "strict", strict=True)
    assert not list(tmp_path.glob("strict*"))


def test_nul_characters_are_stripped_and_counted_or_rejected_with_strict(tmp_path, bpe_tokenizer):
    (tmp_path / "nul.txt").write_bytes(b"a\x00b\n\x00\x00\nclean\n")
    (tmp_path / "nul.jsonl").write_text('{"text": "x\\u0000y"}\n{"text": "z"}\n')
    summary = preprocess([tmp_path / "nul.txt", tmp_path / "nul.jsonl"], bpe_tokenizer.path, tmp_path / "out")
    assert documents(tmp_path / "out", bpe_tokenizer) == ["ab", "clean", "xy", "z"]
    assert summary.repaired == {"nul stripped": 2} and summary.skipped == {"empty": 1}
    with pytest.raises(UserError, match=r"nul\.txt:1: NUL character.*--strict"):
        preprocess([tmp_path / "nul.txt"], bpe_tokenizer.path, tmp_path / "strict", strict=True)
    with pytest.raises(UserError, match=r"nul\.jsonl:1: NUL character"):
        preprocess([tmp_path / "nul.jsonl"], bpe_tokenizer.path, tmp_path / "strict", strict=True)


def test_a_20_mb_document_takes_linear_time(tmp_path, spm_tokenizer):
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ".split()
    text = (" ".join(np.array(words)[np.random.default_rng(0).integers(0, len(words), 20_000)]) * 200)[:20_000_000]
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    one = preprocess([tmp_path / "one.jsonl"], spm_tokenizer.path, tmp_path / "one")
    expected, _ = spm_tokenizer.encode_batch_flat([text])
    dataset = open_indexed(tmp_path / "one")  # held: its arrays are views of its memory map
    assert (one.documents, one.tokens) == (1, len(expected)) and np.array_equal(dataset[0], expected)

    def paragraph_seconds(size):
        """One document of `size` bytes in lines without a blank one, gzipped: read in 64 KiB blocks."""
        lines = text[:size].replace(" sed ", "\nsed ")
        with gzip.open(tmp_path / "para.txt.gz", "wt", compresslevel=1) as f:
            f.write("short document\n\n" + lines + "\n \nlast document\n")
        start = time.perf_counter()
        summary = preprocess([tmp_path / "para.txt.gz"], spm_tokenizer.path, tmp_path / "para",
                             txt_docs="blank-line", chunk_bytes=1 << 16)
        seconds = time.perf_counter() - start
        paragraphs = open_indexed(tmp_path / "para")
        assert summary.documents == 3 and paragraphs.sequence_lengths[1] > size / 7
        return seconds

    small, large = paragraph_seconds(2_000_000), paragraph_seconds(20_000_000)
    assert large < 20 * small + 1  # linear: about 10x (work that grows with the square would be ~100x)


def write_with_bad_line(path, good=20, bad_line='{"text": "unterminated'):
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(good)]
    lines.insert(good - 3, bad_line)  # past the first ranges, so some shards were already written
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
        with pytest.raises(UserError, match=rf"{bad}:{line}: malformed JSON .*--skip-bad-lines"):
            preprocess([bad], bpe_tokenizer.path, prefix, workers=workers, chunk_bytes=64)
        assert {s: p.read_bytes() for s, p in output_files(prefix).items()} == before
        assert sorted(p.name for p in prefix.parent.iterdir()) == ["corpus.bin", "corpus.idx", "corpus.json"]


def test_failure_leaves_no_partial_output(tmp_path, bpe_tokenizer):
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write("\n".join([json.dumps({"text": f"doc {i}"}) for i in range(500)] + ['{"title": "no text"}']) + "\n")
    with pytest.raises(UserError, match=rf"{bad}:501: no key 'text'.*--json-key"):
        preprocess([bad], bpe_tokenizer.path, tmp_path / "out" / "corpus", chunk_bytes=1000)
    assert list((tmp_path / "out").iterdir()) == []


def test_skip_bad_lines_counts_each_reason(tmp_path, bpe_tokenizer, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps({"text": "kept one"}), '{"text": "unterminated', '[1, 2]',
                               json.dumps({"title": "no text"}), json.dumps({"text": 42}),
                               json.dumps({"text": "kept two"})]) + "\n")
    summary = preprocess([path], bpe_tokenizer.path, tmp_path / "out", skip_bad_lines=True)
    assert documents(tmp_path / "out", bpe_tokenizer) == ["kept one", "kept two"]
    assert summary.skipped == {"malformed json": 1, "missing key": 2, "not a string": 1}
    assert f"skipped {path}:2 (malformed json)" in caplog.text


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
    with pytest.raises(UserError, match="--txt-docs 'paragraph' is not one of line, blank-line"):
        preprocess([tmp_path / "blank.txt"], bpe_tokenizer.path, tmp_path / "x", txt_docs="paragraph")
    (tmp_path / "broken.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"broken\.txt\.gz: not a readable gzip file"):
        preprocess([tmp_path / "broken.txt.gz"], bpe_tokenizer.path, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "broken.txt.gz"]  # nothing half-written


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
                      f"fix or remove the line, or pass --skip-bad-lines"]
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "out").iterdir()) == []
