"""Settings that are also command-line flags: each is declared once, as a field of a frozen config.

    max_num_seqs: int = setting(256, "most sequences in one step")

gives the field its default and `--max-num-seqs` its type (from the annotation), default and help
line. The config's `__post_init__` checks the values, for flags and library callers alike. A field
whose type is itself a config is a slice: its fields are flags too, and `build` hands the slice
down whole, so a layer below reads its own settings without restating them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

_HELP, _FLAG, _PARSE, _CHOICES = "help", "flag", "parse", "choices"


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str = "",
    choices: tuple[Any, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A config field and its flag. `flag`: the flag's name where it is not the field's (`--no-x` for a
    switch that turns a True default off); `parse` reads what argparse cannot (a comma-separated list);
    the help of a None default says what None means."""
    meta = {_HELP: help, _FLAG: flag, _CHOICES: choices, _PARSE: parse}
    return dataclasses.field(default=default, metadata=meta)


def fields(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field[Any], type]]:
    """The settings of `cls` and of its slices, in order: (the slice's path, the field, its type)."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[tuple[str, ...], dataclasses.Field[Any], type]] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += fields(hints[f.name], (*path, f.name))
        elif _HELP in f.metadata:
            out.append((path, f, hints[f.name]))
    return out


def flag_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata[_FLAG] or "--" + f.name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    """Adds a flag for each setting of `cls` not in `skip` (field names) nor already on the parser."""
    group = parser.add_argument_group(title)
    taken = {a.dest for a in parser._actions}
    for _, f, kind in fields(cls):
        if f.name in skip or f.name in taken:
            continue
        help, default = f.metadata[_HELP], f.default
        if kind is bool:
            action = "store_false" if default else "store_true"
            group.add_argument(flag_name(f), dest=f.name, action=action, help=f"{help} (default: off)")
            continue
        kw: dict[str, Any] = {"dest": f.name, "type": f.metadata[_PARSE] or _scalar(kind)}
        if default is dataclasses.MISSING:
            kw["required"] = True
            help += " (required)"
        else:
            kw["default"] = default
            if default not in (None, ""):
                help += f" (default: {default})"
            elif "default" not in help:
                help += " (default: none)"
        if f.metadata[_CHOICES] is not None:
            kw["choices"] = f.metadata[_CHOICES]
        group.add_argument(flag_name(f), help=help, **kw)


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """A `cls` from flat setting names (parsed flags, or a test's dict); slices are built the same way,
    and names absent from `values` keep their defaults."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kw[f.name] = build(hints[f.name], values)
        elif f.name in values:
            kw[f.name] = values[f.name]
    return cls(**kw)


def to_argv(config: Any) -> list[str]:
    """The flags that rebuild `config` in another process: every setting not at its default."""
    argv: list[str] = []
    for path, f, kind in fields(type(config)):
        value = functools.reduce(getattr, (*path, f.name), config)
        if value == f.default:
            continue
        if kind is bool:
            argv.append(flag_name(f))
        elif isinstance(value, tuple):
            argv += [flag_name(f), ",".join(map(str, value))]
        else:
            argv += [flag_name(f), str(value)]
    return argv


def _scalar(kind: Any) -> type:
    """int for `int` and `int | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = (a for a in typing.get_args(kind) if a is not type(None))
    return kind
