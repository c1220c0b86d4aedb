"""rankwise.compress on tiny Llama-GQA, GPT-2 (Conv1D) and BERT models; save/load; sequential calibration."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import rankwise
from rankwise.compression.api import CompressConfig, compress
from rankwise.compression.calibration import StatsCollector
from rankwise.compression.calibration.loops import windows_forward_loop
from rankwise.compression.runner import BlockRunner, find_blocks
from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError
from rankwise.surgery import LowRankLinear, find_targets


def _plant_low_rank(model: torch.nn.Module, rank: int = 6, noise: float = 0.002, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in find_targets(model):
        m, n = t.shape
        W = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5
        t.set_weight(0.3 * W + noise * torch.randn(m, n, generator=g))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=128, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    _plant_low_rank(m, seed=seed)
    return m


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)).eval()
    _plant_low_rank(m)
    return m


def windows(vocab: int = 128, n: int = 8, t: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def copy_of(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("method", ["svd", "asvd", "fwsvd", "whiten"])
@pytest.mark.parametrize("alloc", ["uniform", "global"])
def test_llama_gqa_compresses(method, alloc):
    model = tiny_llama()
    x = windows()
    ref = model(x).logits
    before = sum(p.numel() for p in model.parameters())
    res = compress(model, CompressConfig(ratio=0.3, method=method, alloc=alloc, progress=False), calib=x)
    lows = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lows, "nothing was factorised"
    for name, mod in lows.items():
        assert res.ranks[name] == mod.rank < break_even_rank(mod.out_features, mod.in_features)
    assert res.params_before == before and res.params_after < before
    assert res.achieved_ratio >= 0.3 - 0.05
    assert res.targeted_params_before - res.targeted_params_after == before - res.params_after
    out = model(x).logits
    rel = float((out - ref).pow(2).mean() / ref.pow(2).mean())
    assert rel < 0.05  # planted rank 6 ≪ kept ranks: the model barely changes
    meta = model.rankwise_meta
    assert meta["method"] == method and meta["allocation"] == alloc
    assert meta["rank_per_matrix"] == res.ranks and meta["asked_ratio"] == 0.3
    if method != "svd" or alloc == "global":  # global's Fisher sensitivity uses the calibration windows
        assert meta["calibration"]["samples"] == 8 and meta["calibration"]["seq_len"] == 32
    else:
        assert meta["calibration"] is None  # data-free


def test_whiten_beats_svd_on_real_inputs_of_a_model():
    x = windows(n=8, t=48)
    errs = {}
    for method in ("svd", "whiten"):
        model = tiny_llama()
        ref = model(x).logits
        compress(model, CompressConfig(ratio=0.6, method=method, alloc="uniform", sequential=False,
                                       progress=False), calib=x)
        errs[method] = float((model(x).logits - ref).pow(2).mean())
    assert errs["whiten"] < errs["svd"]


def test_gpt2_conv1d_compresses_and_dense_export_matches(tmp_path):
    model = tiny_gpt2()
    x = windows(vocab=96)
    res = compress(model, ratio=0.25, method="whiten", alloc="global", sequential=True, calib=x, progress=False)
    assert any(isinstance(m, LowRankLinear) and m.orig_kind == "conv1d" for m in model.modules())
    out = model(x).logits
    rankwise.export_dense(model, tmp_path / "dense")
    dense = GPT2LMHeadModel.from_pretrained(str(tmp_path / "dense")).eval()
    assert torch.allclose(dense(x).logits, out, atol=1e-4)
    assert res.sequential


def test_bert_compresses_with_a_forward_loop_callable():
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=100, max_position_embeddings=64)).eval()
    _plant_low_rank(model)
    data = [torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calls = []

    def forward_loop(m):
        calls.append(1)
        with torch.no_grad():
            for ids in data:
                m(input_ids=ids, attention_mask=torch.ones_like(ids))

    ref = model(input_ids=data[0]).last_hidden_state
    res = compress(model, CompressConfig(ratio=0.2, method="whiten", alloc="uniform", sequential=True,
                                         progress=False), calib=forward_loop)
    assert calls and res.sequential
    assert res.calibration["text"] == "<forward_loop>"
    assert any(n.startswith("pooler") for n in res.ranks)  # a target outside the blocks is handled too
    out = model(input_ids=data[0]).last_hidden_state
    assert torch.isfinite(out).all()
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.1


def test_find_blocks_and_sequential_stats_differ_in_later_blocks():
    model = tiny_llama()
    x = windows()
    targets = find_targets(model)
    blocks = find_blocks(model, targets)
    assert blocks is not None and blocks.prefix == "model.layers" and len(blocks.modules) == 3
    loop = windows_forward_loop(x)
    with BlockRunner(model, blocks, loop, progress=False) as r:
        r.capture()
        assert r.n_batches == 1  # one batch of 8 windows
        # the captured block-0 input equals the embedding output
        assert torch.allclose(r.h0[0], model.model.embed_tokens(x))
    name = "model.layers.2.self_attn.q_proj"
    stats = {}
    for seq in (False, True):
        m = copy_of(model)
        cache: dict = {}
        compress(m, CompressConfig(ratio=0.5, method="whiten", alloc="uniform", sequential=seq, progress=False),
                 calib=x, stats_cache=None if seq else cache)
        if not seq:
            stats[seq] = cache[name].xtx
    # recompute sequential statistics of block 2 by hand: run blocks 0,1 of a compressed copy
    m = copy_of(model)
    compress(m, CompressConfig(ratio=0.5, method="whiten", alloc="uniform", sequential=True, progress=False), calib=x)
    dense_q = copy_of(model).model.layers[2].self_attn.q_proj
    m.model.layers[2].self_attn.q_proj = dense_q
    from rankwise.surgery.targets import Target

    with BlockRunner(m, find_blocks(m, targets), loop, progress=False) as r:
        r.capture()
        h = r.h0
        for i in range(2):
            with r.block(i) as blk:
                h = r.run(i, blk, h)
        with StatsCollector([Target(name, dense_q)]) as col, r.block(2) as blk:
            r.run(2, blk, h)
    seq_xtx = col.stats[name].xtx
    assert not torch.allclose(seq_xtx, stats[False], rtol=1e-3)
    # and the dense statistics are what a non-sequential hook pass over the dense model gives
    with StatsCollector([t for t in find_targets(model) if t.name == name]) as col2:
        loop(model)
    assert torch.allclose(col2.stats[name].xtx, stats[False])


def test_sequential_output_closer_to_dense_than_non_sequential_at_high_ratio():
    x = windows(n=16, t=32)
    errs = {}
    for seq in (False, True):
        model = tiny_llama(seed=3)
        ref = model(x).logits
        res = compress(model, CompressConfig(ratio=0.6, method="whiten", alloc="uniform", sequential=seq,
                                             progress=False), calib=x)
        assert res.sequential == seq
        errs[seq] = float((model(x).logits - ref).pow(2).mean())
    assert errs[True] < errs[False] * 1.05


def test_save_load_identical_logits_and_rankwise_json(tmp_path):
    model = tiny_llama()
    x = windows()
    res = compress(model, CompressConfig(ratio=0.3, method="whiten", progress=False), calib=x)
    out = model(x).logits
    rankwise.save(model, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "rankwise.json").read_text())
    assert meta["method"] == "whiten" and meta["allocation"] == "global"
    assert meta["asked_ratio"] == 0.3 and abs(meta["achieved_ratio"] - res.achieved_ratio) < 1e-12
    assert meta["calibration"]["sha256"] and meta["calibration"]["samples"] == 8
    assert {k: v for k, v in res.ranks.items() if v is not None} == meta["ranks"]
    loaded = rankwise.load(tmp_path / "c")
    assert torch.equal(loaded(x).logits, out)
    with pytest.raises(RankwiseError, match="already exists"):
        rankwise.save(model, tmp_path / "c")


def test_load_rejects_missing_meta_and_mismatched_tensors(tmp_path):
    model = tiny_llama()
    compress(model, CompressConfig(ratio=0.3, alloc="uniform", progress=False), calib=windows())
    rankwise.save(model, tmp_path / "c")
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(RankwiseError, match="no rankwise.json"):
        rankwise.load(tmp_path / "plain")
    meta_file = tmp_path / "c" / "rankwise.json"
    meta = json.loads(meta_file.read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][name]["rank"] += 1
    meta_file.write_text(json.dumps(meta))
    cfg_file = tmp_path / "c" / "config.json"  # the layer map is recorded in config.json too: edit both alike
    cfg = json.loads(cfg_file.read_text())
    if isinstance(cfg.get("quantization_config"), dict) and "layers" in cfg["quantization_config"]:
        cfg["quantization_config"]["layers"][name]["rank"] += 1
        cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(RankwiseError, match="do not match the rank map"):
        rankwise.load(tmp_path / "c")


def test_bad_inputs_are_one_line_errors(tmp_path):
    model = tiny_llama()
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(RankwiseError, match="between 0 and 1"):
            compress(model, ratio=bad, calib=windows(), progress=False)
    with pytest.raises(RankwiseError, match="unknown allocation"):
        compress(model, alloc="nope", calib=windows(), progress=False)
    with pytest.raises(RankwiseError, match="2-D LongTensor"):
        compress(model, calib=torch.zeros(3), progress=False)

    class Tiny(torch.nn.Module):  # every matrix already at break-even: 2×2 layers
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(2, 2)

    with pytest.raises(RankwiseError, match="break-even"):
        compress(Tiny(), method="svd", alloc="uniform", ratio=0.2)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # failed runs left it untouched


class _Tok:
    """A whitespace tokenizer: enough for text calibration tests."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [2 + (hash(w) % 100) for w in text.split()]}


