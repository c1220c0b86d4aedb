"""Write outputs so that an error, Ctrl-C, SIGTERM or even SIGKILL never loses or half-writes anything.

Every output is written under a temporary name beside its destination
(``.NAME.rw<pid>-<tag>.tmp``, the owner's PID in the name) and put in place
only when complete:

* an output that does not exist yet is renamed into place (atomic on one
  filesystem);
* ``--overwrite`` of an existing output swaps new and old with one
  ``renameat2(RENAME_EXCHANGE)`` call on Linux (so the destination always holds
  the old or the new version), then deletes the old one. Where the exchange is
  unsupported (another OS, or a filesystem without it) the old version is
  renamed aside and the new one renamed in; a run killed between those two
  renames is repaired by the next run (or :func:`recover`).

Several outputs of one command (``--out``, ``--merge``, ``--json``, ...) are
staged together with :func:`atomic_outputs` and committed at the end: before
the first rename a small journal (``.rankwise-commit.rw<pid>-<tag>.json``) is
written beside every output, so a run killed during the commit is rolled
forward (all new) by the next run, and one killed before it leaves all old.
Temporary folders and journals whose owning process is dead are cleaned up at
the start of the next write into the same folder.

Outputs follow the umask like any other file a program creates (``mkdtemp``
would make them private, 0700/0600, and safetensors writes 0600 files: the
modes are set from the umask on the complete output before it is put in place). Disk full, a file-size limit, a
read-only or unwritable location become one-line :class:`RankwiseError`
messages, with nothing left behind.

``RANKWISE_TEST_KILL_AT=<step>`` (tests only) sends SIGKILL (or the signal
``RANKWISE_TEST_KILL_SIGNAL`` names) to this process at a named step of the
commit (see :data:`STEPS`); ``RANKWISE_NO_EXCHANGE=1`` forces the two-rename
fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwise.errors import RankwiseError

STEPS = ("staged", "journal", "aside", "swapped", "cleaned")
"""Named steps of a commit at which ``RANKWISE_TEST_KILL_AT`` can kill the process.

``staged``: every output is complete under its temporary name, nothing renamed yet;
``journal``: the commit journal is written; ``aside:<i>``: (two-rename fallback only) the old output
``i`` is renamed aside and the new one not yet in place; ``swapped:<i>``: output ``i`` is in place;
``cleaned``: the old versions are deleted, the journal not yet.
"""

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.rw(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})(?P<old>\.old)?\.tmp$")
_JOURNAL_RE = re.compile(r"^\.rankwise-commit\.rw(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})\.json(?P<part>\.part)?$")
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this system's file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
    errno.EXDEV: "the temporary name and the destination are on different file systems",
}


# -- small helpers --------------------------------------------------------------------------------
def _kill_point(step: str) -> None:
    """Test hook: signal this process when ``RANKWISE_TEST_KILL_AT`` names ``step``.

    The signal is SIGKILL, or the one ``RANKWISE_TEST_KILL_SIGNAL`` names (``TERM``, ``INT``).
    """
    at = os.environ.get("RANKWISE_TEST_KILL_AT")
    if at and at == step:
        sig = getattr(signal, "SIG" + os.environ.get("RANKWISE_TEST_KILL_SIGNAL", "KILL").upper())
        os.kill(os.getpid(), sig)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def _ino(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _remove(path: Path) -> None:
    """Delete a file or a folder tree; silently nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask is a set-and-restore, racy with threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """Give a staged output the modes the umask gives new files (0666) and folders (0777).

    Some writers create private files whatever the umask (safetensors' ``save_file`` makes 0600
    files), so the modes are set once, on the complete output, before it is put in place.
    """
    mask = _umask()
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_symlink():
        return
    if path.is_file():
        os.chmod(path, fmode)
        return
    os.chmod(path, dmode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), dmode)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), fmode)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc (no ldconfig run)
        fn = libc.renameat2  # glibc >= 2.28, musl >= 1.2.? (the Linux call itself exists since 3.15)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both must exist); False where the platform cannot."""
    if _renameat2 is None or os.environ.get("RANKWISE_NO_EXCHANGE"):
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def write_error(exc: BaseException) -> tuple[int | None, str] | None:
    """(errno, reason) when ``exc`` is a failed write (disk full, read-only, size limit...), else None.

    safetensors (Rust) and torch's zip writer report I/O errors as their own exception types with
    the OS error in the text, so the text is parsed too.
    """
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e.errno, _WRITE_ERRNOS[e.errno]
    text = str(exc)
    m = re.search(r"Os \{ code: (\d+)", text) or re.search(r"\[Errno (\d+)\]", text)
    if m and int(m.group(1)) in _WRITE_ERRNOS:
        return int(m.group(1)), _WRITE_ERRNOS[int(m.group(1))]
    for needle, code in (("No space left", errno.ENOSPC), ("File too large", errno.EFBIG),
                         ("Read-only file system", errno.EROFS), ("file write failed", None)):
        if needle in text:
            return code, _WRITE_ERRNOS.get(code, "the write failed") if code else "the write failed"
    return None


