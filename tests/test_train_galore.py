"""GaLoreAdamW: AdamW equivalences, galore-torch parity, loss decrease, resume, memory and errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rankwise.errors import RankwiseError
from rankwise.train import GaLoreAdamW, galore_param_groups, optimizer_state_bytes


def _bench_peers():
    """bench/_peers.py (peer loaders live with the benchmarks, outside the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "_peers.py"
    spec = importlib.util.spec_from_file_location("_rankwise_bench_peers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 128,
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def batch(seed: int = 0, n: int = 4, t: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: repeated short sequences
    base = torch.randint(0, 128, (n, 6), generator=g)
    return base.repeat(1, t // 6)


def lm_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def quad_loss(w: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """A smooth non-quadratic loss of a matrix parameter (its gradient is full rank)."""
    return (torch.tanh(inputs @ w.T) - targets).pow(2).mean() + 0.1 * w.pow(4).mean()


# --------------------------------------------------------------------- AdamW equivalences
def test_plain_groups_match_torch_adamw_exactly() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    mine = copy.deepcopy(ref)
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}
    o_ref = torch.optim.AdamW(ref.parameters(), foreach=False, **kw)
    o_mine = GaLoreAdamW(mine.parameters(), **kw)  # no "rank": plain AdamW for everything
    x, y = torch.randn(32, 10), torch.randn(32, 3)
    for _ in range(6):
        for model, opt in ((ref, o_ref), (mine, o_mine)):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(ref.parameters(), mine.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("projection", ["svd", "dct"])
def test_full_rank_scale_one_equals_adamw_in_the_projected_basis(shape: tuple[int, int], projection: str) -> None:
    """At rank = full dimension and scale 1, GaLore is exactly AdamW on the reparametrised W' = QᵀW (or W Q).

    Adam is elementwise, hence not rotation invariant: GaLore's step equals AdamW's step expressed in the
    basis Q, which is what this test checks (for Q = I, e.g. the DCT of a constant, it is AdamW itself).
    """
    m, n = shape
    torch.manual_seed(0)
    w0 = torch.randn(m, n) * 0.3
    inputs, targets = torch.randn(40, n), torch.randn(40, m)
    w = nn.Parameter(w0.clone())
    full = min(m, n)
    kw = {"lr": 5e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    opt = GaLoreAdamW([{"params": [w], "rank": full, "update_proj_gap": 1000, "scale": 1.0,
                        "projection": projection}], **kw)
    quad_loss(w, targets, inputs).backward()
    opt.step()
    opt.zero_grad()
    st = opt.state[w]
    from rankwise.train.projector import Projector

    proj = Projector(shape, full, projection=projection)
    q = proj.basis(st, w).detach().double()
    assert proj.side == ("left" if m < n else "right")
    # the same first step with torch.optim.AdamW on W' (Q is square and orthogonal, so W = Q W' or W' Qᵀ)
    wp = nn.Parameter((q.T @ w0.double()) if proj.side == "left" else (w0.double() @ q))
    ref = torch.optim.AdamW([wp], foreach=False, **kw)

    def w_of(wp_: torch.Tensor) -> torch.Tensor:
        return q @ wp_ if proj.side == "left" else wp_ @ q.T

    quad_loss(w_of(wp), targets.double(), inputs.double()).backward()
    ref.step()
    ref.zero_grad()
    for _ in range(5):
        quad_loss(w, targets, inputs).backward()
        opt.step()
        opt.zero_grad()
        quad_loss(w_of(wp), targets.double(), inputs.double()).backward()
        ref.step()
        ref.zero_grad()
    torch.testing.assert_close(w.detach().double(), w_of(wp.detach()), atol=2e-5, rtol=1e-4)
    # and the run did move the weights (the comparison is not vacuous)
    assert float((w.detach() - w0).abs().max()) > 0.1


def test_matches_galore_torch_step_for_step() -> None:
    """Same groups, same SVD projection: rankwise's GaLoreAdamW reproduces galore-torch's GaLoreAdamW.

    Gradients are given (the same for both), so every projection refresh sees bitwise-identical input; on a
    model, float-level differences would be amplified by near-degenerate singular values at the rank cut.
    """
    import importlib.util

    if importlib.util.find_spec("galore_torch") is None:
        pytest.skip("galore-torch (the bench extra) is not installed")
    PeerAdamW = _bench_peers().galore_torch_adamw()
    torch.manual_seed(0)
    shapes = [(24, 40), (40, 24), (32, 32)]
    init = [torch.randn(*s) for s in shapes] + [torch.randn(16)]
    mine = [nn.Parameter(t.clone()) for t in init]
    peer = [nn.Parameter(t.clone()) for t in init]
    kw = {"lr": 1e-2, "weight_decay": 0.0, "eps": 1e-12}  # ε placement is the only formula difference

    def groups(ps: list[nn.Parameter]) -> list[dict]:
        return [{"params": ps[3:]}, {"params": ps[:3], "rank": 6, "update_proj_gap": 3, "scale": 0.25,
                                     "proj_type": "std"}]

    o_a = GaLoreAdamW(groups(mine), **kw)
    o_b = PeerAdamW(groups(peer), no_deprecation_warning=True, **kw)
    for _ in range(8):  # refreshes at steps 0, 3, 6
        grads = [torch.randn_like(t) for t in init]
        for ps, opt in ((mine, o_a), (peer, o_b)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b, t in zip(mine, peer, init):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert float((a.detach() - t).abs().max()) > 1e-3  # they did move
    mem_a, mem_b = optimizer_state_bytes(o_a), optimizer_state_bytes(o_b)
    assert mem_a.logical == mem_b.logical  # the same tensors of the same shapes
    assert mem_a.total == mem_a.logical  # rankwise keeps compact copies of the bases
    assert mem_b.total > mem_b.logical  # galore-torch's Vh[:r] / U[:, :r] views keep the full factors alive

    # with eps_style="galore" the arithmetic is galore-torch's: equal for a real ε and weight decay, too
    kw_g = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3}
    mine = [nn.Parameter(t.clone()) for t in init]
    peer = [nn.Parameter(t.clone()) for t in init]
    o_a = GaLoreAdamW(groups(mine), eps_style="galore", **kw_g)
    o_b = PeerAdamW(groups(peer), no_deprecation_warning=True, **kw_g)
    torch_style = [nn.Parameter(t.clone()) for t in init]
    o_c = GaLoreAdamW(groups(torch_style), **kw_g)
    for _ in range(8):
        grads = [torch.randn_like(t) * 1e-3 for t in init]  # small gradients: ε matters
        for ps, opt in ((mine, o_a), (peer, o_b), (torch_style, o_c)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b, c in zip(mine, peer, torch_style):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert float((a.detach() - c.detach()).abs().max()) > 1e-3  # torch-style ε: visibly different

    # on a real model the first steps (one projection, no refresh) agree as well
    la, lb = tiny_llama(0), tiny_llama(0)
    o_la = GaLoreAdamW(galore_param_groups(la, rank=8, update_proj_gap=100, scale=0.25), **kw)
    o_lb = PeerAdamW(galore_param_groups(lb, rank=8, update_proj_gap=100, scale=0.25), no_deprecation_warning=True,
                     **kw)
    for i in range(3):
        lm_step(la, o_la, batch(i))
        lm_step(lb, o_lb, batch(i))
    for (n, pa), (_, pb) in zip(la.named_parameters(), lb.named_parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------- training works
@pytest.mark.parametrize("projection, fira", [("svd", False), ("randomized", False), ("dct", False), ("svd", True),
                                              ("dct", True)])
def test_a_few_steps_lower_the_loss(projection: str, fira: bool) -> None:
    model = tiny_llama(1)
    groups = galore_param_groups(model, rank=8, update_proj_gap=4, scale=1.0, projection=projection, fira=fira)
    opt = GaLoreAdamW(groups, lr=3e-3)
    x = batch(5)
    with torch.no_grad():
        before = float(model(input_ids=x, labels=x).loss)
    for _ in range(12):
        lm_step(model, opt, x)
    with torch.no_grad():
        after = float(model(input_ids=x, labels=x).loss)
    assert after < before - 0.5, (before, after)
    # the projected matrices hold r×n or m×r moments, never m×n
    for group in opt.param_groups:
        if "rank" in group:
            for p in group["params"]:
                assert min(opt.state[p]["exp_avg"].shape) == 8


def test_fira_adds_the_out_of_subspace_residual_and_limits_its_growth() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(16, 24) * 0.1)
    w_plain = nn.Parameter(w.detach().clone())
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 100, "scale": 1.0, "fira": True}], lr=1e-2,
                      fira_limit=1.01)
    plain = GaLoreAdamW([{"params": [w_plain], "rank": 4, "update_proj_gap": 100, "scale": 1.0}], lr=1e-2)
    norms = []
    for step in range(4):
        g = torch.randn(16, 24) * (1.0 + 2 * step)  # a gradient whose norm grows fast
        w.grad, w_plain.grad = g.clone(), g.clone()
        before, before_plain = w.detach().clone(), w_plain.detach().clone()
        opt.step()
        plain.step()
        diff = (w.detach() - before) - (w_plain.detach() - before_plain)  # = −lr·φ·(G − QQᵀG) after limiting
        q = plain.state[w_plain]["proj_basis"]
        # the extra term lies outside the projected subspace (left side: Qᵀ·diff = 0)
        torch.testing.assert_close(q.T @ diff, torch.zeros(4, 24), atol=1e-6, rtol=0)
        norms.append(float(diff.norm()))
        assert norms[-1] > 0
    for a, b in zip(norms, norms[1:]):
        assert b <= 1.01 * a * (1 + 1e-4)  # norm-growth limiter
    assert float(opt.state[w]["fira_norm"]) == pytest.approx(norms[-1] / 1e-2, rel=1e-4)


def test_conv1d_models_are_supported() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64))
    groups = galore_param_groups(model, rank=4, update_proj_gap=2)
    names = {id(p): n for n, p in model.named_parameters()}
    lowrank = [names[id(p)] for p in groups[-1]["params"]]
    assert lowrank and all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in lowrank)
    assert "transformer.wte.weight" not in lowrank
    opt = GaLoreAdamW(groups, lr=1e-2)
    x = batch(2)
    first = lm_step(model, opt, x)
    for _ in range(5):
        last = lm_step(model, opt, x)
    assert last < first


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("projection, fira", [("svd", False), ("randomized", False), ("dct", True)])
def test_state_dict_resume_gives_the_same_next_steps(projection: str, fira: bool) -> None:
    model = tiny_llama(2)
    opt = GaLoreAdamW(galore_param_groups(model, rank=6, update_proj_gap=2, projection=projection, fira=fira), lr=3e-3)
    for i in range(3):
        lm_step(model, opt, batch(i))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for i in range(3, 6):  # includes a projection refresh at step 4
        lm_step(model, opt, batch(i))

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = tiny_llama(99)
    resumed.load_state_dict(saved["model"])
    opt2 = GaLoreAdamW(galore_param_groups(resumed, rank=6, update_proj_gap=2, projection=projection, fira=fira),
                       lr=3e-3)
    opt2.load_state_dict(saved["opt"])
    for i in range(3, 6):
        lm_step(resumed, opt2, batch(i))
    for (n, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_loading_a_state_saved_with_another_rank_is_refused() -> None:
    model = tiny_llama(0)
    opt = GaLoreAdamW(galore_param_groups(model, rank=8), lr=1e-3)
    lm_step(model, opt, batch(0))
    sd = opt.state_dict()
    other = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-3)
    with pytest.raises(RankwiseError, match="saved with rank 8 .* uses rank 4") as exc:
        other.load_state_dict(sd)
    assert "\n" not in str(exc.value)
    dct = GaLoreAdamW(galore_param_groups(model, rank=8, projection="dct"), lr=1e-3)
    with pytest.raises(RankwiseError, match="projection 'svd'"):
        dct.load_state_dict(sd)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "group, match",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"rank": -1}, "rank must be a positive integer"),
        ({"rank": 17}, "rank 17 is larger than the 16x24 matrix"),
        ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap must be a positive"),
        ({"rank": 4, "update_proj_gap": -5}, "update_proj_gap must be a positive"),
        ({"rank": 4, "projection": "fft"}, "unknown projection 'fft'"),
    ],
)
def test_bad_groups_raise_one_line_errors(group: dict, match: str) -> None:
    w = nn.Parameter(torch.zeros(16, 24))
    with pytest.raises(RankwiseError, match=match) as exc:
        GaLoreAdamW([{"params": [w], **group}])
    assert "\n" not in str(exc.value)


