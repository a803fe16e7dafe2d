"""Logging set-up, done once by the entry points: messages to the console, and to a run
directory's `run.log` while a run writes one. Library code only calls `logging.getLogger`."""
import contextlib
import logging
import sys

LOGGER_NAME = "s5vh"
_FORMAT = "%(message)s"


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a message comes (it may be replaced meanwhile)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(level=logging.INFO):
    """Console handler on the project's logger (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(isinstance(h, _Console) for h in logger.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
    return logger


def get_logger(module_name):
    """The logger of a module, under the project's logger."""
    return logging.getLogger(f"{LOGGER_NAME}.{module_name}")


class _RunLog(logging.FileHandler):
    """A run directory's log file. A failed write (a full disk) is not reported here: the run's
    next file write fails the same way and stops the run with one line, where a report here
    would print a traceback first."""

    def handleError(self, record):
        pass


@contextlib.contextmanager
def log_to_file(path):
    """Also write the project's messages to `path` (appended) while the context is open."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = _RunLog(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
