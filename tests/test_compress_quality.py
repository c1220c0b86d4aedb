"""bench/compress_quality.py: the grid it builds, the dense numbers it reuses and the goals it marks.

The measurements themselves run in the bench queue; these tests pin the bookkeeping that decides which
rows run, on which splits, and whether a goal is met (a wrong flag here would misreport the tables).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def cq():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("compress_quality", BENCH / "compress_quality.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def args(cq, *argv):
    return cq.build_parser().parse_args(list(argv))


def test_reduced_grid_order_and_skip(cq):
    a = args(cq, "--rows", "svd-llm,today,new", "--ratios", "0.2,0.4,0.1", "--skip", "new@0.4")
    grid, notes = cq.build_grid(a)
    assert [(g["tag"], g["config"]["ratio"]) for g in grid] == [
        ("svd-llm", 0.2), ("today", 0.2), ("new", 0.2), ("svd-llm", 0.4), ("today", 0.4),
        ("svd-llm", 0.1), ("new", 0.1)]  # today is not a full-ratio row; new@0.4 skipped
    assert notes == []
    with pytest.raises(SystemExit, match="TAG@RATIO"):
        cq.build_grid(args(cq, "--skip", "new"))


def test_refine_row_builds_on_the_new_default(cq):
    a = args(cq, "--rows", "new+refine", "--ratios", "0.4", "--refine-steps", "7", "--refine-lr", "1e-4",
             "--new-default", "calib=ptb")
    (row,), _ = cq.build_grid(a)
    # refinement adapts factors: the row pins whiten (method="auto" would run MoDeGPT on a Llama layout)
    assert row["config"] == {"calib": "ptb", "method": "whiten", "refine_steps": 7, "refine_lr": 1e-4, "ratio": 0.4}
    cfg = cq.CompressConfig(**row["config"])
    assert cfg.method == "whiten" and cfg.refine_steps == 7


def test_dense_from_refuses_another_protocol(cq, tmp_path):
    a = args(cq, "--split", "valid,test", "--tokens", "4096")
    good = {"model": a.model, "protocol": cq.protocol(a), "dense": {"valid": {"ptb": 1.0}, "test": {"ptb": 2.0}}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(good))
    a.dense_from = str(path)
    assert cq.dense_from(a, ["test"]) == {"test": {"ptb": 2.0}}
    a.tokens = 2048  # another evaluation protocol: its dense numbers do not apply
    with pytest.raises(SystemExit, match="differ"):
        cq.dense_from(a, ["test"])
    a.tokens = 4096
    path.write_text(json.dumps({**good, "dense": {"test": {"ptb": 2.0}}}))
    with pytest.raises(SystemExit, match="valid split"):
        cq.dense_from(a, ["valid", "test"])


def test_goals_marked_per_split_for_test_only_rows(cq):
    dense = {"valid": {"ptb": 10.0, "bbc": 10.0}, "test": {"ptb": 10.0, "bbc": 10.0}}
    rows = [  # goal at rho 0.2: PTB <= 1.25x, BBC <= 1.6x
        {"tag": "svd-llm", "ratio": 0.2, "ppl": {"test": {"ptb": 20.0, "bbc": 30.0}}, "cached": False},
        {"tag": "new", "ratio": 0.2, "cached": False,
         "ppl": {"valid": {"ptb": 12.5, "bbc": 16.1}, "test": {"ptb": 12.0, "bbc": 15.0}}},
        {"tag": "+healing", "ratio": 0.2, "heal_steps": 5, "cached": False,
         "ppl": {"test": {"ptb": 11.0, "bbc": 11.0}}},
    ]
    data = {"dense": dense, "rows": rows}
    cq.annotate(data)
    svd, new, healed = rows
    assert svd["goal"] == {"test": {"ptb": False, "bbc": False}}
    assert new["goal"] == {"valid": {"ptb": True, "bbc": False}, "test": {"ptb": True, "bbc": True}}
    assert new["x_svd_llm"] == {"test": {"ptb": 0.6, "bbc": 0.5}}  # only on the split both rows have
    assert "goal" not in healed  # trained rows are reported apart
