"""rankwise.inspect on tiny models: keys, values against direct computation, errors, compare, FARMS, HTML."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import rankwise
from rankwise.compression.allocation.welore import welore_allocation
from rankwise.engine.powerlaw import fit_power_law
from rankwise.errors import RankwiseError
from rankwise.inspection.api import MATRIX_KEYS, InspectConfig, farms_eigenvalues, inspect, layer_index, layer_type
from rankwise.surgery import LowRankLinear, find_targets, set_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def planted(model: nn.Module, rank: int = 4, noise: float = 1e-3, pattern: str = "q_proj") -> None:
    """Give the matching matrices a planted low-rank structure W = B A + noise."""
    g = torch.Generator().manual_seed(1)
    for t in find_targets(model, pattern):
        m, n = t.shape
        w = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / math.sqrt(rank)
        t.set_weight(w + noise * torch.randn(m, n, generator=g))


CFG = InspectConfig(progress=False)


def test_keys_and_values_match_direct_computation() -> None:
    model = tiny_llama()
    planted(model)
    rep = inspect(model, CFG)
    d = rep.to_dict()
    assert set(d) == {"model", "matrices", "summary", "settings"}
    assert d["settings"]["threads"] == 1 and d["settings"]["device"] == "cpu" and d["settings"]["streamed"] is False
    assert len(d["matrices"]) == 14
    for row in d["matrices"]:
        assert list(row)[: len(MATRIX_KEYS)] == list(MATRIX_KEYS)
        assert "alpha_farms" not in row and "intruder_dimensions" not in row
    json.dumps(d, allow_nan=False)  # strictly valid JSON
    t = find_targets(model, "layers.0.self_attn.o_proj")[0]  # a random (not planted) matrix
    row = rep[t.name]
    w = t.weight().double()
    s = torch.linalg.svdvals(w)
    assert row["shape"] == [64, 64] and row["break_even_rank"] == 32
    assert row["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4)
    assert row["nuclear_norm"] == pytest.approx(float(s.sum()), rel=1e-4)
    assert row["l12_norm"] == pytest.approx(float(w.norm(dim=0).sum()), rel=1e-6)
    assert row["condition_number"] == pytest.approx(float(s[0] / s[-1]), rel=1e-3)
    # planted rank 4: the q_proj matrices keep ≤ 4 directions at 99 % energy, random ones far more
    for r in d["matrices"]:
        if r["name"].endswith("q_proj"):
            assert r["energy_rank_99"] <= 4 and r["energy_rank_90"] <= 4
        else:
            assert r["energy_rank_90"] > 10
    fit = fit_power_law(s.numpy() ** 2)
    assert row["alpha"] == pytest.approx(fit.alpha, rel=1e-3)
    assert row["layer"] == 0 and row["type"] == "self_attn.o_proj"


def test_summary_totals_and_weighted_means() -> None:
    model = tiny_llama()
    planted(model)
    rep = inspect(model, InspectConfig(progress=False, ratio=0.3))
    rows, s = rep.matrices, rep.summary
    total = sum(r["shape"][0] * r["shape"][1] for r in rows)
    assert s["matrices"] == 14 and s["params"] == total
    wm = sum(r["params"] * r["stable_rank"] for r in rows) / total
    assert s["weighted_means"]["stable_rank"] == pytest.approx(wm)
    for lv in (90, 95, 99):
        exp = 0
        for r in rows:
            m, n = r["shape"]
            k = r[f"energy_rank_{lv}"]
            exp += max(0, m * n - k * (m + n))
        assert s[f"params_removed_energy_{lv}"] == exp
    assert s["params_removed_energy_90"] >= s["params_removed_energy_99"] > 0  # the planted matrices
    # WeLore classes are the allocation's
    alloc = welore_allocation([torch.tensor(rep.spectra[r["name"]]) for r in rows],
                              [tuple(r["shape"]) for r in rows], 0.3)
    assert [r["welore_class"] for r in rows] == ["LRC" if x else "N-LRC" for x in alloc.lrc]
    assert s["welore"]["threshold"] == pytest.approx(alloc.threshold)
    assert all(r["welore_class"] == "LRC" for r in rows if r["name"].endswith("q_proj"))
    assert set(s["by_type"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert sum(e["matrices"] for e in s["by_type"].values()) == 14


def test_unreachable_welore_ratio_reports_instead_of_failing() -> None:
    rep = inspect(tiny_llama(), InspectConfig(progress=False, ratio=0.99))
    assert all(r["welore_class"] is None for r in rep.matrices)
    assert "smaller --ratio" in rep.summary["welore"]["error"]


def test_gpt2_conv1d_and_bert() -> None:
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
    rep = inspect(gpt2, CFG)
    assert rep["transformer.h.0.attn.c_attn"]["shape"] == [96, 32]
    assert rep["transformer.h.1.mlp.c_proj"]["type"] == "mlp.c_proj"
    assert "attn.c_proj" in rep.summary["by_type"] and "mlp.c_proj" in rep.summary["by_type"]
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=64)).eval()
    rep2 = inspect(bert, CFG)
    assert rep2["encoder.layer.1.attention.self.query"]["layer"] == 1


def test_targets_filter_and_errors() -> None:
    model = tiny_llama()
    rep = inspect(model, InspectConfig(progress=False, targets="mlp", exclude="down"))
    assert {r["type"] for r in rep.matrices} == {"mlp.gate_proj", "mlp.up_proj"}
    with pytest.raises(RankwiseError, match="match no linear layer.*model.layers.0.self_attn.q_proj"):
        inspect(model, InspectConfig(progress=False, targets="zzz"))
    for bad in (0.0, 1.0, -1, 2):
        with pytest.raises(RankwiseError, match="between 0 and 1"):
            inspect(model, InspectConfig(progress=False, ratio=bad))
    with pytest.raises(RankwiseError, match="intruder_eps"):
        inspect(model, InspectConfig(progress=False, intruder_eps=1.5))
    with pytest.raises(RankwiseError, match="threads"):
        inspect(model, InspectConfig(progress=False, threads=-2))
    with pytest.raises(RankwiseError, match="spectrum_method"):
        inspect(model, InspectConfig(progress=False, spectrum_method="qr"))
    # the svd spectrum path gives the same metrics as the default float64 Gram path
    a = inspect(model, InspectConfig(progress=False, spectrum_method="svd", targets="layers.0"))
    b = inspect(model, InspectConfig(progress=False, targets="layers.0"))
    for ra, rb in zip(a.matrices, b.matrices):
        assert ra["stable_rank"] == pytest.approx(rb["stable_rank"], rel=1e-5)
        assert ra["alpha"] == pytest.approx(rb["alpha"], rel=1e-3)
        assert ra["energy_rank_90"] == rb["energy_rank_90"]
    # threads are restored afterwards
    before = torch.get_num_threads()
    inspect(model, InspectConfig(progress=False, threads=1, targets="layers.0.mlp"))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weight_names_the_matrix(value: float) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    with pytest.raises(RankwiseError) as exc:
        inspect(model, CFG)
    msg = str(exc.value)
    assert "model.layers.1.mlp.up_proj" in msg and "NaN/Inf" in msg and "\n" not in msg


def test_unknown_model_name() -> None:
    with pytest.raises(RankwiseError, match="unknown model"):
        inspect("not-a-model", CFG)


def test_compare_intruder_dimensions_and_spectral_change() -> None:
    base = tiny_llama()
    tuned = tiny_llama()
    # identical model: no intruders, no spectral change
    rep0 = inspect(base, InspectConfig(progress=False, compare=tuned))
    assert all(r["intruder_dimensions"] == 0 for r in rep0.matrices)
    assert all(r["relative_spectral_change"] < 1e-6 for r in rep0.matrices)
    # add a strong rank-2 update along random new directions to one matrix: 2 intruders appear there
    t = find_targets(tuned, "layers.1.self_attn.o_proj")[0]
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(64, 2, generator=g))[0]
    v = torch.linalg.qr(torch.randn(64, 2, generator=g))[0]
    top = float(torch.linalg.svdvals(t.weight())[0])
    t.set_weight(t.weight() + 3 * top * u @ v.T)
    rep = inspect(base, InspectConfig(progress=False, compare=tuned, intruder_top=10, intruder_eps=0.5))
    row = rep["model.layers.1.self_attn.o_proj"]
    assert row["intruder_dimensions"] == 2
    s0 = torch.linalg.svdvals(find_targets(base, "layers.1.self_attn.o_proj")[0].weight().double())
    s1 = torch.linalg.svdvals(t.weight().double())
    assert row["relative_spectral_change"] == pytest.approx(float((s1 - s0).norm() / s0.norm()), rel=1e-4)
    others = [r for r in rep.matrices if r["name"] != row["name"]]
    assert all(r["intruder_dimensions"] == 0 for r in others)
    assert rep.summary["intruder_dimensions"] == 2
    # a model with different shapes does not compare
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=128)).eval()
    with pytest.raises(RankwiseError, match="does not match"):
        inspect(base, InspectConfig(progress=False, compare=other))


def test_farms_pools_square_windows() -> None:
    w = torch.randn(96, 32, generator=torch.Generator().manual_seed(0))
    ev = farms_eigenvalues(w, side=16)
    # 96×32 covered by 6×2 non-overlapping 16×16 windows, 16 eigenvalues each, scaled by 1/16
    assert ev.shape == (6 * 2 * 16,)
    block = w[:16, :16]
    expect = (torch.linalg.svdvals(block).double() ** 2 / 16).numpy()
    assert np.allclose(np.sort(ev[:16]), np.sort(expect), rtol=1e-5)
    model = tiny_llama()
    rep = inspect(model, InspectConfig(progress=False, farms=True))
    assert all("alpha_farms" in r for r in rep.matrices)
    assert rep.summary["weighted_means"]["alpha_farms"] is not None


def test_factorised_model_is_inspected_densely() -> None:
    model = tiny_llama()
    ref = inspect(model, CFG)
    t = find_targets(model, "layers.0.mlp.up_proj")[0]
    m, n = t.shape
    set_module(model, t.name, LowRankLinear.from_linear(t.module, rank=min(m, n)))
    rep = inspect(model, CFG)
    assert len(rep) == len(ref)
    assert rep[t.name]["stable_rank"] == pytest.approx(ref[t.name]["stable_rank"], rel=1e-4)


def test_layer_names() -> None:
    assert layer_index("model.layers.12.self_attn.q_proj") == 12
    assert layer_type("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert layer_type("transformer.h.3.mlp.c_proj") == "mlp.c_proj"
    assert layer_index("classifier") is None and layer_type("classifier") == "classifier"


def test_public_api_and_html(tmp_path: Path) -> None:
    model = tiny_llama()
    planted(model)
    rep = rankwise.inspect(model, rankwise.InspectConfig(progress=False, farms=True, compare=tiny_llama()))
    assert isinstance(rep, rankwise.InspectReport)
    out = tmp_path / "r.html"
    rep.write_html(out)
    text = out.read_text()
    assert text.startswith("<!doctype html>")
    pngs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(pngs) >= 6  # α, stable rank, ESDs, WeLore, FARMS, intruders, spectral change
    import base64

    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "http://" not in text and "https://" not in text  # self-contained, nothing fetched
    assert "model.layers.1.mlp.down_proj" in text
    rep.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["matrices"] == 14
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_left_singular_vectors_match_svd(shape: tuple[int, int]) -> None:
    from rankwise.inspection.api import left_singular_vectors

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = left_singular_vectors(w)
    ref, _, _ = torch.linalg.svd(w, full_matrices=False)
    p = min(shape)
    # same subspace and the same vectors up to sign, column by column
    assert torch.allclose((u[:, :p].T @ ref).abs(), torch.eye(p, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-8)
