"""PEFT sees a compressed model's factors (J.2) and loads exported adapters from any directory (J.3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise
from rankwise.io.checkpoint import mark_factorised
from rankwise.surgery import LowRankLinear, find_targets, set_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 64
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def compressed(n: int = 9) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    for t in find_targets(model)[:n]:
        set_module(model, t.name, LowRankLinear.from_linear(t.module, 5))
    return mark_factorised(model)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_all_linear_lora_wraps_every_factor_and_merge_unmerge_restore(tmp_path: Path) -> None:
    model = compressed()
    lowrank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    specs = {n: model.get_submodule(n).spec() for n in lowrank}
    base = logits(model)
    pm = get_peft_model(model, LoraConfig(target_modules="all-linear", r=2, init_lora_weights=False))
    inner = pm.base_model.model
    for name in lowrank:
        layer = inner.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        assert isinstance(layer.A, LoraLinear) and isinstance(layer.B, LoraLinear), name
        assert layer.spec() == specs[name]  # sizes still readable through the wrappers
    assert not isinstance(inner.lm_head, LoraLinear)  # all-linear leaves the output layer alone
    adapted = logits(pm)
    from rankwise.tune import AdapterConfig, apply

    with pytest.raises(rankwise.RankwiseError, match="already PEFT-wrapped"):  # recognised, not wrapped again
        apply(pm, AdapterConfig(method="lora", rank=2))
    assert (adapted - base).abs().max() > 1e-3  # random lora_B: the adapter changes the outputs
    pm.merge_adapter()
    assert torch.allclose(logits(pm), adapted, atol=1e-5, rtol=1e-5)
    pm.unmerge_adapter()
    assert torch.allclose(logits(pm), adapted, atol=1e-5, rtol=1e-5)
    with pm.disable_adapter():
        assert torch.allclose(logits(pm), base, atol=1e-5, rtol=1e-5)
    merged = pm.merge_and_unload()
    assert isinstance(merged.get_submodule(lowrank[0]).A, torch.nn.Linear)
    assert torch.allclose(logits(merged), adapted, atol=1e-5, rtol=1e-5)


def test_export_peft_names_an_absolute_base_that_autopeft_loads_anywhere(tmp_path: Path, monkeypatch) -> None:
    from rankwise.tune import AdapterConfig, apply, export_peft

    rankwise.save(compressed(), tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    model = rankwise.load("ck")  # a relative path, as a user types it
    model = apply(model, AdapterConfig(method="lora", rank=2, targets="mlp"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # a trained adapter, not the zero init
    want = logits(model)
    export_peft(model, "adapter")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    got = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert any(isinstance(m, LowRankLinear) for m in got.modules())  # the compressed base, rebuilt
    assert torch.allclose(logits(got), want, atol=1e-5, rtol=1e-5)
