"""The exceptions a study ends on with one line instead of a traceback.

`mechbiqa.cli.run` catches the *expected* failures of a study, the ones caused
by what the user passed (a bad option value, a missing file, a checkpoint or
store that does not fit), prints their message as one line on stderr and
exits with a non-zero code. Everything else is a bug and keeps its traceback.
The library raises ordinary exceptions (`ValueError`, `FileNotFoundError`,
`KeyError`, and its own subclasses: ``CheckpointError``, ``StoreError`` ...)
whose message names the problem and the fix; `UserError` is for the few
problems that fit none of them.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """Bad input that no built-in exception describes; the message says what to pass instead."""


class UsageError(UserError):
    """A command line that cannot be parsed (unknown option, a value of the wrong type)."""


def is_expected(error: BaseException) -> bool:
    """Whether a study reports ``error`` as one line: bad input or environment, not a bug.

    `UserError`, `ValueError` (and the library's subclasses: ``CheckpointError``,
    ``MetricError`` ...), `KeyError` and other `LookupError`s except `IndexError` (an
    index out of range is a bug), `OSError` (a missing or unreadable file), the store's
    ``StoreError`` and the benchmark's ``BenchmarkMismatchError``.
    """
    if isinstance(error, IndexError):
        return False
    if isinstance(error, UserError | ValueError | LookupError | OSError):
        return True
    # the store's and the benchmark's errors: only raised once their modules are imported (no import here)
    library = (("mechbiqa.store", "StoreError"), ("mechbiqa.data.benchmark", "BenchmarkMismatchError"))
    for module, name in library:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(error, kind):
            return True
    return False


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a `KeyError` without its quotes)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(str(text).split())
    return text or type(error).__name__
