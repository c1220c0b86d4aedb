"""export_peft: the folder loads with peft.PeftModel.from_pretrained and gives rankwise's outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from rankwise.errors import RankwiseError
from rankwise.tune import AdapterConfig, apply, export_peft, merge
from test_tune_adapters import IDS, logits, perturb, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _peft_logits(base, folder, ids=IDS):
    pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "pissa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_peft_equals_rankwise(method, arch, tmp_path):
    make = tiny_llama if arch == "llama" else tiny_gpt2
    ids = IDS % 96
    model = make()
    original = copy.deepcopy(model)  # PEFT applies the exported LoRA to the ORIGINAL weights
    apply(model, AdapterConfig(method=method, rank=4, alpha=6, targets="proj|attn|mlp"))
    perturb(model)
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(original, ids), atol=1e-3)
    export_peft(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    r = 8 if method == "pissa" else 4  # PiSSA → LoRA conversion doubles rank and alpha
    assert cfg["r"] == r and cfg["lora_alpha"] == (12 if method == "pissa" else 6) and cfg["peft_type"] == "LORA"
    theirs = _peft_logits(original, tmp_path / "p", ids)
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()


def test_export_peft_classifier_head(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=5)
    model = BertForSequenceClassification(cfg).eval()
    original = copy.deepcopy(model)
    apply(model, AdapterConfig(method="lora", rank=4, modules_to_save="^classifier$"))
    assert model.classifier.weight.requires_grad
    perturb(model)
    ids = IDS % 100
    ours = logits(model, ids)
    export_peft(model, tmp_path / "p")
    theirs = _peft_logits(original, tmp_path / "p", ids)
    assert torch.allclose(theirs, ours, atol=1e-5)


def test_export_peft_merged_model_still_exact(tmp_path):
    model = tiny_llama()
    original = copy.deepcopy(model)
    apply(model, AdapterConfig(method="pissa", rank=4))
    perturb(model)
    merge(model)
    export_peft(model, tmp_path / "p")
    assert torch.allclose(_peft_logits(original, tmp_path / "p"), logits(model), atol=1e-5)


@pytest.mark.parametrize("method", ["svfit", "salt", "sorsa", "loldu"])
def test_export_peft_refuses_other_methods(method, tmp_path):
    model = tiny_llama()
    apply(model, AdapterConfig(method=method, rank=4))
    with pytest.raises(RankwiseError, match=f"PEFT cannot represent a {method} adapter.*export_dense.*--merge"):
        export_peft(model, tmp_path / "p")
    assert not (tmp_path / "p").exists()
