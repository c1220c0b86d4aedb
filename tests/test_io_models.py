"""io: model resolution errors, cached conversion (interrupted → redone), checkpoints, atomic writes, texts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rankwise.errors import RankwiseError, check_ratio
from rankwise.io import models as io_models
from rankwise.io.atomic import atomic_dir, atomic_file, check_writable
from rankwise.io.checkpoint import export_dense, factorised_layers, load, save
from rankwise.io.models import load_model, resolve_model
from rankwise.surgery import LowRankLinear, find_targets, set_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()


def _logits(model: nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _factorise(model: nn.Module, rank: int) -> list[str]:
    names = []
    for t in find_targets(model, pattern="q_proj|down_proj|c_attn|c_fc"):
        set_module(model, t.name, LowRankLinear.from_linear(t.module, rank=rank))
        names.append(t.name)
    return names


# ----------------------------------------------------------------------------- model names and folders


def test_unknown_model_name_and_missing_folder() -> None:
    with pytest.raises(RankwiseError, match="unknown model 'no-such-model'") as exc:
        resolve_model("no-such-model")
    assert "smollm2-135m" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(RankwiseError, match="does not exist"):
        resolve_model("./no/such/folder")


def test_folder_without_config_and_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(RankwiseError, match="no config.json"):
        resolve_model(tmp_path)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(RankwiseError, match="is a file"):
        resolve_model(f)


def test_hub_id_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RankwiseError, match="no model hub is reachable") as exc:
        resolve_model("some-org/some-model-that-is-not-cached")
    assert "local folder" in str(exc.value)


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    loaded = load_model(tmp_path / "m")
    assert torch.allclose(_logits(loaded, 128), _logits(model, 128), atol=1e-6)


def test_corrupt_safetensors_is_a_one_line_error(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00\x01garbage, not a safetensors header")
    with pytest.raises(RankwiseError) as exc:
        load_model(tmp_path / "m")
    assert "\n" not in str(exc.value)
    assert str(tmp_path / "m") in str(exc.value)


# ----------------------------------------------------------------------------- cached conversion


def test_cached_conversion_converts_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    calls: list[Path] = []

    def convert(dest: Path) -> None:
        calls.append(dest)
        (dest / "config.json").write_text("{}")

    out = io_models._cached_conversion("fake-model", convert)
    assert out == tmp_path / "fake-model"
    assert (out / "config.json").is_file() and (out / io_models._COMPLETE).is_file()
    assert calls and calls[0] != out  # converted in a temporary folder, then renamed
    again = io_models._cached_conversion("fake-model", convert)
    assert again == out and len(calls) == 1  # cached: not converted twice
    assert not list(tmp_path.glob(".fake-model.*.tmp"))


def test_cached_conversion_interrupted_leaves_nothing_and_is_redone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))

    def interrupted(dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io_models._cached_conversion("fake-model", interrupted)
    assert not (tmp_path / "fake-model").exists()
    assert not list(tmp_path.glob(".fake-model.*"))

    # a half-written folder from a killed process (no completion marker) and a stale temp folder
    half = tmp_path / "fake-model"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    stale = tmp_path / ".fake-model.abc.tmp"
    stale.mkdir()
    calls: list[int] = []

    def good(dest: Path) -> None:
        calls.append(1)
        (dest / "model.safetensors").write_bytes(b"complete")

    out = io_models._cached_conversion("fake-model", good)
    assert calls == [1]
    assert (out / "model.safetensors").read_bytes() == b"complete"
    assert (out / io_models._COMPLETE).is_file()
    assert not stale.exists()


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("builder,vocab", [(tiny_llama, 128), (tiny_gpt2, 100)])
def test_save_load_export_dense_round_trip(tmp_path: Path, builder, vocab: int) -> None:
    model = builder()
    names = _factorise(model, rank=5)
    ref = _logits(model, vocab)
    save(model, tmp_path / "ck", meta={"method": "svd", "ratio": 0.2})
    meta = json.loads((tmp_path / "ck" / "rankwise.json").read_text())
    assert meta["method"] == "svd" and set(meta["ranks"]) == set(names) and set(meta["ranks"].values()) == {5}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert f"{names[0]}.A.weight" in state and state[f"{names[0]}.A.weight"].shape[0] == 5
    loaded = load(tmp_path / "ck")
    assert factorised_layers(loaded) == factorised_layers(model)
    assert torch.allclose(_logits(loaded, vocab), ref, atol=1e-5)
    # load_model recognises a rankwise checkpoint
    assert factorised_layers(load_model(tmp_path / "ck"))
    # refuses to overwrite unless asked
    with pytest.raises(RankwiseError, match="already exists"):
        save(model, tmp_path / "ck")
    save(model, tmp_path / "ck", overwrite=True)
    # export_dense: a plain folder that transformers loads without rankwise
    export_dense(loaded, tmp_path / "dense")
    plain = type(model).from_pretrained(str(tmp_path / "dense")).eval()
    assert not factorised_layers(plain)
    assert torch.allclose(_logits(plain, vocab), ref, atol=1e-4)


def test_load_rejects_broken_checkpoints(tmp_path: Path) -> None:
    model = tiny_llama()
    _factorise(model, rank=4)
    save(model, tmp_path / "ck")
    with pytest.raises(RankwiseError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(RankwiseError, match="not a rankwise checkpoint"):
        load(tmp_path)
    meta = json.loads((tmp_path / "ck" / "rankwise.json").read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][name]["rank"] = 7  # inconsistent with the stored tensors
    (tmp_path / "ck" / "rankwise.json").write_text(json.dumps(meta))
    with pytest.raises(RankwiseError, match="layer maps of rankwise.json and config.json"):
        load(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["quantization_config"]["layers"][name]["rank"] = 7
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RankwiseError, match="do not match the rank map"):
        load(tmp_path / "ck")
    save(model, tmp_path / "ck2")
    (tmp_path / "ck2" / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(RankwiseError, match="corrupt"):
        load(tmp_path / "ck2")


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_dir_leaves_nothing_on_exception(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as tmp:
            (tmp / "a.txt").write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("v1")
    assert (dest / "a.txt").read_text() == "v1"
    # overwrite keeps the old folder intact if the new write fails
    with pytest.raises(RuntimeError):
        with atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("v2")
            raise RuntimeError
    assert (dest / "a.txt").read_text() == "v1"
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_and_unwritable_paths(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "r.json"
    with pytest.raises(ValueError):
        with atomic_file(dest) as fh:
            fh.write("partial")
            raise ValueError
    assert not dest.exists()
    with atomic_file(dest) as fh:
        fh.write("ok")
    assert dest.read_text() == "ok"
    with pytest.raises(RankwiseError, match="is a directory"):
        check_writable(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RankwiseError, match="not a writable directory"):
        check_writable(blocker / "out.json")
    if os.geteuid() != 0:  # root can write anywhere; the read-only case only holds for normal users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(RankwiseError):
            check_writable(ro / "x.json")


def test_check_ratio() -> None:
    assert check_ratio("0.25") == 0.25
    for bad in (0, 1, -0.1, 1.5, "abc", None):
        with pytest.raises(RankwiseError):
            check_ratio(bad)
