"""Import cost and the central CLI switches: no torch for `import rankwise` / `rankwise --help`, --quiet everywhere."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import rankwise
from rankwise.cli import main as cli_main
from rankwise.progress import progress, quiet, set_quiet

SRC = Path(rankwise.__file__).resolve().parent
HEAVY = ("torch", "transformers", "numpy", "peft")  # safetensors (a Rust extension, ~1 ms) is fine


def _run(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_rankwise_imports_no_torch():
    loaded = _run(f"import sys, rankwise; print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded == ""


def test_engine_and_config_modules_import_no_torch():
    code = ("import sys, rankwise.engine, rankwise.engine.device, rankwise.config, rankwise.registry\n"
            "import rankwise.progress\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert _run(code) == ""


def test_top_level_help_imports_no_torch():
    code = (
        "import sys\nfrom rankwise.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        f"print('LOADED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert _run(code).splitlines()[-1] == "LOADED="


def test_importtime_of_python_m_rankwise_help_lists_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "rankwise", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "VERB" in out.stdout
    modules = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "rankwise" in modules  # the probe did record imports
    assert not modules & set(HEAVY), modules & set(HEAVY)


def _defines(module: str, name: str) -> bool:
    """Whether ``module``'s source defines or imports ``name`` at top level (found without importing it)."""
    base = SRC.joinpath(*module.split(".")[1:])
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    assert path.is_file(), module
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and name in {(a.asname or a.name) for a in node.names}:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def test_every_public_name_resolves_lazily():
    # every lazy entry names a module that defines it (read from source: importing them all takes long)
    for module, attr in rankwise._LAZY.values():
        assert attr is None or _defines(module, attr), f"{module} does not define {attr}"
    assert set(rankwise.__all__) <= set(dir(rankwise))
    # and resolution really works: a torch-free name and a torch one
    assert rankwise.load_text.__module__ == "rankwise.io.texts"
    assert callable(rankwise.save) and rankwise.save is rankwise.__dict__["save"]  # cached after first access
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rankwise.nope  # noqa: B018


@pytest.mark.parametrize("verb", sorted(cli_main.VERBS))
def test_every_verb_has_exactly_one_quiet(verb):
    parser = cli_main.build_parser(verb)
    sub = next(a for a in parser._actions if a.dest == "verb").choices[verb]
    quiet_actions = [a for a in sub._actions if a.dest == "quiet"]
    assert len(quiet_actions) == 1 and quiet_actions[0].option_strings == ["--quiet"]
    assert quiet_actions[0].default is False and quiet_actions[0].nargs == 0  # a plain on/off flag


def test_quiet_flag_silences_bars_and_console_for_the_run_only(monkeypatch):
    from rankwise.cli.common import console

    seen = {}
    mod = types.ModuleType("rankwise_probe_verb")
    mod.add_arguments = lambda p: None

    def run(args):
        seen.update(env=os.environ.get("TQDM_DISABLE"), quiet=quiet(), console=console.quiet,
                    bar_disabled=progress(3, desc="x").disable)
        return 0

    mod.run = run
    monkeypatch.setitem(sys.modules, "rankwise_probe_verb", mod)
    monkeypatch.setitem(cli_main.VERBS, "probe", ("rankwise_probe_verb", "test verb"))
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert cli_main.main(["probe", "--quiet"]) == 0
    assert seen == {"env": "1", "quiet": True, "console": True, "bar_disabled": True}
    assert "TQDM_DISABLE" not in os.environ and console.quiet is False  # restored after the run
    assert cli_main.main(["probe"]) == 0
    assert seen == {"env": None, "quiet": False, "console": False, "bar_disabled": False}


def test_progress_honours_tqdm_disable_and_enabled(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert list(progress(range(4), desc="t")) == [0, 1, 2, 3]
    assert progress([1], enabled=False).disable is True
    bar = progress(7, desc="manual", unit="step")
    assert bar.total == 7 and bar.disable is False
    bar.close()
    for value, off in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert quiet() is off
        with progress(2) as b:
            assert b.disable is off
    monkeypatch.delenv("TQDM_DISABLE")
    set_quiet(True)
    try:
        assert os.environ["TQDM_DISABLE"] == "1" and quiet()
    finally:
        set_quiet(False)
    assert not quiet() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
