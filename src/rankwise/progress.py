"""One progress-bar library for every verb: tqdm on stderr, silenced by ``--quiet`` or ``TQDM_DISABLE``.

Call sites write ``for x in progress(items, desc="spectra", unit="matrix", enabled=show)`` or
``bar = progress(total, desc=..., unit=...)`` then ``bar.update(n)`` / ``bar.close()`` (a
tqdm object is also a context manager). A bar is shown only when ``enabled`` is true and
:func:`quiet` is false; ``quiet()`` reads the ``TQDM_DISABLE`` environment variable, the same
switch tqdm itself and the libraries built on it (transformers, peft, accelerate, datasets)
honour, so :func:`set_quiet` silences their bars too. Bars go to stderr so ``--json -``
keeps stdout clean, and are removed when done (``leave=False``) unless asked otherwise.

Why tqdm and not rich.progress: the libraries rankwise runs under (transformers, peft,
accelerate) already draw tqdm bars and obey ``TQDM_DISABLE``; one library means one switch.
Rich stays for what tqdm does not do: tables, and the CLI's ``console.status`` spinners around
steps with no count to show (loading or saving a model); those draw on the command line's shared
console, which ``--quiet`` silences too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

_FALSE = ("", "0", "false", "no", "off")


def quiet() -> bool:
    """True when progress bars are switched off (``TQDM_DISABLE`` set to a true value)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE


def set_quiet(value: bool = True) -> None:
    """Switch every tqdm bar of this process (rankwise's and the libraries') off or back on.

    Sets ``TQDM_DISABLE`` (tqdm ≥ 4.66 and rankwise read it) and
    ``HF_HUB_DISABLE_PROGRESS_BARS`` (huggingface_hub's download bars).
    """
    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if value:
            os.environ[key] = "1"
        else:
            os.environ.pop(key, None)


def progress(iterable: Iterable[Any] | int | None = None, desc: str | None = None, unit: str = "it", *,
             total: int | None = None, enabled: bool = True, leave: bool = False, **kwargs: Any):
    """A tqdm bar over ``iterable`` (or, given an int, a manual bar of that ``total``).

    ``enabled=False`` (e.g. a verb's ``progress=False``) or :func:`quiet` gives a disabled
    bar that still iterates and accepts ``update``/``set_postfix``/``close``, so call sites
    never branch. Extra keyword arguments go to tqdm.
    """
    from tqdm.auto import tqdm

    if isinstance(iterable, int) and not isinstance(iterable, bool):
        iterable, total = None, iterable
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not enabled or quiet(), leave=leave,
                file=kwargs.pop("file", sys.stderr), dynamic_ncols=kwargs.pop("dynamic_ncols", True), **kwargs)
