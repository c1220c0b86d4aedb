"""Healing as a compression stage (compression/heal.py): LoRA on each factor, trained, folded back exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise
from rankwise.cli.main import main
from rankwise.compression.api import CompressConfig, compress
from rankwise.compression.heal import attach_lora, fold_lora, heal, lowrank_layers
from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError
from tiny_models import write_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def markov_windows(n: int = 16, t: int = 24, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Token windows of a sparse Markov chain (each token has 2 likely successors): learnable structure."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 2), generator=g)
    rows = torch.empty(n, t, dtype=torch.long)
    rows[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for j in range(1, t):
        pick = torch.randint(0, 2, (n,), generator=g)
        rows[:, j] = succ[rows[:, j - 1], pick]
    return rows


def lm_loss(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


CFG = {"ratio": 0.4, "method": "whiten", "alloc": "uniform", "progress": False, "speed_guard": "off"}


def _cfg(**kw) -> dict:
    """CFG without keys the tree's CompressConfig does not have (yet)."""
    from dataclasses import fields

    names = {f.name for f in fields(CompressConfig)}
    return {k: v for k, v in {**CFG, **kw}.items() if k in names}


def test_heal_lowers_the_calibration_loss():
    x = markov_windows()
    model = tiny_llama()
    compress(model, calib=x, **_cfg())
    ranks = {n: m.rank for n, m in lowrank_layers(model).items()}
    before = lm_loss(model, x)
    res = heal(model, CompressConfig(**_cfg(heal_steps=6, heal_lr=1e-2, heal_batch_size=4)), windows=x)
    after = lm_loss(model, x)
    assert after < before - 0.05, (before, after)
    assert res.steps == 6 and len(res.losses) == 6
    # folded: plain LowRankLinear layers again, same ranks, nothing left trainable, no PEFT wrapper
    assert {n: m.rank for n, m in lowrank_layers(model).items()} == ranks
    assert not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "peft_config")


def test_fold_equals_unfolded_and_keeps_every_rank_below_break_even():
    x = markov_windows(n=4)
    model = tiny_llama()
    compress(model, calib=x, **_cfg())
    params = sum(p.numel() for p in model.parameters())
    ranks = {n: (m.rank, m.in_features, m.out_features) for n, m in lowrank_layers(model).items()}
    peft_model = attach_lora(model, rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained LoRA: non-zero A and B on every factor
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        unfolded = peft_model(input_ids=x).logits
    with torch.no_grad():
        folded = fold_lora(peft_model)(input_ids=x).logits
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)
    # the LoRA changed the function (the comparison above is not vacuous)
    fresh = tiny_llama()
    compress(fresh, calib=x, **_cfg())
    with torch.no_grad():
        assert (fresh(input_ids=x).logits - folded).abs().max() > 1e-3
    layers = lowrank_layers(model)
    assert {n: (m.rank, m.in_features, m.out_features) for n, m in layers.items()} == ranks
    assert sum(p.numel() for p in model.parameters()) == params
    for m in layers.values():
        assert m.rank < break_even_rank(m.out_features, m.in_features)


def test_lora_rank_is_capped_at_each_factors_rank():
    x = markov_windows(n=4)
    model = tiny_llama()
    compress(model, calib=x, **_cfg(ratio=0.7))
    k_min = min(m.rank for m in lowrank_layers(model).values())
    big = k_min + 3
    peft_model = attach_lora(model, rank=big)
    from peft.tuners.lora import LoraLayer

    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer):
            owner = name.rsplit(".", 1)[0].removeprefix("base_model.model.")
            layer = lowrank_layers(peft_model.get_base_model())[owner]
            assert mod.r["default"] == min(big, layer.rank)
    peft_model.unload()


def test_compress_with_healing_saves_and_reloads_exactly(tmp_path):
    x = markov_windows()
    plain = tiny_llama()
    compress(plain, calib=x, **_cfg())
    model = tiny_llama()
    res = compress(model, calib=x, **_cfg(heal_steps=4, heal_lr=5e-3, heal_batch_size=4))
    assert res.healing is not None and res.healing["steps"] == 4 and "healing" in res.timings
    assert res.ranks == {n: m.rank for n, m in lowrank_layers(plain).items()}
    with torch.no_grad():
        healed = model(input_ids=x).logits
        assert (healed - plain(input_ids=x).logits).abs().max() > 1e-4  # healing changed the model
    # the achieved ratio is the allocator's: healing adds no parameters
    assert res.params_after == sum(p.numel() for p in plain.parameters())
    rankwise.save(model, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "rankwise.json").read_text())
    assert meta["healing"]["steps"] == 4 and meta["healing"]["rank"] == 8
    back = rankwise.load(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, healed, atol=1e-5, rtol=1e-5)


def test_streamed_cli_compress_heals_and_reloads(tmp_path, capsys):
    src = write_tiny_llama(tmp_path / "model")
    out = tmp_path / "c"
    args = ["compress", str(src), "--ratio", "0.3", "--calib", "ptb", "--calib-samples", "4", "--seq-len", "32",
            "--heal-steps", "3", "--heal-batch-size", "2", "--heal-lr", "0.005", "--out", str(out), "--json", "-"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["healing"]["steps"] == 3 and report["healing"]["data"]["text"] == "ptb"
    assert report["healing"]["data"]["split"] == "train"
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["healing"]["steps"] == 3 and meta["calibration"]["text"] == "ptb"
    model = rankwise.load(out)  # checksums verified
    ranks = {n: m.rank for n, m in lowrank_layers(model).items()}
    assert ranks == {k: v for k, v in report["ranks"].items() if v is not None}
    x = markov_windows(n=2, t=16, vocab=256)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x).logits).all()
    assert not list(tmp_path.glob(".rankwise-heal-*"))  # the scratch folder is gone


@pytest.mark.parametrize(("kw", "word"), [({"heal_steps": -1}, "heal_steps"), ({"heal_rank": 0}, "heal_rank"),
                                          ({"heal_lr": 0.0}, "heal_lr"), ({"heal_lr": float("nan")}, "heal_lr"),
                                          ({"heal_batch_size": 0}, "heal_batch_size")])
def test_bad_heal_options_are_one_line_errors(kw, word):
    with pytest.raises(RankwiseError) as e:
        CompressConfig(**kw)
    assert word in str(e.value) and "\n" not in str(e.value)


def test_cli_negative_heal_steps_is_one_line_error(tmp_path, capsys):
    assert main(["compress", "--heal-steps", "-1", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heal" in err[0]
    assert not (tmp_path / "c").exists()


def test_heal_without_factorised_layers_is_an_error():
    model = tiny_llama()
    with pytest.raises(RankwiseError, match="no"):
        attach_lora(copy.deepcopy(model), rank=4)


def test_heal_under_torchrun_is_refused_before_any_work(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from rankwise.compression import distributed
    from rankwise.compression.heal import check_heal_supported
    from rankwise.compression.streaming import compress_checkpoint

    enabled = classmethod(lambda cls, device=None: SimpleNamespace(enabled=True))
    monkeypatch.setattr(distributed.Dist, "current", enabled)
    check_heal_supported(CompressConfig())  # no healing: nothing to refuse
    with pytest.raises(RankwiseError, match="torchrun"):
        check_heal_supported(CompressConfig(heal_steps=2))
    with pytest.raises(RankwiseError, match="torchrun"):
        compress_checkpoint(tmp_path / "no-model", tmp_path / "out", CompressConfig(heal_steps=2))
    assert not (tmp_path / "out").exists()
