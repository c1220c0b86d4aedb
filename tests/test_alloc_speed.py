"""The speed guard: allocators never factorise a matrix at a rank slower than its dense layer.

A synthetic cost model (no timing) gives the speed break-even ranks in closed form; each
allocator, guarded, must keep every factorised matrix at or below them, still meet the budget,
and, with the guard off (or limits that do not bind), give exactly today's allocation.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from rankwise.compression.allocation import allocate, max_ratio
from rankwise.compression.allocation.speed import guarded_allocate
from rankwise.compression.api import CompressConfig, compress
from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError
from rankwise.evaluation.cost_model import LayerCostModel, slow_layers, speed_max_ranks
from rankwise.surgery.lowrank import LowRankLinear
from tiny_models import tiny_llama_config, write_tiny_llama

SHAPES = [(96, 96), (32, 96), (256, 96), (96, 256), (96, 96), (32, 96)]
# factorised matmuls at 0.8–0.9 of the dense rate plus a per-call overhead: slower than dense above ~0.7–0.9 ×
# break-even, like the measured CPU (docs/eval.md)
COST = {
    1: LayerCostModel(tokens=1, overhead_s=5e-8, mac_rate=1e10, efficiency=0.8),
    512: LayerCostModel(tokens=512, overhead_s=1e-6, mac_rate=1e11, efficiency=0.9),
}


def _energies(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (m, n) in enumerate(SHAPES):  # slow spectral decay: the unguarded allocators pick high ranks
        p = min(m, n)
        decay = torch.linspace(0, 0.5 + 0.3 * i, p, dtype=torch.float64)
        out.append(torch.exp(-decay) * (1 + 0.01 * torch.rand(p, generator=g, dtype=torch.float64)))
    return out


def _slower(ranks, tokens=(1, 512)) -> list[int]:
    """Indices of factorised matrices slower than dense at some token count, from the cost model itself."""
    bad = []
    for j, ((m, n), k) in enumerate(zip(SHAPES, ranks)):
        if k is not None and any(COST[t].factorised_s(m, n, k) > COST[t].dense_s(m, n) for t in tokens):
            bad.append(j)
    return bad


def test_speed_limits_are_the_cost_model_crossing():
    limits = speed_max_ranks(SHAPES, (1, 512), COST)
    for (m, n), k in zip(SHAPES, limits):
        assert 0 < k < break_even_rank(m, n) - 1  # the speed limit binds below the parameter one here
        for t in (1, 512):
            assert COST[t].factorised_s(m, n, k) <= COST[t].dense_s(m, n)
        assert any(COST[t].factorised_s(m, n, k + 1) > COST[t].dense_s(m, n) for t in (1, 512))
    assert speed_max_ranks(SHAPES, 512, COST) >= limits  # prefill alone is the looser limit


@pytest.mark.parametrize("alloc", ["uniform", "energy", "welore", "global"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_guarded_allocation_is_never_slower_than_dense(alloc, ratio):
    en = _energies()
    plain = allocate(alloc, SHAPES, ratio, energies=en)
    off = guarded_allocate(alloc, SHAPES, ratio, en, guard="off", cost=COST)
    assert off.ranks == plain.ranks and off.achieved_ratio == plain.achieved_ratio  # off = today
    assert off.info["slower_than_dense"] == len(_slower(off.ranks)) and not off.info["speed_guard_applied"]
    guarded = guarded_allocate(alloc, SHAPES, ratio, en, guard="strict", cost=COST)
    assert _slower(guarded.ranks) == []
    assert guarded.info["speed_guard_applied"] and guarded.info["slower_than_dense"] == 0
    assert guarded.info["limited"] == len(SHAPES)
    total = sum(m * n for m, n in SHAPES)
    step = max(m + n for m, n in SHAPES) / total
    if alloc == "uniform":  # capped matrices go dense while the budget allows: within one matrix of the ratio
        assert ratio - 1e-12 <= guarded.achieved_ratio
        assert all(guarded.achieved_ratio - (m * n - k * (m + n)) / total < ratio
                   for (m, n), k in zip(SHAPES, guarded.ranks) if k is not None)
    else:  # a matrix at its limit turns dense in one jump: the budget is met within the largest such jump
        limits = speed_max_ranks(SHAPES, (1, 512), COST)
        jump = max(m * n - k * (m + n) for (m, n), k in zip(SHAPES, limits)) / total
        assert ratio - 1e-12 <= guarded.achieved_ratio <= ratio + max(step, jump) + 1e-12
    assert math.isclose(guarded.achieved_ratio, 1 - sum(
        m * n if k is None else k * (m + n) for (m, n), k in zip(SHAPES, guarded.ranks)) / sum(
        m * n for m, n in SHAPES))  # reported truthfully


def test_the_guard_binds_somewhere_in_the_grid():
    # the test above could not fail if the unguarded allocations were all fast already
    en = _energies()
    slow = {a: len(_slower(allocate(a, SHAPES, 0.1, energies=en).ranks)) for a in ("uniform", "energy", "global")}
    assert all(v > 0 for v in slow.values()), slow


def test_limits_that_do_not_bind_change_nothing():
    en = _energies()
    free = [break_even_rank(m, n) - 1 for m, n in SHAPES]
    for alloc in ("uniform", "energy", "welore", "global"):
        for ratio in (0.1, 0.4):
            a = allocate(alloc, SHAPES, ratio, energies=en)
            b = allocate(alloc, SHAPES, ratio, energies=en, max_ranks=free)
            assert a.ranks == b.ranks and b.info["limited"] == 0


def test_uniform_caps_and_respreads_the_budget():
    shapes = [(96, 96)] * 3  # break-even 48, uniform rank at ρ = 0.2: 38
    a = allocate("uniform", shapes, 0.2, max_ranks=[30, 47, 47])
    # the capped matrix keeps 30; the others take the freed budget: (30 + 2k)·192 ≤ 0.8·3·96² → k = 42
    assert a.ranks == [30, 42, 42] and 0.2 <= a.achieved_ratio < 0.2 + 2 * 192 / (3 * 96 * 96)  # 2 rank steps
    b = allocate("uniform", shapes, 0.2, max_ranks=[0, 47, 47])  # limit 0: kept dense, the others pay for it
    assert b.ranks[0] is None and b.ranks[1] == b.ranks[2] < 38 and b.achieved_ratio >= 0.2
    c = allocate("uniform", [(96, 96), (96, 96), (256, 96)], 0.1, max_ranks=[20, 20, 69])
    # capping the two square matrices at 20 removes far more than 0.1: one goes back to dense
    assert c.ranks.count(None) == 1 and c.achieved_ratio >= 0.1


def test_auto_falls_back_with_a_warning_and_strict_errors():
    shapes = [(64, 64), (64, 64)]
    limits_cost = {1: LayerCostModel(tokens=1, overhead_s=1e-3, mac_rate=1e10, efficiency=0.5)}  # never faster
    assert speed_max_ranks(shapes, 1, limits_cost) == [0, 0]
    with pytest.warns(UserWarning, match="speed guard not applied"):
        a = guarded_allocate("uniform", shapes, 0.3, guard="auto", tokens=1, cost=limits_cost)
    assert a.ranks == allocate("uniform", shapes, 0.3).ranks and not a.info["speed_guard_applied"]
    assert a.info["slower_than_dense"] == 2
    with pytest.raises(RankwiseError, match="slower than dense.*--speed-guard off"):
        guarded_allocate("uniform", shapes, 0.3, guard="strict", tokens=1, cost=limits_cost)
    with pytest.raises(RankwiseError, match="cannot be reached"):  # unreachable anyway: the plain error
        guarded_allocate("uniform", shapes, min(0.99, max_ratio(shapes) + 0.01), guard="auto", cost=limits_cost)


def test_config_errors_are_one_line(tmp_path):
    for kw, match in (({"speed_guard": "sometimes"}, "speed_guard must be one of"),
                      ({"speed_tokens": "1,zero"}, "tokens per call"),
                      ({"speed_tokens": "0"}, "tokens per call"),
                      ({"speed_cost": str(tmp_path / "none.json")}, "cost model file")):
        with pytest.raises(RankwiseError, match=match) as e:
            CompressConfig(**kw)
        assert "\n" not in str(e.value)


def test_compress_keeps_no_layer_slower_than_dense(tmp_path, one_torch_thread):
    from transformers import LlamaForCausalLM

    cost_file = tmp_path / "cost.json"
    models = [{"tokens": t, "overhead_s": 0.0, "mac_rate": 1e11, "efficiency": 0.8} for t in (1, 512)]
    cost_file.write_text(json.dumps({"models": models}))
    cm = LayerCostModel(tokens=512, overhead_s=0.0, mac_rate=1e11, efficiency=0.8)
    runs = {}
    for guard in ("off", "strict"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config()).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = compress(model, method="svd", alloc="uniform", ratio=0.1, speed_guard=guard,
                           speed_cost=str(cost_file), progress=False)
        runs[guard] = (res, slow_layers(model, tokens=(1, 512), cost=cm), model)
    res_off, slow_off, _ = runs["off"]
    res_on, slow_on, model = runs["strict"]
    assert slow_off and not slow_on  # uniform at ρ = 0.1 sits at 0.9 × break-even: above 0.8 ×
    assert res_on.achieved_ratio >= 0.1 - 1e-12
    kept = sum(m.num_params for m in model.modules() if isinstance(m, LowRankLinear))
    dense = sum(model.get_submodule(name).weight.numel() for name in res_on.dense)
    assert res_on.targeted_params_after == kept + dense  # the reported ratio is what the model holds
    assert res_on.dense  # capping removed more than asked: whole matrices went back to dense
    info = model.rankwise_meta["allocation_info"]
    assert info["speed_guard"] == "strict" and info["speed_guard_applied"] and info["slower_than_dense"] == 0


def test_cli_speed_guard(tmp_path, capsys, one_torch_thread):
    from rankwise.cli.main import main

    src = write_tiny_llama(tmp_path / "model")
    capsys.readouterr()  # save_pretrained's own progress output
    args = ["compress", str(src), "--method", "svd", "--alloc", "uniform", "--ratio", "0.3", "--quiet"]
    # tiny layers: two matmul calls always lose to one under the builtin CPU cost model
    assert main([*args, "--speed-guard", "strict", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slower than dense" in err[0] and "--speed-guard off" in err[0]
    assert not (tmp_path / "s").exists()
    assert main([*args, "--speed-tokens", "0", "--out", str(tmp_path / "t")]) == 2
    assert "tokens per call" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--out", str(tmp_path / "a")]) == 0  # auto: not applicable here, so not applied
    info = json.loads((tmp_path / "a" / "rankwise.json").read_text())["allocation_info"]
    assert info["speed_guard"] == "auto" and info["speed_guard_applied"] is False and info["slower_than_dense"] > 0
