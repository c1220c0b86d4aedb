"""Output-anchored factors (compression/anchor.py): closed forms against reference least squares,
equality with whitened truncation when compressed and dense inputs coincide, and the pipeline's
anchored B checked against the layer's real dense and compressed inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise.compression.anchor import CrossCollector, anchor_factors, anchor_objective, anchored_a, anchored_b
from rankwise.compression.api import CompressConfig, compress
from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.methods import get_method
from rankwise.errors import RankwiseError
from rankwise.surgery import LowRankLinear
from rankwise.surgery.targets import Target

# -- closed forms -----------------------------------------------------------------------------------------


def _data(m: int = 12, n: int = 10, rows: int = 200, drift: float = 0.3, seed: int = 0):
    """W, dense inputs X_d (correlated features) and compressed inputs X_c = X_d + drift·noise, float64."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    Xd = torch.randn(rows, n, generator=g, dtype=torch.float64) @ mix
    Xc = Xd + drift * Xd.std() * torch.randn(rows, n, generator=g, dtype=torch.float64)
    return W, Xd, Xc


def _whiten_factors(W: torch.Tensor, X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = get_method("whiten").prepare(W, LayerStats(n=W.shape[1], xtx=X.T @ X, rows=X.shape[0]), name="w")
    return p.factors(k)


def _J(W, B, A, Xd, Xc) -> float:
    return float(((Xd @ W.T - Xc @ A.T @ B.T) ** 2).sum().detach())


def test_anchored_b_is_the_least_squares_solution_and_beats_whitened_truncation(one_torch_thread):
    W, Xd, Xc = _data()
    k = 4
    B0, A = _whiten_factors(W, Xc, k)  # the method's A, chosen on the compressed inputs
    S_c, C = Xc.T @ Xc, Xd.T @ Xc
    B = anchored_b(W, A, S_c, C)
    # reference: argmin_B ‖X_d Wᵀ − (X_c Aᵀ) Bᵀ‖ by least squares on the raw data
    ref = torch.linalg.lstsq(Xc @ A.T, Xd @ W.T).solution.T
    torch.testing.assert_close(B, ref, rtol=1e-6, atol=1e-8)
    assert _J(W, B, A, Xd, Xc) < 0.9 * _J(W, B0, A, Xd, Xc)  # strictly better on the anchored objective
    # the objective from the statistics equals the direct one
    D = Xd.T @ Xd
    assert anchor_objective(W, B, A, S_c, C, D) == pytest.approx(_J(W, B, A, Xd, Xc), rel=1e-9)


def test_anchored_b_equals_whitened_truncation_when_inputs_coincide(one_torch_thread):
    W, X, _ = _data(drift=0.0)
    for k in (1, 3, 7):
        B0, A = _whiten_factors(W, X, k)
        B = anchored_b(W, A, X.T @ X, X.T @ X)
        torch.testing.assert_close(B, B0, rtol=1e-6, atol=1e-7)
        B_none, A_none = anchor_factors(W, B0, A, X.T @ X, None)  # C=None means X_c = X_d
        torch.testing.assert_close(B_none, B0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(A_none, A)


def test_alternating_updates_never_raise_the_objective(one_torch_thread):
    W, Xd, Xc = _data(drift=0.5, seed=1)
    S_c, C, D = Xc.T @ Xc, Xd.T @ Xc, Xd.T @ Xd
    B0, A0 = _whiten_factors(W, Xc, 3)
    # A update alone: the least-squares reference for a fixed B
    B = anchored_b(W, A0, S_c, C)
    A = anchored_a(W, B, S_c, C, jitter=1e-12)  # (the pipeline's ridge is 1e-6)
    vecA = torch.linalg.lstsq(torch.kron(Xc, B), (Xd @ W.T).reshape(-1)).solution  # row-major vec(X_c Aᵀ Bᵀ)
    torch.testing.assert_close(A.T.reshape(-1), vecA, rtol=1e-5, atol=1e-7)
    js = [anchor_objective(W, B0, A0, S_c, C, D)]
    for iters in range(4):
        Bi, Ai = anchor_factors(W, B0, A0, S_c, C, iters=iters)
        js.append(anchor_objective(W, Bi, Ai, S_c, C, D))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(js, js[1:])), js
    assert js[-1] < js[1]  # the alternation gains beyond the B-only update here


def test_cross_collector_pairs_dense_and_compressed_inputs_and_shares_q_k(one_torch_thread):
    class Two(nn.Module):  # q and k read the same tensor; o reads another
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.o = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return self.o(torch.tanh(self.q(x) + self.k(x)))

    torch.manual_seed(0)
    mod = Two()
    targets = [Target(n, getattr(mod, n)) for n in ("q", "k", "o")]
    col = CrossCollector(targets, skip_first=1)
    xd_all, xc_all, hd, hc = [], [], [], []
    for _ in range(3):
        xd, xc = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
        with col.dense():
            mod(xd)
        with col.paired():
            mod(xc)
        xd_all.append(xd[:, 1:].reshape(-1, 6))
        xc_all.append(xc[:, 1:].reshape(-1, 6))
        hd.append(torch.tanh(mod.q(xd) + mod.k(xd))[:, 1:].reshape(-1, 6))
        hc.append(torch.tanh(mod.q(xc) + mod.k(xc))[:, 1:].reshape(-1, 6))
    Xd, Xc = torch.cat(xd_all).double(), torch.cat(xc_all).double()
    torch.testing.assert_close(col.cross["q"], Xd.T @ Xc, rtol=1e-5, atol=1e-5)  # float32 products
    assert col.cross["k"] is col.cross["q"] and col.shares == {"k": "q"}
    torch.testing.assert_close(col.cross["o"], torch.cat(hd).double().T @ torch.cat(hc).double(), rtol=1e-5,
                               atol=1e-5)
    assert col.rows == {"q": 24, "k": 24, "o": 24}  # 3 batches × 2 windows × (5 − 1) positions
    assert len(col.unique()) == 2


# -- the pipeline ---------------------------------------------------------------------------------------


def _tiny_llama():
    from tiny_models import planted_tiny_llama

    return planted_tiny_llama()


def _windows(n: int = 8, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(1))


#: no speed guard: these tests check numerics at a ratio the tiny model cannot reach faster than dense
NO_GUARD = {"speed_guard": "off"} if "speed_guard" in CompressConfig.__dataclass_fields__ else {}


def _cfg(**over) -> CompressConfig:
    return CompressConfig(ratio=0.5, progress=False, sens_samples=2, batch_size=4, **NO_GUARD, **over)


def _inputs_of(model: nn.Module, name: str, windows: torch.Tensor) -> torch.Tensor:
    rows = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    h.remove()
    return torch.cat(rows).double()


def test_anchor_without_sequential_equals_plain_whitened_truncation(one_torch_thread):
    x = _windows()
    plain, anchored = _tiny_llama(), _tiny_llama()
    compress(plain, _cfg(), calib=x)
    compress(anchored, _cfg(anchor=True), calib=x)
    for (k, a), (k2, b) in zip(plain.state_dict().items(), anchored.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_sequential_anchor_solves_b_against_the_dense_outputs_of_the_real_inputs(one_torch_thread):
    """Block 1's q_proj: B equals the least-squares B for the compressed model's inputs vs the dense outputs."""
    x = _windows()
    dense = _tiny_llama()
    seq = copy.deepcopy(dense)
    anchored = copy.deepcopy(dense)
    compress(seq, _cfg(sequential=True), calib=x)
    compress(anchored, _cfg(sequential=True, anchor=True), calib=x)
    for block in (1, 2):
        name = f"model.layers.{block}.self_attn.q_proj"
        layer = anchored.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        W = dense.get_submodule(name).weight.double()
        Xd = _inputs_of(dense, name, x)  # what the dense model feeds the layer
        Xc = _inputs_of(anchored, name, x)  # what the compressed model feeds it (blocks < ℓ compressed)
        assert float((Xd - Xc).norm() / Xd.norm()) > 1e-3  # the streams really differ
        A = layer.A.weight.double()
        ref = torch.linalg.lstsq(Xc @ A.T, Xd @ W.T).solution.T
        torch.testing.assert_close(layer.B.weight.double(), ref, rtol=2e-3, atol=2e-4)
        # same A as plain sequential whitening (the same compressed inputs up to block ℓ's own B), better J
        plain = seq.get_submodule(name)
        if block == 1:
            torch.testing.assert_close(plain.A.weight, layer.A.weight, rtol=1e-3, atol=1e-4)
            assert _J(W, layer.B.weight.double(), A, Xd, Xc) < _J(W, plain.B.weight.double(), A, Xd, Xc)


def test_streamed_checkpoint_with_anchor_equals_in_memory(tmp_path, one_torch_thread):
    from rankwise.compression.streaming import compress_checkpoint
    from tiny_models import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "m")
    x = torch.randint(2, 256, (8, 24), generator=torch.Generator().manual_seed(3))
    cfg = _cfg(sequential=True, anchor=True)
    compress_checkpoint(folder, tmp_path / "out", cfg, calib=x)

    from tiny_models import assert_factors_equal_in_memory

    assert_factors_equal_in_memory(folder, tmp_path / "out", cfg, x)


@pytest.mark.parametrize("over, match", [
    ({"anchor_iters": 1}, "anchor_iters needs anchor"),
    ({"anchor": True, "anchor_iters": -1}, "anchor_iters must be a whole number"),
])
def test_config_errors(over, match):
    with pytest.raises(RankwiseError, match=match):
        CompressConfig(**over)


def test_anchor_with_a_data_free_method_is_a_one_line_error(one_torch_thread):
    with pytest.raises(RankwiseError, match="anchor and refine_steps need the calibration statistics"):
        compress(_tiny_llama(), _cfg(method="svd", anchor=True, alloc="uniform"), calib=_windows())


def test_cli_exposes_anchor_options():
    import argparse

    from rankwise.config import add_config_arguments, config_from_args

    ap = argparse.ArgumentParser()
    add_config_arguments(ap, CompressConfig)
    cfg = config_from_args(CompressConfig, ap.parse_args(["--anchor", "--anchor-iters", "2", "--refine-steps", "5",
                                                          "--refine-lr", "3e-5", "--refine-holdout", "0.5"]))
    assert (cfg.anchor, cfg.anchor_iters, cfg.refine_steps, cfg.refine_lr, cfg.refine_holdout) == (
        True, 2, 5, 3e-5, 0.5)


# -- torch.distributed --------------------------------------------------------------------------------------

_DIST_CASES = {"anchor": {"sequential": True, "anchor": True, "batch_size": 4},
               "refine": {"sequential": True, "anchor": True, "refine_steps": 4, "refine_lr": 1e-5, "batch_size": 2}}


def _dist_compress() -> dict:
    out = {}
    for name, over in _DIST_CASES.items():
        model = _tiny_llama()
        compress(model, CompressConfig(**{"ratio": 0.5, "progress": False, "sens_samples": 2, **NO_GUARD, **over}),
                 calib=_windows())
        out[name] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                     "refine": model.rankwise_meta.get("refine")}
    return out


def _dist_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(_dist_compress(), f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


def test_anchor_and_refine_under_two_processes(tmp_path, one_torch_thread):
    """Cross statistics are all-reduced (two processes equal one), refinement steps agree on every process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    one = _dist_compress()

    def dense(state: dict) -> dict:
        return {k[: -len(".A.weight")]: state[k[: -len(".A.weight")] + ".B.weight"].double() @ v.double()
                for k, v in state.items() if k.endswith(".A.weight")}

    ref = dense(one["anchor"]["state"])
    assert ref
    for r in two:
        got = dense(r["anchor"]["state"])
        for k, v in ref.items():  # equal up to float summation order (the cross statistics were summed)
            assert float((got[k] - v).norm() / v.norm()) < 2e-4, k
    for k, v in two[0]["refine"]["state"].items():  # the same steps on both processes: the same model
        assert torch.equal(v, two[1]["refine"]["state"][k]), k
    info = two[0]["refine"]["refine"]
    assert info and all(b["best"] <= b["start"] for b in info.values())
    assert two[1]["refine"]["refine"] == info
