"""TrainRunConfig: validates itself (Python API) and is the one source of `rankwise train`'s defaults."""

from __future__ import annotations

import dataclasses

import pytest

from rankwise.cli.main import build_parser
from rankwise.errors import RankwiseError
from rankwise.train.config import CALLBACKS, OPTIMIZERS, PROJECTIONS, TrainRunConfig


@pytest.mark.parametrize(("kw", "message"), [
    ({"steps": 0}, "--steps must be at least 1, got 0."),
    ({"steps": 1.5}, "steps (--steps) must be a whole number, got 1.5."),
    ({"steps": 3, "optimizer": "sgd"}, "unknown optimizer 'sgd'; choose one of adamw, galore, galore-dct, fira."),
    ({"steps": 3, "projection": "qr"}, "unknown projection 'qr'"),
    ({"steps": 3, "callback": "prune"}, "unknown callback 'prune'"),
    ({"steps": 3, "rank": 0}, "rank must be a positive integer"),
    ({"steps": 3, "lr": float("nan")}, "lr (--lr) must be a finite number"),
    ({"steps": 3, "lr": -1e-3}, "--lr must be positive"),
    ({"steps": 3, "batch_size": 0}, "--batch-size must be at least 1, got 0."),
    ({"steps": 3, "trp_energy": 1.5}, "--trp-energy must lie in (0, 1]"),
    ({"steps": 3, "fsdp": True, "callback": "trp"}, "--callback trp takes SVDs of whole weight matrices"),
])
def test_config_refuses_bad_values_in_one_line(kw, message):
    with pytest.raises(RankwiseError) as err:
        TrainRunConfig(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_adamw_ignores_the_projection_rank():
    cfg = TrainRunConfig(steps=2, optimizer="adamw", rank=0)  # rank only matters to the low-rank optimisers
    assert cfg.resolved_projection is None
    assert TrainRunConfig(steps=2, optimizer="galore-dct").resolved_projection == "dct"
    assert TrainRunConfig(steps=2).learning_rate == 1e-4
    assert TrainRunConfig(steps=2, from_scratch=True).learning_rate == 1e-3


def test_cli_defaults_are_the_dataclass_defaults_and_choices_come_from_the_registries():
    parser = build_parser("train")
    args = parser.parse_args(["train", "--steps", "7", "--out", "x"])
    for f in dataclasses.fields(TrainRunConfig):
        if f.name == "steps":
            assert args.steps == 7
            continue
        assert getattr(args, f.name) == f.default, f.name
    sub = parser._subparsers._group_actions[0].choices["train"]
    choices = {a.dest: a.choices for a in sub._actions}
    assert tuple(choices["optimizer"]) == OPTIMIZERS.names() == ("adamw", "galore", "galore-dct", "fira")
    assert tuple(choices["callback"]) == CALLBACKS.names() == ("trp", "cuttlefish")
    assert tuple(choices["projection"]) == PROJECTIONS.names() == ("svd", "randomized", "dct")