def test_bad_options_of_the_helper_and_constructor() -> None:
    model = tiny_llama(0)
    with pytest.raises(RankwiseError, match="unknown projection"):
        GaLoreAdamW(model.parameters(), projection="wavelet")
    with pytest.raises(RankwiseError, match="larger than the 32x64 matrix"):
        galore_param_groups(model, rank=48)  # k_proj is 32x64
    with pytest.raises(RankwiseError, match="update_proj_gap"):
        galore_param_groups(model, rank=4, update_proj_gap=0)


# ----------------------------------------------------------------------------- memory
def test_state_bytes_follow_the_closed_form() -> None:
    model = tiny_llama(0)
    r = 8
    for projection in ("svd", "dct"):
        groups = galore_param_groups(model, rank=r, projection=projection)
        opt = GaLoreAdamW(groups, lr=1e-3)
        lm_step(model, opt, batch(0))
        expected_proj = 0
        dims = set()
        for p in groups[-1]["params"]:
            m, n = p.shape
            d, other = (n, m) if m >= n else (m, n)
            expected_proj += 2 * r * other * 4  # the two moments
            expected_proj += d * r * 4 if projection == "svd" else r * 8  # basis, or int64 indices
            dims.add(d)
        if projection == "dct":
            expected_proj += sum(d * d * 4 for d in dims)  # the shared bases, once per size
        expected_plain = sum(2 * p.numel() * 4 for p in groups[0]["params"])
        mem = optimizer_state_bytes(opt)
        assert mem.projected == expected_proj
        assert mem.plain == expected_plain
        assert mem.total == expected_proj + expected_plain
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lm_step(model, adam, batch(0))
    n_params = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(adam).total == 2 * n_params * 4 + 4 * len(list(model.parameters()))


def test_the_trainer_builds_galore_through_the_factory_hook(tmp_path) -> None:
    """Trainer(optimizer_cls_and_kwargs=(GaLoreFactory, ...)) trains with GaLoreAdamW's low-rank groups."""
    from transformers import Trainer, TrainingArguments

    from rankwise.train import GaLoreFactory

    model = tiny_llama(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": (x := batch(i, n=1)[0]), "labels": x} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(GaLoreFactory, {"rank": 4, "update_proj_gap": 10, "lr": 1e-2}))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, GaLoreAdamW)
    low = next(g for g in opt.param_groups if "rank" in g)
    assert low["rank"] == 4 and low["initial_lr"] == 1e-2  # (the Trainer's schedule has decayed "lr" to 0)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert opt.state[q]["exp_avg"].shape == (64, 4)  # projected moments: m×r, not m×n
    assert not torch.equal(q.detach(), before["model.layers.0.self_attn.q_proj.weight"])
