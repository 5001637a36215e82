"""Bounded memory per document, and the failures a user or the machine can cause in preprocessing
and tokenizer training: each a one-line error with exit 2, or a clean stop for signals."""
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.errors import UserError
from data.indexed import ShardWriter, open_indexed, read_sidecar
from data.document_pieces import pieces as _pieces
from data.preprocess import preprocess
from data.tokenizer_train import MAX_VOCAB_SIZE, train_bpe, train_spm
from tools import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "preprocess_data.py"
WORDS = np.array("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split())
# One 8 MB line of BPE takes ~1.63 GB of address space with the document tokenized whole (measured
# on the code before pieces: it aborts under this limit), ~0.83 GB in pieces of 1 MiB, as much as
# a run on a tiny input (torch and megatron-core). One tokenizer thread and two malloc arenas keep the
# address space independent of the machine's core count. 50 MB with the default 4 MiB pieces passes
# under 2.5 GB too, but takes ~80 s on 2 shared cores.
LONG_DOCUMENT_BYTES = 8_000_000
ADDRESS_SPACE_LIMIT = 1_200_000_000
SMALL_ADDRESS_SPACE = {"RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}

def random_words(n: int, seed: int = 0) -> str:
    return " ".join(WORDS[np.random.default_rng(seed).integers(0, len(WORDS), n)])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def run_tool(*args, limit=None, **kwargs):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.Popen([sys.executable, str(TOOL), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=set_limit if limit else None,
                            **kwargs)


# -- bounded memory per document ---------------------------------------------------------------------

def test_one_long_line_is_tokenized_in_pieces_under_a_memory_limit(tmp_path, bpe_tokenizer):
    text = random_words(LONG_DOCUMENT_BYTES // 5)[:LONG_DOCUMENT_BYTES]
    (tmp_path / "one.txt").write_text(text + "\n")
    proc = run_tool("--input", tmp_path / "one.txt", "--tokenizer", bpe_tokenizer.path, "--output-prefix",
                    tmp_path / "out" / "one", "--workers", 1, "--max-document-bytes", 1 << 20,
                    limit=ADDRESS_SPACE_LIMIT, env={**os.environ, **SMALL_ADDRESS_SPACE})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "documents split: 1 (longer than --max-document-bytes 1048576)" in out
    sidecar = read_sidecar(tmp_path / "out" / "one")
    assert (sidecar["documents"], sidecar["split_documents"], sidecar["max_document_bytes"]) == (1, 1, 1 << 20)
    dataset = open_indexed(tmp_path / "out" / "one")
    assert len(dataset) == 1 and sidecar["tokens"] > LONG_DOCUMENT_BYTES // 6  # one document, all of it
    head = bpe_tokenizer.encode(text[:10_000].rsplit(" ", 1)[0])
    assert dataset[0][:len(head) - 1].tolist() == head[:-1]
    assert leftovers(tmp_path / "out") == []


def test_pieces_tokenize_as_the_whole_document(tmp_path, bpe_tokenizer, spm_tokenizer):
    lines = [random_words(n, seed) + "." for seed, n in enumerate([30, 900, 5, 2000, 400] * 8)]
    text = "\n".join(lines)  # lines longer than the limit are cut at sentences, then words
    text = text.replace("sit amet.", "sit amet! Next").replace("do ", "do  \t", 50)
    pieces = _pieces(text, 4096)
    assert "".join(pieces) == text and len(pieces) > 20 and max(len(p.encode()) for p in pieces) <= 4096
    assert any(p.startswith("\n") for p in pieces) and any(p.startswith(" ") for p in pieces)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["short one", text, "last"]))
    summary = preprocess([tmp_path / "a.jsonl"], bpe_tokenizer.path, tmp_path / "bpe", max_document_bytes=4096)
    assert (summary.documents, summary.split) == (3, 1)
    dataset = open_indexed(tmp_path / "bpe")  # held: its items are views of its memory map
    assert dataset[1].tolist() == bpe_tokenizer.encode(text)
    # SentencePiece: cuts at spaces give the same ids (a cut at a line break may not: the next piece
    # starts with the word marker "▁", as any text does)
    one_line = text.replace("\n", " ")
    (tmp_path / "b.txt").write_text("short\n" + one_line + "\n")
    summary = preprocess([tmp_path / "b.txt"], spm_tokenizer.path, tmp_path / "spm", max_document_bytes=4096)
    assert (summary.documents, summary.split) == (2, 1)
    dataset = open_indexed(tmp_path / "spm")
    assert dataset[1].tolist() == spm_tokenizer.encode(one_line)


def test_text_without_whitespace_is_cut_between_characters():
    text = "日本語の文章" * 3000 + "😀" * 2000  # 3 and 4 bytes a character, no space
    pieces = _pieces(text, 1000)
    assert "".join(pieces) == text
    assert all(500 <= len(p.encode()) <= 1000 for p in pieces[:-1])
    assert _pieces("short", 64) == ["short"]


def test_max_document_bytes_is_checked(tmp_path, bpe_tokenizer):
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(UserError, match="--max-document-bytes must be at least 64, got 10"):
        preprocess([tmp_path / "a.txt"], bpe_tokenizer.path, tmp_path / "out", max_document_bytes=10)


# -- where the output goes -----------------------------------------------------------------------------

def test_output_prefix_under_a_file_or_unwritable_directory_is_one_line(tmp_path, bpe_tokenizer):
    (tmp_path / "a.txt").write_text("text\n")
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(UserError, match=r"--output-prefix .*file/out: .*file is not a directory"):
        preprocess([tmp_path / "a.txt"], bpe_tokenizer.path, tmp_path / "file" / "out")
    with pytest.raises(UserError, match=r"--output-prefix .*file/sub/out: .*file.* is not a directory"):
        preprocess([tmp_path / "a.txt"], bpe_tokenizer.path, tmp_path / "file" / "sub" / "out")
    if os.geteuid() == 0:  # root writes through a chmod 555 directory; sysfs refuses even root
        unwritable = Path("/sys/out")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        unwritable = tmp_path / "ro" / "out"
    with pytest.raises(UserError, match=rf"--output-prefix {unwritable}: cannot write in {unwritable.parent} \("):
        preprocess([tmp_path / "a.txt"], bpe_tokenizer.path, unwritable)


@pytest.mark.parametrize("where", ["shard", "merge"])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, bpe_tokenizer, monkeypatch, where):
    """ENOSPC raised where the OS would raise it: a worker's shard write, or the merge into the output."""
    (tmp_path / "a.txt").write_text("".join(f"document {i}\n" for i in range(200)))

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "written"))

    if where == "shard":
        monkeypatch.setattr(ShardWriter, "add", full)
    else:
        monkeypatch.setattr("data.indexed.IndexedWriter.add_shard", full)
    with pytest.raises(UserError, match=r"cannot write .*out/written: No space left on device; free space there"):
        preprocess([tmp_path / "a.txt"], bpe_tokenizer.path, tmp_path / "out" / "corpus", chunk_bytes=200)
    assert list((tmp_path / "out").iterdir()) == []


