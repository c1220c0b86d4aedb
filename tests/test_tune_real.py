"""rankwise.tune on the real built-in models (few tokens, so it stays fast)."""

from __future__ import annotations

import copy

import pytest
import torch

from rankwise.tune import AdapterConfig, apply, export_peft, load_adapter, save_adapter, trainable_parameters
from test_tune_adapters import perturb

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]




@pytest.fixture(scope="module")
def smollm():
    from rankwise.io.models import load_model, load_tokenizer

    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_smollm2_peft_export_matches(smollm, method, tmp_path):
    peft = pytest.importorskip("peft")
    base, tok = smollm
    model = copy.deepcopy(base)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    apply(model, AdapterConfig(method=method, rank=4, targets=r"layers\.(0|1)\.self_attn\.(q|v)_proj",
                               svd="randomized"))
    assert trainable_parameters(model) == 2 * 4 * (576 + 576) + 2 * 4 * (192 + 576)  # 2 layers × (q, v), r = 4
    perturb(model)
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        export_peft(model, tmp_path / "p")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert not torch.allclose(ours, plain, atol=1e-3)
    assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    save_adapter(model, tmp_path / "a")
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ours)


def test_minilm_svfit_far_fewer_params():
    from rankwise.io.models import load_model

    model = load_model("minilm-l6", task="classify", num_labels=5)
    lora = copy.deepcopy(model)
    apply(model, AdapterConfig(method="svfit", modules_to_save="^classifier$"))
    apply(lora, AdapterConfig(method="lora", rank=8, modules_to_save="^classifier$"))
    assert trainable_parameters(model) * 10 < trainable_parameters(lora)
