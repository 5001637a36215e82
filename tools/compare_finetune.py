"""Side by side: fine-tuning from pretrained weights against the same fine-tuning from random weights.

    python tools/compare_finetune.py --pretrained runs/deberta_v3_demo_word_order \
        --random-init runs/deberta_v3_demo_word_order_random [--task "word order"]

Reads the two runs' summary.json (trainer.finetune writes it: the best validation metric of each
seed, their mean and standard deviation) and prints one line,
`word order: pretrained 0.61 +- 0.01 vs random init 0.50 +- 0.00 (accuracy, 3 seeds each): +0.11`,
followed by whether the difference is larger than the seeds' spread (the sum of the two standard
deviations): the demo's test of whether pretraining paid. Exit status 0 either way.
"""
import argparse
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

from data.errors import UserError
from trainer.core.cli import run_cli


def read_summary(run: str | Path) -> Dict:
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run} a finished trainer.finetune run directory?")
    try:
        summary = json.loads(path.read_text())
        _ = summary["metric"], summary["mean"], summary["std"], summary["values"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a fine-tuning summary (metric, mean, std, values)") from None
    return summary


def comparison(pretrained: Dict, random_init: Dict, task: str = "task") -> Dict:
    """The numbers and the printed line; `pays` when the gap exceeds the summed standard deviations."""
    if pretrained["metric"] != random_init["metric"]:
        raise UserError(f"the runs report different metrics: {pretrained['metric']} and {random_init['metric']}")
    gap = pretrained["mean"] - random_init["mean"]
    spread = pretrained["std"] + random_init["std"]
    seeds = {len(pretrained["values"]), len(random_init["values"])}
    count = f"{seeds.pop()} seeds each" if len(seeds) == 1 else \
        f"{len(pretrained['values'])} and {len(random_init['values'])} seeds"
    line = (f"{task}: pretrained {pretrained['mean']:.4f} +- {pretrained['std']:.4f} vs random init "
            f"{random_init['mean']:.4f} +- {random_init['std']:.4f} ({pretrained['metric']}, {count}): {gap:+.4f}")
    verdict = ("pretraining paid: the gap is larger than the seeds' spread" if gap > spread else
               "pretraining did not pay here: the gap is within the seeds' spread" if gap > -spread else
               "pretraining hurt here: random init is ahead by more than the seeds' spread")
    return {"gap": gap, "spread": spread, "pays": gap > spread, "line": line, "verdict": verdict}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="fine-tuning run directory (from pretrained weights)")
    parser.add_argument("--random-init", required=True, help="the same fine-tuning with model.random_init=true")
    parser.add_argument("--task", default="task", help="a name for the printed line")
    args = parser.parse_args(argv)
    result = comparison(read_summary(args.pretrained), read_summary(args.random_init), args.task)
    print(result["line"])
    print(f"  {result['verdict']} ({result['gap']:+.4f} against {result['spread']:.4f})")
    return 0


if __name__ == "__main__":
    run_cli(main)
