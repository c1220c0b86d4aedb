"""Training regimes (``rankwise train --regime``): SLTrain, ReLoRA, LOST on tiny random models.

Closed forms (parameter counts, Eckart–Young residual), reference computations (the fixed-support
gradient against plain autograd of a dense scatter), function equality (ReLoRA's merge, save→load,
export to a plain folder) and the one-line errors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rankwise.errors import RankwiseError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama(seed: int = 0, vocab: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))


def _shapes(model) -> dict[str, tuple[int, int, bool]]:
    from rankwise.surgery.targets import find_targets

    return {t.name: (*t.shape, t.bias is not None) for t in find_targets(model)}


def _steps(model, x, n: int = 3, lr: float = 1e-2) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


# -- SLTrain -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2-conv1d-bias"])
def test_sltrain_parameter_count_is_the_closed_form(make) -> None:
    from rankwise.train.regimes.base import build_regime
    from rankwise.train.regimes.layers import SparseLowRankLinear

    model = make()
    shapes = _shapes(model)
    dense = sum(p.numel() for p in model.parameters())
    r, delta = 6, 0.05
    build_regime("sltrain", rank=r, sparse_density=delta).prepare(model)
    expected_layers = 0
    for name, (m, n, has_bias) in shapes.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLowRankLinear)
        closed = r * (m + n) + math.floor(delta * m * n) + (m if has_bias else 0)
        assert sum(p.numel() for p in layer.parameters()) == closed
        assert layer.sparse_index.unique().numel() == math.floor(delta * m * n)  # distinct positions
        expected_layers += closed
    total = sum(p.numel() for p in model.parameters())
    assert total == dense - sum(m * n + (m if b else 0) for m, n, b in shapes.values()) + expected_layers
    assert total < dense


def test_sltrain_fixed_support_gradient_matches_dense_autograd_and_support_stays_fixed() -> None:
    from rankwise.train.regimes.layers import SparseLowRankLinear

    torch.manual_seed(0)
    m, n, nnz = 7, 5, 9
    layer = SparseLowRankLinear(n, m, 2, nnz, pattern="random", scale=0.5, bias=True)
    with torch.no_grad():
        layer.sparse_index.copy_(torch.randperm(m * n)[:nnz].sort().values.to(layer.sparse_index.dtype))
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 4, n, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    # reference: the same map built from plain autograd ops on a dense scatter of the values
    v = layer.sparse_value.detach().clone().requires_grad_(True)
    a, b, bias = (t.detach().clone().requires_grad_(True) for t in (layer.A.weight, layer.B.weight, layer.B.bias))
    x2 = x.detach().clone().requires_grad_(True)
    s = torch.zeros(m * n).index_put((layer.sparse_index.long(),), v).view(m, n)
    ref = x2 @ (0.5 * b @ a + s).T + bias
    ref.pow(2).sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.sparse_value.grad, v.grad)
    torch.testing.assert_close(layer.A.weight.grad, a.grad)
    torch.testing.assert_close(layer.dense_weight(), (0.5 * b @ a + s).detach())
    before = layer.sparse_index.clone()
    torch.optim.AdamW(layer.parameters(), lr=0.1).step()
    assert torch.equal(layer.sparse_index, before)


# -- LOST ------------------------------------------------------------------------------------------------------------
def test_lost_init_is_the_svd_split_plus_the_largest_residual_channels() -> None:
    from rankwise.train.regimes.base import build_regime

    model = _llama()
    name = "model.layers.0.mlp.down_proj"  # 48×80
    w = model.get_submodule(name).weight.detach().clone()
    r, delta = 5, 0.1
    build_regime("lost", rank=r, sparse_density=delta).prepare(model)
    layer = model.get_submodule(name)
    m, n = w.shape
    k = round(delta * n)
    assert layer.nnz == k and sum(p.numel() for p in layer.parameters()) == r * (m + n) + m * k
    low = (layer.B.weight @ layer.A.weight).detach()
    s = torch.linalg.svdvals(w)
    # Eckart–Young: the low-rank part is the best rank-r approximation
    assert torch.linalg.matrix_rank(low) == r
    assert (w - low).norm() ** 2 == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4)
    resid = w - low
    top = resid.norm(dim=0).topk(k).indices.sort().values
    assert torch.equal(layer.sparse_index, top)
    torch.testing.assert_close(layer.sparse_value, resid[:, top], atol=1e-5, rtol=1e-4)
    # W restricted to the kept channels is reproduced exactly (low-rank + residual there), elsewhere only the low rank
    dw = layer.dense_weight()
    torch.testing.assert_close(dw[:, top], w[:, top], atol=1e-5, rtol=1e-4)


# -- ReLoRA ----------------------------------------------------------------------------------------------------------
def test_relora_merge_keeps_the_function_restarts_factors_and_prunes_moments() -> None:
    from rankwise.train.regimes.base import build_regime
    from rankwise.train.regimes.layers import ReLoRALinear

    model = _llama()
    regime = build_regime("relora", rank=4, relora_every=3, relora_reset=0.99, seed=0)
    regime.prepare(model)
    frozen = [m.weight for m in model.modules() if isinstance(m, ReLoRALinear)]
    assert frozen and not any(w.requires_grad for w in frozen)
    w0 = frozen[0].detach().clone()
    opt = _steps(model, X % 256, n=2)
    layers = [m for m in model.modules() if isinstance(m, ReLoRALinear)]
    assert all(layer.B.weight.abs().sum() > 0 for layer in layers)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=X).logits
    a0 = layers[0].A.weight.detach().clone()
    cb = regime.callbacks()[0]
    cb.on_step_end(model, 2, optimizer=opt)  # not a merge step
    assert cb.events == []
    cb.on_step_end(model, 3, optimizer=opt)
    with torch.no_grad():
        after = model(input_ids=X).logits
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)
    assert all(layer.B.weight.abs().sum() == 0 for layer in layers)
    assert not torch.equal(layers[0].A.weight, a0) and not torch.equal(frozen[0], w0)
    for layer in layers:
        for p in (layer.A.weight, layer.B.weight):
            for key in ("exp_avg", "exp_avg_sq"):
                kept = int((opt.state[p][key] != 0).sum())
                assert kept <= p.numel() - round(0.99 * p.numel())
    assert cb.events[0]["step"] == 3 and cb.events[0]["layers"] == len(layers)


def test_relora_resume_restores_merges_and_schedule_through_the_trainer(tmp_path) -> None:
    """ReLoRA (merges at steps 2 and 4, jagged schedule) checkpointed at step 3 and resumed into a fresh model: the
    merge events come back from the checkpoint, the schedule continues, and the run ends with the uninterrupted
    run's weights, losses and learning rate."""
    from rankwise.train.regimes.base import build_regime
    from rankwise.training import TrainConfig, train

    ids = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(3))
    windows = [{"input_ids": r, "labels": r} for r in ids]

    def run(resume: str | None, out: str):
        model = _llama()
        regime = build_regime("relora", rank=4, relora_every=2, relora_warmup=1, seed=0)
        regime.prepare(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        sched = regime.scheduler(opt, 6)
        cfg = TrainConfig(steps=6, batch_size=2, save_steps=3, checkpoints=out, resume=resume, seed=0)
        res = train(model, windows, cfg, lr=1e-2, optimizer=opt, scheduler=sched, callbacks=regime.callbacks(),
                    progress=False)
        return model, regime, res, opt

    full, reg_full, res_full, opt_full = run(None, str(tmp_path / "a"))
    assert [e["step"] for e in reg_full.callback.events] == [2, 4]
    resumed, reg_res, res_res, opt_res = run(str(tmp_path / "a" / "checkpoint-3"), str(tmp_path / "b"))
    assert reg_res.callback.events == reg_full.callback.events  # step 2's merge restored, step 4's re-done
    assert reg_res.summary()["merges"] == [2, 4]
    assert opt_res.param_groups[0]["lr"] == pytest.approx(opt_full.param_groups[0]["lr"], rel=1e-12)
    assert res_res.losses[3:] == pytest.approx(res_full.losses[3:], rel=1e-6, abs=1e-7)
    ref = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, ref[name], atol=1e-6, rtol=1e-5, msg=name)
    ck = json.loads((tmp_path / "a" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in ck["stateful_callbacks"]["ReLoRACallback"]["attributes"]["events"]] == [2]


def test_relora_jagged_cosine_schedule() -> None:
    from rankwise.train.regimes.relora import jagged_cosine_schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = jagged_cosine_schedule(opt, total_steps=40, every=10, warmup=4, restart_warmup=4, min_lr_ratio=0.1)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def cosine(s: int) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 36))

    assert lrs[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert lrs[5] == pytest.approx(cosine(5)) and lrs[19] == pytest.approx(cosine(19))
    for k in (10, 20, 30):  # after every merge: a drop, then a linear climb back to the cosine curve
        assert lrs[k] < lrs[k - 1] and lrs[k] == pytest.approx(cosine(k + 4) / 5)
        assert lrs[k + 3] == pytest.approx(cosine(k + 4) * 4 / 5) and lrs[k + 4] == pytest.approx(cosine(k + 4))


# -- save → load → export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("regime", ["sltrain", "relora", "lost"])
def test_regime_checkpoint_reloads_and_exports_to_a_plain_folder(regime, tmp_path) -> None:
    from transformers import LlamaForCausalLM

    import rankwise
    from rankwise.train.regimes.base import build_regime

    model = _llama()
    build_regime(regime, rank=4, sparse_density=0.05).prepare(model)
    _steps(model, X)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=X).logits
    rankwise.save(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "rankwise.json").read_text())
    assert {s["type"] for s in meta["layers"].values()} == {"relora" if regime == "relora" else "sparse_lowrank"}
    loaded = rankwise.load(tmp_path / "ckpt")
    assert type(loaded.get_submodule("model.layers.1.mlp.up_proj")) is type(model.get_submodule(
        "model.layers.1.mlp.up_proj"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X).logits, ref, atol=0, rtol=0)
    rankwise.export_dense(loaded, tmp_path / "dense")  # the one conversion knows every registered layer type
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in cfg
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "dense"))
    assert type(plain.get_submodule("model.layers.1.mlp.up_proj")) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=X).logits, ref, atol=2e-5, rtol=1e-4)


