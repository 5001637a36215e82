"""Labelled task files (TSV, CSV, JSONL) -> tokenized examples -> padded batches, for fine-tuning.

Columns are found by name. The GLUE layout works as it is: the text columns are the first pair
of GLUE_TEXT_COLUMNS present (`sentence1`/`sentence2`, `question`/`sentence`, ... or `sentence`
alone) and the label is `label` (MNLI's files: `gold_label`). A headerless file (CoLA) is read
through `columns`, the names of its fields in order. Mistakes (a missing column, a label that is
not a number or not a known class, a row of the wrong width) raise a UserError naming file:line.

GLUE's TSVs are read without quote processing (their sentences contain bare quotes), CSV with
the usual quoting. Inputs are laid out as the model family's tokenizer would:
    [CLS] a [SEP] b [SEP]            (BERT / ELECTRA / DeBERTa; bos = [CLS], eos = [SEP])
    <s> a </s></s> b </s>            (RoBERTa: pair_separators=2)
and truncated longest-first to `max_length` tokens. Token types are all 0: our pretraining
never trains a second segment row.
"""
from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data import jsonio
from data.errors import UserError

FORMATS = ("tsv", "csv", "jsonl")
KINDS = ("classification", "regression")
GLUE_TEXT_COLUMNS = (  # pairs first: a pair file usually also has one of the single names
    ("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
    ("premise", "hypothesis"), ("question", "passage"), ("sentence",), ("text",),
)
GLUE_LABEL_COLUMNS = ("label", "gold_label")


@dataclass
class TaskFormat:
    """How to read the task's files (the fine-tuning config's data section extends it)."""
    kind: str = "classification"
    """classification (cross-entropy, argmax) or regression (one output, squared error: STS-B)."""
    format: str = "auto"
    """auto (from the file suffix), tsv (no quote processing, as GLUE's files), csv or jsonl."""
    columns: Optional[List[str]] = None
    """Names of the fields of a headerless file, in order (CoLA: [source, label, original_label, sentence])."""
    text_columns: Optional[List[str]] = None
    """One or two text columns; default: the first GLUE pair/single name found (sentence1/sentence2, ...)."""
    label_column: Optional[str] = None
    """Default: label (or gold_label, MNLI's)."""
    labels: Optional[List[str]] = None
    """Class names in id order; default: the training file's labels sorted (numerically if numbers)."""


@dataclass
class Example:
    texts: Tuple[str, ...]
    label: str  # raw; converted by `label_ids`
    where: str  # file:line, for error messages


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise UserError(f"data.format={fmt!r} is not one of auto, {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("tsv", "csv", "jsonl"):
        return suffix
    if suffix in ("json", "ndjson"):
        return "jsonl"
    raise UserError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                    f"set data.format to one of {', '.join(FORMATS)}")


def read_rows(path: Path, fmt: str, columns: Optional[Sequence[str]]) -> Iterator[Tuple[int, Dict[str, str]]]:
    """(line number, {column: value}) per row. `columns` names the fields of a headerless file."""
    if not path.is_file():
        raise UserError(f"{path}: no such task file; check data.train / data.validation")
    fmt = file_format(path, fmt)
    with open(path, newline="", encoding="utf-8") as f:
        if fmt == "jsonl":
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = jsonio.loads(line)
                except ValueError as err:
                    raise UserError(f"{path}:{number}: not a JSON line ({err.args[0].split(':')[0]})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{number}: expected a JSON object with named fields")
                yield number, {str(k): "" if v is None else str(v) for k, v in row.items()}
            return
        reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f))
        header = list(columns) if columns else None
        for fields in reader:
            if not fields or fields == [""]:
                continue
            if header is None:
                header = [h.strip() for h in fields]
                continue
            if len(fields) != len(header):
                raise UserError(f"{path}:{reader.line_num}: {len(fields)} fields, the header has {len(header)} "
                                f"({', '.join(header)}); fix the row or set data.columns for a headerless file")
            yield reader.line_num, dict(zip(header, fields))


def resolve_columns(path: Path, number: int, row: Dict[str, str], task: TaskFormat) -> Tuple[List[str], str]:
    """The text columns and the label column of a file, from the config or the GLUE names."""
    names = list(row)
    if task.text_columns:
        text = list(task.text_columns)
    else:
        text = next((list(c) for c in GLUE_TEXT_COLUMNS if all(n in row for n in c)), None)
        if text is None:
            raise UserError(f"{path}:{number}: no text column among {', '.join(names)}; name them with "
                            f"data.text_columns=[...] (GLUE names such as sentence, sentence1/sentence2 work as is)")
    label = task.label_column or next((c for c in GLUE_LABEL_COLUMNS if c in row), GLUE_LABEL_COLUMNS[0])
    for column in [*text, label]:
        if column not in row:
            raise UserError(f"{path}:{number}: no column {column!r} (columns: {', '.join(names)}); "
                            f"set data.text_columns / data.label_column, or data.columns for a headerless file")
    return text, label


