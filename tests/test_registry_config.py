"""registry.Registry and config.add_config_arguments / config_from_args: one name list, one default, strict numbers."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from dataclasses import dataclass, field

import pytest

from rankwise.cli import main as cli_main
from rankwise.config import (
    add_config_arguments,
    check_config_type,
    check_int,
    config_from_args,
    finite_float,
    positive_int,
    whole_int,
)
from rankwise.errors import RankwiseError
from rankwise.registry import Registry

# ---------------------------------------------------------------- Registry


def test_register_get_names_and_decorator():
    reg: Registry[object] = Registry("method")
    reg.register("a", 1)

    @reg.register("b")
    def b():
        return 2

    assert reg.get("a") == 1 and reg.get("b") is b
    assert reg.names() == ("a", "b") and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg
    assert reg.check("b") == "b"
    with pytest.raises(RankwiseError, match=r"^unknown method 'c'; choose one of a, b\.$"):
        reg.get("c")


def test_builtin_names_listed_without_running_the_loader_which_runs_once_on_lookup():
    calls = []
    reg: Registry[str] = Registry("allocation", loader=lambda: calls.append(1) or reg.register("uniform", "U"),
                                  builtin=("uniform", "global"))
    assert reg.names() == ("uniform", "global") and "global" in reg
    assert calls == []  # listing choices (the CLI's --help) imports nothing
    assert reg.get("uniform") == "U" and reg.get("uniform") == "U"
    assert calls == [1]
    with pytest.raises(LookupError, match="listed as built in but was never registered") as info:
        reg.get("global")
    assert not isinstance(info.value, RankwiseError)  # a bug in rankwise, not a user error
    reg.register("extra", "E")  # user entries come after the built-ins
    assert reg.names() == ("uniform", "global", "extra")


def test_loader_without_builtin_runs_on_names():
    reg: Registry[int] = Registry("optimizer", loader=lambda: reg.register("adam", 1))
    assert reg.names() == ("adam",)


# ---------------------------------------------------------------- config → argparse

KINDS: Registry[str] = Registry("kind", builtin=("svd", "whiten"))


@dataclass
class ToyConfig:
    ratio: float = field(default=0.2, metadata={"help": "fraction removed"})
    steps: int = field(default=10, metadata={"help": "steps"})
    limit: int | None = field(default=None, metadata={"help": "optional cap"})
    kind: str = field(default="whiten", metadata={"help": "method", "choices": KINDS.names})
    sequential: bool = field(default=True, metadata={"help": "block by block"})
    seed_text: str = field(default="ptb", metadata={"cli": "--calib", "metavar": "TEXT"})
    hidden: int = field(default=3, metadata={"cli": False})
    tags: tuple = field(default_factory=tuple, metadata={"cli": False})

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise RankwiseError(f"ratio must lie in (0, 1), got {self.ratio}.")
        if self.steps < 1:
            raise RankwiseError(f"--steps must be at least 1, got {self.steps}.")


def _parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    add_config_arguments(p, ToyConfig, **kw)
    return p


def test_defaults_come_from_the_dataclass_once():
    args = _parser().parse_args([])
    assert config_from_args(ToyConfig, args) == ToyConfig()
    helps = {a.dest: a.help for a in _parser()._actions}
    assert helps["ratio"] == "fraction removed (default 0.2)"
    assert helps["sequential"].endswith("(default on)")
    assert helps["limit"] == "optional cap"  # None default: nothing appended
    assert "hidden" not in helps and "tags" not in helps  # cli=False stays off the command line
    assert config_from_args(ToyConfig, _parser().parse_args([]), hidden=7).hidden == 7  # extra fields


def test_options_parse_types_bools_renames_and_choices():
    args = _parser().parse_args(["--ratio", "0.5", "--steps", "4", "--limit", "9", "--kind", "svd",
                                 "--no-sequential", "--calib", "bbc"])
    cfg = config_from_args(ToyConfig, args)
    assert cfg == ToyConfig(ratio=0.5, steps=4, limit=9, kind="svd", sequential=False, seed_text="bbc")
    assert isinstance(cfg.ratio, float) and isinstance(cfg.steps, int)
    assert config_from_args(ToyConfig, _parser().parse_args(["--sequential"])).sequential is True
    kind = next(a for a in _parser()._actions if a.dest == "kind")
    assert kind.choices == ("svd", "whiten")  # fed by the registry, names typed once
    calib = next(a for a in _parser()._actions if a.dest == "seed_text")
    assert calib.option_strings == ["--calib"] and calib.metavar == "TEXT"


def test_defaults_override_for_one_command_line_only():
    p = _parser(defaults={"steps": 99}, skip=("limit",))
    assert config_from_args(ToyConfig, p.parse_args([])).steps == 99
    assert "limit" not in {a.dest for a in p._actions}
    assert ToyConfig().steps == 10


@pytest.mark.parametrize("value, message", [
    ("nan", "--x must be a finite number, got 'nan'."),
    ("inf", "--x must be a finite number, got 'inf'."),
    ("-Infinity", "--x must be a finite number, got '-Infinity'."),
    ("abc", "--x must be a number, got 'abc'."),
])
def test_finite_float_rejects(value, message):
    with pytest.raises(RankwiseError) as info:
        finite_float("--x")(value)
    assert str(info.value) == message


def test_finite_float_accepts():
    assert finite_float("--x")("1e-3") == 1e-3 and finite_float("--x")("-2") == -2.0


@pytest.mark.parametrize("value, message", [
    ("1.5", "--n must be a whole number, got '1.5'."),
    ("1e3", "--n must be a whole number, got '1e3'."),
    (str(2**63), f"--n must fit in 64 bits, got '{2**63}'."),
    (str(-(2**63) - 1), f"--n must fit in 64 bits, got '{-(2**63) - 1}'."),
])
def test_whole_int_rejects(value, message):
    with pytest.raises(RankwiseError) as info:
        whole_int("--n")(value)
    assert str(info.value) == message


def test_whole_int_accepts_the_64_bit_range():
    assert whole_int("--n")(str(2**63 - 1)) == 2**63 - 1 and whole_int("--n")("-7") == -7


def test_check_int_serves_argparse_and_post_init_alike():
    assert check_int(5, "--n") == 5 and check_int(" 7 ", "--n") == 7 and check_int("-3", "--n") == -3
    assert positive_int("--n")("1") == 1 and positive_int("--n")(2**63 - 1) == 2**63 - 1
    for bad, message in ((True, "--n must be a whole number, got True."), (2.0, "--n must be a whole number, got 2.0."),
                         (None, "--n must be a whole number, got None."),
                         (2**63, f"--n must fit in 64 bits, got {2**63}."),
                         (0, "--n must be at least 1, got 0."), ("-2", "--n must be at least 1, got -2.")):
        with pytest.raises(RankwiseError) as info:
            positive_int("--n")(bad)
        assert str(info.value) == message


def test_check_config_type():
    assert check_config_type(None, ToyConfig, "toy") == ToyConfig()
    cfg = ToyConfig(steps=2)
    assert check_config_type(cfg, ToyConfig, "toy") is cfg
    with pytest.raises(RankwiseError, match=r"^toy takes a ToyConfig, got dict; build one with rankwise\.ToyConfig"):
        check_config_type({"steps": 2}, ToyConfig, "toy")


# ---------------------------------------------------------------- through the real CLI entry point


@pytest.fixture
def toy_verb(monkeypatch):
    """A verb whose options come from ToyConfig, run through rankwise.cli.main.main."""
    built = {}
    mod = types.ModuleType("rankwise_toy_verb")
    mod.add_arguments = lambda p: add_config_arguments(p, ToyConfig)
    mod.run = lambda args: built.setdefault("cfg", config_from_args(ToyConfig, args)) and 0
    monkeypatch.setitem(sys.modules, "rankwise_toy_verb", mod)
    monkeypatch.setitem(cli_main.VERBS, "toy", ("rankwise_toy_verb", "toy verb"))
    return built


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "nan"], "--ratio must be a finite number, got 'nan'."),
    (["--steps", "1.5"], "--steps must be a whole number, got '1.5'."),
    (["--steps", "0"], "--steps must be at least 1, got 0."),  # the dataclass's own check
    (["--ratio", "1.5"], "ratio must lie in (0, 1), got 1.5."),
])
def test_cli_errors_are_one_line_exit_2(toy_verb, capsys, argv, message):
    assert cli_main.main(["toy", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"rankwise toy: error: {message}"
    assert "cfg" not in toy_verb


def test_cli_builds_the_config(toy_verb):
    assert cli_main.main(["toy", "--steps", "3", "--no-sequential"]) == 0
    assert toy_verb["cfg"] == dataclasses.replace(ToyConfig(), steps=3, sequential=False)
