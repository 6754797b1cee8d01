"""Command-line flags derived from an options dataclass, so that an option is declared once.

A field declared with :func:`rpnt_core.train.options.option` becomes ``--field-name`` with the
field's type, default, choices and help (its ``metadata``); :func:`option_values` reads the parsed
values back as keyword arguments of the options class.  Torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

_TYPES = {int: int, float: float, str: str}


def flagged_fields(options_cls: type) -> list[dataclasses.Field]:
    """The fields of ``options_cls`` that the command line offers (``metadata["flag"]`` not False)."""
    return [f for f in dataclasses.fields(options_cls) if f.metadata.get("flag", False) is not False]


def add_option_flags(
    parser: argparse.ArgumentParser,
    options_cls: type,
    *,
    unset: Mapping[str, str] | None = None,
    groups: Mapping[str, Any] | None = None,
) -> None:
    """Add one flag per flagged field of ``options_cls`` to ``parser``.

    Args:
        parser: the command's parser.
        options_cls: a dataclass whose fields were declared with ``option(...)``.
        unset: fields whose flag defaults to None (the command decides when the flag is absent),
            each with the text the help shows as its default; ``{default}`` in it is the field's.
        groups: fields added to another container than ``parser`` (e.g. a mutually exclusive
            group), by name.

    Raises:
        TypeError: a flagged field of a type the command line cannot parse.
    """
    unset, groups = unset or {}, groups or {}
    hints = typing.get_type_hints(options_cls)
    for f in flagged_fields(options_cls):
        target = groups.get(f.name, parser)
        help_ = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
        flag = f.metadata["flag"]
        if hints[f.name] is bool:
            negate = bool(f.default)
            name = (
                flag if isinstance(flag, str) else "--" + ("no-" if negate else "") + f.name.replace("_", "-")
            )
            action = "store_false" if negate else "store_true"
            target.add_argument(name, dest=f.name, action=action, help=("no " if negate else "") + help_)
            continue
        kind = _TYPES.get(hints[f.name])
        if kind is None:
            raise TypeError(f"{options_cls.__name__}.{f.name}: no command-line type for {hints[f.name]}")
        name = flag if isinstance(flag, str) else "--" + f.name.replace("_", "-")
        shown = unset[f.name].format(default=f.default) if f.name in unset else f.default
        target.add_argument(
            name,
            dest=f.name,
            type=kind,
            default=None if f.name in unset else f.default,
            choices=list(f.metadata["choices"]) or None,
            help=f"{help_} (default: {shown})",
        )


def option_values(options_cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The parsed values of ``options_cls``'s flags, as keyword arguments for it; a flag left unset
    (None, see ``unset`` in :func:`add_option_flags`) is left out, so the class's default or the
    command's choice applies."""
    values = {f.name: getattr(namespace, f.name) for f in flagged_fields(options_cls)}
    return {k: v for k, v in values.items() if v is not None}
