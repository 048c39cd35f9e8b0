"""Command-line error reporting shared by the scripts: bad input is one line on stderr, exit status 2.

    from embedjax import cli

    def main(argv=None): ...          # argparse (or anything) over argv; raises on bad input

    if __name__ == "__main__":
        cli.run(main)                 # --debug anywhere in argv: the full traceback instead

A user-facing error (``USER_ERRORS``: ``embedjax.data.DataError``, ``embedjax.hf.CheckpointError``,
any ``ValueError``, ``KeyError`` or ``OSError`` such as ``FileNotFoundError`` or a workdir another
trainer holds, and the training NaN guard's ``FloatingPointError``) is printed as
``error: <message>`` on ONE line of stderr (a multi-line message is joined with "; ") and the
process exits with status 2, as argparse does for bad flags. ``DataError`` messages start with
``file:line:``. Any other exception is a bug and propagates with its traceback. With
``debug`` the full traceback of a user-facing error is printed instead of the one line
(still exit status 2).
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, Sequence, TypeVar

from embedjax.data.readers import DataError
from embedjax.hf import CheckpointError

T = TypeVar("T")

# DataError, CheckpointError and a damaged workdir's CheckpointDamaged are ValueErrors; listed for the
# reader. OSError covers FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError and
# embedjax.train.workdir.WorkdirLocked. FloatingPointError: embedjax.train.metrics.TrainingDiverged (the
# NaN guard stopped a run, its last good checkpoint kept).
USER_ERRORS: tuple[type[BaseException], ...] = (DataError, CheckpointError, ValueError, KeyError, OSError,
                                                FloatingPointError)
EXIT_STATUS = 2
DEBUG_FLAG = "--debug"
MAX_CHARS = 2000


def one_line(err: BaseException, max_chars: int = MAX_CHARS) -> str:
    """``err``'s message on one line: lines stripped and joined ("; ", or " " after a colon).

    A ``KeyError`` shows its message without the quotes ``str(KeyError)`` adds; an empty
    message falls back to the exception's type; longer than ``max_chars`` is cut (``--debug``
    shows all of it).
    """
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err)
    out = ""
    for line in text.splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        out = line if not out else out + (" " if out.endswith(":") else "; ") + line
    if not out:
        out = type(err).__name__
    if len(out) > max_chars:
        out = out[:max_chars] + f"... ({len(out) - max_chars} more characters; run with {DEBUG_FLAG} to see all)"
    return out


def add_debug_flag(parser) -> None:
    """Adds ``--debug`` to an ``argparse`` parser (so ``--help`` lists it; ``run`` reads it from argv)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, show the full traceback instead of one line")


def run(main: Callable[[list[str]], T], argv: Sequence[str] | None = None, *, debug: bool | None = None,
        strip_debug: bool = False) -> T:
    """Calls ``main(argv)`` and turns a user-facing error into one line on stderr and exit status 2.

    Args:
      main: any callable taking the argument list (an argparse ``main(argv)``, or the body
        of an absl ``app.run`` main).
      argv: the arguments for ``main``; default ``sys.argv[1:]``. Passed on as a list.
      debug: show the full traceback of a user-facing error. ``None`` (default): True iff
        ``--debug`` is in ``argv`` (before a ``--``). An absl program passes its own flag:
        ``app.run(lambda argv: cli.run(main, argv, debug=FLAGS.debug))``.
      strip_debug: remove ``--debug`` from ``argv`` before calling ``main`` (for a ``main``
        whose parser does not define it; the scripts define it with ``add_debug_flag``).

    Returns what ``main`` returns. On an exception in ``USER_ERRORS`` prints
    ``error: <message on one line>`` to stderr (with ``debug``: the full traceback instead)
    and raises ``SystemExit(2)``. Other exceptions (bugs), ``SystemExit`` (argparse's own usage errors,
    already status 2) and ``KeyboardInterrupt`` pass through unchanged.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    if debug is None:
        debug = DEBUG_FLAG in head
    if strip_debug and DEBUG_FLAG in head:
        argv = [a for a in head if a != DEBUG_FLAG] + argv[len(head):]
    try:
        return main(argv)
    except USER_ERRORS as err:
        sys.stdout.flush()
        if debug:
            traceback.print_exc()
        else:
            print(f"error: {one_line(err)}", file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(EXIT_STATUS) from None
