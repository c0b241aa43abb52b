"""Command-line flags generated from an options dataclass.

Each tool's options live in one frozen dataclass (what the code takes); the
flags are derived from its fields so a new option cannot be forgotten in the
parser, and a flag's default is the field's default by construction. A field
says how it shows on the command line in ``field(metadata=...)`` (see
:func:`option`); fields the generic rules do not fit (a dict, a group of
files) are marked ``cli=False`` and the tool adds their flags by hand.

Rules, by the field's type:

* ``bool`` -> ``--name`` (``store_true``) when it defaults to False,
  ``--no-name`` (``store_false``) when it defaults to True;
* ``int``, ``float``, ``str``, ``Path`` and their ``| None`` -> ``--name TYPE``;
* ``Literal[...]`` -> ``--name {choices}``;
* ``tuple[T, ...]`` -> ``--name T [T ...]`` (``nargs="+"``), back to a tuple
  in :func:`options_from_namespace`;
* a field without a default is a required flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

_SCALARS = (int, float, str, Path)


def option(default: Any = dataclasses.MISSING, *, help: str = "", **cli: Any) -> Any:
    """A dataclass field with its flag's help and overrides.

    ``cli`` keys: ``flag`` (the flag's name instead of ``--field-name``),
    ``choices``, ``metavar``, ``cli=False`` (no generated flag). A mutable
    default is given as ``default_factory`` in ``cli``.
    """
    factory = cli.pop("default_factory", dataclasses.MISSING)
    metadata = {"help": help, **cli}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (anything else unchanged)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _flag_kwargs(f: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments of one field (type, nargs, choices, default)."""
    default = _default(f)
    kind = _unwrap_optional(annotation)
    kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help") or None}
    if kind is bool:
        kwargs["action"] = "store_false" if default is True else "store_true"
        return kwargs
    if typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
        kind = str
    elif typing.get_origin(kind) is tuple:
        kwargs["nargs"] = "+"
        kind = typing.get_args(kind)[0]
        default = list(default) if default is not dataclasses.MISSING else default
    if kind not in _SCALARS:
        raise TypeError(f"{f.name}: no flag rule for {annotation!r}; mark it cli=False")
    kwargs["type"] = kind
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    for key in ("choices", "metavar"):
        if key in f.metadata:
            kwargs[key] = f.metadata[key]
    return kwargs


def _cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_options_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass ``cls`` (the rules of the module docstring)."""
    for f, annotation in _cli_fields(cls):
        kwargs = _flag_kwargs(f, annotation)
        default = _default(f)
        if "flag" in f.metadata:
            flag = f.metadata["flag"]
        elif kwargs.get("action") == "store_false" and default is True:
            flag = "--no-" + f.name.replace("_", "-")
        else:
            flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, **kwargs)


def options_from_namespace(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """Parsed flags -> ``cls``; ``given`` supplies (or overrides) fields by name."""
    values: dict[str, Any] = {}
    for f, annotation in _cli_fields(cls):
        if f.name in given:
            continue
        value = getattr(args, f.name)
        if typing.get_origin(_unwrap_optional(annotation)) is tuple and value is not None:
            value = tuple(value)
        values[f.name] = value
    return cls(**values, **given)
