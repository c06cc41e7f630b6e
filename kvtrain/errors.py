"""Errors kvtrain reports as a message, and the error boundary every entry point runs under.

A *user error* is something the user gave (a file, a field, a value, a model name) that cannot work; its message
names it and what would be accepted. The boundary (`run_entry_point`) prints one line and exits non-zero, with
no stack trace unless ``--debug`` or ``KVTRAIN_DEBUG=1`` asks for one. Under a multi-process launch only the
first rank prints, so a bad flag is said once, not once per process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

DEBUG_ENV = "KVTRAIN_DEBUG"
USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 1


class UserError(ValueError):
    """Something the user gave is wrong; the message names it and what would be accepted."""


class NonFiniteError(FloatingPointError):
    """NaN or inf where a number was needed (a loss, a gradient, logits, a metric); the message says where."""


class OutputInUseError(UserError):
    """Another job holds the output folder."""


def debug_requested(argv: list[str] | None = None) -> bool:
    """``--debug`` among the arguments, or ``KVTRAIN_DEBUG`` set to anything but 0/false/empty."""
    if argv is not None and "--debug" in argv:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_first_rank() -> bool:
    """True outside a multi-process launch, and on rank 0 inside one."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def said_once() -> Iterator[None]:
    """Around argument parsing: argparse prints a usage error (or --help) itself before exiting, so under a
    multi-process launch every rank but the first parses silently and the message is said once."""
    if is_first_rank():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
        yield


def describe(err: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that reached an entry point."""
    if isinstance(err, OSError) and getattr(err, "filename", None):
        return f"{err.filename}: {err.strerror or err}", USER_ERROR_EXIT
    if isinstance(err, (ValueError, OSError, NonFiniteError)):
        # Our own checks raise ValueError subclasses naming the file/field/value; OSError comes from files and
        # model names the user gave.
        return str(err), USER_ERROR_EXIT
    return (f"internal error ({type(err).__name__}: {err}); rerun with --debug (or {DEBUG_ENV}=1) for the "
            "traceback and report it", INTERNAL_ERROR_EXIT)


def run_entry_point(main: Callable[[], object], *, prog: str, debug: bool) -> int:
    """Run `main`, turning any exception into one line on stderr and an exit code; `debug` re-raises instead."""
    try:
        main()
    except KeyboardInterrupt:
        if is_first_rank():
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        message, code = describe(err)
        if is_first_rank():
            print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return code
    return 0