def read_examples(path: str | Path, task: TaskFormat) -> List[Example]:
    path = Path(path)
    examples: List[Example] = []
    text = label = None
    for number, row in read_rows(path, task.format, task.columns):
        if text is None:
            text, label = resolve_columns(path, number, row, task)
        for column in [*text, label]:
            if column not in row:
                raise UserError(f"{path}:{number}: no field {column!r} in this row")
        value = row[label].strip()
        if not value:
            raise UserError(f"{path}:{number}: empty label in column {label!r}")
        examples.append(Example(tuple(row[c] for c in text), value, f"{path}:{number}"))
    if not examples:
        raise UserError(f"{path}: holds no examples")
    return examples


def label_names(train: Sequence[Example], task: TaskFormat) -> List[str]:
    """Class names in id order: data.labels, or the training labels sorted (numerically if all are numbers)."""
    if task.kind == "regression":
        return []
    if task.labels:
        return [str(x) for x in task.labels]
    found = sorted({e.label for e in train})
    try:
        return sorted(found, key=float)
    except ValueError:
        return found


def label_ids(examples: Sequence[Example], task: TaskFormat, names: Sequence[str]) -> np.ndarray:
    if task.kind == "regression":
        values = []
        for e in examples:
            try:
                values.append(float(e.label))
            except ValueError:
                raise UserError(f"{e.where}: label {e.label!r} is not a number (data.kind is regression)") from None
        return np.asarray(values, dtype=np.float32)
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for e in examples:
        if e.label not in index:
            raise UserError(f"{e.where}: label {e.label!r} is not one of the classes {', '.join(names)}; "
                            f"list every class in data.labels")
        ids.append(index[e.label])
    return np.asarray(ids, dtype=np.int64)


@dataclass
class EncodedTask:
    """Token ids per example (special tokens included) and the labels (int64 classes or float32)."""
    ids: List[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def truncate_longest_first(a: List[int], b: Optional[List[int]], budget: int) -> Tuple[List[int], Optional[List[int]]]:
    """Drop tokens from the end of the longer text until both fit in `budget` tokens."""
    if b is None:
        return a[:max(budget, 0)], None
    la, lb = len(a), len(b)
    while la + lb > budget:
        if la >= lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


def encode(examples: Sequence[Example], labels: np.ndarray, tokenizer, max_length: int,
           pair_separators: int = 1) -> EncodedTask:
    """[bos] a [eos] ([eos] x pair_separators-1) b [eos], at most max_length ids per example."""
    columns = len(examples[0].texts)
    if columns > 2:
        raise UserError(f"{examples[0].where}: {columns} text columns; at most two (a sentence pair) are supported")
    encoded = [tokenizer.encode_batch([e.texts[c] for e in examples]) for c in range(columns)]
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    out = []
    for i in range(len(examples)):
        if columns == 1:
            a, _ = truncate_longest_first(encoded[0][i], None, max_length - 2)
            ids = [bos, *a, eos]
        else:
            a, b = truncate_longest_first(encoded[0][i], encoded[1][i], max_length - 2 - pair_separators)
            ids = [bos, *a, *([eos] * pair_separators), *b, eos]
        out.append(np.asarray(ids, dtype=np.int64))
    return EncodedTask(out, labels)


def collate(task: EncodedTask, indices: Sequence[int], pad_id: int) -> Dict[str, torch.Tensor]:
    """A batch padded to its longest example: input_ids, attention_mask (1 = token), labels."""
    length = max(len(task.ids[i]) for i in indices)
    input_ids = np.full((len(indices), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(indices), length), dtype=np.int64)
    for row, i in enumerate(indices):
        n = len(task.ids[i])
        input_ids[row, :n] = task.ids[i]
        attention_mask[row, :n] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(task.labels[list(indices)])}


def write_sentence_tsv(path: str | Path, rows: Sequence[str]) -> None:
    """A task file in GLUE's single-sentence layout: the header `sentence<TAB>label`, then `rows`
    (each "text<TAB>label\n"), written to a temporary file and renamed, so a failure leaves none."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            f.writelines(rows)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
