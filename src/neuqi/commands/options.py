"""Command-line options generated from config dataclasses: one field, one option.

A field becomes ``--field-name`` when its ``metadata`` has a ``help`` (``"flag"`` overrides the name, ``"choices"``
restricts the values, ``"cli": False`` hides it). Booleans get ``--x/--no-x``. Every option defaults to None in
argparse, so ``config_kwargs`` passes on only what the user gave and the dataclass (or a context default such
as the demo settings) decides the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from typing import Any

log = logging.getLogger(__name__)

_SCALARS = (int, float, str)


def _scalar_type(hint: Any) -> type | None:
    """int/float/str/bool for ``hint`` (``X | None`` unwrapped); None for containers (not exposed)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return hint if hint in (*_SCALARS, bool) else None


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """(field, scalar type) of every field of ``cls`` that is a command-line option."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = _scalar_type(hints[f.name])
        if f.metadata.get("help") and f.metadata.get("cli", True) and kind is not None:
            out.append((f, kind))
    return out


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def add_config_options(parser: argparse.ArgumentParser, cls: type, title: str,
                       defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = ()) -> Any:
    """Add one option per CLI field of ``cls`` in a group named ``title`` (returned); ``defaults`` overrides the
    defaults shown in the help."""
    group = parser.add_argument_group(title)
    for f, kind in cli_fields(cls):
        if f.name in exclude:
            continue
        default = (defaults or {}).get(f.name, _default(f))
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        shown = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=shown)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"),
                               help=shown, metavar=None if f.metadata.get("choices") else f.name.upper())
    return group


def config_kwargs(cls: type, args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from the options the user gave, over ``defaults``."""
    kwargs = dict(defaults or {})
    for f, _ in cli_fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            kwargs[f.name] = value
    return kwargs


class DeprecatedAlias(argparse.Action):
    """An old option name that stores into the new one's destination and says so once."""

    def __init__(self, *args: Any, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        log.warning("%s is deprecated; use %s", option_string, self.new)
        setattr(namespace, self.dest, values)
