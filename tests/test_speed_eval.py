"""Speed measurement: prefill/decode/peak memory, greedy equivalence, layer cost model and break-even ranks."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError
from rankwise.evaluation.cost_model import (
    DEFAULT_COST_MODELS,
    SMOLLM2_SHAPES,
    LayerCostModel,
    cost_model,
    fit_cost_model,
    load_cost_models,
    speed_break_even_rank,
)
from rankwise.evaluation.microbench import time_layers
from rankwise.evaluation.speed import greedy_decode, measure_speed, prompt_ids
from rankwise.surgery import LowRankLinear, find_targets, set_module


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=128)).eval()


def full_rank(model: nn.Module) -> nn.Module:
    """Every target replaced by its exact full-rank factorisation (same function, two matmuls)."""
    for t in find_targets(model):
        set_module(model, t.name, LowRankLinear.from_linear(t.module, min(t.shape)))
    return model


def _ids(vocab: int, n: int = 20) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_greedy_decode_equals_generate(build) -> None:
    model = build()
    ids = _ids(100)
    tokens, tp, td = greedy_decode(model, ids, new_tokens=6)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)[0, ids.shape[1]:]
    assert tokens == ref.tolist()
    assert tp > 0 and td > 0


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_measure_speed_dense_vs_full_rank_factorised(build) -> None:
    dense = build()
    fact = full_rank(build())
    assert sum(isinstance(m, LowRankLinear) for m in fact.modules()) > 0
    ids = _ids(100, 24)
    res = measure_speed({"dense": dense, "factorised": fact}, ids, new_tokens=8, repeats=2, warmup=1)
    assert list(res) == ["dense", "factorised"]
    for r in res.values():
        assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0
        assert r.peak_memory_mb > 0 and r.memory_kind == "rss"
        assert len(r.prefill_s) == len(r.decode_s) == 2 and r.prompt_tokens == 24 and r.new_tokens == 8
        assert len(r.prefill_cpu_s) == len(r.decode_cpu_s) == 2 and min(r.prefill_cpu_s + r.decode_cpu_s) > 0
        assert r.prefill_tokens_per_s == pytest.approx(24 / (sum(r.prefill_s) / 2))  # median of two = mean
    assert res["dense"].generated == res["factorised"].generated
    assert len(res["dense"].generated) == 8


def test_measure_speed_encoder_has_no_decode() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=64)).eval()
    r = measure_speed(bert, _ids(100, 16), repeats=1, warmup=0)["model"]
    assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s is None and r.generated == []


def test_measure_speed_bad_arguments() -> None:
    with pytest.raises(RankwiseError, match="repeats"):
        measure_speed(tiny_llama(), _ids(100), repeats=0)
    with pytest.raises(RankwiseError, match="at least one model"):
        measure_speed({}, _ids(100))


def test_peak_memory_sees_an_allocation() -> None:
    # A fresh process: in this one, heap pages freed by earlier tests stay resident and could be
    # reused by the allocation, so RSS would not grow and the check would depend on test order.
    code = (
        "import time, torch\n"
        "from rankwise.evaluation.memory import PeakMemory\n"
        "with PeakMemory() as pm:\n"
        "    x = torch.ones(64 * 2**20)  # 256 MB of float32, touched\n"
        "    x += 1\n"
        "    time.sleep(0.2)\n"
        "    del x\n"
        "print(pm.extra_mb, pm.peak_mb)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    extra_mb, peak_mb = map(float, out.stdout.split())
    assert extra_mb > 150 and peak_mb >= extra_mb


def test_cost_models_come_from_the_data_file(tmp_path) -> None:
    import json
    from importlib import resources

    data = json.loads(resources.files("rankwise.evaluation").joinpath("cost_model.json").read_text())
    assert {d["tokens"] for d in data["models"]} == set(DEFAULT_COST_MODELS)
    assert "--fit" in data["fit_command"]
    for d in data["models"]:
        assert DEFAULT_COST_MODELS[d["tokens"]].mac_rate == d["mac_rate"]
    own = tmp_path / "cm.json"
    own.write_text(json.dumps({"models": [{"tokens": 8, "overhead_s": 1e-6, "mac_rate": 2e10, "efficiency": 0.5}]}))
    assert load_cost_models(own)[8].efficiency == 0.5
    own.write_text(json.dumps({"models": [{"tokens": 8, "overhead_s": 1e-6, "mac_rate": -1, "efficiency": 0.5}]}))
    with pytest.raises(RankwiseError, match="invalid model"):
        load_cost_models(own)
    own.write_text("{not json")
    with pytest.raises(RankwiseError, match="unreadable"):
        load_cost_models(own)


def test_prompt_ids_and_too_short_prompt() -> None:
    class Tok:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
            return {"input_ids": [len(w) for w in text.split()]}

    ids = prompt_ids(Tok(), "a bb ccc dddd eeeee", n_tokens=4)
    assert ids.tolist() == [[7, 1, 2, 3]]
    with pytest.raises(RankwiseError, match="fewer than the 9"):
        prompt_ids(Tok(), "a bb ccc", n_tokens=10, name="tiny")


def test_fit_cost_model_recovers_known_parameters() -> None:
    truth = LayerCostModel(tokens=64, overhead_s=5e-6, mac_rate=5e10, efficiency=0.8)
    samples = []
    for m, n in SMOLLM2_SHAPES:
        samples.append((m, n, None, truth.dense_s(m, n)))
        samples += [(m, n, k, truth.factorised_s(m, n, k)) for k in (20, 80, 160)]
    fit = fit_cost_model(samples, 64)
    assert fit.overhead_s == pytest.approx(5e-6, rel=1e-6)
    assert fit.mac_rate == pytest.approx(5e10, rel=1e-6)
    assert fit.efficiency == pytest.approx(0.8, rel=1e-6)
    # break-even: equal times, closed form
    m, n = 576, 1536
    k = fit.break_even(m, n)
    assert fit.factorised_s(m, n, k) == pytest.approx(fit.dense_s(m, n), rel=1e-9)
    assert k == pytest.approx(0.8 * (m * n - 5e-6 * 5e10 / 64) / (m + n), rel=1e-6)


def test_speed_break_even_rank_properties() -> None:
    for m, n in [*SMOLLM2_SHAPES, (64, 64), (4096, 11008)]:
        be = break_even_rank(m, n)
        k512 = speed_break_even_rank(m, n)
        k1 = speed_break_even_rank(m, n, tokens=1)
        both = speed_break_even_rank(m, n, tokens=(1, 512))
        assert 0 <= k512 < be and 0 <= k1 < be
        assert both == min(k1, k512)
        cm = cost_model(512)
        if 0 < k512 < be - 1:  # limited by speed: the next rank is slower than dense, this one is not
            assert cm.factorised_s(m, n, k512) <= cm.dense_s(m, n) < cm.factorised_s(m, n, k512 + 1)
    # tiny layers are dominated by call overhead: decode never pays off for them
    assert speed_break_even_rank(8, 8, tokens=1) == 0
    # a custom model that is twice as efficient as dense gives the parameter cap
    fast = LayerCostModel(tokens=512, overhead_s=0.0, mac_rate=1e11, efficiency=2.0)
    assert speed_break_even_rank(576, 576, model=fast) == break_even_rank(576, 576) - 1
    with pytest.raises(RankwiseError):
        speed_break_even_rank(0, 5)
    assert set(DEFAULT_COST_MODELS) == {1, 64, 512}
    assert cost_model(300).tokens == 300 and cost_model(300).mac_rate == DEFAULT_COST_MODELS[512].mac_rate


def test_time_layers_and_measured_model() -> None:
    for clock in ("wall", "cpu"):
        dense, fact = time_layers(192, 576, [16, 100], tokens=8, rounds=2, target_s=0.001, clock=clock)
        assert dense > 0 and set(fact) == {16, 100} and all(t > 0 for t in fact.values())
    with pytest.raises(RankwiseError, match="clock"):
        time_layers(8, 8, [2], clock="sundial")
    k = speed_break_even_rank(192, 576, tokens=1, measure=True)
    assert 0 <= k < break_even_rank(192, 576)
    assert math.isfinite(cost_model(1, measure=True).mac_rate)


def test_densify_slow_layers_keeps_function() -> None:
    from rankwise.evaluation.cost_model import densify_slow_layers, slow_layers

    model = tiny_llama()
    for t in find_targets(model):  # q/o (64×64, break-even 32) at rank 30, the rest at rank 4
        set_module(model, t.name, LowRankLinear.from_linear(t.module, 30 if t.shape == (64, 64) else 4))
    ids = _ids(100)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cost = LayerCostModel(tokens=512, overhead_s=0.0, mac_rate=1e11, efficiency=0.8)  # crossing at 0.8·32 = 25.6
    slow = slow_layers(model, cost=cost)
    assert sorted(slow) == sorted(t for t, m in model.named_modules()
                                  if isinstance(m, LowRankLinear) and m.rank == 30)
    assert all(v == {"rank": 30, "speed_break_even": 25, "break_even": 32} for v in slow.values())
    changed = densify_slow_layers(model, cost=cost)
    assert sorted(changed) == sorted(slow) and len(changed) == 4  # q and o of 2 layers
    assert slow_layers(model, cost=cost) == {}
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 10
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