def test_text_calibration_errors_say_how_many_tokens(tmp_path):
    model = tiny_llama()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(RankwiseError, match=r"empty; 4 samples of 16 tokens need about 60 tokens"):
        compress(model, calib=str(empty), tokenizer=_Tok(), calib_samples=4, seq_len=16, progress=False)
    with pytest.raises(RankwiseError, match=r"has 4 tokens but 4 samples of 16 tokens need 60"):
        compress(model, calib=str(short), tokenizer=_Tok(), calib_samples=4, seq_len=16, progress=False)
    long = tmp_path / "long.txt"
    long.write_text(" ".join(f"w{i % 37}" for i in range(400)))
    res = compress(model, calib=str(long), tokenizer=_Tok(), calib_samples=4, seq_len=16, progress=False)
    assert res.calibration["text"] == str(long) and res.calibration["tokens"] == 64


def test_output_sensitivity_matches_autograd():
    from rankwise.compression.calibration.sensitivity import output_sensitivity

    model = tiny_llama()
    x = windows(n=4, t=16)
    t = next(t for t in find_targets(model) if t.name.endswith("layers.1.mlp.down_proj"))
    sens = output_sensitivity(model, [t], windows_forward_loop(x, with_loss=True))
    grabbed = {}
    h = t.module.register_forward_hook(lambda m, a, o: grabbed.setdefault("y", o))
    y_loss = model(input_ids=x, labels=x).loss
    y = grabbed["y"]
    h.remove()
    (g,) = torch.autograd.grad(y_loss, y)
    assert sens[t.name] == pytest.approx(float(g.double().pow(2).mean()), rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_fisher_weighted_global_allocation_beats_relative_on_tiny_llama():
    x = windows()
    held_out = windows(n=16, seed=1)  # evaluated on windows it did not calibrate on
    err = {}
    for sens, norm in (("none", "total"), ("fisher", "none")):
        m = tiny_llama()
        with torch.no_grad():
            ref = m(held_out).logits
        res = compress(m, CompressConfig(ratio=0.6, method="whiten", alloc_norm=norm, alloc_sensitivity=sens,
                                         progress=False), calib=x)
        assert 0.6 <= res.achieved_ratio <= 0.61
        with torch.no_grad():
            err[sens] = float((m(held_out).logits - ref).pow(2).mean())
    assert err["fisher"] < err["none"]


def test_fwsvd_with_a_loop_that_never_calls_backward_is_a_clear_error():
    model = tiny_llama()
    x = windows()

    def forward_only(m):
        with torch.no_grad():
            m(input_ids=x)

    with pytest.raises(RankwiseError, match="did not call backward"):
        compress(model, method="fwsvd", alloc="uniform", calib=forward_only, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_fisher_allocation_with_a_callable_uses_the_config_text_or_refuses(tmp_path):
    """K.5: no silent switch to alloc_norm='total'; sensitivities come from config.calib or a one-line error."""
    model = tiny_llama()
    loop = windows_forward_loop(windows())
    with pytest.raises(RankwiseError, match="needs a tokenizer"):
        compress(model, ratio=0.3, calib=loop, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(400)))
    model = tiny_llama()
    res = compress(model, CompressConfig(ratio=0.3, calib=str(text), seq_len=16, sens_samples=4, progress=False),
                   calib=loop, tokenizer=_Tok())
    assert res.achieved_ratio >= 0.3
    assert model.rankwise_meta["config"]["alloc_norm"] == "none"
    assert res.calibration["sensitivity"]["text"] == str(text) and res.calibration["sensitivity"]["samples"] == 4


@pytest.mark.parametrize("method", ["whiten", "fwsvd", "svd"])
def test_factors_kept_from_the_spectra_pass_equal_a_second_pass(method, monkeypatch, tmp_path):
    """The default pipeline keeps each matrix's factors up to its cap rank from the spectra pass (on disk) and
    slices them: bit-identical to recomputing statistics and decompositions in a second pass, which it skips."""
    import functools

    import rankwise.compression.api as api
    import rankwise.compression.factor_store as fs

    made = {"collectors": 0, "gets": 0}
    real_init = StatsCollector.__init__

    def counting_init(self, *a, **kw):
        made["collectors"] += 1
        real_init(self, *a, **kw)

    class CountingStore(fs.FactorStore):
        def get(self, name, k):
            made["gets"] += 1
            return super().get(name, k)

    monkeypatch.setattr(StatsCollector, "__init__", counting_init)
    monkeypatch.setattr(api, "FactorStore", CountingStore)
    x = windows()
    cfg = CompressConfig(ratio=0.3, method=method, progress=False, sens_samples=2)
    kept = tiny_llama()
    res = compress(kept, cfg, calib=x)
    with_store = dict(made)
    made.update(collectors=0, gets=0)
    monkeypatch.setattr(api, "run_pipeline", functools.partial(api.run_pipeline, keep_factors=False))
    again = tiny_llama()
    ref = compress(again, cfg, calib=x)
    assert res.ranks == ref.ranks
    factorised = sum(r is not None for r in res.ranks.values())
    assert factorised and with_store["gets"] == factorised and made["gets"] == 0
    if method == "whiten":  # a data walk per pass: the second pass's statistics walk is gone
        assert with_store["collectors"] < made["collectors"]
    sd, sd_ref = kept.state_dict(), again.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k


def test_factor_store_falls_back_to_a_second_pass_when_the_disk_is_too_small(monkeypatch):
    """Without room on disk for the factors, the pipeline recomputes them (same result, no store made)."""
    import shutil
    from collections import namedtuple

    import rankwise.compression.factor_store as fs

    x = windows()
    cfg = CompressConfig(ratio=0.3, progress=False, sens_samples=2)
    ref_model = tiny_llama()
    ref = compress(ref_model, cfg, calib=x)
    made = []
    real_init = fs.FactorStore.__init__

    def tracking_init(self, *a, **kw):
        made.append(1)
        real_init(self, *a, **kw)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fs.FactorStore, "__init__", tracking_init)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 10))
    model = tiny_llama()
    res = compress(model, cfg, calib=x)
    assert not made and res.ranks == ref.ranks
    sd, sd_ref = model.state_dict(), ref_model.state_dict()
    assert all(torch.equal(sd[k], sd_ref[k]) for k in sd)
