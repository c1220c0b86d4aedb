"""Streaming compress of a sharded bf16 checkpoint: equal to in-memory, one block at a time, deterministic, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise
from rankwise.compression.api import CompressConfig, compress
from rankwise.compression.calibration.loops import windows_forward_loop
from rankwise.compression.streaming import compress_checkpoint, export_dense_checkpoint
from rankwise.errors import RankwiseError
from rankwise.io.shards import CheckpointReader

LAYERS = 3


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=LAYERS, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    d = tmp_path_factory.mktemp("ckpt") / "src"
    model.save_pretrained(str(d), max_shard_size="60KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d


def _x():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _cfg(**kw):
    return CompressConfig(ratio=0.3, progress=False, max_shard_size="100KB", **kw)


def test_streamed_equals_in_memory_and_materialises_one_block_at_a_time(sharded, tmp_path, one_torch_thread):
    x = _x()
    live: set[int] = set()
    peak, loads = [0], [0]

    def on_block(event, i):
        if event == "load":
            assert i not in live
            live.add(i)
            loads[0] += 1
            peak[0] = max(peak[0], len(live))
        else:
            live.remove(i)

    res = compress_checkpoint(sharded, tmp_path / "out", _cfg(method="whiten"), calib=x, on_block=on_block)
    assert peak[0] == 1 and not live
    # sensitivity forward + backward, spectra, factorisation: 4 walks of 3 blocks (+ block 0 once per capture)
    assert LAYERS * 4 <= loads[0] <= LAYERS * 4 + 4
    model = LlamaForCausalLM.from_pretrained(str(sharded), dtype=torch.bfloat16).eval()
    ref = compress(model, _cfg(method="whiten"), calib=x)
    assert res.ranks == ref.ranks and any(r is not None for r in res.ranks.values())
    assert res.achieved_ratio == pytest.approx(ref.achieved_ratio)
    assert (res.params_before, res.params_after) == (ref.params_before, ref.params_after)  # tied head counted once
    reader = CheckpointReader(tmp_path / "out", check_sizes=False)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded, transformers names
    sd = model.state_dict()
    assert set(reader.keys()) == {k for k in sd if k != "lm_head.weight"}  # tied head stored once
    for k in reader.keys():
        assert reader.dtype(k) == torch.bfloat16
        assert torch.allclose(reader.get(k).float(), sd[k].float(), rtol=1e-2, atol=1e-3), k
    meta = json.loads((tmp_path / "out" / "rankwise.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["torch_threads"] == 1 and meta["device"] == "cpu"
    # the output loads and computes what the in-memory compressed model computes
    loaded = rankwise.load(tmp_path / "out")
    assert torch.allclose(loaded(x[:2]).logits.float(), model(x[:2]).logits.float(), atol=2e-2)
    # and a streamed dense export loads with plain transformers
    export_dense_checkpoint(tmp_path / "out", tmp_path / "dense")
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.bfloat16).eval()
    assert torch.allclose(plain(x[:2]).logits.float(), model(x[:2]).logits.float(), atol=5e-2)


def test_bf16_checkpoint_computed_in_float32_equals_the_upcast_model_in_memory(sharded, tmp_path, one_torch_thread):
    """compute_dtype float32 on a bf16 checkpoint: the fp32 pipeline of the upcast model, stored in bf16."""
    x = _x()[:4, :16]
    cfg = _cfg(calib_samples=4, seq_len=16, sens_samples=2)
    res = compress_checkpoint(sharded, tmp_path / "out", replace(cfg, compute_dtype="float32"), calib=x)
    upcast = LlamaForCausalLM.from_pretrained(str(sharded), dtype=torch.bfloat16).float().eval()
    ref = compress(upcast, replace(cfg, dtype="float32"), calib=x)
    assert res.ranks == ref.ranks and any(r is not None for r in res.ranks.values())
    reader = CheckpointReader(tmp_path / "out", check_sizes=False)
    sd = upcast.state_dict()
    factors = [k for k in reader.keys() if k.endswith((".A.weight", ".B.weight"))]
    assert factors
    for k in reader.keys():
        assert reader.dtype(k) == torch.bfloat16, k  # stored as asked
        got, want = reader.get(k).float(), sd[k].to(torch.bfloat16).float()
        # the bf16 rounding of the same float32 result: equal, or one bf16 step apart where float32 sums differ
        assert torch.allclose(got, want, rtol=2**-7, atol=1e-6), k
    assert sum(torch.equal(reader.get(k).float(), sd[k].to(torch.bfloat16).float()) for k in factors) \
        >= 0.5 * len(factors)
    meta = json.loads((tmp_path / "out" / "rankwise.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["compute_dtype"] == "float32"
    # negative control: computing in bf16 itself (forced) moves the factors by more than bf16 rounding
    compress_checkpoint(sharded, tmp_path / "bf", replace(cfg, compute_dtype="bfloat16"), calib=x)
    other = CheckpointReader(tmp_path / "bf", check_sizes=False)
    assert json.loads((tmp_path / "bf" / "rankwise.json").read_text())["compute_dtype"] == "bfloat16"
    assert not all(other.shape(k) == reader.shape(k) and torch.allclose(
        other.get(k).float(), reader.get(k).float(), rtol=2**-7, atol=1e-6) for k in factors)


def test_same_seed_gives_bit_identical_safetensors(sharded, tmp_path, one_torch_thread):
    cfg = _cfg(method="whiten", alloc="uniform", calib_samples=4, seq_len=16)
    sums = []
    for name in ("a", "b"):
        compress_checkpoint(sharded, tmp_path / name, cfg, calib=_x()[:4, :16])
        sums.append(json.loads((tmp_path / name / "rankwise.json").read_text())["checksums"])
    assert sums[0] == sums[1] and any(k.endswith(".safetensors") for k in sums[0])


def test_streamed_fwsvd_gradients_equal_whole_model_backward(sharded, one_torch_thread):
    x = _x()
    models = [LlamaForCausalLM.from_pretrained(str(sharded), dtype=torch.float32).eval() for _ in range(2)]
    cfg = CompressConfig(ratio=0.3, method="fwsvd", alloc="uniform", progress=False, batch_size=4)
    compress(models[0], cfg, calib=x)  # token windows: streamed block-by-block backward
    compress(models[1], cfg, calib=windows_forward_loop(x, batch_size=4, with_loss=True))  # the loop's own backward
    a, b = models[0].state_dict(), models[1].state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_and_options_are_one_line_errors(sharded, tmp_path):
    def one_line(fn, match):
        with pytest.raises(RankwiseError, match=match) as exc:
            fn()
        assert "\n" not in str(exc.value)

    missing = _copy(sharded, tmp_path / "missing")
    next(missing.glob("model-00002-*.safetensors")).unlink()
    one_line(lambda: compress_checkpoint(missing, tmp_path / "o1", _cfg(), calib=_x()), "missing")
    outside = _copy(sharded, tmp_path / "outside")
    idx = json.loads((outside / "model.safetensors.index.json").read_text())
    key = next(iter(idx["weight_map"]))
    idx["weight_map"][key] = "../elsewhere.safetensors"
    (outside / "model.safetensors.index.json").write_text(json.dumps(idx))
    one_line(lambda: compress_checkpoint(outside, tmp_path / "o2", _cfg(), calib=_x()), "outside the folder")
    absurd = _copy(sharded, tmp_path / "absurd")
    cfg = json.loads((absurd / "config.json").read_text())
    cfg["intermediate_size"] = 10**12
    (absurd / "config.json").write_text(json.dumps(cfg))
    one_line(lambda: compress_checkpoint(absurd, tmp_path / "o3", _cfg(), calib=_x()), "plausible size")
    one_line(lambda: compress_checkpoint(sharded, tmp_path / "o4", _cfg(), calib=lambda m: None), "forward_loop")
    if not torch.cuda.is_available():
        one_line(lambda: CompressConfig(device="cuda"), "no CUDA")
    one_line(lambda: CompressConfig(dtype="float8"), "unknown --dtype")
    one_line(lambda: CompressConfig(max_shard_size="big"), "not a size")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_token_ids_of_a_long_text_are_cached_and_identical(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rankwise.compression.calibration.loops import text_windows
    from rankwise.io.tokens import sample_windows

    words = [f"w{i}" for i in range(300)]
    tk = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(words)}},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")
    text = tmp_path / "long.txt"
    text.write_text(" ".join(words[(i * 7) % 300] for i in range(40_000)))  # > 100k characters
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    first, _ = text_windows(tok, str(text), 6, 32, seed=3)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.pt"))) == 1
    second, _ = text_windows(tok, str(text), 6, 32, seed=3)
    direct = sample_windows(tok, text.read_text(), 6, 32, seed=3)
    assert torch.equal(first, direct) and torch.equal(second, direct)


def test_interrupt_in_the_middle_of_the_walk_leaves_no_output(sharded, tmp_path, monkeypatch, one_torch_thread):
    """SIGTERM becomes an exception in the CLI (like Ctrl-C): raised while block 1 is in the works, it leaves
    neither the output, nor its temporary folder, nor spilled hidden states."""
    import tempfile

    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    loads = []

    def on_block(event, i):
        if event == "load":
            loads.append(i)
            if len(loads) == LAYERS + 2:  # in the middle of the backward (top-down) walk
                raise KeyboardInterrupt

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous output")
    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(sharded, tmp_path / "out", _cfg(calib_samples=4, seq_len=16, sens_samples=2),
                            calib=_x()[:4, :16], overwrite=True, on_block=on_block, spill_bytes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tmp"]  # no temporary folder beside the output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]  # the old output is untouched
    assert not any(spill_root.iterdir())  # spilled hidden states removed


def test_untied_head_and_embeddings_stay_in_the_storage_dtype_outside_the_head_passes(tmp_path, monkeypatch,
                                                                                       one_torch_thread):
    """bf16 checkpoint computed in float32: the embeddings are kept in bf16 (half the memory), the untied head is
    read from the checkpoint only around the loss-sensitivity pass, and the result (head included) equals the
    upcast model compressed in memory."""
    import rankwise.compression.streaming as streaming

    torch.manual_seed(3)
    cfg_hf = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    src = tmp_path / "src"
    LlamaForCausalLM(cfg_hf).to(torch.bfloat16).save_pretrained(str(src))
    seen: dict[str, torch.dtype] = {}
    real = streaming.run_pipeline

    def spy(model, *a, head_scope=None, **kw):
        seen["embed"] = model.get_input_embeddings().weight.dtype
        seen["head"] = str(model.get_output_embeddings().weight.device)
        assert head_scope is not None
        with head_scope():
            w = model.get_output_embeddings().weight
            seen["head_in_scope"] = (str(w.device), w.dtype)
        seen["head_after"] = str(model.get_output_embeddings().weight.device)
        return real(model, *a, head_scope=head_scope, **kw)

    monkeypatch.setattr(streaming, "run_pipeline", spy)
    x = _x()[:4, :16]
    cfg = _cfg(calib_samples=4, seq_len=16, sens_samples=2, compute_dtype="float32")
    res = compress_checkpoint(src, tmp_path / "out", cfg, calib=x)
    # the untied head is not even in memory outside the loss passes (meta), and float32 inside them
    assert seen == {"embed": torch.bfloat16, "head": "meta", "head_in_scope": ("cpu", torch.float32),
                    "head_after": "meta"}
    upcast = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).float().eval()
    ref = compress(upcast, replace(cfg, dtype="float32"), calib=x)
    assert res.ranks == ref.ranks and any(r is not None for r in res.ranks.values())
    reader = CheckpointReader(tmp_path / "out", check_sizes=False)
    sd = upcast.state_dict()
    assert "lm_head.weight" in reader.keys()
    for k in reader.keys():
        assert reader.dtype(k) == torch.bfloat16, k
        assert torch.allclose(reader.get(k).float(), sd[k].to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6), k
