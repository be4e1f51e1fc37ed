"""What the command-line scripts share: a user's mistake is a paragraph, not a traceback.

A script's ``main`` raises :class:`UserError` for what the user can fix (a
missing or corrupt data file, a checkpoint that is not one, conflicting flags,
an output directory that holds another run, a GPU asked for where none
answers); :func:`run_main` prints its message on stderr after the script's name
and returns status 2. Anything else is a bug and keeps its traceback. With
``--debug`` a user error shows its traceback too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the traceback of any error (a mistake in the input is otherwise one paragraph)"


class UserError(Exception):
    """A mistake in the input that the user can fix; the message says what and how."""


def run_main(main: Callable[[list[str]], int], argv: Sequence[str] | None, prog: str) -> int:
    """Call ``main(argv)``; a :class:`UserError` becomes ``prog: error: ...`` and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except UserError as exc:
        if DEBUG_FLAG in argv:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
