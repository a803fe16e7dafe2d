"""The one base class of the errors a user can fix (a bad config, file or run directory).

Entry points catch `UserError` and print its message as one line, exit code 2; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or key and what was expected."""
