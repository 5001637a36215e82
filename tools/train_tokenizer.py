"""Train a tokenizer on raw text and save it as a directory that data/tokenizer.py and Hugging Face load.

    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --type bpe --vocab-size 8000 --output tok/
    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --type spm --output tok/   # DeBERTa-v3 style

Inputs are files, directories or quoted globs of .jsonl (text under --json-key) or .txt (one
document per line, or --txt-docs blank-line), optionally gzipped, read as tools/preprocess_data.py
reads them. The output directory appears only when complete.

--type bpe: RoBERTa's byte-level BPE (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4).
--type spm: SentencePiece, Unigram (or --spm-model-type bpe) with byte fallback and DeBERTa-v3's ids
  ([PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, [MASK] last), by default no Unicode normalisation (see below);
  trained on a uniform sample of --sample-lines lines, read in one streaming pass;
  --character-coverage (default 0.9995, SentencePiece's) of the characters get pieces, the rest bytes.

--normalization fullwidth (both types) folds full-width ASCII (U+FF01-FF5E), the ideographic space
U+3000, half-width CJK punctuation and full-width signs to their NFKC forms, one character to one
(data/tokenizer_train.py WIDTH_FOLDS), identically in load_tokenizer and AutoTokenizer; the default
`identity` changes nothing. --preset zh (Chinese) sets --normalization fullwidth and
--character-coverage 0.9995; options given explicitly win.

--vocab-size outside its range (bpe: 261 to 4194304, spm: 355 to 4194304), and inputs without any
text, are one-line errors (exit 2); nothing is written.
"""
import argparse
import time
from typing import Optional, Sequence

from data.reading import TXT_DOCS, ReadOptions, expand_inputs
from data.errors import UserError
from data.tokenizer_train import DEFAULT_CHARACTER_COVERAGE, NORMALIZATIONS, PRESETS, train_bpe, train_spm
from trainer.core.cli import run_cli

# RoBERTa's; DeBERTa-v3's 128000 SentencePiece pieces plus [MASK] at id 128000
DEFAULT_VOCAB_SIZE = {"bpe": 50265, "spm": 128001}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or quoted globs")
    parser.add_argument("--type", choices=("bpe", "spm"), default="bpe", help="byte-level BPE or SentencePiece")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="ids including specials; default 50265 (bpe) or 128001 (spm: 128000 pieces + [MASK])")
    parser.add_argument("--output", required=True, help="tokenizer directory to write")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    parser.add_argument("--txt-docs", choices=TXT_DOCS, default="line",
                        help=".txt documents: one per line, or separated by blank lines")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip malformed JSON lines and lines without --json-key instead of failing")
    parser.add_argument("--min-frequency", type=int, default=2, help="bpe: fewest occurrences for a merge")
    parser.add_argument("--spm-model-type", choices=("unigram", "bpe"), default="unigram",
                        help="spm: the SentencePiece algorithm (DeBERTa-v3: unigram)")
    parser.add_argument("--sample-lines", type=int, default=5_000_000,
                        help="spm: lines sampled uniformly from the inputs for training")
    parser.add_argument("--seed", type=int, default=0, help="spm: seed of the line sample and of training")
    parser.add_argument("--normalization", choices=tuple(NORMALIZATIONS), default=None,
                        help="identity (default: none) or fullwidth (fold full-width forms, U+3000, as NFKC)")
    parser.add_argument("--character-coverage", type=float, default=None,
                        help=f"spm: share of characters with pieces of their own (default {DEFAULT_CHARACTER_COVERAGE})")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="zh: Chinese settings (--normalization fullwidth, --character-coverage 0.9995)")
    args = parser.parse_args(argv)
    if args.character_coverage is not None and args.type != "spm":
        raise UserError("--character-coverage applies to --type spm only")
    preset = PRESETS.get(args.preset, {})
    normalization = args.normalization or preset.get("normalization", "identity")
    coverage = (args.character_coverage if args.character_coverage is not None
                else preset.get("character_coverage", DEFAULT_CHARACTER_COVERAGE))

    files = expand_inputs(args.input)
    options = ReadOptions(json_key=args.json_key, txt_docs=args.txt_docs, skip_bad_lines=args.skip_bad_lines)
    vocab_size = DEFAULT_VOCAB_SIZE[args.type] if args.vocab_size is None else args.vocab_size
    start = time.perf_counter()
    if args.type == "bpe":
        tok = train_bpe(files, vocab_size, args.output, min_frequency=args.min_frequency, read_options=options,
                        normalization=normalization)
    else:
        tok = train_spm(files, vocab_size, args.output, model_type=args.spm_model_type,
                        sample_lines=args.sample_lines, read_options=options, seed=args.seed,
                        normalization=normalization, character_coverage=coverage)
    print(f"wrote {args.output}: {tok.type}, vocab size {tok.vocab_size}, {len(files)} input file(s), "
          f"fingerprint {tok.fingerprint()[:12]}, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