# -- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"regime": "relora", "optimizer": "galore"}, r"--regime relora .* --optimizer galore .* use --optimizer adamw\. "
                                                  r"Combinations that exist: dense: adamw, galore, galore-dct, fira; "
                                                  r"sltrain: adamw; relora: adamw; lost: adamw\."),
    ({"regime": "lost", "optimizer": "fira"}, r"--optimizer fira"),
    ({"regime": "sltrain", "from_scratch": True, "sparse_density": 0.0}, r"--sparse-density must lie strictly "
                                                                          r"between 0 and 1, got 0\.0"),
    ({"regime": "lost", "sparse_density": 1.0}, r"strictly between 0 and 1, got 1\.0"),
    ({"regime": "sltrain", "from_scratch": True, "sparse_density": -0.2}, r"got -0\.2"),
    ({"regime": "sltrain"}, r"add --from-scratch"),
    ({"regime": "banana"}, r"unknown regime 'banana'; choose one of dense, sltrain, relora, lost\."),
    ({"regime": "relora", "callback": "trp"}, r"--callback trp reshapes dense weight matrices"),
    ({"regime": "relora", "fsdp": True}, r"not supported with --fsdp"),
    ({"regime": "relora", "relora_reset": 1.5}, r"--relora-reset must lie in \[0, 1\]"),
    ({"regime": "relora", "relora_every": 0}, r"--relora-every must be at least 1"),
])
def test_regime_errors_are_one_line(kwargs, match) -> None:
    from rankwise.train.config import TrainRunConfig

    with pytest.raises(RankwiseError, match=match) as exc:
        TrainRunConfig(steps=2, **kwargs)
    assert "\n" not in str(exc.value)


