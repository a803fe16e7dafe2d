"""SIGINT and SIGTERM: the entry points (utils.cli) make either raise `Interrupted`; inside
`deferred_stop()` the first one is only recorded, so that a training loop can finish its epoch
and save before it stops, and a second one raises at once."""
import contextlib
import os
import signal
import sys
import threading

from utils.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def exit_at_once(reason):
    """A handler that ends the process on the spot: one line naming the signal and `reason`
    (none when `reason` is None: the command has said its line already), exit code 2. For the
    moments when nothing is being written, so nothing needs unwinding: an entry script's
    imports, and its exit once the command has ended."""
    def handler(signum, _frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if reason is not None:
            os.write(2, f"error: interrupted by {signal.Signals(signum).name}; {reason}\n"
                     .encode())
        os._exit(2)
    handler.exits_at_once = True
    return handler


def install(handler):
    """`handler` for SIGINT and SIGTERM from now on (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, handler)


def exits_at_once():
    """Whether the handler in place is an `exit_at_once` one (an entry script installed it)."""
    return getattr(signal.getsignal(signal.SIGTERM), "exits_at_once", False)


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
