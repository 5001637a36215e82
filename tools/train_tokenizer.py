"""Train a tokenizer on raw text and save it as a directory that data/tokenizer.py and Hugging Face load.

    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --type bpe --vocab-size 8000 --output tok/

Inputs are files, directories or quoted globs of .jsonl (text under --json-key) or .txt (one
document per line), optionally gzipped. The output directory appears only when complete.
"""
import argparse
import time
from typing import Optional, Sequence

from data.errors import UserError
from data.preprocess import expand_inputs
from data.tokenizer import train_bpe
from tools._cli import run_cli

DEFAULT_VOCAB_SIZE = {"bpe": 50265}  # RoBERTa's


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or quoted globs")
    parser.add_argument("--type", choices=("bpe", "spm"), default="bpe", help="byte-level BPE or SentencePiece")
    parser.add_argument("--vocab-size", type=int, default=None, help="ids including specials; bpe default 50265")
    parser.add_argument("--output", required=True, help="tokenizer directory to write")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a merge")
    args = parser.parse_args(argv)

    if args.type == "spm":
        raise UserError("--type spm is not implemented yet; use --type bpe")
    files = expand_inputs(args.input)
    start = time.perf_counter()
    tok = train_bpe(files, args.vocab_size or DEFAULT_VOCAB_SIZE[args.type], args.output,
                    min_frequency=args.min_frequency, json_key=args.json_key)
    print(f"wrote {args.output}: {tok.type}, vocab size {tok.vocab_size}, {len(files)} input file(s), "
          f"fingerprint {tok.fingerprint()[:12]}, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
