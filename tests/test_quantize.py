"""rankwise.quantize: packing, RTN closed form, GPTQ vs RTN, QuantLinear, EoRA exactness, save → load, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from rankwise.compression.eora import eora_factors
from rankwise.errors import RankwiseError
from rankwise.quantization import (
    QuantizeConfig,
    QuantLinear,
    QuantLowRank,
    QuantSelect,
    load_quantized,
    pack,
    quantize,
    save_quantized,
    to_dense,
    unpack,
)
from rankwise.quantization.gptq import gptq
from rankwise.quantization.pack import packed_size
from rankwise.quantization.rtn import rtn

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def windows(n: int = 8, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def correlated_inputs(rows: int, n: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    """Anisotropic inputs like real activations (X = Z M, decaying scales); of rank ``rank`` if given."""
    g = torch.Generator().manual_seed(seed)
    k = rank or n
    M = torch.randn(k, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, k, dtype=torch.float64)[:, None]
    return torch.randn(rows, k, generator=g, dtype=torch.float64) @ M


# -- packing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 8, 77, 1000])
def test_pack_unpack_is_exact(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.int64)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(numel, bits) == (
        numel if bits == 8 else -(-numel // 8) * bits)
    assert torch.equal(unpack(packed, bits, numel).to(torch.int64), codes)


def test_pack_layout_is_little_endian_bitstream():
    # 3-bit codes 1..8 (8 wraps to 0): bits 001 010 011 100 101 110 111 000 from the least significant end
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])
    word = sum(c << (3 * j) for j, c in enumerate(codes.tolist()))
    assert pack(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x21, 0, 0, 0]


def test_pack_rejects_out_of_range_codes_and_bad_widths():
    with pytest.raises(RankwiseError, match=r"\[0, 4\)"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(RankwiseError, match="--bits must be one of 2, 3, 4, 8"):
        pack(torch.tensor([1]), 5)
    with pytest.raises(RankwiseError, match="inconsistent"):
        unpack(torch.zeros(5, dtype=torch.uint8), 4, 8)


# -- RTN: closed form ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_matches_closed_form_reference(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    W[0, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # an all-positive group: lo clamps to 0
    W[1, 4:8] = 0.0  # an all-zero group
    q = rtn(W, bits, group_size=4)
    qmax = 2**bits - 1
    for i in range(5):
        for grp in range(3):
            vals = W[i, 4 * grp : 4 * grp + 4].tolist()
            lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
            s = (hi - lo) / qmax if hi > lo else 1.0
            s = float(torch.tensor(s).half())  # stored as float16
            z = min(max(round(-lo / s), 0), qmax)
            assert float(q.scales[i, grp]) == s and int(q.zeros[i, grp]) == z
            for j, w in enumerate(vals):
                code = min(max(round(w / s) + z, 0), qmax)
                assert int(q.codes[i, 4 * grp + j]) == code
                assert float(q.dequantize(torch.float64)[i, 4 * grp + j]) == pytest.approx((code - z) * s, abs=1e-12)
    assert torch.equal(q.dequantize()[1, 4:8], torch.zeros(4))  # zero is exact
    # error bound: half a step per weight
    step = q.scales.double().repeat_interleave(4, 1)
    assert bool(((q.dequantize(torch.float64) - W).abs() <= step / 2 + 1e-9).all())


# -- GPTQ -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "group"), [(2, 16), (3, 32), (4, 64), (3, 24)])
def test_gptq_beats_rtn_on_its_calibration_inputs(bits, group):
    g = torch.Generator().manual_seed(bits * 100 + group)
    m, n = 48, 96
    W = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1
    X = correlated_inputs(512, n, seed=bits)
    C = X.T @ X

    def err(What: torch.Tensor) -> float:
        return float(((W - What) @ X.T).square().sum())

    e_gptq = err(gptq(W, C, bits, group).dequantize(torch.float64))
    e_rtn = err(rtn(W, bits, group).dequantize(torch.float64))
    assert e_gptq < 0.8 * e_rtn


def _gptq_column_loop(W: torch.Tensor, C: torch.Tensor, bits: int, group: int, damp: float = 0.01,
                      act_order: bool = False) -> torch.Tensor:
    """The paper's Algorithm without lazy batches: after each column, update EVERY remaining column at once.

    Written from the definition (H = 2C damped, U = chol(H⁻¹) upper), independent of gptq()'s blocks and layout.
    Returns the dequantised matrix.
    """
    m, n = W.shape
    W = W.clone()
    H = 2 * C.clone()
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    qmax = 2**bits - 1

    def params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        s = ((hi - lo) / qmax).to(torch.float16).double()
        return s, torch.round(-lo / s).clamp(0, qmax)

    order = torch.argsort(C.diagonal(), descending=True, stable=True) if act_order else torch.arange(n)
    static = [params(W[:, j:j + group]) for j in range(0, n, group)]
    Hp = H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
    Wp, out = W[:, order].clone(), torch.zeros(m, n, dtype=torch.float64)
    cur = None
    for i in range(n):
        j = int(order[i])
        if act_order:
            s, z = static[j // group]
        elif j % group == 0:
            cur = params(Wp[:, i:i + group])
        if not act_order:
            s, z = cur
        q = (torch.round(Wp[:, i] / s) + z).clamp(0, qmax)
        out[:, j] = (q - z) * s
        err = (Wp[:, i] - out[:, j]) / U[i, i]
        Wp[:, i:] -= torch.outer(err, U[i, i:])
    return out


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("group", "block"), [(16, 32), (16, 128), (24, 24)])
def test_gptq_lazy_blocks_equal_the_column_loop(act_order, group, block):
    g = torch.Generator().manual_seed(group + block)
    m, n = 20, 96
    W = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1
    X = correlated_inputs(400, n, seed=group)
    C = X.T @ X
    q = gptq(W, C, 3, group, block_size=block, act_order=act_order)
    ref = _gptq_column_loop(W, C, 3, group, act_order=act_order)
    assert torch.equal(q.dequantize(torch.float64), ref)  # same codes, scales and zeros: bit-identical
    # and the result is a real improvement on its calibration inputs
    e = float(((W - ref) @ X.T).square().sum())
    e_rtn = float(((W - rtn(W, 3, group).dequantize(torch.float64)) @ X.T).square().sum())
    assert e < 0.8 * e_rtn


def test_gptq_act_order_handles_dead_inputs_and_keeps_contiguous_groups():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 32, generator=g, dtype=torch.float64)
    X = correlated_inputs(200, 32, seed=5)
    X[:, [3, 17]] = 0.0  # inputs never seen: their weights are set to 0 (exact on the data)
    q = gptq(W, X.T @ X, 4, 8, act_order=True)
    What = q.dequantize(torch.float64)
    assert torch.equal(What[:, [3, 17]], torch.zeros(12, 2))
    assert q.scales.shape == (12, 4) and q.codes.shape == (12, 32)


def test_gptq_with_isotropic_inputs_and_tiny_damping_is_rtn():
    # H ∝ I: no column correlations, so the error feedback is zero and GPTQ rounds to nearest
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q = gptq(W, torch.eye(32, dtype=torch.float64), bits=4, group_size=8, damp=1e-6)
    r = rtn(W, bits=4, group_size=8)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)


# -- QuantLinear ---------------------------------------------------------------------------------------------------


def test_quantlinear_stores_packed_bytes_and_computes_dequantised_linear():
    torch.manual_seed(0)
    W, b = torch.randn(40, 64), torch.randn(40)
    q = rtn(W, 3, 32)
    layer = QuantLinear.from_quantized(q, bias=b)
    sd = layer.state_dict()
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].numel() == 40 * 64 * 3 // 8
    assert sd["scales"].dtype == torch.float16 and tuple(sd["scales"].shape) == (40, 2)
    assert torch.equal(layer.codes(), q.codes) and torch.equal(layer.zeros(), q.zeros)
    x = torch.randn(3, 5, 64)
    assert torch.allclose(layer(x), F.linear(x, q.dequantize(), b), atol=1e-5)


def test_int4_kernel_path_matches_dequantised_matmul_in_bfloat16():
    torch.manual_seed(1)
    W = torch.randn(96, 128)
    layer = QuantLinear.from_quantized(rtn(W, 4, 64))
    x = torch.randn(7, 128).to(torch.bfloat16)
    y = layer._int4_kernel(x)
    assert y is not None and y.dtype == torch.bfloat16
    ref = x.float() @ layer.dequantize().T
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2


def test_eora_at_full_rank_removes_the_error_on_the_calibration_subspace():
    torch.manual_seed(2)
    m, n = 24, 32
    W = torch.randn(m, n, dtype=torch.float64)
    q = rtn(W, 2, 16)
    X = correlated_inputs(200, n, seed=5, rank=12)  # activations spanning a 12-dim subspace
    C = X.T @ X
    delta = W - q.dequantize(torch.float64)
    B, A, _ = eora_factors(delta, C, min(m, n))
    layer = QuantLinear.from_quantized(q, dtype=torch.float64)
    layer.set_eora(B, A)
    before = float(((delta) @ X.T).norm())
    after = float((layer(X) - X @ W.T).norm())
    assert before > 1.0 and after < 1e-8 * before


# -- the model-level API ---------------------------------------------------------------------------------------------


def test_quantize_save_load_identical_logits(tmp_path):
    model = tiny_llama()
    x = windows(2, 16, seed=9)
    ref = model(x).logits
    res = quantize(model, QuantizeConfig(bits=4, group_size=32, method="gptq", eora_rank=8, progress=False),
                   calib=windows())
    assert len(res.layers) == 14 and all(isinstance(model.get_submodule(n), QuantLinear) for n in res.layers)
    assert all(v["rel_err_eora"] < v["rel_err"] for v in res.layers.values())
    out = model(x).logits
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.2
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "rankwise"
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
    assert qw.dtype == torch.uint8 and qw.numel() == 64 * 128 * 4 // 8
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(loaded(x).logits, out)
    from transformers import AutoModelForCausalLM

    assert torch.equal(AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))(x).logits, out)
    model.save_pretrained(str(tmp_path / "hf"))  # marked: save_pretrained writes a folder that rebuilds too
    assert torch.equal(AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))(x).logits, out)
    dense = to_dense(loaded)
    assert not any(isinstance(mod, QuantLinear) for mod in dense.modules())
    assert torch.allclose(dense(x).logits, out, atol=1e-4)


def test_gptq_model_error_below_rtn():
    x = windows(4, 32, seed=11)
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_llama()
        res = quantize(model, QuantizeConfig(bits=3, group_size=32, method=method, eora_rank=None, progress=False),
                       calib=x) if method == "gptq" else None
        if res is None:  # RTN needs no data; measure its error on the same inputs through the GPTQ statistics
            quantize(model, QuantizeConfig(bits=3, group_size=32, method="rtn", progress=False))
        errs[method] = float((model(x).logits - tiny_llama()(x).logits).norm())
    assert errs["gptq"] < errs["rtn"]


def test_quantize_lowrank_factors(tmp_path):
    import rankwise

    model = tiny_llama()
    rankwise.compress(model, rankwise.CompressConfig(ratio=0.3, method="svd", alloc="uniform",
                                                     alloc_sensitivity="none", progress=False))
    x = windows(2, 16, seed=4)
    ref = model(x).logits
    res = quantize(model, QuantizeConfig(bits=8, group_size=32, method="gptq", eora_rank=2, progress=False),
                   calib=windows())
    lr = [mod for mod in model.modules() if isinstance(mod, QuantLowRank)]
    assert len(lr) == 14 and all(isinstance(m.A, QuantLinear) and isinstance(m.B, QuantLinear) for m in lr)
    assert all(m.A.eora_rank == 2 and m.B.eora_rank == 2 for m in lr)  # EoRA on each quantised factor
    assert all(v["rel_err_eora"] <= v["rel_err"] for v in res.layers.values())
    out = model(x).logits
    assert float((out - ref).norm() / ref.norm()) < 0.02  # 8 bits: close to the low-rank model
    save_quantized(model, tmp_path / "lq")
    assert torch.equal(load_quantized(tmp_path / "lq")(x).logits, out)


def tiny_qwen2_with_biases() -> torch.nn.Module:
    """GQA 4/2 heads with (non-zero) q/k/v biases: MoDeGPT's selections then carry biases too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return model


