"""Datasets checked before step 1: PREFIX.bin against PREFIX.idx against the PREFIX.json sidecar and the tokenizer.

Each case copies a freshly preprocessed tiny corpus into tmp_path, damages one file the way it happens
in practice (a copy cut short, an .idx from another dataset, an edited or stale sidecar, flipped bytes)
and expects a one-line `UserError` that names the file at fault. One `python -m trainer.pretrain` run
shows the same check ends the trainer with `error:` and exit 2 before any step or run directory.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from data.errors import UserError
from data.indexed import check_dataset, open_indexed
from data.preprocess import preprocess
from launch import ROOT, run

SUFFIXES = (".bin", ".idx", ".json")
IDX_ARRAYS_AT = 34  # header (9) + version (8) + dtype code (1) + sequence and document counts (8 + 8)


@pytest.fixture(scope="module")
def corpora(demo_corpus, bpe_tokenizer, tmp_path_factory) -> dict:
    """Two preprocessed corpora: "main" (the demo corpus) and "other" (its first 40 documents)."""
    root = tmp_path_factory.mktemp("checked")
    lines = demo_corpus.path.read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "other.jsonl").write_text("".join(lines[:40]), encoding="utf-8")
    preprocess([demo_corpus.path], bpe_tokenizer.path, root / "main" / "corpus")
    preprocess([root / "other.jsonl"], bpe_tokenizer.path, root / "other" / "corpus")
    return {name: root / name / "corpus" for name in ("main", "other")}


def copy_dataset(source: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    for suffix in SUFFIXES:
        shutil.copyfile(f"{source}{suffix}", dest_dir / f"corpus{suffix}")
    return dest_dir / "corpus"


def edit_sidecar(prefix: Path, edit) -> None:
    path = Path(f"{prefix}.json")
    sidecar = json.loads(path.read_text())
    edit(sidecar)
    path.write_text(json.dumps(sidecar))


def idx_arrays(prefix: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """(sequence count, lengths, pointers) of PREFIX.idx, as writable copies."""
    raw = Path(f"{prefix}.idx").read_bytes()
    sequences = struct.unpack("<Q", raw[18:26])[0]
    lengths = np.frombuffer(raw, np.int32, sequences, IDX_ARRAYS_AT).copy()
    pointers = np.frombuffer(raw, np.int64, sequences, IDX_ARRAYS_AT + 4 * sequences).copy()
    return sequences, lengths, pointers


def write_idx_arrays(prefix: Path, lengths: np.ndarray, pointers: np.ndarray) -> None:
    path = Path(f"{prefix}.idx")
    raw = bytearray(path.read_bytes())
    raw[IDX_ARRAYS_AT:IDX_ARRAYS_AT + lengths.nbytes] = lengths.tobytes()
    raw[IDX_ARRAYS_AT + lengths.nbytes:IDX_ARRAYS_AT + lengths.nbytes + pointers.nbytes] = pointers.tobytes()
    path.write_bytes(bytes(raw))


def expect_error(prefix: Path, *fragments: str, tokenizer=None) -> str:
    """The one-line UserError of opening `prefix` (the shared opener tools and the trainer use)."""
    with pytest.raises(UserError) as caught:
        open_indexed(prefix) if tokenizer is None else open_indexed(prefix, tokenizer)
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_sound_dataset_opens_and_its_sidecar_records_the_idx_sha256(corpora, bpe_tokenizer, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    sidecar = json.loads(Path(f"{prefix}.json").read_text())
    assert sidecar["idx_sha256"] == hashlib.sha256(Path(f"{prefix}.idx").read_bytes()).hexdigest()
    dataset = open_indexed(prefix, bpe_tokenizer)
    assert len(dataset) == sidecar["documents"] and int(dataset.sequence_lengths.sum()) == sidecar["tokens"]


def test_a_bin_cut_in_half(corpora, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    data = Path(f"{prefix}.bin")
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    message = expect_error(prefix, f"{data}: {size // 2} bytes, but corpus.idx says {size}", "truncated")
    assert message.startswith(str(data))


def test_an_idx_from_another_dataset(corpora, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    shutil.copyfile(f"{corpora['other']}.idx", f"{prefix}.idx")
    expect_error(prefix, f"{prefix}.bin: ", "from another dataset")


def test_a_bin_and_idx_pair_from_another_dataset_under_a_stale_sidecar(corpora, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{corpora['other']}{suffix}", f"{prefix}{suffix}")
    other_documents = json.loads(Path(f"{corpora['other']}.json").read_text())["documents"]
    main_documents = json.loads(Path(f"{prefix}.json").read_text())["documents"]
    expect_error(prefix, f"{prefix}.idx: {other_documents} documents, but corpus.json says {main_documents}")


@pytest.mark.parametrize("key", ["documents", "tokens"])
def test_sidecar_counts_that_differ_from_the_idx(corpora, tmp_path, key):
    prefix = copy_dataset(corpora["main"], tmp_path)
    recorded = json.loads(Path(f"{prefix}.json").read_text())[key]
    edit_sidecar(prefix, lambda s: s.update({key: recorded + 1}))
    expect_error(prefix, f"{prefix}.idx: {recorded} {key}, but corpus.json says {recorded + 1}")


def test_moved_document_boundaries_are_caught_by_the_checksum(corpora, tmp_path):
    """A boundary moved by one token keeps every count and size: only the recorded sha256 differs."""
    prefix = copy_dataset(corpora["main"], tmp_path)
    _, lengths, pointers = idx_arrays(prefix)
    lengths[3] += 1
    lengths[4] -= 1
    pointers[4] += 2  # uint16 tokens
    write_idx_arrays(prefix, lengths, pointers)
    expect_error(prefix, f"{prefix}.idx: sha256", "but corpus.json recorded", "modified, or from another dataset")


def test_a_sidecar_from_before_the_checksum_is_accepted_on_the_other_checks(corpora, bpe_tokenizer, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    edit_sidecar(prefix, lambda s: s.pop("idx_sha256", None))
    open_indexed(prefix, bpe_tokenizer)
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(100)
    expect_error(prefix, f"{prefix}.bin: 100 bytes")


@pytest.mark.parametrize("damage, fragment", [
    (lambda raw: raw.__setitem__(slice(0, 4), b"XXXX"), "not a megatron-core index"),
    (lambda raw: raw.__setitem__(17, 99), "unknown dtype code 99"),
    (lambda raw: raw.__delitem__(slice(-8, None)), "(truncated or corrupt?)"),
    (lambda raw: raw.__setitem__(slice(IDX_ARRAYS_AT, IDX_ARRAYS_AT + 4), b"\xff\xff\xff\xff"), "negative length -1"),
], ids=["header", "dtype-code", "cut-short", "negative-length"])
def test_damaged_idx_bytes(corpora, tmp_path, damage, fragment):
    prefix = copy_dataset(corpora["main"], tmp_path)
    edit_sidecar(prefix, lambda s: s.pop("idx_sha256", None))  # each damage is found without the checksum
    path = Path(f"{prefix}.idx")
    raw = bytearray(path.read_bytes())
    damage(raw)
    path.write_bytes(bytes(raw))
    expect_error(prefix, f"{path}: ", fragment)


def test_shifted_pointers_are_found_without_the_checksum(corpora, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    edit_sidecar(prefix, lambda s: s.pop("idx_sha256", None))
    _, lengths, pointers = idx_arrays(prefix)
    pointers[5] += 2
    write_idx_arrays(prefix, lengths, pointers)
    expect_error(prefix, f"{prefix}.idx: sequence 5 starts at byte {pointers[5]}")


def test_a_sidecar_of_another_tokenizer(corpora, bpe_tokenizer, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    edit_sidecar(prefix, lambda s: s["tokenizer"].update(fingerprint="0" * 64))
    open_indexed(prefix)  # the files agree; only the run's tokenizer is not theirs
    expect_error(prefix, f"{prefix}.json: preprocessed with tokenizer", f"not {bpe_tokenizer.path}",
                 tokenizer=bpe_tokenizer)
    with pytest.raises(UserError, match="fingerprint"):
        check_dataset(prefix, bpe_tokenizer)


def test_a_sidecar_vocabulary_that_is_not_the_tokenizers(corpora, bpe_tokenizer, tmp_path):
    prefix = copy_dataset(corpora["main"], tmp_path)
    edit_sidecar(prefix, lambda s: s["tokenizer"].update(vocab_size=70_000))
    expect_error(prefix, f"{prefix}.json: preprocessed with a vocabulary of 70000, but tokenizer",
                 tokenizer=bpe_tokenizer)
    expect_error(prefix, f"{prefix}.bin: uint16 tokens cannot hold the ids of a vocabulary of 70000")


def test_the_trainer_checks_every_blended_corpus_before_step_1(corpora, tmp_path):
    """End to end, one process: a blend of a sound corpus and a truncated one ends in `error:`, exit 2,
    before any step and before the run directory is made."""
    truncated = copy_dataset(corpora["main"], tmp_path / "cut")
    with open(f"{truncated}.bin", "r+b") as f:
        f.truncate(1000)
    runs = tmp_path / "runs"
    proc = run([sys.executable, "-m", "trainer.pretrain", "--config", ROOT / "configs/pretrain/roberta_debug.yaml",
                "data.prefix=", f"data.blend=[[0.5, {corpora['main']}], [0.5, {truncated}]]",
                f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={runs}"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert errors == [f"error: {truncated}.bin: 1000 bytes, but corpus.idx says "
                      f"{Path(corpora['main']).with_suffix('.bin').stat().st_size} (truncated or from another "
                      f"dataset?); rerun tools/preprocess_data.py"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not runs.exists()
