"""The entry wrapper of every command line (trainer modules and tools): user errors become one line on stderr and exit 2."""
import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from data.errors import UserError


def run_cli(main: Callable[[Optional[Sequence[str]]], int | None], argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("megatron", "DeepSpeed", "deepspeed"):  # their import-time INFO lines are noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def parse_run_args(description: str, recipes: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of a training run: --config RECIPE and key.sub=value overrides (the deepspeed
    launcher's --local_rank is accepted; LOCAL_RANK in the environment is what is used)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML recipe ({recipes})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of any config field")
    return parser.parse_args(argv)
