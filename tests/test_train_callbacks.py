"""TRP and Cuttlefish on tiny models with planted low-rank structure (plain loop and HF Trainer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.train import TRP, Cuttlefish, GaLoreAdamW

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted(m: int, n: int, sigmas: list[float], noise: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """U diag(σ) Vᵀ with random orthonormal U, V, plus small Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigmas)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return (u * torch.tensor(sigmas)) @ v.T + noise * torch.randn(m, n, generator=g)


def mlp(seed: int = 0) -> nn.Sequential:
    """Two Linear layers (48×32 and 32×48), each of planted rank 4 (σ = 3, 3, 3, 2.7)."""
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32))
    with torch.no_grad():
        model[0].weight.copy_(planted(48, 32, [3.0, 3.0, 3.0, 2.7], seed=seed))
        model[2].weight.copy_(planted(32, 48, [3.0, 3.0, 3.0, 2.7], seed=seed + 1))
    return model


def svals(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double())


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, cbs: list, start: int, n: int) -> None:
    torch.manual_seed(start)
    for step in range(start, start + n):
        x = torch.randn(16, 32)
        nn.functional.mse_loss(model(x), x.flip(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for cb in cbs:
            cb.on_step_end(model, step, optimizer=opt)


# ------------------------------------------------------------------------------ TRP
def test_trp_nuclear_step_shrinks_every_singular_value_by_lambda() -> None:
    model = mlp()
    before = [svals(model[i].weight) for i in (0, 2)]
    cb = TRP(lam=0.05, every=1000, penalty_every=1)
    cb.on_step_end(model, 1)
    for i, s0 in zip((0, 2), before):
        s1 = svals(model[i].weight)
        torch.testing.assert_close(s1, (s0 - 0.05).clamp_min(0), atol=1e-5, rtol=0)
    assert cb.events == []  # no truncation yet


def test_trp_truncates_to_the_energy_rank_and_factorises_at_the_end() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cb = TRP(lam=1e-4, every=2, energy=0.99)
    train_steps(model, opt, [cb], 1, 1)  # step 1: no truncation, noise still there
    assert int((svals(model[0].weight) > 1e-3).sum()) > 4
    train_steps(model, opt, [cb], 2, 1)  # step 2: truncation to the planted rank
    for i, name in ((0, "0"), (2, "2")):
        s = svals(model[i].weight)
        assert int((s > 1e-5 * s[0]).sum()) == 4
        assert cb.history[name] == [(2, 4)]
    train_steps(model, opt, [cb], 3, 3)  # steps 3-5: training adds rank again, step 4 truncates again
    assert cb.history["0"] == [(2, 4), (4, 4)]
    x = torch.randn(8, 32)
    with torch.no_grad():
        ref = model(x)
    cb.on_train_end(model)
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert model[0].rank == 4 and model[2].rank == 4
    assert cb.ranks == {"0": 4, "2": 4}
    assert [e["action"] for e in cb.events if e["step"] is None] == ["factorise", "factorise"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=2e-3, rtol=1e-3)  # only step 5's tiny update is cut


def test_trp_keeps_full_rank_matrices_dense() -> None:
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(16))  # energy rank 16 >= break-even 8
    cb = TRP(lam=0.0, every=1, energy=0.99)
    cb.on_train_end(model)
    assert isinstance(model[0], nn.Linear)
    assert cb.events == [{"step": None, "layer": "0", "action": "kept-dense", "rank": 16}]


# ------------------------------------------------------------------------ Cuttlefish
def test_cuttlefish_switches_at_the_stable_rank_once_it_settles() -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # weights stay put until the switch
    cb = Cuttlefish(check_every=1, tol=0.02, patience=2)
    old_w0 = model[0].weight
    x = torch.randn(8, 32)
    train_steps(model, opt, [cb], 1, 2)  # two checks: not enough history yet
    assert isinstance(model[0], nn.Linear) and cb.events == []
    with torch.no_grad():  # what the switch must give: each W replaced by its best rank-4 approximation
        ref = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32))
        ref.load_state_dict(model.state_dict())
        for i in (0, 2):
            u, s, vh = torch.linalg.svd(ref[i].weight.double(), full_matrices=False)
            ref[i].weight.copy_((u[:, :4] * s[:4]) @ vh[:4])
        expected = ref(x)
    train_steps(model, opt, [cb], 3, 1)  # third check: the stable rank (3 + 0.81) has not moved -> switch
    for i, name in ((0, "0"), (2, "2")):
        layer = model[i]
        assert isinstance(layer, LowRankLinear), name
        assert layer.rank == 4  # ceil(stable rank 3.81)
        sr = [v for _, v in cb.history[name]]
        assert sr[-1] == pytest.approx(3.81, abs=0.02)
    assert [(e["step"], e["layer"], e["rank"], e["action"]) for e in cb.events] == [
        (3, "0", 4, "factorise"), (3, "2", 4, "factorise")
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # the optimizer now trains the factors, not the dropped dense weight
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(old_w0) not in held and id(model[0].A.weight) in held and id(model[0].B.weight) in held
    a_before = model[0].A.weight.detach().clone()
    opt.param_groups[0]["lr"] = 1e-3
    train_steps(model, opt, [cb], 4, 1)
    assert not torch.equal(model[0].A.weight.detach(), a_before)


def test_cuttlefish_waits_while_the_stable_rank_moves() -> None:
    model = mlp()
    cb = Cuttlefish(check_every=1, tol=0.02, patience=2)
    for step in range(1, 6):
        with torch.no_grad():  # keep changing the spectrum of layer 0 by 10 % per check
            u, s, vh = torch.linalg.svd(model[0].weight, full_matrices=False)
            s[1:4] *= 0.9
            model[0].weight.copy_((u * s) @ vh)
        cb.on_step_end(model, step)
    assert isinstance(model[0], nn.Linear)  # still moving: still dense
    assert isinstance(model[2], LowRankLinear)  # untouched layer settled and switched at step 3
    assert [e["step"] for e in cb.events] == [3]
    cb.on_step_end(model, 6)
    cb.on_step_end(model, 7)
    cb.on_step_end(model, 8)  # layer 0 stopped moving at step 5: switches after `patience` more checks
    assert isinstance(model[0], LowRankLinear)
    assert cb.events[-1]["step"] == 7


def test_cuttlefish_keeps_matrices_above_break_even_dense() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(16))  # stable rank 16 >= break-even 8
    cb = Cuttlefish(check_every=1, patience=1)
    for step in (1, 2, 3):
        cb.on_step_end(model, step)
    assert isinstance(model[0], nn.Linear)
    assert [(e["action"], e["rank"]) for e in cb.events] == [("kept-dense", 16)]