def test_quantize_modegpt_select_layers(tmp_path):
    import rankwise
    from rankwise.surgery.select import SelectLinear

    model = tiny_qwen2_with_biases()
    rankwise.compress(model, method="modegpt", ratio=0.3, calib=windows(), device="cpu", progress=False)
    sel = {n: copy.deepcopy(m) for n, m in model.named_modules() if isinstance(m, SelectLinear)}
    dense = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(sel) == 7 and len(dense) == 7  # the allocation compresses one block and leaves the other dense
    x = windows(2, 16, seed=4)
    ref = model(x).logits.detach()
    res = quantize(model, QuantizeConfig(bits=8, group_size=32, method="gptq", eora_rank=2, progress=False),
                   calib=windows())
    qs = {n: m for n, m in model.named_modules() if isinstance(m, QuantSelect)}
    assert set(qs) == set(sel) and all(isinstance(m.inner, QuantLinear) and m.inner.eora_rank == 2
                                       for m in qs.values())
    assert set(res.layers) == {f"{n}.inner" for n in sel} | dense
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in dense)
    assert all(v["rel_err_eora"] <= v["rel_err"] for v in res.layers.values())
    assert any(m.cols % 32 for m in qs.values())  # o_proj/down_proj keep a chosen number of columns: ragged groups
    g = torch.Generator().manual_seed(3)
    for n, m in qs.items():
        old = sel[n]
        assert (m.rows, m.cols, m.scatter_out, m.gather_in) == (old.rows, old.cols, old.scatter_out, old.gather_in)
        for a, b in ((m.out_index, old.out_index), (m.in_index, old.in_index)):
            assert (a is None and b is None) or torch.equal(a, b)
        # reference: the SelectLinear holding the dequantised block plus its EoRA correction
        block = (m.inner.dequantize() + m.inner.eora_B @ m.inner.eora_A).detach()
        want = SelectLinear.from_weight(block, m.inner.bias, old.in_features, old.out_features, old.out_index,
                                        old.in_index, old.scatter_out, old.gather_in)
        h = torch.randn(3, old.cols if old.in_index is not None and not old.gather_in else old.in_features,
                        generator=g)
        torch.testing.assert_close(m(h), want(h))
        assert float((block - old.weight).norm() / old.weight.norm()) < 0.01  # 8 bits
    out = model(x).logits.detach()
    assert float((out - ref).norm() / ref.norm()) < 0.02
    save_quantized(model, tmp_path / "mq")
    meta = json.loads((tmp_path / "mq" / "rankwise.json").read_text())
    assert {n: s["type"] for n, s in meta["layers"].items()} == {**{n: "quant_select" for n in sel},
                                                                  **{n: "quant" for n in dense}}
    down = next(n for n in sel if n.endswith("down_proj"))
    with safe_open(str(tmp_path / "mq" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{down}.inner.qweight").dtype == torch.uint8
        assert f"{down}.inner.weight" not in f.keys() and f.get_tensor(f"{down}.weight").numel() == 0  # placeholder
    loaded = load_quantized(tmp_path / "mq")
    assert torch.equal(loaded(x).logits, out)
    from transformers import AutoModelForCausalLM

    assert torch.equal(AutoModelForCausalLM.from_pretrained(str(tmp_path / "mq"))(x).logits, out)
    plain = to_dense(loaded)
    assert not any(isinstance(mod, (QuantSelect, SelectLinear, QuantLinear)) for mod in plain.modules())
    torch.testing.assert_close(plain(x).logits, out, atol=1e-4, rtol=1e-4)
    with pytest.raises(RankwiseError, match="already quantised"):
        quantize(loaded, QuantizeConfig(group_size=32, method="rtn", progress=False))


@pytest.mark.parametrize("method", ["svd", "modegpt"])
def test_targets_leave_unmatched_factorised_layers_as_they_were(tmp_path, method):
    import rankwise
    from rankwise.surgery.lowrank import LowRankLinear
    from rankwise.surgery.select import SelectLinear

    model = tiny_qwen2_with_biases()
    rankwise.compress(model, method=method, ratio=0.3, alloc="uniform", alloc_sensitivity="none", speed_guard="off",
                      calib=windows(), device="cpu", progress=False)
    kind = SelectLinear if method == "modegpt" else LowRankLinear
    before = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    assert any(isinstance(m, kind) and not n.endswith("q_proj") for n, m in before.items())
    res = quantize(model, QuantizeConfig(group_size=32, method="rtn", targets="q_proj", progress=False))
    assert res.layers and all("q_proj" in n for n in res.layers)
    for n, m in before.items():
        now = model.get_submodule(n)
        if n.endswith("q_proj"):
            assert isinstance(now, {kind: QuantSelect if method == "modegpt" else QuantLowRank}.get(type(m),
                                                                                                   QuantLinear)), n
        else:
            assert now is m, n  # untouched, still what compress made (a factorised layer or dense)
    x = windows(2, 16, seed=4)
    save_quantized(model, tmp_path / "part")
    assert torch.equal(load_quantized(tmp_path / "part")(x).logits, model(x).logits)


# -- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "msg"), [
    ({"inner": None}, "lacks its 'inner' layer"),
    ({"select_in": "yes"}, "must be true or false"),
    ({"out_features": 16}, "inner block 24×64 does not fit the 16×64 layer"),
    ({"select_out": False}, "inner block 24×64 does not fit the 64×64 layer"),
])
def test_corrupt_quant_select_spec_is_a_one_line_error(change, msg):
    from rankwise.surgery.layers import build_layer

    inner = {"type": "quant", "in_features": 64, "out_features": 24, "bits": 4, "group_size": 32, "bias": True}
    spec = {"type": "quant_select", "in_features": 64, "out_features": 64, "select_out": True, "select_in": False,
            "scatter_out": True, "gather_in": False, "inner": inner}
    layer = build_layer("blk.q_proj", spec)
    assert isinstance(layer, QuantSelect) and layer.out_index.shape == (24,) and layer.in_index is None
    with pytest.raises(RankwiseError, match=msg):
        build_layer("blk.q_proj", {**spec, **change})