# -- signals and killed workers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory):
    """Enough documents to keep two workers busy for several seconds."""
    path = tmp_path_factory.mktemp("slow") / "slow.txt"
    words = random_words(1_500_000).split(" ")
    path.write_text("".join(" ".join(words[i:i + 300]) + "\n" for i in range(0, len(words), 300)))
    return path


def start_and_wait_for_shards(corpus, tokenizer, out: Path):
    proc = run_tool("--input", corpus, "--tokenizer", tokenizer.path, "--output-prefix", out / "corpus",
                    "--workers", 2)
    deadline = time.monotonic() + 120
    while not any(out.glob(".corpus.shards-*/*.bin")):  # the workers are tokenizing
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children
            if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def finish(proc, workers: list[int]) -> tuple[str, list[int]]:
    """proc's stderr once it exits, and its workers still alive then (killed after); a run that hangs
    (as a killed worker's parent did) is killed."""
    try:
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        time.sleep(0.2)  # a worker whose pipe closed exits on its own
        survivors = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    return err, survivors


def test_sigterm_stops_workers_and_removes_temporary_files(slow_corpus, bpe_tokenizer, tmp_path):
    proc = start_and_wait_for_shards(slow_corpus, bpe_tokenizer, tmp_path)
    workers = workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    err, survivors = finish(proc, workers)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and survivors == [] and len(workers) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_killed_worker_fails_the_run_cleanly(slow_corpus, bpe_tokenizer, tmp_path):
    proc = start_and_wait_for_shards(slow_corpus, bpe_tokenizer, tmp_path)
    workers = workers_of(proc.pid)
    os.kill(workers[0], signal.SIGKILL)  # as the kernel's out-of-memory killer would
    err, survivors = finish(proc, workers)
    assert proc.returncode == 2 and survivors == [], err[-2000:]
    assert [l for l in err.splitlines() if l.startswith("error:")] == [
        f"error: a preprocessing worker died (killed, or out of memory?); nothing was written to "
        f"{tmp_path / 'corpus'}; rerun, with fewer --workers or a smaller --max-document-bytes"]
    assert list(tmp_path.iterdir()) == []