def test_cuttlefish_moves_factors_out_of_a_galore_group() -> None:
    model = mlp()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = GaLoreAdamW([{"params": biases}, {"params": weights, "rank": 2, "update_proj_gap": 5}], lr=1e-5)
    cb = Cuttlefish(check_every=1, patience=1)
    train_steps(model, opt, [cb], 1, 3)
    assert isinstance(model[0], LowRankLinear)
    assert opt.param_groups[1]["params"] == []  # the dense weights left the low-rank group
    plain = {id(p) for p in opt.param_groups[0]["params"]}
    assert {id(model[0].A.weight), id(model[0].B.weight), id(model[2].A.weight), id(model[2].B.weight)} <= plain
    train_steps(model, opt, [cb], 4, 1)  # and it keeps training
    assert "exp_avg" in opt.state[model[0].A.weight]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cb", [TRP(), Cuttlefish()])
def test_callbacks_refuse_models_without_target_matrices(cb) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    for call in (lambda: cb.on_train_begin(model), lambda: cb.on_step_end(model, cb_step(cb))):
        with pytest.raises(RankwiseError, match="needs a model with target matrices") as exc:
            call()
        assert "\n" not in str(exc.value)


def cb_step(cb) -> int:
    """A step at which the callback acts."""
    return cb.every if isinstance(cb, TRP) else cb.check_every


