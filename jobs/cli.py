"""Click options generated from spec dataclasses, so the CLI and the spec cannot drift apart.

Each spec field becomes ``--field-name`` with the field's default and help; bool fields become
``--flag/--no-flag``; tuple fields take a comma-separated list. ``spec_from_options`` builds the
frozen spec back from the parsed values, and its ``ValueError`` becomes one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _base_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    return tp


def spec_options(spec_cls: type, skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of ``spec_cls`` (in field order)."""
    hints = typing.get_type_hints(spec_cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(spec_cls)):
            if f.name in skip:
                continue
            tp = _base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if tp is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=f.default, show_default=True,
                                  help=help_)(fn)
            elif f.metadata.get("multiple"):
                fn = click.option(flag, f.name, multiple=True, default=f.default, help=help_ + " (repeatable)")(fn)
            elif typing.get_origin(tp) is tuple or tp is tuple:
                default = ",".join(map(str, f.default))
                fn = click.option(flag, f.name, default=default, show_default=True, help=help_)(fn)
            else:
                # choices are checked by the spec itself so the error lists them in one line
                if choices:
                    help_ = f"{help_} [{'|'.join(choices)}]"
                fn = click.option(flag, f.name, type=tp, default=f.default, show_default=True, help=help_)(fn)
        return fn

    return decorate


def _split(value: str, item_type: Any) -> tuple:
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        return tuple(item_type(p) for p in parts)
    except ValueError as e:
        raise ValueError(f"cannot read {value!r} as a list of {item_type.__name__}: {e}") from e


def spec_from_options(spec_cls: type, options: dict[str, Any]) -> Any:
    """Build ``spec_cls`` from parsed options (only its own fields are taken)."""
    hints = typing.get_type_hints(spec_cls)
    kwargs = {}
    for f in dataclasses.fields(spec_cls):
        if f.name not in options:
            continue
        v = options[f.name]
        tp = _base_type(hints[f.name])
        if typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            v = _split(v, args[0] if args else str) if isinstance(v, str) else tuple(v)
        kwargs[f.name] = v
    return spec_cls(**kwargs)


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """One clear line on stderr and an exit code: 2 (click's usage-error code) for bad input, 1 for a failed run."""
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)