@pytest.mark.parametrize(("kw", "msg"), [
    ({"bits": 5}, "--bits must be one of 2, 3, 4, 8"),
    ({"bits": 4.0}, "--bits must be one of"),
    ({"group_size": 0}, "--group-size must be at least 1, got 0"),
    ({"calib_samples": "8"}, "calib_samples \\(--calib-samples\\) must be a whole number"),
    ({"eora_rank": 0}, "--eora-rank must be a positive"),
    ({"eora_rank": -3}, "--eora-rank must be a positive"),
    ({"method": "awq"}, "awq"),
    ({"damp": 0.0}, "--damp"),
])
def test_config_errors(kw, msg):
    with pytest.raises(RankwiseError, match=msg):
        QuantizeConfig(**kw)


def test_group_size_must_divide_in_features_and_names_nearest():
    with pytest.raises(RankwiseError, match=r"--group-size 40 does not divide in_features 64 .*nearest valid group "
                                            r"size is 32"):
        quantize(tiny_llama(), QuantizeConfig(group_size=40, method="rtn", progress=False))


def test_eora_rank_above_break_even():
    # q_proj is 64×64: r·128 < 4096 → r ≤ 31
    with pytest.raises(RankwiseError, match="above break-even .* at most 31"):
        quantize(tiny_llama(), QuantizeConfig(group_size=32, eora_rank=32, progress=False), calib=windows())


def test_quantizing_twice_is_refused():
    model = tiny_llama()
    quantize(model, QuantizeConfig(group_size=32, method="rtn", progress=False))
    with pytest.raises(RankwiseError, match="already quantised"):
        quantize(model, QuantizeConfig(group_size=32, method="rtn", progress=False))
