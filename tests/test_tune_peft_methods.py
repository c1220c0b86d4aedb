"""PEFT-backed adapters (dora, adalora, eva, olora, corda): PEFT's own results, PEFT's own format, base checks."""

from __future__ import annotations

import copy

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.training import TrainConfig, train
from rankwise.tune import (
    AdapterConfig,
    apply,
    closed_form_trainable,
    is_peft_model,
    load_adapter,
    load_peft_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
    unmerge,
)
from test_tune_adapters import IDS, compressed, logits, tiny_llama

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = "q_proj|v_proj|up_proj"


def _rows(n: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(4))
    return [{"input_ids": r, "labels": r} for r in ids]


def move(model, size: float = 0.05) -> None:
    """Add N(0, size²) to every trainable tensor (LoRA's B starts at 0, so a relative nudge would not show)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * size)


def _names(model, pattern=TARGETS):
    import re

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(pattern, n)]


@pytest.mark.parametrize("method", ["dora", "olora"])
def test_same_seed_gives_peft_own_loss_curve(method, tmp_path):
    """rankwise (apply + training.train) vs PEFT used by hand (LoraConfig + get_peft_model + transformers.Trainer)."""
    from transformers import Trainer, TrainingArguments

    steps, lr = 5, 1e-2
    ours = apply(tiny_llama(), AdapterConfig(method=method, rank=4, alpha=8, targets=TARGETS, seed=0),
                 progress=False)
    res = train(ours, _rows(), TrainConfig(steps=steps, batch_size=2, seed=0), lr=lr, progress=False)

    base = tiny_llama()
    kw = {"use_dora": True} if method == "dora" else {"init_lora_weights": "olora"}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=_names(base), **kw))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                             weight_decay=0.0, optim="adamw_torch", seed=0, data_seed=0, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=theirs, args=args, train_dataset=_rows())
    trainer.train()
    ref = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(res.losses) == len(ref) == steps
    assert max(abs(a - b) for a, b in zip(res.losses, ref)) < 1e-5, (res.losses, ref)
    assert res.losses[-1] != res.losses[0]


@pytest.mark.parametrize("method", ["dora", "olora", "adalora", "eva", "corda"])
def test_init_counts_merge_save_load(method, tmp_path):
    model = tiny_llama()
    fresh, ref = copy.deepcopy(model), logits(model)
    data = [{"input_ids": IDS, "labels": IDS}]
    pm = apply(model, AdapterConfig(method=method, rank=4, targets=TARGETS, total_steps=10), data=data,
               progress=False)
    assert is_peft_model(pm) and pm.rankwise_adapter["backend"] == "peft"
    assert torch.allclose(logits(pm), ref, atol=1e-5)  # every init keeps the function
    shapes = [(m.out_features, m.in_features) for m in (fresh.get_submodule(n) for n in _names(fresh))]
    ranks = [int(lay.r["default"]) for lay in pm.base_model.model.modules() if hasattr(lay, "lora_A")
             and isinstance(getattr(lay, "r", None), dict)]
    per = {"dora": lambda m, n, r: r * (m + n) + m, "adalora": lambda m, n, r: r * (m + n) + r}
    form = per.get(method, lambda m, n, r: r * (m + n))
    assert trainable_parameters(pm) == closed_form_trainable(pm) == sum(
        form(m, n, r) for (m, n), r in zip(shapes, ranks))
    if method != "eva":  # EVA redistributes ranks by explained variance
        assert ranks == [4] * len(shapes)
    move(pm)
    out = logits(pm)
    assert not torch.allclose(out, ref, atol=1e-3)
    if method != "adalora":  # PEFT's AdaLoRA keeps merge for merge_and_unload only
        merge(pm)
        assert torch.allclose(logits(pm), out, atol=1e-5)
        unmerge(pm)
    save_adapter(pm, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").is_file() and (tmp_path / "a" / "rankwise_adapter.json").is_file()
    again = load_adapter(fresh, tmp_path / "a")  # onto the untouched base (olora/corda: PEFT's LoRA conversion)
    assert torch.allclose(logits(again), out, atol=1e-5)
    with pytest.raises(RankwiseError, match="made for another base"):
        load_adapter(tiny_llama(seed=1), tmp_path / "a")
    plain = merge_and_unload(pm)
    assert not is_peft_model(plain) and torch.allclose(logits(plain), out, atol=1e-5)


def test_load_peft_adapter_from_peft_itself_and_another_base(tmp_path):
    base = tiny_llama()
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=_names(base)))
    move(pm)
    want = logits(pm)
    pm.save_pretrained(str(tmp_path / "p"))
    merged = load_peft_adapter(copy.deepcopy(base), tmp_path / "p")  # what inspect --compare loads
    assert not is_peft_model(merged) and torch.allclose(logits(merged), want, atol=1e-5)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=128))
    with pytest.raises(RankwiseError, match=r"made for another base .*up_proj is 96x64 here but 128x64"):
        load_peft_adapter(other, tmp_path / "p")
    # a rankwise-written PEFT folder carries the base fingerprint: same shapes, other weights are refused too
    ours = apply(tiny_llama(), AdapterConfig(method="dora", rank=4, targets=TARGETS), progress=False)
    save_adapter(ours, tmp_path / "r")
    with pytest.raises(RankwiseError, match="made for another base"):
        load_peft_adapter(tiny_llama(seed=2), tmp_path / "r")


def test_errors_unsupported_layer_and_peft_wrapped():
    with pytest.raises(RankwiseError, match=r"PEFT's eva does not support layers of type Embedding "
                                            r"\(model.embed_tokens\)"):
        apply(tiny_llama(), AdapterConfig(method="eva", targets="embed_tokens|q_proj"),
              data=[{"input_ids": IDS}])
    with pytest.raises(RankwiseError, match="eva initialises from data"):
        apply(tiny_llama(), AdapterConfig(method="eva", targets=TARGETS))
    with pytest.raises(RankwiseError, match="adalora's rank schedule needs the training length"):
        apply(tiny_llama(), AdapterConfig(method="adalora", targets=TARGETS))
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for inner in (wrapped, wrapped.base_model.model):  # the PeftModel, or the model inside it
        with pytest.raises(RankwiseError, match=r"already PEFT-wrapped \(Linear layers\): no adapter on an adapter"):
            apply(inner, AdapterConfig(method="lora", rank=2))
        with pytest.raises(RankwiseError, match="already PEFT-wrapped"):
            apply(inner, AdapterConfig(method="dora", rank=2))


def test_peft_adapter_on_the_factors_of_a_compressed_model():
    """Healing through PEFT: DoRA wraps the nn.Linear factors (A, B) of each LowRankLinear."""
    from rankwise.surgery.lowrank import LowRankLinear

    model = compressed(tiny_llama(), rank=6)
    ref = logits(model)
    pm = apply(model, AdapterConfig(method="dora", rank=2, targets="q_proj"), progress=False)
    targets = pm.rankwise_adapter["targets"]
    assert targets == ["model.layers.0.self_attn.q_proj.A", "model.layers.0.self_attn.q_proj.B",
                       "model.layers.1.self_attn.q_proj.A", "model.layers.1.self_attn.q_proj.B"]
    assert torch.allclose(logits(pm), ref, atol=1e-5)
    assert isinstance(pm.base_model.model.model.layers[0].self_attn.q_proj, LowRankLinear)
    # A: 64 → 6, B: 6 → 64; DoRA: r(m+n) + m each
    assert trainable_parameters(pm) == 2 * ((2 * (6 + 64) + 6) + (2 * (64 + 6) + 64))
    res = train(pm, _rows(4), TrainConfig(steps=3, batch_size=4), lr=3e-2, progress=False)
    assert res.losses[-1] < res.losses[0]


def test_corda_covariances_equal_peft_own_and_work_on_an_encoder_pooler():
    """rankwise feeds PEFT's CorDA the covariances PEFT's own hook computes (bitwise, on a decoder), and also on
    an encoder whose pooler sees one vector per sequence, where PEFT's hook collapses them to a scalar."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution, target_modules
    from transformers import BertConfig, BertForSequenceClassification

    from rankwise.tune.peft_backend import _corda_covariances

    model = tiny_llama()
    cfg = peft.LoraConfig(r=4, target_modules=_names(model), init_lora_weights="corda",
                          corda_config=CordaConfig(corda_method="ipm"))
    batch = {"input_ids": IDS}

    def run_model():
        for i in range(len(IDS)):
            model(input_ids=IDS[i: i + 1])

    with torch.no_grad():
        calib_cov_distribution(model, cfg, run_model, None, None)
    ours = _corda_covariances(model, cfg, [batch], torch.device("cpu"))
    names = [n for n, _ in target_modules(model, cfg)]
    assert sorted(ours) == sorted(names)
    for name, mod in target_modules(model, cfg):
        assert torch.equal(ours[name], mod.covariance_matrix), name

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3))
    rows = [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": torch.tensor([0, 1])}]
    covs = _corda_covariances(bert, peft.LoraConfig(r=4, target_modules=["dense"], init_lora_weights="corda",
                                                    corda_config=CordaConfig()), rows, torch.device("cpu"))
    assert covs["bert.pooler.dense"].shape == (32, 32)  # PEFT's own hook: a 0-d tensor here
    pm = apply(bert, AdapterConfig(method="corda", rank=4, modules_to_save="^classifier$"), data=rows, progress=False)
    assert is_peft_model(pm) and trainable_parameters(pm) > 0


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()


def _bert_batches(lengths=(12, 9, 12, 7)) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    return [{"input_ids": torch.randint(1, 96, (2, n), generator=g),
             "attention_mask": torch.ones(2, n, dtype=torch.long), "labels": torch.tensor([0, 2])} for n in lengths]


def test_eva_batches_one_padded_masked_batch():
    """All init batches go to PEFT's EVA as one batch; shorter sequences right-padded and masked out."""
    from rankwise.tune.peft_backend import _eva_batches

    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _bert_batches()]
    assert _eva_batches(batches[:1]) == batches[:1]  # one batch: PEFT gets it unchanged
    (one,) = _eva_batches(batches)
    assert tuple(one["input_ids"].shape) == (8, 12)
    assert torch.equal(one["input_ids"][2:4, :9], batches[1]["input_ids"])
    assert torch.equal(one["attention_mask"].sum(1), torch.tensor([12, 12, 9, 9, 12, 12, 7, 7]))  # padding masked
    assert torch.equal(one["input_ids"][6:, 7:], torch.zeros(2, 5, dtype=torch.long))
    (lm,) = _eva_batches([{"input_ids": IDS}, {"input_ids": IDS[:, :5]}])  # no mask given: one is made
    assert lm["attention_mask"].sum() == 2 * 12 + 2 * 5


