"""``inspect --compare ADAPTER_DIR``: a PEFT adapter folder is compared as its base with the adapter merged."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rankwise.inspection.api import InspectConfig, inspect

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_peft_adapter_folder_equals_merged_model(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).eval()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                init_lora_weights=False))
    with torch.no_grad():  # a strong update, so the comparison sees intruder dimensions
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(50.0)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()

    kw = {"progress": False, "intruder_top": 10, "intruder_eps": 0.5}
    from_folder = inspect(str(base_dir), InspectConfig(compare=str(adapter_dir), **kw))
    from_module = inspect(base, InspectConfig(compare=merged, **kw))
    rows_f = {r["name"]: r for r in from_folder.matrices}
    rows_m = {r["name"]: r for r in from_module.matrices}
    assert rows_f.keys() == rows_m.keys()
    changed = [n for n in rows_f if "q_proj" in n]
    assert changed and all(rows_f[n]["intruder_dimensions"] > 0 for n in changed)
    for name, row in rows_f.items():
        assert row["intruder_dimensions"] == rows_m[name]["intruder_dimensions"], name
        if "q_proj" not in name:
            assert row["intruder_dimensions"] == 0
