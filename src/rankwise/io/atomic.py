"""Write outputs so that an error or Ctrl-C never leaves a half-written file or folder.

Everything is written under a temporary name next to the destination and
renamed into place only when complete (rename is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rankwise.errors import RankwiseError


def check_writable(path: str | os.PathLike, is_dir: bool = False) -> Path:
    """Fail early, with a one-line error, if ``path`` cannot be created."""
    p = Path(path).expanduser()
    parent = p.parent
    probe = parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise RankwiseError(f"cannot write {p}: {probe} is not a writable directory; choose another path.")
    if p.exists() and is_dir and not p.is_dir():
        raise RankwiseError(f"cannot write folder {p}: a file of that name exists; choose another path.")
    if p.exists() and not is_dir and p.is_dir():
        raise RankwiseError(f"cannot write file {p}: it is a directory; choose a file name.")
    return p


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file beside ``path``; on success rename it onto ``path``."""
    p = check_writable(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        kw = {} if "b" in mode else {"encoding": encoding}
        with open(tmp, mode, **kw) as fh:
            yield fh
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; rename it to ``path`` when the block succeeds.

    Refuses (one-line error) when ``path`` exists and ``overwrite`` is false. On
    any exception, including KeyboardInterrupt, the temporary folder is removed
    and ``path`` is left exactly as it was.
    """
    p = check_writable(path, is_dir=True)
    if p.exists() and not overwrite:
        raise RankwiseError(f"output folder {p} already exists; pass --overwrite (overwrite=True) or another --out.")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    try:
        yield tmp
        if p.exists():
            old = p.with_name(f".{p.name}.old-{os.getpid()}")
            os.replace(p, old)
            os.replace(tmp, p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