def test_eva_convergence_test_ignores_a_sign_flip():
    """PEFT's incremental PCA fixes signs by the largest |v| entry, which can flip a component between steps
    (cosine -1): PEFT's own SVDHook then never counts it converged; rankwise's counts |cos|."""
    from peft.tuners.lora.eva import SVDHook

    from rankwise.tune.peft_backend import _sign_invariant_svd_hook

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([9, 5, 3, 1, 1, 1, 1, 1.0])
    results = {}
    for cls in (SVDHook, _sign_invariant_svd_hook()):
        hook = cls(n_components=2, sim_thresh=0.99, name="layer", gather_distributed_inputs=False)
        hook(None, (x,), None)
        fit = hook.svd.partial_fit

        def flipped(data, check_input=True, fit=fit, hook=hook):  # the same data, each component's sign flipped
            out = fit(data, check_input)
            hook.svd.components_ = -hook.svd.components_
            return out

        hook.svd.partial_fit = flipped
        hook(None, (x,), None)
        results[cls.__name__] = hook.converged.tolist()
        hook(None, (x[:1],), None)  # fewer rows than components: PEFT skips the step, the flag must stay
        assert hook.converged.tolist() == results[cls.__name__]
    assert results == {"SVDHook": [False, False], "SignInvariantSVDHook": [True, True]}