def _as_user_error(exc: BaseException, dest: Path, kept: str) -> BaseException:
    """A one-line RankwiseError for a failed write, or ``exc`` itself when it is something else."""
    if isinstance(exc, RankwiseError | KeyboardInterrupt | SystemExit):
        return exc
    found = write_error(exc)
    if found is None:
        return exc
    return RankwiseError(f"cannot write {dest}: {found[1]}; {kept} Free some space or choose another location.")


# -- checks before any work -----------------------------------------------------------------------
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
        why = "is a read-only location" if _read_only(probe) else "is not a writable directory"
        raise RankwiseError(f"cannot write {p}: {probe} {why}; choose another path.")
    if p.exists() and is_dir and not p.is_dir():
        raise RankwiseError(f"cannot write folder {p}: a file of that name exists; choose another path.")
    if p.exists() and not is_dir and p.is_dir():
        raise RankwiseError(f"cannot write file {p}: it is a directory; choose a file name.")
    return p


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; returns the folders created (deepest last) so a failure can remove them."""
    made: list[Path] = []
    for d in reversed([folder, *folder.parents]):
        if not d.exists():
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            made.append(d)
    return made


# -- stale temporaries from killed runs -------------------------------------------------------------
_LIVE_JOURNALS: set[Path] = set()
"""Journals of commits running in this process (a journal of ours not listed here is a failed commit's)."""


def recover(folder: str | os.PathLike) -> list[str]:
    """Finish or undo what killed runs left in ``folder``; returns one line per action taken.

    A commit journal of a dead process is rolled forward when its commit had started (every
    journal of that commit written) and rolled back otherwise; then temporary outputs whose
    owning process is dead are deleted. Live processes' files are never touched.
    """
    folder = Path(folder)
    done: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return done
    for name in names:
        m = _JOURNAL_RE.match(name)
        if m and (folder / name) not in _LIVE_JOURNALS and (
                int(m.group("pid")) == os.getpid() or not _pid_alive(int(m.group("pid")))):
            if m.group("part"):
                _remove(folder / name)
            else:
                try:
                    done += _replay(folder / name)
                except OSError as exc:
                    done.append(f"could not finish the interrupted commit in {folder / name}: {exc}")
    for name in names:
        m = _TMP_RE.match(name)
        if m and not _pid_alive(int(m.group("pid"))) and (folder / name).exists():
            _remove(folder / name)
            done.append(f"removed {folder / name} left by a killed run (pid {m.group('pid')})")
    return done


def _replay(journal: Path) -> list[str]:
    """Roll the commit described by ``journal`` forward (all copies present) or back."""
    try:
        data = json.loads(journal.read_text())
        entries = [_Entry.from_dict(e) for e in data["entries"]]
        copies = [Path(j) for j in data["journals"]]
    except (OSError, ValueError, KeyError, TypeError):
        _remove(journal)
        return [f"removed unreadable commit journal {journal}"]
    done: list[str] = []
    if all(j.exists() for j in copies):
        for e in entries:
            done += e.roll_forward()
    else:  # the commit never started: no destination was touched; only temporaries to delete
        for e in entries:
            e.restore_aside()
            _remove(e.staged)
            _remove(e.old)
    for j in copies:
        _remove(j)
    return done


# -- one staged output ----------------------------------------------------------------------------
@dataclass
class _Entry:
    dest: Path
    staged: Path
    old: Path
    ino: tuple[int, int] | None = None

    @classmethod
    def new(cls, dest: Path) -> _Entry:
        tag = f"rw{os.getpid()}-{secrets.token_hex(4)}"
        return cls(dest, dest.with_name(f".{dest.name}.{tag}.tmp"), dest.with_name(f".{dest.name}.{tag}.old.tmp"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Entry:
        return cls(Path(d["dest"]), Path(d["staged"]), Path(d["old"]), tuple(d["ino"]) if d["ino"] else None)

    def to_dict(self) -> dict[str, Any]:
        return {"dest": str(self.dest), "staged": str(self.staged), "old": str(self.old),
                "ino": list(self.ino) if self.ino else None}

    def swap(self, i: int) -> None:
        """Put the staged output in place; the previous one (if any) ends under a temporary name."""
        if os.path.lexists(self.dest):
            if not exchange(self.staged, self.dest):
                os.rename(self.dest, self.old)
                _kill_point(f"aside:{i}")
                os.rename(self.staged, self.dest)
        else:
            os.rename(self.staged, self.dest)
        _kill_point(f"swapped:{i}")

    def roll_forward(self) -> list[str]:
        if self.ino is not None and _ino(self.dest) == self.ino:
            pass
        elif self.ino is not None and _ino(self.staged) == self.ino:
            if os.path.lexists(self.dest) and not exchange(self.staged, self.dest):
                os.rename(self.dest, self.old)
            if not os.path.lexists(self.dest):
                os.rename(self.staged, self.dest)
            else:
                _remove(self.old)
        else:
            self.restore_aside()
            return [f"could not finish the interrupted write of {self.dest}: its new version is gone"]
        _remove(self.staged)
        _remove(self.old)
        return [f"finished the interrupted write of {self.dest}"]

    def restore_aside(self) -> None:
        if not os.path.lexists(self.dest) and os.path.lexists(self.old):
            os.rename(self.old, self.dest)


# -- a group of outputs committed together ---------------------------------------------------------
_ACTIVE: contextvars.ContextVar[AtomicOutputs | None] = contextvars.ContextVar("rankwise_outputs", default=None)


class AtomicOutputs:
    """Outputs of one command, checked now, written under temporary names, committed together.

    Build it before the work starts (it checks every destination: writable, distinct, not existing
    unless ``overwrite``, and repairs what killed runs left there); then wrap the saving code in
    ``with outputs:``. Inside the block, :func:`atomic_dir` / :func:`atomic_file` calls (and
    everything built on them: ``rankwise.save``, ``export_dense``, ``save_adapter``, ``write_json``)
    for these destinations are staged instead of committed; at the end of the block all are put in
    place together. An exception or interruption inside the block leaves every destination as it
    was; one during the commit is finished by a journal (see the module docstring).
    """

    def __init__(self, dirs: Iterable[str | os.PathLike | None] = (),
                 files: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                 flags: dict[str, str] | None = None) -> None:
        self.overwrite = overwrite
        self.kinds: dict[Path, bool] = {}
        flags = flags or {}
        for is_dir, group in ((True, dirs), (False, files)):
            for p in group:
                if p is None or str(p) == "-":
                    continue
                dest = check_writable(p, is_dir=is_dir)
                key = _key(dest)
                if key in self.kinds:
                    raise RankwiseError(f"{p} is given as two outputs{_flags_text(flags)}; each must be different.")
                if dest.exists() and is_dir and not overwrite:
                    raise RankwiseError(f"output folder {dest} already exists; pass --overwrite "
                                        "(overwrite=True) or another path.")
                self.kinds[key] = is_dir
        for key in self.kinds:
            with contextlib.suppress(OSError):
                if key.parent.is_dir():
                    recover(key.parent)
        self.entries: dict[Path, _Entry] = {}
        self._made: list[Path] = []
        self._token: contextvars.Token | None = None

    def owns(self, path: Path) -> bool:
        return self._token is not None and _key(path) in self.kinds

    def staged(self, path: str | os.PathLike) -> Path:
        """Where ``path``'s new version is while the group is open (to read an output back), else ``path``."""
        entry = self.entries.get(_key(Path(path)))
        return entry.staged if entry is not None else Path(path)

    # staging ---------------------------------------------------------------------------------------
    def _stage(self, dest: Path) -> _Entry:
        key = _key(dest)
        if key in self.entries:  # written twice: the later version wins
            _remove(self.entries.pop(key).staged)
        self._made += _make_parents(key.parent)
        recover(key.parent)
        entry = _Entry.new(key)
        self.entries[key] = entry
        return entry

    @contextlib.contextmanager
    def _staging(self, dest: Path) -> Iterator[Any]:
        """Stage ``dest``; on any failure remove the staged copy, forget it, and raise one line."""
        entry = self._stage(dest)
        try:
            yield entry
        except BaseException as exc:
            _remove(entry.staged)
            self.entries.pop(_key(dest), None)
            err = _as_user_error(exc, dest, "nothing was written.")
            if err is exc:
                raise
            raise err from exc

    @contextlib.contextmanager
    def stage_dir(self, dest: Path) -> Iterator[Path]:
        with self._staging(dest) as entry:
            os.mkdir(entry.staged, 0o777)  # the umask applies, unlike mkdtemp's 0700
            yield entry.staged

    @contextlib.contextmanager
    def stage_file(self, dest: Path, mode: str, encoding: str | None) -> Iterator[Any]:
        with self._staging(dest) as entry:
            fd = os.open(entry.staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            kw = {} if "b" in mode else {"encoding": encoding}
            with open(fd, mode, **kw) as fh:
                yield fh

    # commit ----------------------------------------------------------------------------------------
    def __enter__(self) -> AtomicOutputs:
        if self._token is not None:
            raise RuntimeError("AtomicOutputs is not re-entrant")
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _ACTIVE.reset(self._token)
        self._token = None
        if exc_type is not None:
            self.discard()
            if exc is not None and not isinstance(exc, RankwiseError):
                err = _as_user_error(exc, next(iter(self.kinds), Path(".")), "no output was changed.")
                if err is not exc:
                    raise err from exc
            return False
        self.commit()
        return False

    def discard(self) -> None:
        """Delete everything staged (and folders this group created); destinations are untouched."""
        for e in self.entries.values():
            _remove(e.staged)
        self.entries.clear()
        for d in reversed(self._made):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._made.clear()

    def commit(self) -> None:
        """Put every staged output in place: all of them, or (on failure) a one-line account of where each is."""
        entries = list(self.entries.values())
        if not entries:
            return
        try:
            self._commit(entries)
        finally:
            _LIVE_JOURNALS.difference_update(j for j in list(_LIVE_JOURNALS) if j.name.startswith(".rankwise-commit")
                                             and j.parent in {e.dest.parent for e in entries})

    def _commit(self, entries: list[_Entry]) -> None:
        for e in entries:
            _follow_umask(e.staged)
        for e in entries:
            e.ino = _ino(e.staged)
        tag = f"rw{os.getpid()}-{secrets.token_hex(4)}"
        parents = sorted({e.dest.parent for e in entries})
        journals = [d / f".rankwise-commit.{tag}.json" for d in parents]
        record = json.dumps({"entries": [e.to_dict() for e in entries], "journals": [str(j) for j in journals]})
        _LIVE_JOURNALS.update(journals)
        try:
            _kill_point("staged")
            for j in journals:
                part = j.with_name(j.name + ".part")
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with open(fd, "w") as fh:
                    fh.write(record)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.rename(part, j)
                _fsync_dir(j.parent)
        except BaseException as exc:
            for j in journals:
                _remove(j)
                _remove(j.with_name(j.name + ".part"))
            self.discard()
            err = _as_user_error(exc, entries[0].dest, "no output was changed.")
            if err is exc:
                raise
            raise err from exc
        try:
            _kill_point("journal")
            for i, e in enumerate(entries):
                e.swap(i)
            for e in entries:
                _remove(e.staged)
                _remove(e.old)
            _kill_point("cleaned")
        except BaseException as exc:
            # Interrupted (or a rename failed) half way: every new version is complete, so finish the job.
            try:
                for e in entries:
                    e.roll_forward()
            except OSError as again:
                raise RankwiseError(
                    f"could not put the new outputs in place ({again}); "
                    + "; ".join(f"{e.dest}: {_where(e)}" for e in entries)
                    + f". The journal {journals[0]} lets the next run finish the job."
                ) from exc
            for j in journals:
                _remove(j)
            if not isinstance(exc, Exception):  # interrupted: the outputs are complete, pass the signal on
                raise
        for j in journals:
            _remove(j)
        self.entries.clear()
        self._made.clear()


def _where(e: _Entry) -> str:
    if e.ino is not None and _ino(e.dest) == e.ino:
        return "new version in place"
    if os.path.lexists(e.staged):
        return f"new version in {e.staged}" + (f", old one in {e.old}" if os.path.lexists(e.old) else "")
    return "unchanged"


def _key(p: Path) -> Path:
    return Path(os.path.abspath(Path(p).expanduser()))


def _flags_text(flags: dict[str, str]) -> str:
    return f" ({', '.join(flags)})" if flags else ""


def atomic_outputs(dirs: Iterable[str | os.PathLike | None] = (), files: Iterable[str | os.PathLike | None] = (),
                   overwrite: bool = False) -> AtomicOutputs:
    """Check ``dirs`` (folders) and ``files`` now; ``with`` the result around the code that writes them.

    ``None`` and ``"-"`` (stdout) entries are skipped, so a verb passes its options as they are::

        outputs = atomic_outputs(dirs=[args.out, args.merge], files=[args.json], overwrite=args.overwrite)
        ...  # the work
        with outputs:
            save(model, args.out)
            export_dense(model, args.merge)
            write_json(data, args.json)
    """
    return AtomicOutputs(dirs, files, overwrite)


# -- single outputs (part of a group when one is active) --------------------------------------------
@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file beside ``path``; on success rename it onto ``path``."""
    p = check_writable(path)
    group = _ACTIVE.get()
    if group is not None and group.owns(p):
        with group.stage_file(p, mode, encoding) as fh:
            yield fh
        return
    with AtomicOutputs(files=[p], overwrite=True) as own, own.stage_file(p, mode, encoding) as fh:
        yield fh


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; put it in place as ``path`` when the block succeeds.

    Refuses (one-line error) when ``path`` exists and ``overwrite`` is false. On
    any exception, including KeyboardInterrupt, the temporary folder is removed
    and ``path`` is left exactly as it was. Inside an :func:`atomic_outputs`
    block that names ``path``, the folder is committed with the group's others.
    """
    p = check_writable(path, is_dir=True)
    if p.exists() and not overwrite:
        raise RankwiseError(f"output folder {p} already exists; pass --overwrite (overwrite=True) or another --out.")
    group = _ACTIVE.get()
    if group is not None and group.owns(p):
        with group.stage_dir(p) as tmp:
            yield tmp
        return
    with AtomicOutputs(dirs=[p], overwrite=True) as own, own.stage_dir(p) as tmp:
        yield tmp
