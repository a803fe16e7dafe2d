"""SIGINT and SIGTERM: the entry points (utils.cli) make either raise `Interrupted`; inside
`deferred_stop()` the first one is only recorded, so that a training loop can finish its epoch
and save before it stops, and a second one raises at once."""
import contextlib
import signal
import threading

from utils.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def handlers(handler):
    """Install `handler` for SIGINT and SIGTERM while the context is open (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopRequest:
    """`signal`: the name of the first signal received, or None."""

    def __init__(self):
        self.signal = None

    @property
    def requested(self):
        return self.signal is not None


@contextlib.contextmanager
def deferred_stop():
    """Yield a StopRequest that the first SIGINT/SIGTERM sets; a second raises Interrupted."""
    request = StopRequest()

    def record(signum, frame):
        if request.requested:
            raise_interrupted(signum, frame)
        request.signal = signal.Signals(signum).name

    with handlers(record):
        yield request
