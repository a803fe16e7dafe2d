"""Entry-point wrapper: logging set up once; user errors end with one line on stderr, exit 2."""
import sys

from utils.errors import UserError
from utils.log import setup_logging


def run_cli(main):
    setup_logging()
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
