"""`python -m trainer.pretrain` (and `deepspeed --module trainer.pretrain`): the pretraining entry point.

The run itself reads top to bottom in trainer/pretraining/train.py."""
from trainer.pretraining.train import main

if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
