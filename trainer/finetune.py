"""`python -m trainer.finetune` (and `deepspeed --module trainer.finetune`): the fine-tuning entry point.

The run itself reads top to bottom in trainer/finetuning/train.py."""
from trainer.finetuning.train import main

if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
