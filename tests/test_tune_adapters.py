"""rankwise.tune adapters on tiny random models: init, merge/unmerge, save/load, parameter counts, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rankwise.errors import RankwiseError
from rankwise.surgery import LowRankLinear, find_targets, set_module
from rankwise.tune import (
    LOWRANK_METHODS,
    NATIVE_METHODS,
    AdapterConfig,
    adapter_layers,
    apply,
    closed_form_trainable,
    load_adapter,
    merge,
    merge_and_unload,
    regularization_loss,
    save_adapter,
    trainable_parameters,
    unload,
    unmerge,
)

METHODS = NATIVE_METHODS  # the PEFT-backed ones are tested in test_tune_peft_methods.py
DENSE_METHODS = [m for m in METHODS if m not in LOWRANK_METHODS]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64)).eval()


def compressed(model, rank: int = 6, skip: str | None = "down_proj"):
    """Replace every target (except ``skip``, which stays dense like an N-LRC) by its rank-``rank`` SVD."""
    for t in find_targets(model, exclude=skip):
        set_module(model, t.name, LowRankLinear.from_linear(t.module, rank))
    return model


def base_for(method: str, seed: int = 0):
    m = tiny_llama(seed)
    return compressed(m) if method in LOWRANK_METHODS else m


def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its init so merge/save/export tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # LoRA-XS's R starts at 0 between two large frozen factors: move it by O(0.1)
                size = 2.0 if name.endswith("lora_R") else p.abs().mean() + 1e-2
                p.add_(torch.randn(p.shape, generator=g) * scale * size)


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
DATA = [{"input_ids": IDS, "labels": IDS}]  # batches for data-driven inits (lora-ga); ignored by the others


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_init_equals_base_and_only_adapter_trains(method):
    model = base_for(method)
    ref = logits(model)
    apply(model, AdapterConfig(method=method, rank=4), data=DATA)
    out = logits(model)
    if method in ("lora", "lora-xs", "dylora"):  # B = 0 / R = 0: exact
        assert torch.equal(out, ref)
    elif method in LOWRANK_METHODS:  # same factors, but the copies are contiguous and from_linear's are not
        assert torch.allclose(out, ref, atol=1e-6, rtol=0), (out - ref).abs().max()
    else:
        assert torch.allclose(out, ref, atol=TOL), (out - ref).abs().max()
    layers = adapter_layers(model)
    assert layers
    for name, p in model.named_parameters():
        is_adapter = any(name.startswith(n + ".") and ".base." not in name[len(n):] for n in layers)
        assert p.requires_grad == is_adapter, name


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_and_unload(method):
    model = base_for(method)
    original = weights(model)
    ref0 = logits(model)
    apply(model, AdapterConfig(method=method, rank=4), data=DATA)
    perturb(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if ".base." in k}
    adapted = logits(model)
    assert not torch.allclose(adapted, ref0, atol=1e-3)  # the perturbation matters
    merge(model)
    assert torch.allclose(logits(model), adapted, atol=TOL)
    with pytest.raises(RankwiseError, match="merge twice"):
        merge(model)
    unmerge(model)
    after = {k: v.detach() for k, v in model.named_parameters() if ".base." in k}
    for k in before:
        assert torch.allclose(after[k], before[k], atol=1e-6, rtol=0), k
    assert torch.allclose(logits(model), adapted, atol=TOL)
    with pytest.raises(RankwiseError, match="not merged"):
        unmerge(model)
    unload(model)
    assert not adapter_layers(model)
    for k, v in weights(model).items():
        assert torch.allclose(v, original[k], atol=1e-6), k
    assert torch.allclose(logits(model), ref0, atol=TOL)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_gives_plain_model(method):
    model = base_for(method)
    apply(model, AdapterConfig(method=method, rank=4), data=DATA)
    perturb(model)
    adapted = logits(model)
    merge_and_unload(model)
    assert not adapter_layers(model) and not hasattr(model, "rankwise_adapter")
    assert torch.allclose(logits(model), adapted, atol=TOL)
    if method in LOWRANK_METHODS:
        from rankwise import to_dense

        assert torch.allclose(logits(to_dense(model)), adapted, atol=TOL)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_identical(method, tmp_path):
    model = base_for(method)
    fresh = copy.deepcopy(model)
    apply(model, AdapterConfig(method=method, rank=4), data=DATA)
    perturb(model)
    adapted = logits(model)
    save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter.safetensors").is_file()
    import json

    meta = json.loads((tmp_path / "a" / "rankwise_adapter.json").read_text())
    assert meta["method"] == method and meta["trainable_parameters"] == trainable_parameters(model)
    assert meta["targets"] == list(adapter_layers(model)) and len(meta["base_fingerprint"]) == 64
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), adapted)
    assert trainable_parameters(fresh) == trainable_parameters(model)
    with pytest.raises(RankwiseError, match="already exists"):
        save_adapter(model, tmp_path / "a")


def _closed_form(method: str, shapes: list[tuple[int, int]], r: int, ranks: list[int]) -> int:
    if method in ("lora", "pissa", "lora-ga", "dylora"):
        return sum(r * (m + n) for m, n in shapes)
    if method == "lora-xs":
        return r * r * len(shapes)
    if method == "svfit":
        return sum(ranks)
    if method == "salt":
        return sum(2 * r + r * (m + n) for m, n in shapes)
    if method == "sorsa":
        return sum(r * (m + n + 1) for m, n in shapes)
    if method == "loldu":
        return sum(r + 1 for _ in shapes)
    return sum(k * (m + n) for (m, n), k in zip(shapes, ranks))  # factor methods: the layer ranks


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_closed_form(method):
    model = base_for(method)
    r = 4
    apply(model, AdapterConfig(method=method, rank=r), data=DATA)
    layers = adapter_layers(model)
    shapes = [(lay.m, lay.n) for lay in layers.values()]
    ranks = [lay.rank for lay in layers.values()]
    assert trainable_parameters(model) == _closed_form(method, shapes, r, ranks) == closed_form_trainable(model)
    if method in LOWRANK_METHODS:
        assert ranks == [6] * len(ranks)  # the compressed layers' own rank


def test_svfit_energy_rank_and_fewer_params():
    model = tiny_llama()
    # plant low-rank structure in q_proj of layer 0 so its 99 % energy rank is small
    t = [t for t in find_targets(model) if t.name.endswith("layers.0.self_attn.q_proj")][0]
    g = torch.Generator().manual_seed(0)
    t.set_weight(torch.randn(64, 3, generator=g) @ torch.randn(3, 64, generator=g) + 1e-4 * torch.randn(64, 64))
    lora = copy.deepcopy(model)
    apply(model, AdapterConfig(method="svfit"))
    apply(lora, AdapterConfig(method="lora", rank=8))
    layers = adapter_layers(model)
    assert layers["model.layers.0.self_attn.q_proj"].rank == 3
    from rankwise.engine.metrics import energy_rank

    for name, lay in layers.items():
        s = torch.linalg.svdvals(lay.base_weight().float() + lay.init_delta())
        assert lay.rank == min(max(1, energy_rank(s, 0.99)), min(lay.m, lay.n) - 1), name
    assert trainable_parameters(model) * 10 < trainable_parameters(lora)


def test_pissa_factors_are_principal_and_randomized_close():
    model = tiny_llama()
    t = [t for t in find_targets(model) if t.name.endswith("layers.0.mlp.up_proj")][0]
    g = torch.Generator().manual_seed(0)  # planted decaying spectrum, so a randomized SVD can find the top 4
    spectrum = torch.tensor([4.0, 3, 2, 1.5, 0.3, 0.2])
    low = torch.randn(128, 6, generator=g) * spectrum @ torch.randn(6, 64, generator=g) / 8
    t.set_weight(low + 1e-3 * torch.randn(128, 64, generator=g))
    w = t.weight().clone()
    exact = copy.deepcopy(model)
    apply(exact, AdapterConfig(method="pissa", rank=4, alpha=8))
    lay = adapter_layers(exact)["model.layers.0.mlp.up_proj"]
    u, s, vh = torch.linalg.svd(w)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert torch.allclose(lay.delta_weight(), best, atol=1e-5)  # s·BA = top-4 SVD part
    assert torch.allclose(lay.base_weight(), w - best, atol=1e-5)  # residual base
    rnd = copy.deepcopy(model)
    apply(rnd, AdapterConfig(method="pissa", rank=4, alpha=8, svd="randomized", svd_iters=6))
    lay2 = adapter_layers(rnd)["model.layers.0.mlp.up_proj"]
    assert float((lay2.delta_weight() - best).norm() / best.norm()) < 1e-3
    assert torch.allclose(logits(rnd), logits(model), atol=TOL)


def test_loldu_split_is_exact_ldu():
    model = tiny_llama()
    w = [t for t in find_targets(model) if t.name.endswith("layers.1.self_attn.o_proj")][0].weight().clone()
    apply(model, AdapterConfig(method="loldu", rank=5))
    lay = adapter_layers(model)["model.layers.1.self_attn.o_proj"]
    p, lo, up = torch.linalg.lu(w)
    expect = (p @ lo)[:, :5] @ up[:5]  # P L_r D_r U_r with D folded back into U
    assert torch.allclose(lay.init_delta(), expect, atol=1e-5)
    assert torch.allclose(lay.Ur.diagonal()[:5], torch.ones(5), atol=1e-6)  # unit upper factor
    assert trainable_parameters(model) == 6 * len(adapter_layers(model))


def test_sorsa_regulariser():
    model = tiny_llama()
    apply(model, AdapterConfig(method="sorsa", rank=4, gamma=0.5))
    assert float(regularization_loss(model).detach()) < 1e-8  # orthonormal at init
    lay = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        lay.U_p.mul_(2.0)  # UᵀU = 4I → ‖3I‖² = 9·4 = 36 per layer
    reg = regularization_loss(model)
    assert float(reg) == pytest.approx(0.5 * 36, rel=1e-4)
    reg.backward()
    assert lay.U_p.grad is not None and lay.U_p.grad.abs().sum() > 0
    other = tiny_llama()
    apply(other, AdapterConfig(method="lora", rank=4))
    assert float(regularization_loss(other)) == 0.0


@pytest.mark.parametrize("method", ["lora", "pissa", "svfit", "sorsa"])
def test_conv1d_gpt2(method, tmp_path):
    model = tiny_gpt2()
    fresh = copy.deepcopy(model)
    ids = IDS % 96
    ref = logits(model, ids)
    apply(model, AdapterConfig(method=method, rank=4), data=DATA)
    assert torch.allclose(logits(model, ids), ref, atol=TOL)
    perturb(model)
    adapted = logits(model, ids)
    merge(model)
    assert torch.allclose(logits(model, ids), adapted, atol=TOL)
    unmerge(model)
    save_adapter(model, tmp_path / "g")
    load_adapter(fresh, tmp_path / "g")
    assert torch.equal(logits(fresh, ids), adapted)


def test_heal_on_rankwise_loaded_checkpoint(tmp_path):
    import rankwise

    model = compressed(tiny_llama())
    rankwise.save(model, tmp_path / "c")
    loaded = rankwise.load(tmp_path / "c")
    ref = logits(loaded)
    apply(loaded, AdapterConfig(method="heal", heal_mode="lora", rank=2))
    assert torch.equal(logits(loaded), ref)
    assert trainable_parameters(loaded) == sum(2 * (lay.m + lay.n) for lay in adapter_layers(loaded).values())
    perturb(loaded)
    adapted = logits(loaded)
    merge(loaded)  # LoRA appended to the factors: rank 6 + 2
    assert all(lay.base.rank == 8 for lay in adapter_layers(loaded).values())
    assert torch.allclose(logits(loaded), adapted, atol=TOL)
    unmerge(loaded)
    assert all(lay.base.rank == 6 for lay in adapter_layers(loaded).values())
    merge_and_unload(loaded)
    rankwise.save(loaded, tmp_path / "healed")
    assert torch.allclose(logits(rankwise.load(tmp_path / "healed")), adapted, atol=TOL)


# -- errors ---------------------------------------------------------------------------------------
def test_error_unknown_method():
    with pytest.raises(RankwiseError, match="unknown adapter method 'nope'.*lora, pissa.*dora"):
        apply(tiny_llama(), AdapterConfig(method="nope"))


@pytest.mark.parametrize("rank", [0, -3, 64, 100])
def test_error_bad_rank(rank):
    model = tiny_llama()
    ref = logits(model)
    with pytest.raises(RankwiseError, match="rank"):
        apply(model, AdapterConfig(method="pissa", rank=rank))
    assert not adapter_layers(model)  # a failed apply leaves the model untouched
    assert torch.equal(logits(model), ref)
    assert all(p.requires_grad for p in model.parameters())


def test_error_targets_match_nothing():
    with pytest.raises(RankwiseError, match="match no linear layer"):
        apply(tiny_llama(), AdapterConfig(method="lora", targets="no_such_layer"))
    with pytest.raises(RankwiseError, match="no LowRankLinear"):
        apply(tiny_llama(), AdapterConfig(method="welore-lrc"))


def test_error_wrong_base_fingerprint(tmp_path):
    model = tiny_llama(0)
    apply(model, AdapterConfig(method="lora", rank=4))
    save_adapter(model, tmp_path / "a")
    other = tiny_llama(1)
    with pytest.raises(RankwiseError, match="different base model"):
        load_adapter(other, tmp_path / "a")
    assert not adapter_layers(other)


def test_error_apply_twice_and_missing_adapter(tmp_path):
    model = tiny_llama()
    with pytest.raises(RankwiseError, match="no rankwise adapter"):
        merge(model)
    apply(model, AdapterConfig(method="lora", rank=2))
    with pytest.raises(RankwiseError, match="already has a rankwise adapter"):
        apply(model, AdapterConfig(method="lora", rank=2))
    with pytest.raises(RankwiseError, match="rankwise_adapter.json"):
        load_adapter(tiny_llama(), tmp_path)
