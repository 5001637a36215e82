"""Convert a training checkpoint to a Hugging Face directory or one native fp32 file, or import from HF.

    python tools/convert_checkpoint.py --checkpoint runs/NAME/checkpoints --output hf/NAME \\
        [--format hf|native] [--component discriminator|generator] [--step N] [--verify]
    python tools/convert_checkpoint.py --from-hf DIR --output native/NAME [--generator DIR] [--verify]

Any ZeRO stage (0-3), TP degree and precision (fp32, bf16, fp16): TP shards are merged and the fp32
master weights read (trainer/convert/export.py). `--format hf` writes config.json, model.safetensors, the
run's tokenizer and a model card (README.md: recipe, data, diagnostics; trainer/convert/model_card.py):
RoBERTa -> RobertaForMaskedLM, DeBERTa -> DebertaV2ForMaskedLM, ELECTRA -> ElectraForPreTraining (or
ElectraForMaskedLM with --component generator), DeBERTaV3 -> DebertaV2Model (E_D = E_G + E_Delta; the
RTD head beside it in rtd_head.safetensors) or DebertaV2ForMaskedLM for the generator. `--format native` writes models/native.py's file (model.pt), both towers included, which
fine-tuning and `model.init=` (continued pretraining) start from. `--verify` runs both models on one
batch and fails above a max difference of 1e-4.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from data.errors import UserError


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from models.registry import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="runs/NAME/checkpoints (or runs/NAME, or one global_stepN directory)")
    source.add_argument("--from-hf", metavar="DIR", help="import a Hugging Face RoBERTa/DeBERTa-v2/v3/ELECTRA directory")
    parser.add_argument("--output", required=True, help="output directory (or a .pt file for --format native)")
    parser.add_argument("--format", choices=("hf", "native"), default=None,
                        help="hf (default for --checkpoint) or native (the only one for --from-hf)")
    parser.add_argument("--component", choices=("discriminator", "generator"), default=None,
                        help="RTD models: the tower to export as HF (default: discriminator)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--verify", action="store_true", help="compare outputs with ours; fail above 1e-4")
    parser.add_argument("--generator", metavar="DIR", help="--from-hf RTD models: the HF generator to import "
                        "(default: a fresh one)")
    parser.add_argument("--model", choices=tuple(MODELS), default=None,
                        help="--from-hf: the model to import as (default: from the directory)")
    parser.add_argument("--embedding-sharing", choices=("none", "es", "gdes", "all"), default=None,
                        help="--from-hf RTD models (default: es for ELECTRA, gdes for DeBERTaV3)")
    parser.add_argument("--no-check-files", action="store_true",
                        help="skip the manifest checksums of the checkpoint's files (large checkpoints)")
    return parser.parse_args(argv)


def _quiet_transformers() -> None:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    from trainer.convert.export import locate, read_checkpoint, verify_hf, verify_native, write_hf, write_native

    args = parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    start = time.perf_counter()
    output = Path(args.output)
    if args.from_hf:
        from trainer.convert.hf_import import import_hf
        if args.format == "hf":
            raise UserError("--from-hf writes a native file (--format native); export it again from a run")
        if args.step is not None or args.component:
            raise UserError("--step and --component apply to --checkpoint, not --from-hf")
        _quiet_transformers()
        native = import_hf(args.from_hf, args.generator, args.model, args.embedding_sharing, log=log)
        tokenizer = Path(args.from_hf) if (Path(args.from_hf) / "tokenizer_meta.json").is_file() else None
        if tokenizer is None:
            log(f"  {args.from_hf} has no project tokenizer (tokenizer_meta.json): none copied; "
                f"train or convert one for continued pretraining")
        path = write_native(native, output, tokenizer, log=log)
        if args.verify:
            verify_native(native, path, log=log)
    else:
        if args.generator or args.model or args.embedding_sharing:
            raise UserError("--generator, --model and --embedding-sharing apply to --from-hf")
        if args.component and args.format == "native":
            raise UserError("--component applies to --format hf (a native file holds both towers)")
        tag_dir = locate(args.checkpoint, args.step)
        native = read_checkpoint(tag_dir, log=log, check_files=not args.no_check_files)
        _quiet_transformers()
        run_dir = tag_dir.parent.parent
        tokenizer = run_dir / "tokenizer" if (run_dir / "tokenizer" / "tokenizer_meta.json").is_file() else None
        if tokenizer is None:
            log(f"  no tokenizer in {run_dir / 'tokenizer'}: the export has no tokenizer files")
        if (args.format or "hf") == "hf":
            write_hf(native, output, args.component, tokenizer, log=log)
            if args.verify:
                verify_hf(native, output, args.component, log=log)
        else:
            path = write_native(native, output, tokenizer, log=log)
            if args.verify:
                verify_native(native, path, log=log)
    log(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
