"""Evaluate a saved pretraining checkpoint again: the run's held-out samples and masks, and every diagnostic
the trainer logs today, each beside its baseline (trainer/core/diagnostics.py).

    python tools/evaluate_checkpoint.py --checkpoint runs/NAME [--step N] [key.sub=value ...]

What it is for: a run from before a diagnostic existed (the context-free accuracy, the accuracy where the
input hides the target) can be read with it afterwards, and any checkpoint of a run, not only those at
`eval.every_steps`, can be scored on the same held-out set. docs/ablations.md's corrected MLM readings were
made this way.

--checkpoint takes a run directory, its checkpoints/ directory or one global_stepN directory (default: the
checkpoint a plain resume would load; --step N picks another). The weights are read as
tools/convert_checkpoint.py reads them (weights only, any ZeRO stage, TP merged, the fp32 masters); the
config is the run's config.yaml (or --config), with key.sub=value overrides as in training, for example
data.prefix=... when the data moved. The held-out samples come from the training code path for one
data-parallel rank, so they are those the run evaluated on (eval.samples of them), whatever its
data-parallel size. It runs in one CPU process, in fp32: a bf16 run's logged numbers differ by its rounding.

Prints `step N: ` and one JSON object of the valid_ metrics, then the summary lines the trainer prints at
the end of a run; --json FILE also writes the object ({"step": N, "checkpoint": ..., metrics}).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from data.errors import UserError

CHECKPOINT_FLAG = "--checkpoint"


def evaluate_checkpoint(checkpoint: str, step: Optional[int] = None, config: Optional[str] = None,
                        overrides: Sequence[str] = (), log=print) -> Dict:
    """{"step", "checkpoint", valid_ metrics} of the checkpoint on its run's held-out samples."""
    from data.loader import validation_batches
    from models.registry import batch_keys
    from trainer.convert.export import locate, read_checkpoint
    from trainer.core.parallel import ParallelContext
    from trainer.core.step import evaluate
    from trainer.pretraining.config import load_run_config
    from trainer.pretraining.inputs import single_process_inputs

    tag_dir = locate(checkpoint, step)
    run_dir = tag_dir.parent.parent
    cfg = load_run_config(config, overrides, str(run_dir), run_flag=CHECKPOINT_FLAG)
    native = read_checkpoint(tag_dir, log=log)
    if native.name != cfg.model.name:
        raise UserError(f"{tag_dir} holds a {native.name} model but the config says model.name={cfg.model.name}")
    tokenizer, inputs = single_process_inputs(cfg)
    trained_on = native.meta.get("tokenizer_fingerprint")
    if trained_on and trained_on != tokenizer.fingerprint():
        raise UserError(f"{tag_dir} was trained with another tokenizer than {tokenizer.path} (data.prefix "
                        f"{cfg.data.prefix}): its held-out samples would not be the run's")
    if inputs.valid is None:
        raise UserError(f"the run holds out no samples (data.valid_fraction={cfg.data.valid_fraction}): "
                        f"nothing to evaluate on")
    keys = set(batch_keys(cfg.model.name))
    batches = ({k: v for k, v in batch.items() if k in keys}
               for batch in validation_batches(inputs.valid, cfg.eval.samples, cfg.train.micro_batch_size, 0, 1))
    model = native.build(sampling_seed=cfg.train.seed)  # RTD: the run's generator samples
    record = evaluate(model, batches, ParallelContext.single_cpu(), vocab_size=tokenizer.vocab_size,
                      mask_id=tokenizer.mask_id)
    return {"step": native.meta["step"], "checkpoint": str(tag_dir), **record}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from trainer.core.run_dir import baseline_lines

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(CHECKPOINT_FLAG, required=True,
                        help="a run directory, its checkpoints/ directory or a global_stepN directory")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")
    parser.add_argument("--config", default=None, help="pretraining config (default: the run's config.yaml)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config, as in training")
    args = parser.parse_args(argv)
    result = evaluate_checkpoint(args.checkpoint, args.step, args.config, args.overrides)
    metrics = {k: v for k, v in result.items() if k not in ("step", "checkpoint")}
    print(f"step {result['step']}: {json.dumps(metrics, sort_keys=True)}")
    for line in baseline_lines([{"step": result["step"], **metrics}]):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