def test_a_later_run_removes_what_a_killed_run_left(tmp_path, bpe_tokenizer):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    out = tmp_path / "out"
    stale = out / f".corpus.shards-{host}-{dead.pid}-abcd_123"
    stale.mkdir(parents=True)
    (stale / "00000000.bin").write_bytes(b"x" * 100)
    for name in (".corpus.tmp-0123abcd.bin", ".corpus.tmp-0123abcd.idx", "..corpus.tmp-0123abcd.json.89ab.tmp"):
        (out / name).write_bytes(b"x")
    live = out / f".other.shards-{host}-{os.getpid()}-abcd_123"  # another prefix, a live process
    live.mkdir()
    (tmp_path / "a.txt").write_text("text\n")
    preprocess([tmp_path / "a.txt"], bpe_tokenizer.path, out / "corpus")
    assert leftovers(out) == [live.name]

    foreign = out / ".corpus.shards-another-host-1-abcd_123"  # maybe running there: kept, with the writer's files
    foreign.mkdir()
    (out / ".corpus.tmp-0123abcd.bin").write_bytes(b"x")
    preprocess([tmp_path / "a.txt"], bpe_tokenizer.path, out / "corpus")
    assert leftovers(out) == sorted([".corpus.tmp-0123abcd.bin", foreign.name, live.name])


# -- tokenizer training ---------------------------------------------------------------------------------

def test_vocab_size_out_of_range_is_one_line(tmp_path, demo_corpus):
    for kind, size, smallest in [("bpe", "0", 261), ("bpe", str(2 ** 31), 261), ("spm", "0", 355),
                                 ("spm", str(MAX_VOCAB_SIZE + 1), 355)]:
        with pytest.raises(UserError, match=rf"vocab size {size} is too .* use --vocab-size {smallest} to "
                                            rf"{MAX_VOCAB_SIZE} "):
            train_tokenizer.main(["--input", str(demo_corpus.path), "--type", kind, "--vocab-size", size,
                                  "--output", str(tmp_path / "tok")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("train", [train_bpe, train_spm])
def test_empty_corpus_is_an_error_not_a_tokenizer(tmp_path, train):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(UserError, match=rf"no text in {tmp_path / 'empty.jsonl'}: every document is empty"):
        train([tmp_path / "empty.jsonl"], 1000, tmp_path / "tok")
    with pytest.raises(UserError, match="no text in the given texts"):
        train(iter(["", " "]), 1000, tmp_path / "tok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]
