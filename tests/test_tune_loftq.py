"""loftq on a machine without CUDA: PEFT's LoftQ algorithm on the weight's own device (bitsandbytes' NF4)."""

from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.tune import (
    AdapterConfig,
    apply,
    closed_form_trainable,
    export_peft,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from rankwise.tune.peft_backend import RANKWISE_BASE_FILE, loftq_on_peft_device
from test_tune_adapters import IDS, logits, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = "q_proj|v_proj|up_proj"
LAYER = "model.layers.0.mlp.up_proj"  # 128 x 64


def _nf4(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 round trip through its functional API (blocks of 64, fp32 absmax, no double quant)."""
    q, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4")
    return bnb.functional.dequantize_4bit(q, state)


def _reference(w: torch.Tensor, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al. 2023, Alg. 1) written out: Q_t = NF4(W − B_{t−1}A_{t−1}), B_t A_t = SVD_r(W − Q_t)."""
    ba = torch.zeros_like(w)
    for _ in range(iters):
        q = _nf4(w - ba)
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        ba = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    return q, ba


def _peft_loftq_init_on_cpu():
    """PEFT's own ``loftq_init`` (0.21) with its hard-coded compute device ("cuda"/"xpu") set to "cpu"."""
    import inspect
    import textwrap

    from peft.utils import loftq_utils

    src = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    needle = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert needle in src, "PEFT's loftq_init changed: re-check rankwise's CPU path against it"
    ns = dict(vars(loftq_utils))
    exec(compile(src.replace(needle, 'compute_device = "cpu"'), "peft_loftq_init_cpu", "exec"), ns)
    return ns["loftq_init"]


def _parts(pm, name: str = LAYER) -> tuple[torch.Tensor, torch.Tensor, float]:
    layer = pm.base_model.model.get_submodule(name)
    ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return layer.get_base_layer().weight.detach(), ba.detach(), layer.scaling["default"]


@pytest.mark.skipif(loftq_on_peft_device(), reason="a CUDA/XPU machine runs PEFT's own loftq_init")
@pytest.mark.parametrize("iters", [1, 3])
def test_cpu_init_is_loftq_and_beats_plain_quantisation(iters):
    model = tiny_llama()
    w = model.get_submodule(LAYER).weight.detach().clone()
    pm = apply(model, AdapterConfig(method="loftq", rank=4, targets=TARGETS, loftq_iter=iters), progress=False)
    q, ba, s = _parts(pm)
    assert s == 1.0  # alpha defaults to r for loftq: PEFT's factors carry no 1/scale
    ref_q, ref_ba = _reference(w, 4, iters)
    assert torch.allclose(q, ref_q, atol=1e-6) and torch.allclose(ba, ref_ba, atol=1e-5)
    peft_q, peft_a, peft_b = _peft_loftq_init_on_cpu()(w, num_bits=4, reduced_rank=4, num_iter=iters)
    layer = pm.base_model.model.get_submodule(LAYER)
    assert torch.equal(q, peft_q)  # PEFT's own code on CPU: the same tensors
    assert torch.equal(layer.lora_A["default"].weight, peft_a) and torch.equal(layer.lora_B["default"].weight, peft_b)
    plain = (w - _nf4(w)).norm()
    err = (w - (q + s * ba)).norm()
    assert err < 0.97 * plain, (err, plain)
    if iters == 1:  # Eckart–Young: ‖E − E_r‖² = ‖E‖² − Σ_{i≤r} σ_i(E)², E = W − NF4(W)
        sig = torch.linalg.svdvals(w - _nf4(w))
        assert torch.isclose(err ** 2, plain ** 2 - (sig[:4] ** 2).sum(), rtol=1e-4)
        # Q is NF4 of W: every entry is absmax(block) × the NF4 code nearest to w / absmax(block)
        code = bnb.functional.get_4bit_type("nf4", device="cpu")
        blocks = w.reshape(-1, 64)
        absmax = blocks.abs().amax(1, keepdim=True)
        nearest = code[((blocks / absmax).unsqueeze(-1) - code).abs().argmin(-1)]
        assert torch.allclose(q.reshape(-1, 64), nearest * absmax, atol=1e-6)


def test_save_load_merge_and_peft_export(tmp_path):
    model = tiny_llama()
    fresh = copy.deepcopy(model)
    pm = apply(model, AdapterConfig(method="loftq", rank=4, targets=TARGETS), progress=False)
    shapes = [(m.out_features, m.in_features) for n, m in fresh.named_modules()
              if isinstance(m, torch.nn.Linear) and re.search(TARGETS, n)]
    assert trainable_parameters(pm) == closed_form_trainable(pm) == sum(4 * (m + n) for m, n in shapes)
    with torch.no_grad():  # train-like change of every adapter tensor, so a lost adapter shows
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = logits(pm)
    assert not torch.allclose(out, logits(fresh), atol=1e-3)
    merge(pm)
    assert torch.allclose(logits(pm), out, atol=1e-5)
    unmerge(pm)
    save_adapter(pm, tmp_path / "a")
    assert (tmp_path / "a" / RANKWISE_BASE_FILE).is_file()
    again = load_adapter(copy.deepcopy(fresh), tmp_path / "a")  # the quantised base comes back with it
    assert torch.allclose(logits(again), out, atol=1e-5)
    with pytest.raises(RankwiseError, match="made for another base"):
        load_adapter(tiny_llama(seed=1), tmp_path / "a")
    # PEFT's own loader on a base holding the quantised weights (a 4-bit-loaded base: with loftq_iter=1 those
    # are NF4(W), checked against bitsandbytes' round trip)
    export_peft(pm, tmp_path / "p")
    from safetensors.torch import load_file

    base = copy.deepcopy(fresh)
    with torch.no_grad():
        for name, q in load_file(str(tmp_path / "p" / RANKWISE_BASE_FILE)).items():
            assert torch.allclose(q, _nf4(base.get_submodule(name).weight.detach()), atol=1e-6)  # merge+unmerge
            base.get_submodule(name).weight.copy_(q)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=IDS).logits, out, atol=1e-5)
    plain = merge_and_unload(pm)
    assert torch.allclose(logits(plain), out, atol=1e-5)


def test_conv1d_and_missing_bitsandbytes_are_one_line_errors(monkeypatch, tmp_path, capsys):
    with pytest.raises(RankwiseError, match=r"PEFT's loftq does not support layers of type Conv1D \(transformer"):
        apply(tiny_gpt2(), AdapterConfig(method="loftq", rank=2, targets="c_attn"), progress=False)
    import rankwise.io.models as models
    from rankwise.cli.main import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    want = "loftq needs bitsandbytes (pip install bitsandbytes)"
    with pytest.raises(RankwiseError, match=re.escape(want)):
        apply(tiny_llama(), AdapterConfig(method="loftq", rank=2, targets=TARGETS), progress=False)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the loftq check")

    monkeypatch.setattr(models, "load_model", no_load)
    assert main(["tune", "--method", "loftq", "--data", "ptb", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0]
    assert not (tmp_path / "o").exists()
