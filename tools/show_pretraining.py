"""Print a pretraining run's summary again: losses, and the diagnostics beside their baselines.

    python tools/show_pretraining.py runs/deberta_v3_demo

The lines `trainer.pretrain` prints when it ends (run directory, first and last loss, the last
validation RTD loss against the prior's loss and ROC AUC, generator or MLM accuracy against the
context-free accuracy), read from the run's metrics.jsonl, for scripts that want them later.
"""
import argparse
from pathlib import Path
from typing import Optional, Sequence

from data.errors import UserError
from trainer.core.cli import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    from trainer.core.run_dir import RunDirectory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run directory ({run.dir}/{run.name})")
    args = parser.parse_args(argv)
    if not (Path(args.run) / "metrics.jsonl").is_file():
        raise UserError(f"{args.run} holds no metrics.jsonl: not a pretraining run directory")
    print(RunDirectory(Path(args.run), True).summary()["text"])
    return 0


if __name__ == "__main__":
    run_cli(main)
