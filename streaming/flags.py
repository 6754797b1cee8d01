"""Command-line flags generated from settings fields (:mod:`streaming.options`, :mod:`service.settings`).

    add_flags(parser, DaemonConfig, TUNING)                       # --stall-ms, --max-jump-s, ...
    cfg = config_from_args(DaemonConfig, args, TUNING)            # the flags given, validated

A field's flag is ``--`` + its name with ``-`` for ``_``; its type, choices, default and help (the
field's description) come from the field.  Booleans are switches (``store_true``); ``list[int]``
takes ``1,2``; ``list[str]`` is repeatable; a ``Literal`` gives the choices.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .options import described, extra


@dataclass(frozen=True)
class Flag:
    """One flag for one settings field.

    Args:
        field: the field's name in its model.
        flag: the flag (default ``--`` + field with ``-`` for ``_``).
        invert: a ``--no-X`` switch that sets a default-true boolean field to false (its description
            reads as a verb phrase: the help is "do not" + it).
    """

    field: str
    flag: str | None = None
    invert: bool = False

    @property
    def name(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")


def cpu_list(text: str) -> list[int]:
    """``"0,2"`` → ``[0, 2]`` (an argparse type)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPU ids like 1 or 0,2, got {text!r}") from None


def _base(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not NoneType]
        if len(args) == 1:
            return args[0]
    return annotation


def _default_words(value: Any) -> str:
    if value is None or value is False or value == []:
        return ""
    return f" (default {value})"


def flag_kwargs(
    model: type[BaseModel], spec: Flag, *, default: Any = None, setting: str | None = None
) -> dict[str, Any]:
    """``add_argument`` keyword arguments for ``spec``: the argparse ``default`` is ``default`` (None:
    not given), the help says the field's own default (or ``default``) and, with ``setting``, names
    it (``[daemon.stall_ms]``)."""
    f = model.model_fields[spec.field]
    kind = _base(f.annotation)
    if spec.invert:
        words = f"do not {described(f)}"
    elif default is not None and default != f.default:  # this command's own default
        words = (f.description or "") + _default_words(default)
    else:
        words = described(f) + _default_words(f.default)
    kw: dict[str, Any] = {"default": None if default == [] else default}
    if kind is bool:
        kw["action"] = "store_true"
    elif get_origin(kind) is Literal:
        kw["choices"] = get_args(kind)
    elif get_origin(kind) is list and get_args(kind) == (int,):
        kw["type"] = cpu_list
    elif get_origin(kind) is list:
        kw["action"] = "append"
    elif kind in (int, float):
        kw["type"] = kind
    metavar = extra(f, "metavar")
    if metavar and kw.get("action") != "store_true":
        kw["metavar"] = metavar
    kw["help"] = (words + (f" [{setting}]" if setting else "")).replace("%", "%%")
    return kw


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    specs: Iterable[Flag | str],
    *,
    defaults: Mapping[str, Any] | bool = True,
    section: str | None = None,
) -> None:
    """Add a flag per spec (a :class:`Flag`, or a field name).

    Args:
        defaults: True: each flag defaults to its field's default; a mapping: those fields'
            defaults instead; False: every flag defaults to None (not given), so that a settings file
            can supply the value.
        section: name the setting in each help (``[section.field]``; ``""`` for a top-level one).
    """
    for spec in specs:
        spec = Flag(spec) if isinstance(spec, str) else spec
        if defaults is False:
            default = None
        elif isinstance(defaults, Mapping) and spec.field in defaults:
            default = defaults[spec.field]
        else:
            default = model.model_fields[spec.field].default
        setting = None if section is None else (f"{section}.{spec.field}" if section else spec.field)
        parser.add_argument(spec.name, **flag_kwargs(model, spec, default=default, setting=setting))


def given(args: argparse.Namespace, specs: Iterable[Flag | str]) -> dict[str, Any]:
    """The fields whose flags were given (not None), by field name (an ``invert`` flag → False)."""
    out: dict[str, Any] = {}
    for spec in specs:
        spec = Flag(spec) if isinstance(spec, str) else spec
        value = getattr(args, spec.dest)
        if spec.invert:
            value = False if value else None
        if value is not None:
            out[spec.field] = value
    return out


def config_from_args(model: type[BaseModel], args: argparse.Namespace, specs: Iterable[Flag | str]) -> Any:
    """``model`` validated from the flags in ``specs`` (fields without a flag keep their defaults).

    Raises:
        ValueError: ``"--flag: what is wrong"`` for each flag out of its field's bounds.
    """
    flags = [Flag(s) if isinstance(s, str) else s for s in specs]
    try:
        return model.model_validate(given(args, flags))
    except ValidationError as exc:
        names = {f.field: f.name for f in flags}
        raise ValueError(
            "; ".join(
                f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
        ) from None


def as_argv(config: BaseModel, specs: Iterable[Flag | str]) -> list[str]:
    """The flags that give ``config``'s values which differ from the field defaults (for a child
    ``serve`` process)."""
    argv: list[str] = []
    for spec in specs:
        spec = Flag(spec) if isinstance(spec, str) else spec
        value = getattr(config, spec.field)
        if value == type(config).model_fields[spec.field].default:
            continue
        if isinstance(value, bool):
            argv.append(spec.name)
        elif isinstance(value, list):
            argv += [spec.name, ",".join(map(str, value))]
        else:
            argv += [spec.name, str(value)]
    return argv
