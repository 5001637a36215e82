"""Tokenize raw text into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx + PREFIX.json).

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --tokenizer tok/ --output-prefix bin/corpus --workers 8

Each document (a .jsonl line's --json-key field, a .txt line, or with --txt-docs blank-line a .txt
paragraph) becomes one sequence of token ids without special tokens. Invalid UTF-8 is replaced and
NUL characters stripped (--strict rejects both); empty documents are skipped; a malformed JSON line
or a missing key stops the run with file:line (--skip-bad-lines skips it). The summary counts every
skipped or repaired document by reason; the sidecar PREFIX.json records them and the tokenizer.
Workers share even a single file (it is cut into byte ranges); the output does not depend on --workers.

Memory per document is bounded: a document longer than --max-document-bytes (default 4 MiB) is
tokenized in pieces of at most that size, cut at a line break, else after a sentence, else before a
word, else between characters, and its pieces' ids are joined: it stays one document. Byte-level BPE
gives the ids of the whole at these cuts, but a cut between characters may change the tokens there,
and with SentencePiece so may a cut at a line break (the next piece starts as a new text). The
summary and the sidecar count the documents split. Tokenizing holds about 110 bytes per byte of a
piece (BPE), about 0.5 GB per worker at the default.

Static masking (BERT's; RoBERTa section 4.1): --static-masks N also writes PREFIX.static_masks.bin/.idx,
N copies of the data, each with its own masks drawn once now (per document, seeded by --mask-seed,
the copy and the document; recipe: --mask-prob, --mask-token-prob, --random-token-prob,
--whole-word-mask, --max-span, as the data.* config keys of that name). Train on them with
data.masking=static: epoch e of the corpus reads copy e mod N (validation: copy 0), and the
trainer's data.mask_prob, ..., data.max_span must equal these flags. BERT used N=10. The copies take
4 bytes per token each.

Word starts for whole-word masking (Chinese): --word-segmenter jieba also writes
PREFIX.wordstarts.bin/.idx, one uint8 flag per token (1 = the token begins a word), from
jieba.lcut of each document (Han runs), digit runs, single punctuation marks and whitespace/class
changes elsewhere; data.whole_word_mask then masks those words whole. Needs the extra:
pip install -e '.[zh]'. With --static-masks and --whole-word-mask the stored masks use these words.

SIGINT and SIGTERM stop the workers and remove every temporary file; a later run on the same
--output-prefix removes what a SIGKILLed run on this host left (.PREFIX.shards-*, .PREFIX.tmp-*).
A full disk, or an --output-prefix that cannot be written, is a one-line error (exit 2).
"""
import argparse
from typing import Optional, Sequence

from data.preprocess import DEFAULT_MAX_DOCUMENT_BYTES, MIN_MAX_DOCUMENT_BYTES, available_cpus, preprocess
from data.reading import TXT_DOCS
from data.segmenter import INSTALL, SEGMENTERS
from data.static_masks import StaticMaskOptions
from trainer.core.cli import run_cli


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "none"


def main(argv: Optional[Sequence[str]] = None) -> int:
    # the paragraphs from "Memory per document" on: what a user needs to know about limits and failures
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=__doc__[__doc__.index("Memory per document"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or quoted globs")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory from tools/train_tokenizer.py")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="tokenizing processes; default: the CPUs available")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    parser.add_argument("--txt-docs", choices=TXT_DOCS, default="line",
                        help=".txt documents: one per line, or separated by blank lines")
    parser.add_argument("--strict", action="store_true", help="reject invalid UTF-8 and NUL characters")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed JSON lines and missing keys instead of failing")
    parser.add_argument("--max-document-bytes", type=int, default=DEFAULT_MAX_DOCUMENT_BYTES,
                        help=f"tokenize longer documents in pieces of at most this many UTF-8 bytes, cut at lines, "
                             f"then sentences, words, characters (still one document each), so memory does not grow "
                             f"with the longest document; default {DEFAULT_MAX_DOCUMENT_BYTES} (4 MiB), at least "
                             f"{MIN_MAX_DOCUMENT_BYTES}")
    parser.add_argument("--word-segmenter", choices=SEGMENTERS, default=None,
                        help=f"also write each token's word-start flag to PREFIX.wordstarts.bin/.idx from this "
                             f"segmenter (Chinese whole-word masking; needs {INSTALL}); default: none")
    masks = parser.add_argument_group("static masking (off unless --static-masks N > 0)")
    masks.add_argument("--static-masks", type=int, default=0, metavar="N",
                       help="write N masked copies to PREFIX.static_masks.bin/.idx for data.masking=static "
                            "(BERT: 10); default 0: none (dynamic masking needs none)")
    masks.add_argument("--mask-seed", type=int, default=1234, help="seed of the static masks (default 1234)")
    masks.add_argument("--mask-prob", type=float, default=0.15, help="as data.mask_prob (default 0.15)")
    masks.add_argument("--mask-token-prob", type=float, default=0.8, help="as data.mask_token_prob (default 0.8)")
    masks.add_argument("--random-token-prob", type=float, default=0.1,
                       help="as data.random_token_prob (default 0.1)")
    masks.add_argument("--whole-word-mask", action="store_true", help="as data.whole_word_mask")
    masks.add_argument("--max-span", type=int, default=1, help="as data.max_span (default 1)")
    args = parser.parse_args(argv)
    static_masks = StaticMaskOptions(args.static_masks, args.mask_seed, args.mask_prob, args.mask_token_prob,
                                     args.random_token_prob, args.whole_word_mask, args.max_span)

    s = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers, json_key=args.json_key,
                   txt_docs=args.txt_docs, strict=args.strict, skip_bad_lines=args.skip_bad_lines,
                   max_document_bytes=args.max_document_bytes, static_masks=static_masks,
                   word_segmenter=args.word_segmenter)
    print(f"wrote {s.prefix}.bin/.idx/.json: {s.documents} documents, {s.tokens} tokens ({s.dtype}) "
          f"from {s.files} file(s), {s.read_bytes / 1e6:.1f} MB, in {s.seconds:.1f} s with {s.workers} worker(s) "
          f"({s.tokens / max(s.seconds, 1e-9) / 1e6:.2f}M tokens/s, startup included)\n"
          f"skipped: {_counts(s.skipped)}\nrepaired: {_counts(s.repaired)}\n"
          f"documents split: {s.split} (longer than --max-document-bytes {s.max_document_bytes})")
    if s.word_segmenter:
        print(f"word starts ({s.word_segmenter}): {s.prefix}.wordstarts.bin/.idx")
    if s.static_masks:
        print(f"static masks: {s.static_masks} copies in {s.prefix}.static_masks.bin/.idx")
    return 0


if __name__ == "__main__":
    run_cli(main)
