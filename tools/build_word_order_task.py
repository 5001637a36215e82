"""Build a labelled task that needs context: were two adjacent words of this sentence swapped?

    python tools/build_word_order_task.py --corpus demo/corpus/demo.jsonl --output demo/word_order

SentEval's "bigram shift" probing task (Conneau et al., 2018, "What you can cram into a single
vector"), built from any JSONL corpus ({"text": ...} per line). Each example is one sentence of
the corpus, either as written (label `original`) or with two adjacent words inverted (`swapped`),
the label drawn at random. A swapped sentence has exactly the words of an original one, so a
bag-of-words (or bag-of-tokens) model cannot beat chance: only word order, that is context, tells
the classes apart. That is what pretraining on running text should teach and what a model
fine-tuned from random weights on a few thousand labels cannot learn. The first word is never
moved (a byte-level BPE marks it differently from the others), and both swapped words are plain
lower-case or capitalised words, different from each other.

Sentences are taken at most `--per-document` per corpus document, and documents are split
between train.tsv and validation.tsv by a hash of their text, so a document's sentences never
appear on both sides. Files use GLUE's layout (`sentence`, `label`), as the fine-tuning recipes read.
"""
import argparse
import hashlib
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from data.seeding import derive_rng
from data.errors import UserError
from data.jsonio import read_jsonl_texts
from data.tasks import write_sentence_tsv
from trainer.core.cli import run_cli

LABELS = ("original", "swapped")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WORD = re.compile(r"^[A-Za-z][a-z]*$")  # a plain word: letters only, no digits, code or punctuation
TOKEN = re.compile(r"^[\"'(]?[A-Za-z][A-Za-z'-]*[.,;:!?)\"']*$")  # a word with punctuation around it


def sentences(text: str, min_words: int, max_words: int) -> Iterator[List[str]]:
    """Sentences of prose (mostly words, not code or tables) of min..max words, as word lists."""
    for sentence in SENTENCE_END.split(" ".join(text.split())):
        words = sentence.split(" ")
        if not min_words <= len(words) <= max_words or not sentence.endswith((".", "!", "?")):
            continue
        if sum(bool(TOKEN.match(w)) for w in words) >= 0.9 * len(words):
            yield words


def swappable(words: Sequence[str]) -> List[int]:
    """Positions j (never 0) where words j and j+1 are two different plain words."""
    return [j for j in range(1, len(words) - 1)
            if WORD.match(words[j]) and WORD.match(words[j + 1]) and words[j].lower() != words[j + 1].lower()]


def _bucket(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big") / 2**32


def read_documents(corpus: Path) -> Iterator[Tuple[int, str]]:
    if not corpus.is_file():
        raise UserError(f"--corpus {corpus} does not exist")
    return read_jsonl_texts(corpus)


def build_word_order_task(corpus: str | Path, output: str | Path, train_size: int = 4000,
                          validation_size: int = 1000, per_document: int = 2, min_words: int = 8,
                          max_words: int = 30, seed: int = 0) -> Dict:
    """Writes output/train.tsv and output/validation.tsv (balanced labels); returns a summary."""
    if train_size < 2 or validation_size < 2:
        raise UserError(f"--train-size and --validation-size must be at least 2, got {train_size}, {validation_size}")
    if not 3 <= min_words <= max_words:
        raise UserError(f"need 3 <= --min-words <= --max-words, got {min_words}, {max_words}")
    fraction = validation_size / (train_size + validation_size)
    pools: Dict[str, List[Tuple[int, List[str], int]]] = {"train": [], "validation": []}
    documents = 0
    for number, text in read_documents(Path(corpus)):
        documents += 1
        rng = derive_rng(seed, number)
        found = [(words, spots) for words in sentences(text, min_words, max_words) if (spots := swappable(words))]
        side = "validation" if _bucket(text) < fraction else "train"
        for k in sorted(rng.permutation(len(found))[:per_document].tolist()):
            words, spots = found[k]
            pools[side].append((number, words, int(spots[rng.integers(len(spots))])))
    wanted = {"train": train_size, "validation": validation_size}
    for side, pool in pools.items():
        if len(pool) < wanted[side]:
            raise UserError(f"{corpus}: only {len(pool)} usable sentences for {side} ({documents} documents), "
                            f"{wanted[side]} wanted; lower --{side}-size, raise "
                            f"--per-document or widen --min-words/--max-words")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summary = {"documents": documents}
    for side, pool in pools.items():
        rng = derive_rng(seed, 0x574F5244, side == "validation")  # "WORD": the pick and labels
        chosen = sorted(rng.choice(len(pool), wanted[side], replace=False).tolist())
        labels = rng.permutation(np.arange(wanted[side]) % 2)  # balanced: half of each label
        rows = []
        for index, label in zip(chosen, labels.tolist()):
            _, words, j = pool[index]
            words = list(words)
            if label:
                words[j], words[j + 1] = words[j + 1], words[j]
            rows.append(f"{' '.join(words)}\t{LABELS[label]}\n")
        order = rng.permutation(len(rows))  # not in corpus order: a file's head is no run of one document
        write_sentence_tsv(output / f"{side}.tsv", [rows[i] for i in order])
        summary[side] = len(rows)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Alike in shape to build_demo_task.main (argparse lines), intentionally: each task tool owns its flags.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="a JSONL corpus, one {\"text\": ...} per line")
    parser.add_argument("--output", required=True, help="directory for train.tsv and validation.tsv")
    parser.add_argument("--train-size", type=int, default=4000, help="training examples; default 4000")
    parser.add_argument("--validation-size", type=int, default=1000, help="validation examples; default 1000")
    parser.add_argument("--per-document", type=int, default=2, help="sentences per document at most; default 2")
    parser.add_argument("--min-words", type=int, default=8, help="default 8")
    parser.add_argument("--max-words", type=int, default=30, help="default 30")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    args = parser.parse_args(argv)
    s = build_word_order_task(args.corpus, args.output, args.train_size, args.validation_size, args.per_document,
                              args.min_words, args.max_words, args.seed)
    print(f"wrote {args.output}/train.tsv ({s['train']}) and validation.tsv ({s['validation']}): sentences of "
          f"{s['documents']} documents, half with two adjacent words swapped ({', '.join(LABELS)})")
    return 0


if __name__ == "__main__":
    run_cli(main)
