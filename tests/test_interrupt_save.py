"""Interruption at every step of a save: the old or the new output is in place, never neither, never a mix.

A child process writes two folders and one file as one group (``atomic_outputs``) and is killed
(SIGKILL, or SIGTERM turned into KeyboardInterrupt as the CLI does) at each named step of the
commit (test hook ``RANKWISE_TEST_KILL_AT``), with the exchange rename and with the two-rename
fallback, writing fresh outputs and overwriting old ones. The child imports only
``rankwise.errors`` and ``rankwise.io.atomic`` (no torch), so each run costs ~0.1 s.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import rankwise.io.atomic as atomic
from rankwise.errors import RankwiseError
from rankwise.io.atomic import atomic_dir, atomic_file, atomic_outputs, recover

SRC = str(Path(atomic.__file__).resolve().parents[2])

CHILD = r"""
import os, signal, sys, types
src, root, label, overwrite = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
for name, sub in (("rankwise", ""), ("rankwise.io", "io")):  # skip the packages' heavy __init__
    m = types.ModuleType(name)
    m.__path__ = [os.path.join(src, "rankwise", sub)]
    sys.modules[name] = m
from rankwise.io.atomic import atomic_dir, atomic_file, atomic_outputs

def term(*_):
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, term)
a, b, j = os.path.join(root, "a"), os.path.join(root, "sub", "b"), os.path.join(root, "r.json")
outs = atomic_outputs(dirs=[a, b], files=[j], overwrite=overwrite)
try:
    with outs:
        for d in (a, b):
            with atomic_dir(d, overwrite=overwrite) as tmp:
                (open(os.path.join(tmp, "v.txt"), "w")).write(label)
                os.mkdir(os.path.join(tmp, "inner"))
        with atomic_file(j) as fh:
            fh.write(label)
except KeyboardInterrupt:
    sys.exit(130)