def test_bad_callback_settings() -> None:
    with pytest.raises(RankwiseError, match="lam must be >= 0"):
        TRP(lam=-1)
    with pytest.raises(RankwiseError, match="energy threshold"):
        TRP(energy=1.5)
    with pytest.raises(RankwiseError, match="check_every/patience"):
        Cuttlefish(check_every=0)


# --------------------------------------------------------------------- HF Trainer use
def test_callbacks_work_inside_a_hugging_face_trainer(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, vocab_size=64))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (x := torch.randint(0, 64, (16,), generator=g)), "labels": x} for _ in range(8)]
    trp = TRP(lam=1e-4, every=2, energy=0.6)
    cf = Cuttlefish(check_every=1, patience=1, tol=1.0)  # tol 100 %: everything counts as settled
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[trp, cf])
    trainer.train()
    assert trp.history and all(steps[0][0] == 2 for steps in trp.history.values())  # truncated at step 2
    switched = [e for e in cf.events if e["action"] == "factorise"]
    assert switched and all(e["step"] == 2 for e in switched)  # first settled check after two checks
    n_low = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert n_low >= len(switched)


# ------------------------------------------------------- Trainer checkpoints and resume
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=2, vocab_size=64,
                                        max_position_embeddings=32))


def _windows(n: int = 24) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r, "labels": r} for r in ids]


def _galore(model):
    from rankwise.train import galore_param_groups

    return GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=2), lr=1e-2)


@pytest.mark.parametrize("optimizer", ["trainer-adamw", "galore"])
def test_cuttlefish_run_saves_and_resumes_exactly_through_the_trainer(tmp_path, optimizer) -> None:
    """Factorised at step 2, checkpointed at step 3 (Trainer.save_model: a rankwise folder), resumed from it into a
    fresh dense model: the switches are replayed into the model and the optimizer before the checkpoint's weights and
    optimizer state load, so steps 4-6 and the final weights equal the uninterrupted run's."""
    from transformers import AutoModelForCausalLM

    import rankwise  # noqa: F401  (from_pretrained rebuilds factorised folders)
    from rankwise.training import TrainConfig, train

    def run(resume: str | None, out: str):
        model = _tiny_llama()
        cb = Cuttlefish(check_every=1, patience=1, tol=10.0)  # every matrix settles at the 2nd check: switch at 2
        cfg = TrainConfig(steps=6, batch_size=2, save_steps=3, checkpoints=out, resume=resume, seed=0)
        opt = _galore(model) if optimizer == "galore" else None
        res = train(model, _windows(), cfg, lr=5e-3, optimizer=opt, callbacks=[cb], progress=False)
        return model, cb, res

    full, cb_full, res_full = run(None, str(tmp_path / "a"))
    switched = [e for e in cb_full.events if e["action"] == "factorise"]
    assert switched and {e["step"] for e in switched} == {2}
    n_low = sum(isinstance(m, LowRankLinear) for m in full.modules())
    assert n_low == len(switched)
    # the step-3 checkpoint is a factorised folder that from_pretrained rebuilds (Trainer.save_model wrote it)
    ck3 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "checkpoint-3"))
    assert sum(isinstance(m, LowRankLinear) for m in ck3.modules()) == n_low
    x = torch.arange(32).view(2, 16)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "checkpoint-6")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, full.eval()(x).logits, atol=0, rtol=0)

    resumed, cb_res, res_res = run(str(tmp_path / "a" / "checkpoint-3"), str(tmp_path / "b"))
    assert sum(isinstance(m, LowRankLinear) for m in resumed.modules()) == n_low
    assert cb_res.events == cb_full.events and cb_res.done == cb_full.done  # the callback's state came back
    assert res_res.losses[3:] == pytest.approx(res_full.losses[3:], rel=1e-6, abs=1e-7)
    ref = dict(full.named_parameters())
    assert set(ref) == {n for n, _ in resumed.named_parameters()}
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, ref[name], atol=1e-6, rtol=1e-5, msg=name)
    moved = [n for n, p in ref.items() if ".A." in n and not torch.equal(p, dict(ck3.named_parameters())[n])]
    assert moved, "the factors did not train after the checkpoint"
