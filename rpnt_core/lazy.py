"""Lazy package exports: public names that resolve (and import their module) on first use, so that
importing a package costs nothing until one of its heavy parts is needed (``import rpnt_core``
does not import torch; ``import streaming`` does not import zmq)."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(
    package: str, table: dict[str, str], namespace: dict
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``table`` maps a public name to the module that
    defines it (absolute, or relative to ``package`` with a leading dot); a resolved name is cached
    in ``namespace`` (the package's ``globals()``)."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
