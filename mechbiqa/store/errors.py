"""The store's exceptions: every message names the file, the problem and the fix.

Where it sits: raised by every module of `mechbiqa.store`; the studies turn them into one
line on the command line.
"""

from __future__ import annotations

__all__ = ["SchemaVersionError", "StoreError", "StoreKeyError", "StoreLockedError", "StoreMismatchError"]


class StoreError(RuntimeError):
    """A store cannot be created, resumed or read; the message says why and what to do."""


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


class StoreMismatchError(StoreError):
    """A store was made by another model, config, spec or sample list than the one at hand."""


class SchemaVersionError(StoreError):
    """A store was written with another schema version than this mechbiqa reads."""


class StoreKeyError(StoreError, KeyError):
    """Something asked for is not in the store (an array, a layer, a selection, a sample id).

    A `KeyError` (``except KeyError`` still catches it) whose message prints without the quotes
    `KeyError` adds.
    """

    def __str__(self) -> str:  # KeyError's str() is repr(message); print the message as it is
        return str(self.args[0]) if self.args else ""