"""

STEPS = ["staged", "journal", "aside:0", "aside:1", "aside:2", "swapped:0", "swapped:1", "swapped:2", "cleaned"]


def _start(root: Path, label: str, overwrite: bool, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-S", "-c", CHILD, SRC, str(root), label, "1" if overwrite else "0"],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _versions(root: Path) -> list[str | None]:
    a, b, j = root / "a" / "v.txt", root / "sub" / "b" / "v.txt", root / "r.json"
    return [p.read_text() if p.is_file() else None for p in (a, b, j)]


def _leftovers(root: Path) -> list[str]:
    return sorted(n for d in (root, root / "sub") if d.is_dir() for n in os.listdir(d) if n.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "fresh"])
@pytest.mark.parametrize("sig", ["KILL", "TERM"])
def test_kill_at_every_step_leaves_old_or_new(tmp_path, exchange, overwrite, sig):
    if sig == "TERM" and not overwrite:
        pytest.skip("covered by the overwrite case (a superset of the steps)")
    env = {"RANKWISE_TEST_KILL_SIGNAL": sig}
    if not exchange:
        env["RANKWISE_NO_EXCHANGE"] = "1"
    procs = {}
    for step in STEPS:  # the children run side by side: each is tiny, the cost is interpreter start-up
        root = tmp_path / f"{step.replace(':', '_')}"
        root.mkdir()
        if overwrite:
            for d in (root / "a", root / "sub" / "b"):
                (d / "inner").mkdir(parents=True)
                (d / "v.txt").write_text("old")
            (root / "r.json").write_text("old")
        procs[step] = _start(root, "new", overwrite, {**env, "RANKWISE_TEST_KILL_AT": step})
    for step in STEPS:
        root = tmp_path / f"{step.replace(':', '_')}"
        rc = procs[step].wait(timeout=120)
        before = "old" if overwrite else None
        now = _versions(root)
        hit = rc != 0
        if step.startswith("aside") and (exchange or not overwrite):
            assert not hit, step  # that step does not exist on this path
        if not hit:
            assert now == ["new"] * 3 and _leftovers(root) == []
            continue
        assert rc == (-9 if sig == "KILL" else 130), (step, rc)
        if sig == "TERM":  # clean-up ran in the process itself: all old before the journal, all new after
            expect = before if step == "staged" else "new"
            assert now == [expect] * 3, (step, now)
            assert _leftovers(root) == [], (step, _leftovers(root))
            continue
        # SIGKILL: each destination holds a complete old or new version, except the one output the
        # two-rename fallback had moved aside (the next run puts it back: recover below)
        for i, v in enumerate(now):
            if not (step == f"aside:{i}" and not exchange):
                assert v in (before, "new"), (step, i, now)
        actions = recover(root) + recover(root / "sub")
        after = _versions(root)
        expect = before if step == "staged" else "new"
        assert after == [expect] * 3, (step, after, actions)
        assert _leftovers(root) == [], (step, _leftovers(root))


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.rw{pid}-0123abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".out.rw{os.getpid()}-89abcdef.tmp"
    live.mkdir()
    foreign = tmp_path / ".out.k2j3h4.tmp"  # not ours (no PID): never touched
    foreign.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("1")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert (tmp_path / "out" / "f").read_text() == "1"


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f.txt").write_text("x")
        with atomic_file(tmp_path / "r.json") as fh:
            fh.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "f.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644


def test_group_checks_before_work_and_error_leaves_everything(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("mine")
    with pytest.raises(RankwiseError, match="already exists"):
        atomic_outputs(dirs=[tmp_path / "a"], files=[tmp_path / "r.json"])
    with pytest.raises(RankwiseError, match="two outputs"):
        atomic_outputs(dirs=[tmp_path / "x", tmp_path / "y" / ".." / "x"])
    (tmp_path / "f").write_text("")
    with pytest.raises(RankwiseError, match="a file of that name exists"):
        atomic_outputs(dirs=[tmp_path / "f"])
    outs = atomic_outputs(dirs=[tmp_path / "a", tmp_path / "new" / "deep" / "b"], files=[tmp_path / "r.json", "-"],
                          overwrite=True)
    with pytest.raises(RuntimeError, match="boom"), outs:
        with atomic_dir(tmp_path / "a", overwrite=True) as tmp:
            (tmp / "x").write_text("new")
        with atomic_dir(tmp_path / "new" / "deep" / "b") as tmp:
            (tmp / "x").write_text("new")
        raise RuntimeError("boom")
    assert (tmp_path / "a" / "keep").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["a", "f"]  # parents it created are gone too


def test_group_commits_all_together(tmp_path):
    outs = atomic_outputs(dirs=[tmp_path / "a", tmp_path / "b"], files=[tmp_path / "r.json"])
    with outs:
        with atomic_dir(tmp_path / "a") as tmp:
            (tmp / "x").write_text("1")
        assert not (tmp_path / "a").exists()  # staged, not yet committed
        with atomic_dir(tmp_path / "b") as tmp:
            (tmp / "x").write_text("2")
        with atomic_file(tmp_path / "r.json") as fh:
            json.dump({"ok": 1}, fh)
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    assert (tmp_path / "a" / "x").read_text() == "1" and (tmp_path / "b" / "x").read_text() == "2"
    assert json.loads((tmp_path / "r.json").read_text()) == {"ok": 1}
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "r.json"]


def test_failed_swap_says_where_each_version_is(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "v").write_text("old")
    monkeypatch.setenv("RANKWISE_NO_EXCHANGE", "1")
    real = os.rename

    def flaky(src, dst):
        if str(src).endswith(".tmp") and Path(dst).name == "a":
            raise OSError(13, "Permission denied", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky)
    with pytest.raises(RankwiseError) as info, atomic_dir(tmp_path / "a", overwrite=True) as tmp:
        (tmp / "v").write_text("new")
    msg = str(info.value)
    assert "\n" not in msg and "new version in" in msg and "journal" in msg
    monkeypatch.setattr(atomic.os, "rename", real)
    recover(tmp_path)  # the next run finishes the job
    assert (tmp_path / "a" / "v").read_text() == "new"
    assert os.listdir(tmp_path) == ["a"]


@pytest.mark.parametrize("step", ["swapped:1"])  # a subprocess of the real CLI costs seconds: the mid-commit kill
def test_cli_compress_killed_during_save_keeps_all_old_or_all_new(step, tmp_path):
    """The real CLI with three outputs, SIGKILLed during its commit; the next run's recovery settles all three."""
    import fuzz_fixtures as fx

    fixtures = fx.build_base(tmp_path / "fx")
    out, dense, js = tmp_path / "w" / "c", tmp_path / "w" / "d", tmp_path / "w" / "r.json"
    for d in (out, dense):
        d.mkdir(parents=True)
        (d / "old.txt").write_text("old")
    js.write_text('"old"')
    argv = [sys.executable, "-m", "rankwise", "compress", str(fixtures["dense"]), "--method", "svd", "--alloc",
            "uniform", "--calib", str(fixtures["text"]), "--calib-samples", "2", "--seq-len", "16", "--quiet",
            "--out", str(out), "--export-dense", str(dense), "--json", str(js), "--overwrite"]
    env = {**os.environ, "RANKWISE_TEST_KILL_AT": step, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    recover(tmp_path / "w")
    names = sorted(os.listdir(tmp_path / "w"))
    assert names == ["c", "d", "r.json"], names
    if step == "staged":
        assert (out / "old.txt").exists() and (dense / "old.txt").exists() and js.read_text() == '"old"'
    else:
        import rankwise

        assert not (out / "old.txt").exists() and not (dense / "old.txt").exists()
        assert json.loads(js.read_text())["out"] == str(out)
        rankwise.load(out)  # the new checkpoint is complete


def test_saved_checkpoint_follows_the_umask(tmp_path):
    """J.4: a real rankwise.save output (folder, tensors, JSON, tokenizer) has 0755/0644 under umask 022."""
    import fuzz_fixtures as fx
    import rankwise

    old = os.umask(0o022)
    try:
        rankwise.save(fx.tiny_llama(), tmp_path / "ckpt", tokenizer=fx.tokenizer())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ckpt").st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in modes and "rankwise.json" in modes
    assert set(modes.values()) == {0o644}, modes
