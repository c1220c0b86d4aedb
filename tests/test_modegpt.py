"""MoDeGPT (``--method modegpt``): exactness at full size, closed forms, the ratio, save/load, layout errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rankwise
from rankwise.compression.api import compress
from rankwise.compression.modegpt import (
    BlockStats,
    Layout,
    Sizes,
    _Collector,
    allocate_sparsity,
    block_layout,
    compress_block,
    mlp_quantum,
    nystrom_mlp,
)
from rankwise.errors import RankwiseError
from rankwise.surgery.select import SelectLinear
from tiny_models import tiny_llama_config, write_tiny_llama


def _llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def _qwen2(seed: int = 0):
    """GQA 4/2 heads with q/k/v biases (Qwen2's layout)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=256, max_position_embeddings=128)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for layer in m.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return m


def _windows(n: int = 8, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _dense_stats(model, x: torch.Tensor) -> list[BlockStats]:
    """Every block's statistics from one forward of the dense model (what a non-sequential walk sees)."""
    layers = model.model.layers
    lays = [block_layout(f"model.layers.{i}", b, model.config) for i, b in enumerate(layers)]
    cols = [_Collector(b, lay, torch.device("cpu"), 0, moments=True, influence=True) for b, lay in zip(layers, lays)]
    for c in cols:
        c.__enter__()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for c in cols:
            c.__exit__()
    return lays, [c.stats for c in cols]


@pytest.mark.parametrize("build", [_llama, _qwen2], ids=["llama", "qwen2-gqa-bias"])
def test_full_size_decomposition_reproduces_the_model(build, one_torch_thread):
    model = build()
    x = _windows()
    ref = model(x).logits
    lays, stats = _dense_stats(model, x)
    for b, lay, st in zip(model.model.layers, lays, stats):
        full = Sizes(mlp=lay.inter, qk_units=len(lay.units), vo=lay.head_dim)
        kept = compress_block(b, lay, st, full, force=True)
        assert len(kept) == 7
    assert all(isinstance(m, SelectLinear) for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(model(x).logits, ref, atol=2e-5, rtol=1e-4)


def test_nystrom_down_proj_is_the_least_squares_fit_on_the_activations(one_torch_thread):
    torch.manual_seed(0)
    gate, up, down = nn.Linear(16, 40, bias=False), nn.Linear(16, 40, bias=False), nn.Linear(40, 16, bias=False)
    X = torch.randn(500, 16, dtype=torch.float64)
    Z = torch.nn.functional.silu(X @ gate.weight.double().T) * (X @ up.weight.double().T)
    g, u, d, S = nystrom_mlp(gate, up, down, Z.T @ Z, k=12)
    assert g.rows == u.rows == d.cols == 12 and torch.equal(g.out_index, S) and torch.equal(d.in_index, S)
    # reference: argmin_X ‖Z_S X − Z W_dᵀ‖ straight from the activations
    ref = torch.linalg.lstsq(Z[:, S], Z @ down.weight.double().T).solution.T
    torch.testing.assert_close(d.weight.double(), ref, atol=1e-4, rtol=1e-4)
    # the kept neurons are the top ridge-leverage scores of C_σ
    C = Z.T @ Z
    lam = torch.linalg.eigvalsh(C).mean()
    lev = torch.diagonal(C @ torch.linalg.inv(C + lam * torch.eye(40, dtype=C.dtype)))
    assert set(S.tolist()) == set(torch.topk(lev, 12).indices.tolist())


def test_rope_pairs_and_gqa_groups_are_kept_together(one_torch_thread):
    model = _llama()
    x = _windows()
    lays, stats = _dense_stats(model, x)
    lay, block = lays[0], model.model.layers[0]
    compress_block(block, lay, stats[0], Sizes(mlp=lay.inter, qk_units=5, vo=lay.head_dim))
    q, k = block.self_attn.q_proj, block.self_attn.k_proj
    hd, half = lay.head_dim, lay.head_dim // 2
    assert q.rows == lay.heads * 10 and k.rows == lay.kv_heads * 10
    kd = [set((k.out_index[k.out_index // hd == g] % hd).tolist()) for g in range(lay.kv_heads)]
    for g, dims in enumerate(kd):
        assert all((i + half) in dims for i in dims if i < half)  # RoPE pairs whole
        for h in range(lay.group):  # every query head of the group keeps its key head's dimensions
            head = g * lay.group + h
            assert set((q.out_index[q.out_index // hd == head] % hd).tolist()) == dims


def test_ratio_is_met_and_save_load_export_are_identical(tmp_path, one_torch_thread):
    from transformers import AutoModelForCausalLM

    model = _llama()
    x = _windows()
    res = compress(model, method="modegpt", ratio=0.3, calib=x, device="cpu", progress=False)
    d = model.config.hidden_size
    assert abs(res.achieved_ratio - 0.3) <= 3 * d / res.targeted_params_before  # within one MLP neuron
    left = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("_proj"))
    assert left == res.targeted_params_after
    assert res.method == "modegpt" and res.timings["influence"] > 0
    y = _windows(2, 16, seed=5)
    ref = model(y).logits
    rankwise.save(model, tmp_path / "c")
    for loaded in (rankwise.load(tmp_path / "c"), AutoModelForCausalLM.from_pretrained(str(tmp_path / "c"))):
        torch.testing.assert_close(loaded.eval()(y).logits, ref, atol=0, rtol=0)
    assert json.loads((tmp_path / "c" / "rankwise.json").read_text())["method"] == "modegpt"
    rankwise.export_dense(model, tmp_path / "d")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "d")).eval()
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(plain(y).logits, ref, atol=1e-5, rtol=1e-5)


def test_cli_streamed_modegpt_loads_and_matches_in_memory(tmp_path, capsys, one_torch_thread):
    from transformers import AutoModelForCausalLM

    from rankwise.cli.main import main

    src = write_tiny_llama(tmp_path / "m")
    out, dense = tmp_path / "c", tmp_path / "d"
    args = ["--ratio", "0.2", "--calib", "ptb", "--calib-samples", "4", "--seq-len", "32", "--device", "cpu"]
    assert main(["compress", str(src), "--method", "modegpt", *args, "--out", str(out), "--export-dense", str(dense),
                 "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "modegpt" and abs(data["achieved_ratio"] - 0.2) < 0.01
    streamed = rankwise.load(out)
    mem = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    from rankwise.compression.calibration.loops import text_windows
    from rankwise.io.models import load_tokenizer

    windows, _ = text_windows(load_tokenizer(src), "ptb", 4, 32, 0)
    compress(mem, method="modegpt", ratio=0.2, calib=windows, device="cpu", progress=False)
    y = _windows(2, 16, seed=3)
    torch.testing.assert_close(streamed(y).logits, mem(y).logits, atol=1e-5, rtol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(str(dense)).eval()  # plain transformers, full-width zero-padded
    torch.testing.assert_close(plain(y).logits, mem(y).logits, atol=1e-5, rtol=1e-5)


def test_unsupported_layouts_are_one_line_errors_naming_the_module(one_torch_thread):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64)).eval()
    with pytest.raises(RankwiseError, match=r"transformer\.h\.0.*c_attn \(Conv1D\)") as exc:
        compress(gpt2, method="modegpt", ratio=0.2, calib=_windows(2, 16), device="cpu", progress=False)
    assert "\n" not in str(exc.value)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.fc1, self.fc2 = Attn(), nn.Linear(8, 16), nn.Linear(16, 8)

    with pytest.raises(RankwiseError, match=r"MLP of blk\.0.*gate_proj"):
        block_layout("blk.0", Block(), tiny_llama_config())
    with pytest.raises(RankwiseError, match="targets"):
        compress(_llama(), method="modegpt", ratio=0.2, calib=_windows(2, 16), exclude="mlp", device="cpu")
    with pytest.raises(RankwiseError, match="heal-steps"):
        compress(_llama(), method="modegpt", ratio=0.2, calib=_windows(2, 16), heal_steps=2, device="cpu")


def test_allocation_follows_influence_and_hits_the_ratio():
    lay = Layout(block="b", attn="a", mlp="m", hidden=64, inter=256, heads=4, kv_heads=2, head_dim=16,
                 units=[[i, i + 8] for i in range(8)])
    lays = [lay] * 4
    influence = [0.5, 0.05, 0.1, 0.2]
    dense = 4 * lay.dense_params()
    q = mlp_quantum(lay.inter)
    assert q == 4  # MLP widths move in groups of 4 neurons at inter 256 (16 from inter 1,024 up)
    for ratio in (0.1, 0.3, 0.5):
        a = allocate_sparsity(influence, lays, ratio, fixed_params=1000)
        assert abs(a.achieved_ratio - ratio) <= q * 3 * 64 / 2 / (dense + 1000)  # within half a group of neurons
        assert all(sz.mlp % q == 0 for sz in a.sizes)
        assert a.sparsity[1] >= a.sparsity[2] >= a.sparsity[3] >= a.sparsity[0]  # important blocks lose less
    with pytest.raises(RankwiseError, match="out of reach"):
        allocate_sparsity(influence, lays, 0.99, fixed_params=0)


# -- method="auto" (the default): modegpt where every block decomposes, whiten otherwise -------------------


def test_auto_is_the_default_and_runs_modegpt_on_a_decomposable_model(tmp_path, one_torch_thread):
    from rankwise.compression.api import CompressConfig

    assert CompressConfig().method == "auto"
    x = _windows(4, 16)
    auto, explicit = _qwen2(), _qwen2()
    res = compress(auto, ratio=0.3, calib=x, device="cpu", progress=False)
    ref = compress(explicit, method="modegpt", ratio=0.3, calib=x, device="cpu", progress=False)
    assert res.method == "modegpt" and res.method_choice.startswith("auto → modegpt")
    assert res.ranks == ref.ranks and any(isinstance(m, SelectLinear) for m in auto.modules())
    from rankwise.evaluation.report import size_report

    rep = size_report(auto)  # what `rankwise eval` shows: select layers, no factorised ones
    assert rep.select_layers == sum(isinstance(m, SelectLinear) for m in auto.modules()) and rep.factorised_layers == 0
    y = _windows(2, 16, seed=5)
    # the same pipeline (equal up to the last float32 bits: BLAS kernels may differ with buffer alignment)
    torch.testing.assert_close(auto(y).logits, explicit(y).logits, atol=1e-5, rtol=1e-5)
    rankwise.save(auto, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "rankwise.json").read_text())
    assert meta["method"] == "modegpt" and meta["config"]["method"] == "modegpt"
    assert meta["method_choice"] == res.method_choice


@pytest.mark.parametrize("option, why", [
    ({"anchor": True}, "--anchor is an option of the whiten pipeline"),
    ({"alloc": "uniform"}, "--alloc is an option of the whiten pipeline"),
    ({"heal_steps": 1}, "heal-steps"),
    ({"exclude": "mlp"}, "targets/--exclude"),
    ({"ratio": 0.1}, "ratio 0.1 < 0.15"),  # small ratios: whiten was better on validation
])
def test_auto_falls_back_to_whiten_with_its_reason(option, why, one_torch_thread):
    from rankwise.compression.api import CompressConfig, choose_method
    from rankwise.surgery.targets import find_targets

    model = _llama()
    config = CompressConfig(**{"ratio": 0.3, **option})
    chosen, reason = choose_method(model, find_targets(model, config.targets, config.exclude), config)
    assert chosen.method == "whiten" and reason.startswith("auto → whiten") and why in reason
    assert {k: v for k, v in vars(chosen).items() if k != "method"} == {
        k: v for k, v in vars(config).items() if k != "method"}  # nothing else changed
    explicit = CompressConfig(ratio=0.3, method="svd")
    assert choose_method(model, find_targets(model), explicit) == (explicit, None)  # only "auto" is resolved


def test_auto_on_a_fused_layout_runs_whiten_and_names_the_module(one_torch_thread):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rankwise.surgery.lowrank import LowRankLinear

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64)).eval()
    res = compress(gpt2, ratio=0.2, calib=_windows(4, 16), device="cpu", progress=False, speed_guard="off")
    assert res.method == "whiten" and "transformer.h.0" in res.method_choice and "c_attn" in res.method_choice
    assert "\n" not in res.method_choice
    assert any(isinstance(m, LowRankLinear) for m in gpt2.modules())


@pytest.mark.parametrize("family, expect", [
    ("gemma2", "modegpt"),  # alternating sliding-window/global layers, explicit head_dim, softcapping
    ("qwen3", "whiten"),  # per-head q_norm/k_norm: modegpt cannot drop query/key dimensions
])
def test_auto_on_other_families_reloads_identically(family, expect, tmp_path, one_torch_thread):
    import transformers as T

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    cfg, cls = {"gemma2": (T.Gemma2Config(**common, sliding_window=8), T.Gemma2ForCausalLM),
                "qwen3": (T.Qwen3Config(**common), T.Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    res = compress(model, ratio=0.3, calib=_windows(8, 32), device="cpu", progress=False)
    assert res.method == expect and abs(res.achieved_ratio - 0.3) < 0.01
    if expect == "whiten":
        assert "q_norm" in res.method_choice
    y = _windows(2, 24, seed=7)
    rankwise.save(model, tmp_path / "c")
    torch.testing.assert_close(rankwise.load(tmp_path / "c")(y).logits, model(y).logits, atol=0, rtol=0)
