"""Block refinement (compression/refine.py): never worse than its start on the held-out slice, the
held-out loss it reports recomputed by hand from the dense and compressed models, the dense teacher
stream under sequential calibration, the streamed path, and one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise.compression.api import CompressConfig, compress
from rankwise.compression.refine import factor_parameters, split_batches
from rankwise.errors import RankwiseError

NO_GUARD = {"speed_guard": "off"} if "speed_guard" in CompressConfig.__dataclass_fields__ else {}
BATCH = 2


def _tiny_llama():
    from tiny_models import planted_tiny_llama

    return planted_tiny_llama()


def _windows() -> torch.Tensor:
    return torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))


def _cfg(**over) -> CompressConfig:
    return CompressConfig(**{"ratio": 0.6, "progress": False, "sens_samples": 2, "batch_size": BATCH, **NO_GUARD,
                             **over})


def _block_io(model: nn.Module, i: int, x: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
    """(args, kwargs) block ``i`` receives on windows ``x`` and its output."""
    got: dict = {}
    block = model.model.layers[i]

    def pre(mod, args, kwargs):
        got["a"], got["kw"] = args, dict(kwargs)

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(x, use_cache=False)
    h.remove()
    with torch.no_grad():
        out = block(*got["a"], **got["kw"])
    return got["a"], got["kw"], out[0] if isinstance(out, tuple) else out


def _held_out_error(dense: nn.Module, student: nn.Module, i: int, x: torch.Tensor, inputs_from: nn.Module) -> float:
    """‖f_c(h_c) − f_d(h_d)‖² / ‖f_d(h_d) − h_d‖² of block ``i`` on windows ``x`` (h_c from ``inputs_from``)."""
    a_d, _, t = _block_io(dense, i, x)
    a_c, kw_c, _ = _block_io(inputs_from, i, x)
    with torch.no_grad():
        out = student.model.layers[i](*a_c, **kw_c)
    out = out[0] if isinstance(out, tuple) else out
    h_d = a_d[0] if a_d else None
    return float(((out - t) ** 2).sum() / ((t - h_d) ** 2).sum())


@pytest.mark.parametrize("lr, improves", [(0.5, False), (1e-5, True)])
def test_refinement_never_ends_worse_than_its_start_on_the_held_out_slice(lr, improves, one_torch_thread):
    x = _windows()
    held = x[-BATCH:]  # 4 batches of 2 windows; refine_holdout 0.25 holds out the last one
    dense = _tiny_llama()
    plain, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    compress(plain, _cfg(), calib=x)
    compress(refined, _cfg(refine_steps=30, refine_lr=lr), calib=x)
    info = refined.rankwise_meta["refine"]
    assert sorted(info) == ["0", "1", "2"]
    for i in range(3):
        rec = info[str(i)]
        assert (rec["train_batches"], rec["holdout_batches"]) == (3, 1)
        assert rec["best"] <= rec["start"]
        # recomputed by hand: the block on the dense model's inputs against the dense block's outputs
        before = _held_out_error(dense, plain, i, held, inputs_from=dense)
        after = _held_out_error(dense, refined, i, held, inputs_from=dense)
        assert before == pytest.approx(rec["start"], rel=1e-3)
        assert after == pytest.approx(rec["best"], rel=1e-3)
        assert after <= before * (1 + 1e-4)
        if not improves:  # diverging steps: the start state is put back bit for bit
            assert rec["best_step"] == 0
            for p, q in zip(factor_parameters(plain.model.layers[i]), factor_parameters(refined.model.layers[i])):
                assert torch.equal(p, q)
    if improves:
        assert any(info[k]["best"] < 0.999 * info[k]["start"] for k in info)
        # only the factors moved: norms and every non-factor weight are the dense model's
        for (k, v), v2 in zip(plain.state_dict().items(), refined.state_dict().values()):
            if not k.endswith((".A.weight", ".B.weight")):
                assert torch.equal(v, v2), k


def test_sequential_refinement_targets_the_dense_teacher_outputs(one_torch_thread):
    x = _windows()
    held = x[-BATCH:]
    dense = _tiny_llama()
    model = copy.deepcopy(dense)
    compress(model, _cfg(sequential=True, anchor=True, refine_steps=12, refine_lr=1e-5), calib=x)
    info = model.rankwise_meta["refine"]
    for i in range(3):
        # inputs from the compressed model itself (blocks < i compressed and refined), target: the dense block on
        # the dense model's inputs
        got = _held_out_error(dense, model, i, held, inputs_from=model)
        assert got == pytest.approx(info[str(i)]["best"], rel=1e-3)
    assert info["2"]["start"] > info["0"]["start"]  # the error earlier blocks pass on is in the target


def test_streamed_refinement_equals_in_memory_one_block_at_a_time(tmp_path, one_torch_thread):

    from rankwise.compression.streaming import compress_checkpoint
    from tiny_models import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "m")
    x = torch.randint(2, 256, (8, 24), generator=torch.Generator().manual_seed(3))
    cfg = _cfg(sequential=True, refine_steps=6, refine_lr=1e-4)
    live, peak = set(), [0]

    def on_block(event: str, i: int) -> None:
        (live.add if event == "load" else live.discard)(i)
        peak[0] = max(peak[0], len(live))

    compress_checkpoint(folder, tmp_path / "out", cfg, calib=x, on_block=on_block)
    assert peak[0] == 1
    from tiny_models import assert_factors_equal_in_memory

    assert_factors_equal_in_memory(folder, tmp_path / "out", cfg, x)


def test_split_batches():
    assert split_batches(4, 0.25) == ([0, 1, 2], [3])
    assert split_batches(2, 0.9) == ([0], [1])  # one batch always left to train on
    assert split_batches(10, 0.01) == (list(range(9)), [9])  # one held out at least
    with pytest.raises(RankwiseError, match="at least 2 calibration batches"):
        split_batches(1, 0.25)


@pytest.mark.parametrize("over, match", [
    ({"refine_steps": -1}, "refine_steps must be a whole number"),
    ({"refine_holdout": 0.0}, "refine_holdout must lie in"),
    ({"refine_holdout": 1.0}, "refine_holdout must lie in"),
    ({"refine_lr": 0.0}, "refine_lr must lie in"),
    ({"refine_lr": float("nan")}, "refine_lr"),
])
def test_config_errors(over, match):
    with pytest.raises(RankwiseError, match=match):
        CompressConfig(**over)


def test_refine_errors_are_one_line(one_torch_thread):
    with pytest.raises(RankwiseError, match="anchor and refine_steps need"):
        compress(_tiny_llama(), _cfg(method="svd", alloc="uniform", refine_steps=2), calib=_windows())
    with pytest.raises(RankwiseError, match="at least 2 calibration batches"):
        compress(_tiny_llama(), _cfg(refine_steps=2, batch_size=8), calib=_windows())
