"""The seed adapters rankwise implements natively: LoRA-XS, LoRA-GA, DyLoRA (closed forms and reference computations).

init / merge / unmerge / save / load equivalence and the parameter counts of these three run with every native
method in test_tune_adapters.py; here: what makes each method what it is.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.tune import (
    AdapterConfig,
    adapter_layers,
    apply,
    load_adapter,
    merge,
    save_adapter,
    set_eval_rank,
    trainable_parameters,
    unmerge,
)
from test_tune_adapters import IDS, logits, perturb, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Q = "model.layers.0.self_attn.q_proj"


def _weight(model, name=Q) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().clone()


def test_lora_xs_factors_are_the_truncated_svd_and_only_r_squared_trains():
    model = tiny_llama()
    w = _weight(model)
    apply(model, AdapterConfig(method="lora-xs", rank=4, alpha=4))
    lay = adapter_layers(model)[Q]
    u, s, vh = torch.linalg.svd(w)
    assert torch.allclose(lay.xs_B @ lay.xs_A, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)  # B A = best rank-4 part
    assert torch.equal(lay.base.weight, w)  # no residual: the base is untouched
    assert [n for n, p in lay.named_parameters() if p.requires_grad] == ["lora_R"]
    n_layers = len(adapter_layers(model))
    assert trainable_parameters(model) == 16 * n_layers
    lora = apply(tiny_llama(), AdapterConfig(method="lora", rank=4))
    assert trainable_parameters(lora) >= 20 * trainable_parameters(model)  # the issue's ≥ 20× fewer
    with torch.no_grad():
        lay.lora_R.copy_(torch.eye(4))  # ΔW = s·U_r Σ_r V_rᵀ when R = I (s = alpha/r = 1)
    assert torch.allclose(lay.delta_weight(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)


def _grad_reference(model, name, batches):
    """∂L/∂W of ``name`` averaged over ``batches``, by autograd on a copy (the reference for LoRA-GA)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    w = ref.get_submodule(name).weight
    w.requires_grad_(True)
    total = torch.zeros_like(w)
    for b in batches:
        loss = ref(**b).loss
        (g,) = torch.autograd.grad(loss, w)
        total += g
    return total / len(batches)


def test_lora_ga_init_is_the_papers_gradient_svd():
    model = tiny_llama()
    ids2 = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))
    batches = [{"input_ids": IDS, "labels": IDS}, {"input_ids": ids2, "labels": ids2}]
    g = _grad_reference(model, Q, batches)
    w = _weight(model)
    ref = logits(model)
    r, alpha, gamma = 3, 6.0, 16.0
    apply(model, AdapterConfig(method="lora-ga", rank=r, alpha=alpha, ga_gamma=gamma), data=batches)
    lay = adapter_layers(model)[Q]
    u, _, vh = torch.linalg.svd(g.double())
    zeta = lay.m ** 0.25 / math.sqrt(gamma)
    # singular vectors are defined up to sign: compare the rank-1 projectors of each pair
    for i in range(r):
        a_i, v_i = lay.lora_A[i].double() / zeta, vh[i]
        b_i, u_i = lay.lora_B[:, i].double() / zeta, u[:, r + i]
        assert torch.allclose(torch.outer(a_i, a_i), torch.outer(v_i, v_i), atol=1e-4)
        assert torch.allclose(torch.outer(b_i, b_i), torch.outer(u_i, u_i), atol=1e-4)
    s = alpha / r
    assert torch.allclose(lay.base.weight, w - s * lay.lora_B.detach() @ lay.lora_A.detach(), atol=1e-6)
    assert torch.allclose(logits(model), ref, atol=1e-5)  # the residual base keeps the function at init
    assert trainable_parameters(model) == sum(r * (x.m + x.n) for x in adapter_layers(model).values())


def test_lora_ga_needs_data_and_room_for_2r():
    with pytest.raises(RankwiseError, match="lora-ga initialises from gradients"):
        apply(tiny_llama(), AdapterConfig(method="lora-ga", rank=4))
    with pytest.raises(RankwiseError, match=r"2·rank <= min\(m, n\)"):
        apply(tiny_llama(), AdapterConfig(method="lora-ga", rank=20), data=[{"input_ids": IDS, "labels": IDS}])


def test_dylora_truncation_equals_a_smaller_lora():
    """At eval rank b the model is the LoRA made of the first b components, scaled α/b (the paper's forward)."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    apply(model, AdapterConfig(method="dylora", rank=4, alpha=8))
    perturb(model)
    for b in (1, 2, 4):
        set_eval_rank(model, b)
        ref = copy.deepcopy(base)
        with torch.no_grad():
            for name, lay in adapter_layers(model).items():
                ref.get_submodule(name).weight += (8 / b) * lay.lora_B[:, :b] @ lay.lora_A[:b]
        assert torch.allclose(logits(model), logits(ref), atol=1e-5), b
        merge(model)  # merge folds the current eval rank
        assert torch.allclose(logits(model), logits(ref), atol=1e-5), b
        with pytest.raises(RankwiseError, match="unmerge before changing"):
            set_eval_rank(model, 1)
        unmerge(model)


def test_dylora_training_draws_one_rank_per_step_in_every_layer():
    model = tiny_llama()
    apply(model, AdapterConfig(method="dylora", rank=4, seed=3))
    model.train()
    seen: dict[str, list[int]] = {}
    for name, lay in adapter_layers(model).items():
        lay.register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, []).append(m.last_rank))
    draws = []
    orig = type(next(iter(adapter_layers(model).values())))._rank_now

    def spy(self):
        self.last_rank = orig(self)
        return self.last_rank

    type(next(iter(adapter_layers(model).values())))._rank_now = spy
    try:
        for _ in range(6):
            model(input_ids=IDS)
            draws.append({v[-1] for v in seen.values()})
    finally:
        type(next(iter(adapter_layers(model).values())))._rank_now = orig
    assert all(len(d) == 1 for d in draws)  # every layer used the same b in one forward
    assert len({next(iter(d)) for d in draws}) > 1  # and b varies across steps
    assert all(1 <= next(iter(d)) <= 4 for d in draws)


def test_dylora_eval_rank_saved_and_errors(tmp_path):
    model = tiny_llama()
    fresh = copy.deepcopy(model)
    apply(model, AdapterConfig(method="dylora", rank=4, eval_rank=2))
    perturb(model)
    out = logits(model)
    save_adapter(model, tmp_path / "d")
    load_adapter(fresh, tmp_path / "d")
    assert torch.equal(logits(fresh), out)
    assert adapter_layers(fresh)[Q].eval_rank == 2
    with pytest.raises(RankwiseError, match="--eval-rank 5 is above the trained rank 4"):
        set_eval_rank(model, 5)
    with pytest.raises(RankwiseError, match="--eval-rank 6 is above the trained rank 4"):
        AdapterConfig(method="dylora", rank=4, eval_rank=6)
    with pytest.raises(RankwiseError, match="applies to dylora only"):
        AdapterConfig(method="lora", rank=4, eval_rank=2)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_must_be_positive(rank):
    with pytest.raises(RankwiseError, match="rank must be a positive integer"):
        AdapterConfig(method="lora-xs", rank=rank)
