"""Entry-point wrapper: expected input problems end with one line on stderr, not a traceback."""
import sys

from dataset.io import DataError
from optim.engine import NonFiniteLossError
from utils.checkpoint import CheckpointError
from utils.config import ConfigError

USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


def run_cli(main):
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
