"""EoRA compensation (docs/methods.md §3): optimality on one matrix, exactness at full rank, a tiny Llama, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from rankwise.compression.eora import EoraLinear, eora_compensate, eora_factors, prune_magnitude_, quantize_rtn_
from rankwise.engine.whitening import inverse_sqrt_factor
from rankwise.errors import RankwiseError
from rankwise.surgery import Target, find_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def windows(n: int = 8, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def correlated_inputs(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Anisotropic inputs (like real activations): X = Z M with decaying column scales."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)[:, None]
    return torch.randn(rows, n, generator=g, dtype=torch.float64) @ M


# -- (1) one matrix: the error is the discarded σ², and beats plain SVD truncation ---------------------------


@pytest.mark.parametrize("r", [1, 4, 10])
def test_factors_are_optimal_on_one_matrix(r):
    g = torch.Generator().manual_seed(1)
    m, n = 24, 16
    delta = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = correlated_inputs(64, n)
    C = X.T @ X
    B, A, sigma = eora_factors(delta, C, r)
    assert B.shape == (m, r) and A.shape == (r, n) and B.dtype == A.dtype == torch.float64
    err = float(((delta - B @ A) @ X.T).square().sum())
    S, _ = inverse_sqrt_factor(C)
    s_ref = torch.linalg.svdvals(delta @ S)
    assert torch.allclose(sigma, s_ref, rtol=1e-10, atol=1e-12)
    assert err == pytest.approx(float(sigma[r:].square().sum()), rel=1e-8)
    # plain SVD truncation of ΔW, judged on the same output error
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    svd_err = float(((delta - (U[:, :r] * s[:r]) @ Vh[:r]) @ X.T).square().sum())
    assert err <= svd_err * (1 + 1e-12)
    assert err < 0.9 * svd_err  # strictly better on anisotropic inputs


# -- (2) at full rank the compensated layer reproduces the original outputs ----------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_full_rank_reproduces_original_outputs(kind):
    torch.manual_seed(0)
    m, n = 24, 16
    base = torch.nn.Linear(n, m) if kind == "linear" else Conv1D(m, n)
    if kind == "conv1d":
        torch.nn.init.normal_(base.weight, std=0.2)
        torch.nn.init.normal_(base.bias, std=0.1)
    t = Target(name="layer", module=base)
    W = t.weight().clone()
    t.set_weight(W + 0.1 * torch.randn(m, n))  # a compressed W′
    X = correlated_inputs(64, n, seed=3).float()
    C = X.double().T @ X.double()
    delta = W.double() - t.weight().double()
    B, A, _ = eora_factors(delta, C, min(m, n))
    layer = EoraLinear(base, B, A)
    assert layer.rank == 16 and not any(p.requires_grad for p in layer.base.parameters())
    with torch.no_grad():
        ref = X @ W.T + base.bias
        out = layer(X)
        assert torch.linalg.norm(out - ref) / torch.linalg.norm(ref) < 1e-4
        assert torch.linalg.norm(base(X) - ref) / torch.linalg.norm(ref) > 1e-2  # W′ alone is not
        assert torch.allclose(layer.merged_weight(), W, atol=1e-4)


# -- (3) a tiny Llama quantised to 3 bits: rank-8 EoRA brings the logits back towards the original ----------


def test_tiny_llama_rtn3_eora_rank8_improves_logits():
    model = tiny_llama()
    calib, held_out = windows(seed=0), windows(seed=1)
    with torch.no_grad():
        ref_cal, ref_out = model(calib).logits, model(held_out).logits
    original = quantize_rtn_(model, bits=3, group_size=64)
    assert set(original) == {t.name for t in find_targets(tiny_llama())}
    with torch.no_grad():
        q_cal, q_out = model(calib).logits, model(held_out).logits
    report = eora_compensate(model, original, rank=8, calib=calib)
    with torch.no_grad():
        e_cal, e_out = model(calib).logits, model(held_out).logits
    mse = lambda a, b: float((a - b).square().mean())  # noqa: E731
    assert mse(q_cal, ref_cal) > 0
    assert mse(e_cal, ref_cal) < 0.8 * mse(q_cal, ref_cal)
    assert mse(e_out, ref_out) < mse(q_out, ref_out)
    layers = report["layers"]
    assert set(layers) == set(original)
    for name, rec in layers.items():
        assert rec["rank"] == 8 and rec["err_after"] < rec["err_before"] and 0 < rec["rel_after"] < rec["rel_before"]
        assert isinstance(model.get_submodule(name), EoraLinear)
    assert report["params_added"] == sum(8 * sum(w.shape) for w in original.values())
    assert report["calibration"]["tokens"] == calib.numel()


def test_prune_then_compensate_single_layer():
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    original = prune_magnitude_(model, sparsity=0.5, targets=[name])
    W = model.get_submodule(name).weight
    assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(original[name][W != 0], W[W != 0])
    report = eora_compensate(model, original, rank=16, calib=windows())
    rec = report["layers"][name]
    assert rec["err_after"] < 0.8 * rec["err_before"]


def test_quantize_rtn_grid():
    model = tiny_llama()
    name = "model.layers.1.self_attn.q_proj"
    original = quantize_rtn_(model, bits=4, group_size=16, targets="layers.1.self_attn.q_proj")
    assert list(original) == [name]
    Wq = model.get_submodule(name).weight.detach()
    groups, orig = Wq.reshape(64, 4, 16), original[name].reshape(64, 4, 16)
    step = orig.abs().amax(-1, keepdim=True) / 7
    q = groups / step
    assert torch.allclose(q, q.round(), atol=1e-4) and float(q.abs().max()) <= 7 + 1e-4
    assert float((Wq - original[name]).abs().max()) <= float(step.max()) / 2 + 1e-6


# -- (4) errors ------------------------------------------------------------------------------------------------


def test_errors():
    model = tiny_llama()
    name = "model.layers.0.self_attn.k_proj"  # 32×64
    original = quantize_rtn_(model, bits=3, targets=[name])
    cal = windows(n=2, t=8)
    for bad in (0, -1, 32, 40, 2.0, True):
        with pytest.raises(RankwiseError, match="rank"):
            eora_compensate(model, original, rank=bad, calib=cal)
    with pytest.raises(RankwiseError, match="no module named"):
        eora_compensate(model, {"model.layers.9.nope": original[name]}, rank=4, calib=cal)
    with pytest.raises(RankwiseError, match="not an nn.Linear"):
        eora_compensate(model, {"model.norm": original[name]}, rank=4, calib=cal)
    with pytest.raises(RankwiseError, match="shape"):
        eora_compensate(model, {name: original[name].T}, rank=4, calib=cal)
    with pytest.raises(RankwiseError, match="non-empty"):
        eora_compensate(model, {}, rank=4, calib=cal)
    with pytest.raises(RankwiseError, match="bits"):
        quantize_rtn_(model, bits=1)
    with pytest.raises(RankwiseError, match="group_size"):
        quantize_rtn_(model, group_size=0)
    with pytest.raises(RankwiseError, match="sparsity"):
        prune_magnitude_(model, sparsity=1.0)
    with pytest.raises(RankwiseError, match="rank"):
        eora_factors(torch.randn(4, 3), torch.eye(3), 4)
    with pytest.raises(RankwiseError, match="do not fit"):
        EoraLinear(torch.nn.Linear(3, 4), torch.zeros(4, 2), torch.zeros(2, 5))
    assert not any(isinstance(m, EoraLinear) for m in model.modules())  # nothing was swapped by a failed call


def test_gpt2_conv1d_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    x = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    original = quantize_rtn_(model, bits=3, group_size=16)
    with torch.no_grad():
        q = model(x).logits
    report = eora_compensate(model, original, rank=4, calib=x)
    with torch.no_grad():
        e = model(x).logits
    assert float((e - ref).square().mean()) < float((q - ref).square().mean())
    assert all(r["err_after"] < r["err_before"] for r in report["layers"].values())