def test_eva_on_an_encoder_with_a_pooler_finishes(monkeypatch):
    """BERT's pooler sees one vector per sequence: with batches of 2 sequences and 2r = 4 components PEFT's EVA
    skipped its SVD every step and cycled forever (the missing BBC row). One batch of all the init data converges
    in a few forwards; PEFT's loop is also capped with a one-line error."""
    import rankwise.tune.peft_backend as pb

    forwards = []
    capped = pb._CappedForward.__call__
    monkeypatch.setattr(pb._CappedForward, "__call__", lambda self, m, x: forwards.append(1) or capped(self, m, x))

    bert = _tiny_bert()
    ref = bert(**{k: v for k, v in _bert_batches()[0].items() if k != "labels"}).logits
    pm = apply(bert, AdapterConfig(method="eva", rank=2, modules_to_save="^classifier$"), data=_bert_batches(),
               progress=False)
    assert "bert.pooler.dense" in pm.rankwise_adapter["targets"]
    out = pm.eval()(**{k: v for k, v in _bert_batches()[0].items() if k != "labels"}).logits
    assert torch.allclose(out, ref, atol=1e-5)  # EVA's B starts at 0: the function is kept
    assert trainable_parameters(pm) == closed_form_trainable(pm) > 0
    assert len(forwards) <= 4, len(forwards)  # the hashing forward, two fits, the converged check
    monkeypatch.setattr(pb, "EVA_MAX_PASSES", 0)
    with pytest.raises(RankwiseError, match=r"eva: PEFT's incremental SVD did not converge .* in 0 forwards"):
        apply(_tiny_bert(), AdapterConfig(method="eva", rank=2, modules_to_save="^classifier$"),
              data=_bert_batches(), progress=False)
