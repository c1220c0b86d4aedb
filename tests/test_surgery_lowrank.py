"""Model surgery: targets, LowRankLinear exactness / Eckart–Young optimality, swap round trips on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from rankwise.errors import RankwiseError
from rankwise.io.checkpoint import to_dense
from rankwise.surgery import LowRankLinear, Target, find_targets, get_module, set_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(tied: bool = True) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=128, tie_word_embeddings=tied, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def test_find_targets_llama_gqa_excludes_head_and_tied() -> None:
    model = tiny_llama(tied=True)
    names = [t.name for t in find_targets(model)]
    assert len(names) == 2 * 7
    assert "lm_head" not in names
    assert "model.layers.0.self_attn.k_proj" in names
    shapes = {t.name: t.shape for t in find_targets(model)}
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)  # GQA: 2 kv heads × 16
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 128)
    # untied head: still excluded by default, included on request
    untied = tiny_llama(tied=False)
    assert "lm_head" not in [t.name for t in find_targets(untied)]
    assert "lm_head" in [t.name for t in find_targets(untied, include_heads=True)]
    # regex selection and exclusion
    sel = find_targets(model, pattern=r"q_proj|v_proj", exclude=r"layers\.1\.")
    assert [t.name for t in sel] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_find_targets_errors_are_one_line() -> None:
    model = tiny_llama()
    with pytest.raises(RankwiseError) as exc:
        find_targets(model, pattern="nothing_matches_this")
    msg = str(exc.value)
    assert "\n" not in msg and "model.layers.0.self_attn.q_proj" in msg
    with pytest.raises(RankwiseError, match="not a valid regular expression"):
        find_targets(model, pattern="q_proj(")
    with pytest.raises(RankwiseError, match="no nn.Linear"):
        find_targets(nn.Sequential(nn.ReLU()))


def test_gpt2_conv1d_targets_are_out_by_in() -> None:
    model = tiny_gpt2()
    ts = {t.name: t for t in find_targets(model)}
    assert "lm_head" not in ts
    t = ts["transformer.h.0.attn.c_attn"]
    assert t.transposed and isinstance(t.module, Conv1D)
    assert t.shape == (96, 32)  # out = 3·n_embd, in = n_embd
    assert torch.equal(t.weight(), t.module.weight.T)
    # set_weight writes back in the module's own (in×out) layout
    new = torch.randn(96, 32)
    t.set_weight(new)
    assert torch.equal(t.module.weight, new.T)
    x = torch.randn(3, 32)
    assert torch.allclose(t.module(x), x @ new.T + t.module.bias, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_linear_exact_at_full_rank_and_eckart_young_at_rank_k(kind: str) -> None:
    torch.manual_seed(0)
    m, n = 24, 16
    layer = nn.Linear(n, m) if kind == "linear" else Conv1D(m, n)
    with torch.no_grad():
        layer.bias.normal_()
    w = Target("x", layer).weight().double()
    x = torch.randn(5, n)
    full = LowRankLinear.from_linear(layer, rank=min(m, n))
    assert full.orig_kind == kind
    assert torch.allclose(full(x), layer(x), atol=1e-5)
    s = torch.linalg.svdvals(w)
    for k in (1, 4, 9):
        lr = LowRankLinear.from_linear(layer, rank=k)
        assert lr.A.weight.shape == (k, n) and lr.B.weight.shape == (m, k)
        assert lr.num_params == k * (m + n)
        err = torch.linalg.matrix_norm(lr.dense_weight().double() - w)
        optimal = s[k:].pow(2).sum().sqrt()  # Eckart–Young: the tail of the spectrum
        assert float(err) == pytest.approx(float(optimal), rel=1e-4)
        # the factors share the scale: B = U√Σ, A = √Σ Vᵀ
        assert torch.allclose(lr.B.weight.norm(dim=0), lr.A.weight.norm(dim=1), rtol=1e-4)
    # randomized SVD path gives (nearly) the same error
    lr_r = LowRankLinear.from_linear(layer, rank=4, svd="randomized", niter=4)
    err_r = torch.linalg.matrix_norm(lr_r.dense_weight().double() - w)
    assert float(err_r) <= 1.05 * float(s[4:].pow(2).sum().sqrt())
    # to_dense gives back the same kind of module computing B A
    dense = LowRankLinear.from_linear(layer, rank=4).to_dense()
    assert isinstance(dense, Conv1D if kind == "conv1d" else nn.Linear)
    lr4 = LowRankLinear.from_linear(layer, rank=4)
    assert torch.allclose(dense(x), lr4(x), atol=1e-5)


def test_lowrank_init_and_from_factors() -> None:
    layer = LowRankLinear(8, 6, rank=3, bias=False)
    assert torch.count_nonzero(layer.B.weight) == 0  # B = 0: the layer starts as the zero map
    assert torch.equal(layer(torch.randn(2, 8)), torch.zeros(2, 6))
    b, a = torch.randn(6, 3), torch.randn(3, 8)
    f = LowRankLinear.from_factors(b, a, bias=torch.ones(6))
    x = torch.randn(4, 8)
    assert torch.allclose(f(x), x @ (b @ a).T + 1, atol=1e-5)
    with pytest.raises(ValueError):
        LowRankLinear.from_factors(torch.randn(6, 2), a)
    with pytest.raises(ValueError):
        LowRankLinear(8, 6, rank=0)


def _swap_all(model: nn.Module) -> list[str]:
    names = []
    for t in find_targets(model):
        m, n = t.shape
        set_module(model, t.name, LowRankLinear.from_linear(t.module, rank=min(m, n)))
        names.append(t.name)
    return names


@pytest.mark.parametrize("builder,vocab", [(tiny_llama, 128), (tiny_gpt2, 100), (tiny_bert, 100)])
def test_surgery_round_trip_same_outputs(builder, vocab: int) -> None:
    model = builder()
    ids = _ids(vocab)
    ref = _out(model, ids)
    names = _swap_all(model)
    assert names and all(isinstance(get_module(model, n), LowRankLinear) for n in names)
    lowrank_out = _out(model, ids)
    assert torch.allclose(lowrank_out, ref, atol=1e-4, rtol=1e-4)
    dense = to_dense(model)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert any(isinstance(m, LowRankLinear) for m in model.modules())  # to_dense copies by default
    assert torch.allclose(_out(dense, ids), ref, atol=1e-4, rtol=1e-4)
    # module kinds restored (Conv1D for GPT-2)
    for n in names:
        orig_kind = get_module(model, n).orig_kind
        assert isinstance(get_module(dense, n), Conv1D if orig_kind == "conv1d" else nn.Linear)


def test_low_rank_truncation_changes_outputs_by_expected_amount() -> None:
    """Truncating a planted rank-4 + tiny noise layer to rank 4 keeps the layer output nearly unchanged."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 48, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 4) @ torch.randn(4, 32) + 1e-4 * torch.randn(48, 32))
    x = torch.randn(10, 32)
    lr = LowRankLinear.from_linear(layer, rank=4)
    rel = (lr(x) - layer(x)).norm() / layer(x).norm()
    assert rel < 1e-3
    assert lr.num_params < 48 * 32
