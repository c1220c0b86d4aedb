"""Shared CLI helpers: consoles, JSON output, argument parsing of common options."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from rankwise.config import positive_int  # noqa: F401 - re-exported for the verbs
from rankwise.errors import RankwiseError, check_ratio
from rankwise.io.atomic import atomic_file

console = Console(stderr=True)
"""Progress and tables go to stderr so ``--json -`` keeps stdout clean."""


def ratio_arg(value: str) -> float:
    """argparse type for --ratio: a float strictly inside (0, 1); a clear error otherwise."""
    return check_ratio(value)


def add_model_argument(parser: argparse.ArgumentParser, help: str, metavar: str | None = None) -> None:
    """The optional positional MODEL every verb takes (default: the built-in smollm2-135m)."""
    parser.add_argument("model", nargs="?", default=None, metavar=metavar, help=help)


def add_output_arguments(parser: argparse.ArgumentParser, what: str, dense: str | None = None) -> None:
    """``--out DIR`` (required, written atomically), ``--overwrite`` and, given ``dense``, ``--export-dense DIR``."""
    parser.add_argument("--out", required=True, metavar="DIR", help=f"output folder ({what}; written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    if dense is not None:
        parser.add_argument("--export-dense", default=None, metavar="DIR",
                            help=f"also write a plain HF folder ({dense}) that from_pretrained loads")


def add_json_argument(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json PATH`` ('-' = stdout), written by :func:`write_json`."""
    parser.add_argument("--json", default=None, metavar="PATH", help=f"write {what} as JSON ('-' = stdout)")


def write_json(data: Any, dest: str | None) -> None:
    """Write ``data`` as JSON to ``dest`` (a path, atomically) or to stdout when ``dest == "-"``."""
    if dest is None:
        return
    text = json.dumps(data, indent=2, allow_nan=False, default=_default)
    if dest == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    with atomic_file(dest) as fh:
        fh.write(text + "\n")


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def split_list(value: str) -> list[str]:
    """'ptb,bbc' -> ['ptb', 'bbc']; empty items are an error."""
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise RankwiseError(f"empty item in list {value!r}; separate names with commas, e.g. ptb,bbc.")
    return items
