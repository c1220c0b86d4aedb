"""Config dataclasses → command-line options, so every default is written once.

Each verb's config is a dataclass that validates itself in ``__post_init__``.
:func:`add_config_arguments` turns its fields into argparse options
(``calib_samples`` → ``--calib-samples``; bool → ``--x/--no-x``; the field's
default is the option's default) and :func:`config_from_args` builds the config
back from the parsed namespace, so validation happens in one place: the
dataclass. Field metadata may carry:

* ``help``: the option's help text (the default is appended);
* ``choices``: a tuple, or a zero-argument callable returning one (e.g. a
  :class:`rankwise.registry.Registry`'s ``names``) so registries feed the CLI;
* ``cli``: False to keep a field off the command line; or a flag name to use;
* ``metavar``, ``type``: passed to argparse.

Numbers typed on the command line are parsed strictly: floats must be finite,
integers whole, so ``--lr nan`` or ``--seed 1.5`` are one-line errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from rankwise.errors import RankwiseError

C = TypeVar("C")


def finite_float(flag: str) -> Callable[[str], float]:
    """argparse type: a finite float (``nan``/``inf`` are one-line errors naming ``flag``)."""

    def parse(value: str) -> float:
        try:
            v = float(value)
        except ValueError:
            raise RankwiseError(f"{flag} must be a number, got {value!r}.") from None
        if not math.isfinite(v):
            raise RankwiseError(f"{flag} must be a finite number, got {value!r}.")
        return v

    return parse


def check_int(value: Any, flag: str, minimum: int | None = None) -> int:
    """``value`` (an int, or a string of one) as a 64-bit whole number ≥ ``minimum``, else a one-line error.

    The one integer check of the package: argparse types (:func:`whole_int`, :func:`positive_int`)
    and config ``__post_init__`` checks both use it, so ``--seed 1.5``, ``2**70``, ``True`` and
    ``0`` where 1 is the least are refused with the same words everywhere.
    """
    v: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        v = value
    elif isinstance(value, str):
        try:
            v = int(value.strip())
        except ValueError:
            v = None
    if v is None:
        raise RankwiseError(f"{flag} must be a whole number, got {value!r}.")
    if not -(2**63) <= v < 2**63:
        raise RankwiseError(f"{flag} must fit in 64 bits, got {value!r}.")
    if minimum is not None and v < minimum:
        raise RankwiseError(f"{flag} must be at least {minimum}, got {v}.")
    return v


def whole_int(flag: str) -> Callable[[Any], int]:
    """argparse type: a whole number that fits in 64 bits (``1.5``/``2**70`` are one-line errors)."""
    return functools.partial(check_int, flag=flag)


def positive_int(flag: str) -> Callable[[Any], int]:
    """argparse type (and validator): a 64-bit whole number ≥ 1 (``0``, ``-3``, ``1.5`` are one-line errors)."""
    return functools.partial(check_int, flag=flag, minimum=1)


def _base_type(hint: Any) -> tuple[type | None, bool]:
    """(the non-None type of ``hint``, whether None is allowed)."""
    args = typing.get_args(hint)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 and isinstance(rest[0], type) else None), True
    return (hint if isinstance(hint, type) else None), False


def flag_of(field: dataclasses.Field) -> str:
    cli = field.metadata.get("cli", True)
    return cli if isinstance(cli, str) else "--" + field.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser | Any, cls: type, skip: tuple[str, ...] = (),
                         defaults: dict[str, Any] | None = None) -> None:
    """Add one option per field of dataclass ``cls`` (except ``skip`` and ``cli=False`` fields).

    ``defaults`` overrides a field's default on this command line only (e.g. a verb whose
    default learning rate differs); the dataclass stays the one source otherwise.
    """
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli", True) is False or not f.init:
            continue
        flag = flag_of(f)
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else
                               (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
        base, _optional = _base_type(hints[f.name])
        kw: dict[str, Any] = {"default": default, "dest": f.name}
        help_text = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = tuple(choices())
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if "type" in f.metadata:
                kw["type"] = f.metadata["type"]
            elif base is float:
                kw["type"] = finite_float(flag)
            elif base is int:
                kw["type"] = whole_int(flag)
            if choices:
                kw["choices"] = choices
            if "metavar" in f.metadata:
                kw["metavar"] = f.metadata["metavar"]
        if default is not None and default != "":
            help_text = f"{help_text} (default {'on' if default is True else 'off' if default is False else default})"
        kw["help"] = help_text.strip() or None
        parser.add_argument(flag, **kw)


def config_from_args(cls: type[C], args: argparse.Namespace, **extra: Any) -> C:
    """Build ``cls`` from the parsed options (fields absent from ``args`` keep their defaults)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
          if f.init and hasattr(args, f.name)}
    kw.update(extra)
    return cls(**kw)


def check_config_type(config: Any, cls: type[C], verb: str) -> C:
    """``config`` if it is a ``cls`` (``None`` → defaults), else a one-line error (Python API misuse)."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise RankwiseError(f"{verb} takes a {cls.__name__}, got {type(config).__name__}; "
                            f"build one with rankwise.{cls.__name__}(...).")
    return config


def check_numbers(config: Any) -> None:
    """One-line error for a number field of dataclass ``config`` that the CLI parser would have refused.

    Python API callers bypass argparse, so each config calls this first in ``__post_init__``: a field
    annotated ``float`` must hold a finite real number, one annotated ``int`` a whole number that fits
    in 64 bits (``bool`` is refused for both; ``None`` only where the annotation allows it).
    """
    try:
        hints = typing.get_type_hints(type(config))
    except (NameError, TypeError):  # annotations that cannot be resolved here: nothing to check
        return
    for f in dataclasses.fields(config):
        base, optional = _base_type(hints.get(f.name))
        if base not in (int, float):
            continue
        v = getattr(config, f.name)
        if v is None and optional:
            continue
        name = f"{f.name} ({flag_of(f)})" if f.metadata.get("cli", True) is not False else f.name
        if base is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RankwiseError(f"{name} must be a number, got {v!r}.")
            if not math.isfinite(v):
                raise RankwiseError(f"{name} must be a finite number, got {v!r}.")
        else:
            if isinstance(v, bool) or not isinstance(v, int):
                raise RankwiseError(f"{name} must be a whole number, got {v!r}.")
            if not -(2**63) <= v < 2**63:
                raise RankwiseError(f"{name} must fit in 64 bits, got {v!r}.")
