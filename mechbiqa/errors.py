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

import errno
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


#: errno -> what a bare ``[Errno N] ...`` error from the operating system means for the user, and the fix.
_OS_FIXES = {
    errno.EEXIST: "{path} exists and is not a folder; move it away or pass another path",
    errno.ENOTDIR: "a part of {path} is a file where a folder is needed; pass another path",
    errno.EISDIR: "{path} is a folder where a file is needed; pass a file",
    errno.ENOENT: "{path} does not exist; check the path",
    errno.EACCES: "permission denied on {path}; pass a path you may write (or read), or fix its permissions",
    errno.EPERM: "permission denied on {path}; pass a path you may write (or read), or fix its permissions",
    errno.EROFS: "{path} is on a read-only file system; pass a writable path",
    errno.ENOSPC: "no space left on the device of {path}; free some space or pass another path",
    errno.ENAMETOOLONG: "the file name {path} is too long; pass a shorter path",
}


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (a `KeyError` without its quotes).

    An `OSError` straight from the operating system (``[Errno 17] File exists: 'out'``) is
    said in words, with the path and the fix.
    """
    if isinstance(error, OSError) and error.errno in _OS_FIXES and str(error).startswith("[Errno"):
        path = error.filename if error.filename is not None else "the path"
        return _OS_FIXES[error.errno].format(path=f"'{path}'" if error.filename is not None else path)
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(str(text).split())
    return text or type(error).__name__
