"""Streaming inspect: a folder read one tensor at a time gives the same report as the model in memory."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import rankwise.inspection.loading as loading
from rankwise.errors import RankwiseError
from rankwise.inspection.api import MATRIX_KEYS, InspectConfig, inspect

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUMERIC = [k for k in MATRIX_KEYS if k not in ("name", "shape", "welore_class")] + [
    "spectral_norm", "frobenius_norm", "alpha_farms", "welore_rank"]


def tiny_llama(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def save_sharded(model, folder: Path, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def assert_same_report(a, b) -> None:
    assert [r["name"] for r in a.matrices] == [r["name"] for r in b.matrices]
    for ra, rb in zip(a.matrices, b.matrices):
        assert ra["shape"] == rb["shape"] and ra["welore_class"] == rb["welore_class"]
        for k in NUMERIC:
            va, vb = ra.get(k), rb.get(k)
            if va is None or vb is None or (isinstance(va, float) and math.isnan(va)):
                assert (va is None or math.isnan(va)) == (vb is None or math.isnan(vb)), (ra["name"], k)
            else:
                assert va == pytest.approx(vb, rel=1e-9, abs=1e-12), (ra["name"], k, va, vb)
    assert a.summary["params"] == b.summary["params"]
    assert a.summary["welore"]["threshold"] == pytest.approx(b.summary["welore"]["threshold"])


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tied=False), tiny_gpt2],
                         ids=["llama-tied", "llama-untied", "gpt2-conv1d"])
def test_streamed_equals_in_memory(make, tmp_path: Path) -> None:
    model = make()
    folder = save_sharded(model, tmp_path / "m")
    cfg = dict(progress=False, farms=True)
    streamed = inspect(folder, InspectConfig(**cfg, stream=True))
    in_memory = inspect(model, InspectConfig(**cfg))
    assert streamed.settings["streamed"] is True and in_memory.settings["streamed"] is False
    assert_same_report(streamed, in_memory)
    assert "lm_head" not in {r["name"] for r in streamed.matrices}
    loaded = inspect(folder, InspectConfig(**cfg, stream=False))  # the folder loaded whole: same again
    assert loaded.settings["streamed"] is False
    assert_same_report(streamed, loaded)


def test_gpt2_conv1d_is_transposed(tmp_path: Path) -> None:
    model = tiny_gpt2()
    folder = save_sharded(model, tmp_path / "g")
    rep = inspect(folder, InspectConfig(progress=False, targets=r"h\.0\.mlp\.c_fc"))
    (row,) = rep.matrices
    w = model.transformer.h[0].mlp.c_fc.weight.detach().T  # Conv1D stores in×out: the matrix is out×in
    assert row["shape"] == [128, 32]
    s = torch.linalg.svdvals(w.double())
    assert row["spectral_norm"] == pytest.approx(float(s[0]), rel=1e-10)
    assert row["l12_norm"] == pytest.approx(float(w.double().norm(dim=0).sum()), rel=1e-6)


def test_bf16_checkpoint_streams_in_its_own_dtype(tmp_path: Path) -> None:
    model = tiny_llama()
    folder = save_sharded(model, tmp_path / "b", dtype=torch.bfloat16)
    streamed = inspect(folder, InspectConfig(progress=False))
    assert streamed.settings["streamed"] is True
    assert_same_report(streamed, inspect(model.to(torch.bfloat16), InspectConfig(progress=False)))
    asked = inspect(folder, InspectConfig(progress=False, dtype="float32"))
    assert_same_report(asked, streamed)  # bf16 → fp32 is exact


class LiveCounter:
    """Wraps a reader: counts tensors read and the most alive at one time (weak references, no RSS)."""

    def __init__(self) -> None:
        self.live = self.max_live = self.reads = 0
        self.live_bytes = self.max_live_bytes = 0

    def wrap(self, reader):
        real_get = reader.get

        def get(key, *a, **kw):
            t = real_get(key, *a, **kw)
            nbytes = t.numel() * t.element_size()
            self.reads += 1
            self.live += 1
            self.live_bytes += nbytes
            self.max_live = max(self.max_live, self.live)
            self.max_live_bytes = max(self.max_live_bytes, self.live_bytes)
            weakref.finalize(t, self._dead, nbytes)
            return t

        reader.get = get
        return reader

    def _dead(self, nbytes: int) -> None:
        self.live -= 1
        self.live_bytes -= nbytes


@pytest.mark.parametrize("budget", [0, 2 * 4 * 96 * 48 * 3])
def test_streaming_holds_one_batch_of_matrices(budget: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_sharded(tiny_llama(), tmp_path / "m")
    counter = LiveCounter()
    real_open = loading.open_reader
    monkeypatch.setattr(loading, "open_reader", lambda f: counter.wrap(real_open(f)))

    def no_model(*a, **k):
        raise AssertionError("streaming inspect must not build or load the model")

    monkeypatch.setattr(loading, "_load_module", no_model)
    rep = inspect(folder, InspectConfig(progress=False, max_batch_bytes=budget))
    assert counter.reads == len(rep.matrices) == 14  # every matrix read exactly once
    assert counter.live == 0
    if budget == 0:  # one matrix at a time
        assert counter.max_live == 1 and counter.max_live_bytes == 4 * 96 * 48
    else:  # a batch of equal shapes within the budget (float32 bytes ×3 for the float64 copy and Gram)
        assert counter.max_live == 4 and counter.max_live_bytes <= budget // 3


def test_streamed_factorised_checkpoint_equals_in_memory(tmp_path: Path) -> None:
    import rankwise
    from rankwise.surgery import LowRankLinear, find_targets, set_module

    model = tiny_llama()
    for t in find_targets(model, "mlp"):
        set_module(model, t.name, LowRankLinear.from_linear(t.module, 8))
    rankwise.save(model, tmp_path / "c")
    streamed = inspect(tmp_path / "c", InspectConfig(progress=False, stream=True))
    assert streamed.settings["streamed"] is True
    assert_same_report(streamed, inspect(model, InspectConfig(progress=False)))
    assert streamed["model.layers.0.mlp.up_proj"]["energy_rank_99"] <= 8


def test_streaming_errors(tmp_path: Path) -> None:
    model = tiny_llama()
    bad_shape = save_sharded(model, tmp_path / "shape")
    cfg = json.loads((bad_shape / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the config now disagrees with the tensors on disk
    (bad_shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RankwiseError, match=r"has shape \[96, 48\] but the config implies \[80, 48\]"):
        inspect(bad_shape, InspectConfig(progress=False))

    outside = save_sharded(model, tmp_path / "outside")
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RankwiseError, match="outside"):
        inspect(outside, InspectConfig(progress=False))

    missing = save_sharded(model, tmp_path / "missing")
    sorted(missing.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(RankwiseError, match="missing"):
        inspect(missing, InspectConfig(progress=False))

    nan = tmp_path / "nan"
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 3] = float("inf")
    save_sharded(model, nan)
    with pytest.raises(RankwiseError, match=r"model\.layers\.1\.mlp\.down_proj .*NaN/Inf"):
        inspect(nan, InspectConfig(progress=False))

    binary = tmp_path / "bin"  # weights only in a pytorch_model.bin: nothing to stream
    small = tiny_llama()
    small.save_pretrained(binary)
    for f in binary.glob("*.safetensors*"):
        f.unlink()
    torch.save(small.state_dict(), binary / "pytorch_model.bin")
    with pytest.raises(RankwiseError, match="no safetensors files, so it cannot be streamed"):
        inspect(binary, InspectConfig(progress=False, stream=True))
    rep = inspect(binary, InspectConfig(progress=False))  # auto: loaded whole, and the report says so
    assert rep.settings["streamed"] is False and "loaded whole" in rep.settings["notes"][0]
    assert_same_report(rep, inspect(small, InspectConfig(progress=False)))


@pytest.mark.real
def test_real_smollm2_streamed_equals_loaded() -> None:
    cfg = dict(progress=False, targets=r"layers\.(0|29)\.")
    streamed = inspect("smollm2-135m", InspectConfig(**cfg))
    assert streamed.settings["streamed"] is True and len(streamed) == 14
    assert_same_report(streamed, inspect("smollm2-135m", InspectConfig(**cfg, stream=False)))
