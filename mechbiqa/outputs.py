"""One writer of what studies leave on disk: ``config.json``, the result JSON, figures.

How the files connect: every script in ``studies/`` writes its Config with
`write_config`, its result with `write_json` and its figures through
`mechbiqa.figures`, whose drawing functions save through `write_figure`. `jsonable` is the
one conversion of results to JSON values:

* dataclasses -> dicts, mappings -> dicts with string keys, tuples/sets -> lists;
* numpy arrays and scalars, torch tensors -> Python lists and numbers;
* ``Path`` -> str; NaN and +-inf -> ``null`` (strict JSON that every reader parses:
  Python's ``json`` would otherwise write the non-standard ``NaN``/``Infinity``);
* anything else -> its ``str``.

Files are written to a temporary name and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON values (see the module docstring); NaN and infinities become None."""
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return [jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def dumps(value: Any, indent: int | None = 1) -> str:
    """Strict JSON text of ``value`` (`jsonable` first; ``allow_nan=False`` guards the rule)."""
    return json.dumps(jsonable(value), indent=indent, allow_nan=False) + "\n"


def _write_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    """Write ``value`` as strict JSON (NaN/inf -> null); returns the path."""
    return _write_text(Path(path), dumps(value, indent))


def write_config(path: str | Path, config: Any) -> Path:
    """Write a study's Config as JSON: to ``path`` if it ends in ``.json``, else ``path/config.json``."""
    path = Path(path)
    return write_json(path if path.suffix == ".json" else path / "config.json", config, indent=2)


def write_figure(path: str | Path, figure: Any) -> Path:
    """Save a matplotlib ``Figure`` to ``path`` (format from the suffix; written whole or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    os.replace(tmp, path)
    return path
