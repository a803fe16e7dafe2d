"""Entry-point wrapper: logging set up once; user errors and signals end with one line on stderr,
exit code 2. An entry script's first lines call `started()`, so that a signal during its imports
ends it with one line too."""
import argparse
import shlex
import sys

from utils.errors import Interrupted, UserError
from utils.log import setup_logging
from utils.signals import exit_at_once, exits_at_once, handlers, install, raise_interrupted

# An error message is one line of at most this many characters, whatever it quotes.
MAX_MESSAGE = 600


def one_line(text, limit=MAX_MESSAGE):
    """`text` on one line, its middle cut out when longer than `limit` characters."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} […] {text[-keep:]}"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit code 2, as every other error
    of a command is (the usage is in --help)."""

    def error(self, message):
        sys.stderr.write(f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")
        sys.exit(2)


def command_parser(prog, doc):
    """The argument parser of a command: its docstring's first paragraph as the description and
    the rest (examples, notes) after the options, laid out as written."""
    description, _, rest = doc.strip().partition("\n\n")
    return CommandParser(prog=prog, description=description, epilog=rest,
                         formatter_class=argparse.RawDescriptionHelpFormatter)


def command_line(prog, argv=None):
    """The command as it was given, for a result file: `prog` and its arguments (`argv`, or the
    process's own when None)."""
    return f"{prog} " + shlex.join(sys.argv[1:] if argv is None else argv)


def run_cli(main):
    """Run `main()`: a UserError, SIGINT or SIGTERM ends it with one line and exit code 2.

    Both signals raise `Interrupted` in the main thread; code that can stop cleanly (the training
    loop finishes its epoch, saves and says how to resume) defers it, everything else unwinds
    through its `finally` blocks, so temporaries are removed and nothing half-written is left."""
    setup_logging()
    entry_script = exits_at_once()       # its first lines made a signal exit at once
    failed = False
    try:
        with handlers(raise_interrupted):
            try:
                main()
            except (UserError, Interrupted) as err:
                failed = True
                # one write, so the lines of processes that share the stream never mix
                sys.stderr.write(f"error: {one_line(err)}\n")
                sys.stderr.flush()
                sys.exit(2)
    finally:
        # the interpreter's exit may take a while (torchrun also signals the processes that
        # are left when one fails); what is written is done, and a failure has said its line
        if entry_script:
            install(exit_at_once(None if failed else
                                 "the command had ended, and what it wrote is complete"))


def started():
    """An entry script's first call, before its imports (under `__main__` only: tests import the
    scripts): until `run_cli` takes over, SIGINT or SIGTERM ends the process at once with one
    line; nothing has been written by then."""
    install(exit_at_once("the command had not started, and nothing was written"))
