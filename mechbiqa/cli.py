"""The command line of every study: a parser derived from the study's frozen ``Config``, one error surface.

How the files connect: each script in ``studies/`` declares a frozen ``Config``
(fields with defaults, a Google ``Attributes:`` docstring) and ``main(config)
-> Result``; its ``if __name__ == "__main__":`` is ``cli.run(main, Config,
render)``. `run` builds the parser from the Config (`parser`), parses, checks
the paths the options name (`check_paths`) before ``main`` loads any model,
runs, renders the result with rich, and turns an expected failure
(`mechbiqa.errors.is_expected`: bad input, a missing file, a store or
checkpoint that does not fit) into one line on stderr and exit code 1 (2 for a
command line that does not parse); ``--debug`` shows the traceback instead.
A run that completes but only in part (e.g. some images could not be read and
the others were rated) says so through its Result: an ``exit_code`` attribute
(an int, or a property) that is not 0 makes `run` exit with that code after
rendering; a Result without one exits 0.
`mechbiqa.outputs` writes what the study produces; `check_common` is what a
Config's ``__post_init__`` calls to validate the options all studies share.

Derivation rules (`options`):

* field name -> ``--kebab-case``; help from the ``Attributes:`` section of the
  Config's docstring; default from the field (shown in ``--help``);
* ``int``, ``float``, ``str``, ``Path`` -> ``type=``; ``X | None`` -> the word
  ``none`` (``all`` for ``--split``) gives None;
* ``Literal[...]`` -> choices; ``bool`` -> ``--flag/--no-flag``;
  ``tuple[X, ...]``, ``list[X]`` -> any number of values; ``tuple[X, Y]`` -> two;
* a field whose type is a frozen dataclass (a library config such as
  ``SamplingConfig``) -> its fields as options in their own group, with their
  own docstring help, named ``--<field>-<name>`` only where a name clashes
  with another option (or where ``meta(prefix=...)`` asks for it);
* ``dict`` and ``Any`` fields (overrides that tests pass) stay off the command line, and so
  does a config nested in a nested config (a study lifts it to a field of its own Config).

`meta` (a field's ``metadata``) renames a flag (``out_dir`` -> ``--out``), adds
aliases, or makes a positional argument. `COMMON` fixes the options every
study shares: ``--model --dtype --device --out --dataset --split --limit
--seed --batch-size`` have one spelling, one set of choices and one meaning.

Why not tyro or simple-parsing: the derivation is this one short file, adds no
dependency, reads the help from the docstrings the Configs already carry, and
gives exact control over the names, choices and ``none`` words of the common
options (tyro spells nested options ``--sampling.seeds`` and booleans its own
way; simple-parsing wants its own field wrappers in every Config).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
import re
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar

from mechbiqa.errors import UsageError, is_expected, one_line

C = TypeVar("C")

DTYPES = ("float32", "bfloat16", "float16")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Common:
    """What a shared option means in every study.

    Attributes:
        help: Help text when the Config's docstring has none.
        choices: Allowed values, or None.
        none: The word that gives None for an ``X | None`` field.
    """

    help: str
    choices: tuple[str, ...] | None = None
    none: str = "none"


COMMON: dict[str, Common] = {
    "--model": Common("checkpoint directory (config.json, weights, tokenizer)"),
    "--dtype": Common("model dtype: the weights are cast to it as they are read", DTYPES),
    "--device": Common("cpu, cuda, cuda:1 ..."),
    "--out": Common("where the output goes"),
    "--dataset": Common("'builtin', a folder of images, a .jsonl of records, or NAME=ROOT"),
    "--split": Common("keep one split of the data set ('all': every split)", SPLITS, none="all"),
    "--limit": Common("keep the first N samples (none: all)"),
    "--seed": Common("random seed"),
    "--batch-size": Common("samples per forward"),
}


@dataclass(frozen=True)
class Range:
    """The values an option with this name takes wherever it appears (`RANGES`).

    Attributes:
        low: Smallest allowed value, or None.
        high: Largest allowed value, or None.
        low_open: ``low`` itself is refused (``> low``).
        high_open: ``high`` itself is refused (``< high``).
    """

    low: int | float | None = None
    high: int | float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: int | float) -> bool:
        """Whether ``value`` lies in the range."""
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def __str__(self) -> str:
        def show(x: int | float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {show(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {show(self.high)}")
        return " and ".join(parts)


_COUNT = Range(1)  # how many of something: at least one
_NONNEG = Range(0)  # a count or period where 0 means none/all/off
_POSITIVE = Range(0, low_open=True)
_SEED = Range(0, 2**32 - 1)  # what numpy, torch and random all accept
_FRACTION = Range(0, 1, high_open=True)

RANGES: dict[str, Range] = {
    **dict.fromkeys(
        ("--limit", "--batch-size", "--total-steps", "--grad-accum", "--n-images", "--n-answers", "--n-batches",
         "--n-bins", "--n-splits",
         "--inner-splits", "--n-patch", "--n-instability", "--probe-splits", "--k", "--top-k", "--chunk",
         "--rounds", "--repeats", "--images", "--tokens", "--prompt-len", "--memory-batches", "--scales",
         "--read-samples", "--read-layers", "--read-pos", "--read-d", "--batch-images", "--images-per-step",
         "--group-size", "--inner-steps", "--d-hidden", "--head-hidden", "--head-epochs", "--head-batch-size",
         "--lora-rank", "--timeout"),
        _COUNT,
    ),
    "--threads": Range(1, 4096),
    # sizes that allocate: a huge value would end in an overflow or out of memory deep inside
    "--image-size": Range(1, 4096),
    "--crops-per-photo": Range(1, 1000),
    "--vocab-size": Range(1, 1_000_000),
    "--max-new-tokens": Range(1, 16384),
    **dict.fromkeys(
        ("--warmup-steps", "--eval-every", "--eval-samples", "--test-samples", "--checkpoint-every", "--steps",
         "--bootstrap", "--examples", "--n-shuffles", "--probe-shuffles", "--checkpoint-seconds",
         "--weight-decay", "--head-weight-decay", "--visual-lr-scale", "--clip-norm", "--kl-beta", "--lam",
         "--w-level", "--w-mos", "--w-rouge", "--w-consistency-answer", "--w-consistency-label"),
        _NONNEG,
    ),
    **dict.fromkeys(("--seed", "--seeds", "--head-seed"), _SEED),
    **dict.fromkeys(("--lr", "--head-lr", "--temperature", "--clip-eps", "--adv-eps", "--forward-cost", "--alphas"),
                    _POSITIVE),
    **dict.fromkeys(("--label-smoothing", "--head-dropout"), _FRACTION),
    "--top-p": Range(0, 1, low_open=True),
}
"""Option name -> its allowed values, in every study that has the option (`check_common` applies it;
a ``None`` value, where the option takes one, is always allowed). Float options also refuse NaN and
infinities."""


def meta(
    *,
    flag: str | None = None,
    aliases: Sequence[str] = (),
    positional: bool = False,
    prefix: str | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """A field's ``metadata`` for the command line: ``field(default=..., metadata=cli.meta(flag="--out"))``.

    Args:
        flag: The option's name instead of ``--field-name`` (e.g. a common name for an older field).
        aliases: Further names of the same option (older spellings).
        positional: A positional argument (a tuple field takes any number of values).
        prefix: For a nested config: prefix every option of it with ``--<prefix>-``.
        check: For ``--model``/``--dataset``: whether `check_paths` requires the path to exist.
    """
    return {"cli": {"flag": flag, "aliases": tuple(aliases), "positional": positional, "prefix": prefix,
                    "check": check}}


@dataclass(frozen=True)
class Option:
    """One command-line option of a Config field.

    Attributes:
        path: Field names from the Config down to the value (two for a nested config's field).
        flag: ``--name`` (or the positional's name).
        aliases: Other names.
        kind: Type of one value (``int``, ``str``, ``Path`` ...).
        default: The field's default.
        help: Help text.
        optional: The field takes None (the ``none`` word).
        none: The word that gives None.
        container: ``tuple`` or ``list`` for a sequence, else None.
        nargs: Values of a sequence (``"*"`` or a number).
        choices: Allowed values, or None.
        boolean: A ``--flag/--no-flag`` switch.
        positional: A positional argument.
        group: Title of the argument group (a nested config's), or None.
        check: Whether `check_paths` checks the path it names.
    """

    path: tuple[str, ...]
    flag: str
    aliases: tuple[str, ...]
    kind: Any
    default: Any
    help: str
    optional: bool = False
    none: str = "none"
    container: type | None = None
    nargs: int | str | None = None
    choices: tuple[Any, ...] | None = None
    boolean: bool = False
    positional: bool = False
    group: str | None = None
    check: bool = True

    @property
    def dest(self) -> str:
        """The argparse destination."""
        return "__".join(self.path)


# ----------------------------------------------------------------------------- derivation
def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> text of the ``Attributes:`` section of a class's Google docstring."""
    lines = (inspect.getdoc(cls) or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Attributes:"]
    if not starts:
        return {}
    out: dict[str, str] = {}
    current, indent = None, None
    for line in lines[starts[0] + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        indent = depth if indent is None else indent
        entry = re.match(r"\s*(\w+)(?: \([^)]*\))?:\s*(.*)", line)
        if depth == indent and entry:
            current = entry.group(1)
            out[current] = entry.group(2)
        elif current is not None:
            out[current] += " " + line.strip()
    return {k: v.replace("``", "").replace("`", "").strip() for k, v in out.items()}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError:  # a module loaded without a sys.modules entry: resolve in a method's globals
        for value in vars(cls).values():
            function = getattr(value, "__func__", value)
            if hasattr(function, "__globals__"):
                return typing.get_type_hints(cls, globalns=function.__globals__)
        raise


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"a command line cannot spell the union {tp}; use X | None")
        return rest[0], len(rest) < len(args)
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _skipped(tp: Any) -> bool:
    return tp is Any or tp is dict or typing.get_origin(tp) is dict


@functools.cache
def options(cls: type) -> tuple[Option, ...]:
    """The command-line options of a Config class, in field order (see the module docstring)."""
    hints = _hints(cls)
    top = [f for f in dataclasses.fields(cls) if f.init]
    nested = {f.name for f in top if _is_config(_unwrap_optional(hints[f.name])[0])}
    # names that appear more than once among the leaves get their nested config's prefix
    leaf_names = [f.name for f in top if f.name not in nested]
    for f in top:
        if f.name in nested:
            leaf_names += [g.name for g in dataclasses.fields(hints[f.name]) if g.init]
    clashing = {n for n in leaf_names if leaf_names.count(n) > 1}
    out: list[Option] = []
    for f in top:
        tp, _ = _unwrap_optional(hints[f.name])
        info = f.metadata.get("cli", {})
        if f.name in nested:
            default = _default(f)
            if default is dataclasses.MISSING or default is None:
                raise TypeError(f"{cls.__name__}.{f.name}: a nested config needs a default instance")
            docs = attribute_docs(tp)
            title = (inspect.getdoc(tp) or tp.__name__).splitlines()[0].rstrip(".")
            sub_hints = _hints(tp)
            for g in dataclasses.fields(tp):
                inner = _unwrap_optional(sub_hints[g.name])[0]
                if not g.init or _skipped(inner) or _is_config(inner):  # one level of nesting only
                    continue
                prefix = info.get("prefix") or (f.name if g.name in clashing else None)
                name = f"{prefix}_{g.name}" if prefix else g.name
                option = _leaf(
                    (f.name, g.name), sub_hints[g.name], getattr(default, g.name), docs.get(g.name, ""),
                    g.metadata.get("cli", {}), f"{tp.__name__}: {title}", name,
                )
                out.append(option)
            continue
        if _skipped(tp):
            continue
        doc = attribute_docs(cls).get(f.name, "")
        out.append(_leaf((f.name,), hints[f.name], _default(f), doc, info, None, f.name))
    flags = [name for o in out for name in (o.flag, *o.aliases)]
    repeated = {n for n in flags if flags.count(n) > 1}
    if repeated:
        raise TypeError(
            f"{cls.__name__}: options {sorted(repeated)} are declared twice; "
            "rename one with cli.meta(flag=...)"
        )
    return tuple(out)


def _leaf(
    path: tuple[str, ...],
    hint: Any,
    default: Any,
    doc: str,
    info: dict[str, Any],
    group: str | None,
    name: str,
) -> Option:
    tp, optional = _unwrap_optional(hint)
    flag = info.get("flag") or ("--" + name.replace("_", "-"))
    common = COMMON.get(flag)
    container = nargs = choices = None
    if typing.get_origin(tp) in (tuple, list):
        container = typing.get_origin(tp)
        args = typing.get_args(tp)
        if container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            nargs = len(args)
        else:
            nargs = "*"
        tp = args[0] if args else str
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        tp = type(choices[0])
    elif common is not None and common.choices is not None:
        choices = common.choices
    if not (tp in (int, float, str, bool) or (isinstance(tp, type) and issubclass(tp, PurePath))):
        raise TypeError(f"{'.'.join(path)}: a command line cannot spell {hint}")
    return Option(
        path=path,
        flag=flag if not info.get("positional") else name,
        aliases=tuple(info.get("aliases", ())),
        kind=tp,
        default=default,
        help=doc or (common.help if common else ""),
        optional=optional,
        none=common.none if common else "none",
        container=container,
        nargs=nargs,
        choices=choices,
        boolean=tp is bool and container is None,
        positional=bool(info.get("positional")),
        group=group,
        check=info.get("check", True),
    )


# ----------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are exceptions (`run` prints them as one line)."""

    def error(self, message: str) -> typing.NoReturn:  # noqa: D102
        raise UsageError(f"{message} (see {self.prog} --help)")


def _show(option: Option, value: Any) -> str:
    if value is None:
        return option.none
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return " ".join(map(str, value)) if value else "none given"
    return str(value)


def _converter(option: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if option.optional and text.lower() == option.none:
            return None
        try:
            value = option.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {option.kind.__name__} value: {text!r}") from None
        if option.choices is not None and value not in option.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(map(str, option.choices))}"
                + (f", or {option.none}" if option.optional else "") + ")"
            )
        return value

    convert.__name__ = getattr(option.kind, "__name__", "value")
    return convert


def parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a Config class (defaults are not stored: `parse` fills them from the Config)."""
    p = _Parser(description=description, prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS)
    groups: dict[str | None, Any] = {None: p}
    for o in options(cls):
        target = groups.get(o.group) or groups.setdefault(o.group, p.add_argument_group(o.group))
        shown = "" if o.default is dataclasses.MISSING else f" (default: {_show(o, o.default)})"
        text = (o.help + shown).replace("%", "%%")
        metavar = (o.flag if o.positional else o.flag[2:]).upper().replace("-", "_")
        if o.choices is not None:
            metavar = "{" + ",".join(map(str, o.choices)) + ("," + o.none if o.optional else "") + "}"
        if o.boolean:
            target.add_argument(
                o.flag, *o.aliases, dest=o.dest, action=argparse.BooleanOptionalAction, help=text
            )
            continue
        kwargs: dict[str, Any] = {"type": _converter(o), "help": text, "metavar": metavar}
        if o.nargs is not None:
            kwargs["nargs"] = o.nargs
            if o.nargs == "*" and not o.positional:
                kwargs["action"] = "extend"  # a repeated option adds values: --model a --model b
        if o.positional:
            if o.nargs is None and o.default is not dataclasses.MISSING:
                kwargs["nargs"] = "?"
            target.add_argument(o.dest, **kwargs)
        else:
            if o.default is dataclasses.MISSING:
                kwargs["required"] = True
            target.add_argument(o.flag, *o.aliases, dest=o.dest, **kwargs)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p


def parse(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None,
          prog: str | None = None) -> C:
    """Command line -> a Config (its ``__post_init__`` validates; errors are exceptions).

    Raises:
        UsageError: The command line does not parse (unknown option, a value of the wrong type).
        ValueError: The Config refuses a value (its message names the option and the fix).
    """
    namespace = vars(parser(cls, description, prog).parse_args(list(sys.argv[1:] if argv is None else argv)))
    namespace.pop("debug", None)
    given: dict[tuple[str, ...], Any] = {}
    for o in options(cls):
        if o.dest in namespace:
            value = namespace[o.dest]
            if o.container is not None and value is not None:
                if None in value and value != [None]:  # the converter turned the none word into None
                    raise UsageError(f"{o.flag}: pass either {o.none!r} alone or values, not both")
                value = None if value == [None] else o.container(value)
            check_range(o, value)  # here, not only in __post_init__: a nested config's own check names no flag
            given[o.path] = value
    return _instance(cls, given)


def _instance(cls: type[C], given: dict[tuple[str, ...], Any]) -> C:
    kwargs: dict[str, Any] = {}
    for path, value in given.items():
        if len(path) == 1:
            kwargs[path[0]] = value
    nested = {path[0] for path in given if len(path) == 2}
    for name in nested:
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        sub = {path[1]: value for path, value in given.items() if len(path) == 2 and path[0] == name}
        kwargs[name] = dataclasses.replace(_default(field), **sub)
    return cls(**kwargs)


def to_argv(config: Any) -> list[str]:
    """The command line that `parse` turns back into ``config`` (every option spelled out)."""
    positional: list[str] = []
    out: list[str] = []
    for o in options(type(config)):
        value = config
        for name in o.path:
            value = getattr(value, name)
        if o.positional:
            positional += [str(v) for v in value] if o.container is not None else [str(value)]
        elif o.boolean:
            out.append(o.flag if value else "--no-" + o.flag[2:])
        elif value is None:
            out += [o.flag, o.none]
        elif o.container is not None:
            out += [o.flag, *map(str, value)]
        else:
            out += [o.flag, str(value)]
    return positional + out


def value_of(config: Any, flag: str) -> Any:
    """The value of the option spelled ``flag`` in ``config`` (`dataclasses.MISSING` if it has none)."""
    for o in options(type(config)):
        if o.flag == flag:
            value = config
            for name in o.path:
                value = getattr(value, name)
            return value
    return dataclasses.MISSING


# ----------------------------------------------------------------------------- checks
def check_common(config: Any) -> None:
    """Validate the shared options of a Config; call it from ``__post_init__``.

    Raises:
        ValueError: ``--limit`` below 1, ``--batch-size`` below 1, a ``--dtype`` or ``--split``
            outside its choices, any numeric option outside its `RANGES` entry or (a float) not
            finite (the message names the option and what to pass).
    """
    limit = value_of(config, "--limit")
    if limit not in (None, dataclasses.MISSING) and limit < 1:
        raise ValueError(f"--limit {limit}: keep at least 1 sample, or leave --limit out to keep all")
    batch = value_of(config, "--batch-size")
    if batch is not dataclasses.MISSING and batch is not None and batch < 1:
        raise ValueError(f"--batch-size {batch}: pass at least 1")
    for flag in ("--dtype", "--split"):
        value = value_of(config, flag)
        choices = COMMON[flag].choices or ()
        if value not in (None, dataclasses.MISSING) and value not in choices:
            raise ValueError(f"{flag} {value}: choose one of {', '.join(choices)}")
    for o in options(type(config)):
        check_range(o, value_of(config, o.flag))


def check_range(option: Option, value: Any) -> None:
    """Refuse a value of a numeric option outside its `RANGES` entry, or a float that is not finite.

    Raises:
        ValueError: Naming the option, the value and what to pass.
    """
    if option.kind not in (int, float) or option.choices is not None:
        return
    values = value if isinstance(value, tuple | list) else () if value in (None, dataclasses.MISSING) else (value,)
    bounds = RANGES.get(option.flag)
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{option.flag} {v}: pass a finite number")
        if bounds is not None and not bounds.admits(v):
            if option.flag == "--limit":
                raise ValueError(f"--limit {v}: keep at least 1 sample, or leave --limit out to keep all")
            raise ValueError(f"{option.flag} {v}: pass {'a value ' if bounds.low_open else ''}{bounds}")


def check_paths(config: Any) -> None:
    """Check that the checkpoints and data sets the options name exist, before any model is loaded.

    Raises:
        FileNotFoundError: A ``--model`` entry (``DIR`` or ``NAME=DIR``) is not a directory, or a
            ``--dataset`` is none of ``builtin``, an existing folder or file, ``NAME=ROOT`` with an
            existing ROOT.
    """
    for o in options(type(config)):
        if o.flag not in ("--model", "--dataset") or not o.check:
            continue
        value = value_of(config, o.flag)
        entries = value if isinstance(value, tuple | list) else () if value is None else (value,)
        for entry in map(str, entries):
            if o.flag == "--model":
                where = entry.rpartition("=")[2] if not Path(entry).exists() else entry
                if not Path(where).is_dir():
                    raise FileNotFoundError(
                        f"--model {entry}: {where} is not a directory; pass a checkpoint directory "
                        "(config.json + weights) or a two-stage pair folder (stage1/, stage2/)"
                    )
            elif entry != "builtin" and not Path(entry).exists():
                if "=" in entry:
                    name, root = entry.split("=", 1)
                    if not Path(root).exists():
                        raise FileNotFoundError(f"--dataset {entry}: {root} does not exist; pass {name}=ROOT "
                                                "with the data set's folder")
                else:
                    raise FileNotFoundError(f"--dataset {entry}: no such file or folder; pass 'builtin', a "
                                            "folder of images, a .jsonl of records or NAME=ROOT")


# ----------------------------------------------------------------------------- running
def run(
    main: Callable[[Any], Any],
    config: type,
    render: Callable[[Any, Any], None] | None = None,
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
) -> Any:
    """Parse, check, run and render a study; an expected failure ends as one line on stderr.

    Args:
        main: The study's ``main(config) -> Result``.
        config: Its Config class.
        render: ``render(result, console)`` printing the result with rich; None: print nothing.
        argv: The arguments (default ``sys.argv[1:]``).
        description: ``--help`` text (default: the docstring of ``main``'s module).

    Returns:
        What ``main`` returned (when its ``exit_code``, if it has one, is 0).

    Raises:
        SystemExit: With the result's ``exit_code`` when it has a non-zero one (a partial
            success, after rendering); with code 1 after an expected failure
            (`mechbiqa.errors.is_expected`), 2 after a command line that does not parse, 130
            when interrupted; ``--debug`` re-raises the
            exception instead. Any other exception (a bug) keeps its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    module = sys.modules.get(main.__module__)
    description = description if description is not None else (module.__doc__ if module else None)
    prog = Path(sys.argv[0]).name or None
    _listen_for_interrupts()
    try:
        cfg = parse(config, args, description=description, prog=prog)
        check_paths(cfg)
        result = main(cfg)
        if render is not None:
            from rich.console import Console

            render(result, Console())
        code = getattr(result, "exit_code", 0)
        if code:
            raise SystemExit(int(code))
        return result
    except KeyboardInterrupt as interrupt:
        if debug:
            raise
        if interrupt.args:  # e.g. training: the step its checkpoint kept
            _fail(prog, f"{one_line(interrupt)}; rerun the same command to resume", 130)
        _fail(prog, "interrupted; rerun the same command to resume (or start again)", 130)
    except Exception as error:
        if debug or not is_expected(error):
            raise
        hint = "" if isinstance(error, UsageError) else " (--debug shows the traceback)"
        _fail(prog, one_line(error) + hint, 2 if isinstance(error, UsageError) else 1)


def _listen_for_interrupts() -> None:
    """Make SIGINT (Ctrl-C, ``kill -INT``) raise `KeyboardInterrupt` even when the process inherited it ignored.

    A shell starts a script's background commands (``cmd &``) with SIGINT ignored, and Python keeps
    an ignored SIGINT ignored: an interrupt sent to such a run would be lost and the run go on.
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _fail(prog: str | None, message: str, code: int) -> typing.NoReturn:
    print(f"{prog or 'error'}: error: {message}", file=sys.stderr)
    raise SystemExit(code)
