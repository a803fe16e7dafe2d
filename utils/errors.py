"""The one base class of the errors a user can fix (a bad config, file or run directory), and the
error a signal raises.

Entry points catch `UserError` and print its message as one line, exit code 2; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or key and what was expected."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (raised by the entry points' signal handler). A KeyboardInterrupt,
    so no `except Exception` swallows it."""

    def __init__(self, signal_name, message=None):
        self.signal_name = signal_name
        super().__init__(message or f"interrupted by {signal_name}; nothing half-written was kept")