def test_regime_default_optimizer_is_adamw_and_rank_larger_than_a_matrix_is_refused() -> None:
    from rankwise.train.config import TrainRunConfig, build_regime

    assert TrainRunConfig(steps=1, regime="lost").optimizer == "adamw"
    assert TrainRunConfig(steps=1).optimizer == "galore"
    model = _llama()
    with pytest.raises(RankwiseError, match=r"rank 30 is larger than the 24x48 matrix of model.layers.0.self_attn.k_"):
        build_regime(TrainRunConfig(steps=1, regime="lost", rank=30)).prepare(model)
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear  # nothing was swapped


def test_cli_train_regime_writes_a_checkpoint_and_a_dense_copy(tmp_path, capsys) -> None:
    from transformers import LlamaForCausalLM

    import rankwise
    from rankwise.cli.main import main
    from rankwise.io.texts import load_text
    from tiny_models import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "tiny")
    text = tmp_path / "train.txt"
    text.write_text(load_text("ptb", "train")[:20_000])
    out, dense = tmp_path / "out", tmp_path / "dense"
    rc = main(["train", str(folder), "--regime", "sltrain", "--from-scratch", "--rank", "4", "--sparse-density",
               "0.05", "--data", str(text), "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--lr", "3e-3",
               "--eval-tokens", "32", "--eval-seq-len", "16", "--out", str(out), "--export-dense", str(dense),
               "--no-progress", "--json", str(tmp_path / "run.json")])
    assert rc == 0
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["optimizer"] == "adamw" and summary["regime"]["regime"] == "sltrain"
    assert summary["parameters"] == summary["regime"]["parameters"] < summary["params_before"]
    model = rankwise.load(out)
    plain = LlamaForCausalLM.from_pretrained(str(dense))
    x = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, model(input_ids=x).logits, atol=2e-5, rtol=1e-4)
    # relora through the Trainer: the merge callback runs (HF signature, the Trainer's optimizer), not at the last step
    rc = main(["train", str(folder), "--regime", "relora", "--rank", "4", "--relora-every", "1", "--data", str(text),
               "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--lr", "3e-3", "--eval-tokens", "0",
               "--out", str(tmp_path / "rl"), "--no-progress", "--json", str(tmp_path / "rl.json")])
    assert rc == 0
    summary = json.loads((tmp_path / "rl.json").read_text())
    assert summary["regime"]["merges"] == [1]
    merges = [e for e in summary["train"]["events"] if e.get("action") == "merge"]
    assert len(merges) == 1 and merges[0]["layers"] == 14 and merges[0]["moments_zeroed"] > 0
    assert type(rankwise.load(tmp_path / "rl").get_submodule("model.layers.0.mlp.up_proj")).__name__ == "ReLoRALinear"
    rc = main(["train", str(folder), "--regime", "relora", "--optimizer", "galore", "--steps", "2", "--out",
               str(tmp_path / "o2")])
    assert rc == 2 and "Combinations that exist" in capsys.readouterr().err
