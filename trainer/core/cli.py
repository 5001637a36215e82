"""The entry wrapper of every command line (trainer modules and tools): user errors become one line on stderr and exit 2."""
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
