import hashlib
import json
import textwrap

import pytest

from data.errors import UserError
from tools.build_demo_corpus import build_demo_corpus, looks_like_prose

PROSE = ("The quick brown fox jumps over the lazy dog while the patient reader waits for the "
         "sentence to end, and then it goes on for a little while longer so that it is long enough "
         "to pass the two hundred character threshold of the prose filter without any trouble. ")


def read_texts(path):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert all(set(row) == {"text"} and isinstance(row["text"], str) for row in rows)
    return [row["text"] for row in rows]


def test_installation_corpus_is_deterministic_capped_and_deduplicated(demo_corpus, tmp_path):
    path, summary = demo_corpus.path, demo_corpus.summary
    again = build_demo_corpus(tmp_path / "again.jsonl", max_mb=demo_corpus.max_mb)
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    assert again.documents == summary.documents

    cap = int(demo_corpus.max_mb * 1_000_000)
    size = path.stat().st_size
    assert size == summary.bytes <= cap
    assert size > 0.9 * cap  # it stopped at the cap, not for want of docstrings

    texts = read_texts(path)
    assert len(texts) == summary.documents > 100
    normalised = {hashlib.sha1(" ".join(t.split()).encode()).digest() for t in texts}
    assert len(normalised) == len(texts)
    assert all(len(t) >= 200 and looks_like_prose(t, 200) for t in texts)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed, not left beside


def write(path, source):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")


def test_filters_tests_unparsable_files_duplicates_and_non_prose(tmp_path):
    root = tmp_path / "site"
    write(root / "b.py", f'''
        """{PROSE}"""

        def f():
            """Short."""

        class C:
            """{PROSE.upper()}"""

            def g(self):
                """{"  ".join(PROSE.split())}"""  # the module docstring with other whitespace

        def h():
            """{"x = [1, 2, 3]; y = {{k: v}} ## " * 20}"""
        ''')
    write(root / "a.py", f'"""A first file. {PROSE}"""\n')
    write(root / "tests" / "test_b.py", f'"""Test prose. {PROSE}"""\n')
    write(root / "broken.py", f'"""Broken. {PROSE}"""\ndef (:\n')
    (root / "latin1.py").write_bytes(b'"""caf\xe9 ' + PROSE.encode() + b'"""\n')

    out = tmp_path / "out" / "corpus.jsonl"  # the parent directory is created
    summary = build_demo_corpus(out, max_mb=1, roots=[root])
    texts = read_texts(out)
    # sorted file order (a.py before b.py), module docstring before the class's, duplicates once
    assert texts == [f"A first file. {PROSE}".strip(), PROSE.strip(), PROSE.upper().strip()]
    assert summary.files_scanned == 4  # tests/ is never walked
    assert summary.files_skipped == 2  # syntax error, undeclared latin-1


def test_cap_stops_before_the_line_that_would_pass_it(tmp_path):
    root = tmp_path / "site"
    for name in "abc":
        write(root / f"{name}.py", f'"""{name.upper()} {PROSE}"""\n')
    line_bytes = len((json.dumps({"text": f"A {PROSE}".strip()}) + "\n").encode())
    summary = build_demo_corpus(tmp_path / "c.jsonl", max_mb=2.5 * line_bytes / 1e6, roots=[root])
    assert summary.documents == 2
    assert [t[0] for t in read_texts(tmp_path / "c.jsonl")] == ["A", "B"]


def test_output_that_is_a_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        build_demo_corpus(tmp_path, max_mb=0.01, roots=[tmp_path])
