"""rankwise.io.shards: transformers-named sharded writes, and a reader that refuses bad folders before reading."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rankwise.errors import RankwiseError
from rankwise.io.shards import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointReader,
    ShardedWriter,
    parse_size,
    sha256_file,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def write(model, folder, max_shard_size="5GB") -> dict[str, str]:
    model.config.save_pretrained(str(folder))
    w = ShardedWriter(folder, max_shard_size=max_shard_size)
    w.add_state_dict(model.state_dict())
    return w.close()


def test_sharded_roundtrip_names_index_checksums_and_transformers_loads_it(tmp_path) -> None:
    model = tiny_llama(torch.bfloat16)
    state = model.state_dict()
    largest = max(v.numel() * v.element_size() for v in state.values())
    sums = write(model, tmp_path, max_shard_size=largest)  # one big tensor per shard at most
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and all(re.fullmatch(rf"model-\d{{5}}-of-{n:05d}\.safetensors", f) for f in files)
    assert not list(tmp_path.glob("*.tmp"))
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    assert set(index["weight_map"]) == set(state)
    assert sums == {f: sha256_file(tmp_path / f) for f in [*files, SAFE_WEIGHTS_INDEX_NAME]}
    # every shard within the limit unless it holds a single tensor
    for f in files:
        held = [k for k, v in index["weight_map"].items() if v == f]
        size = sum(state[k].numel() * state[k].element_size() for k in held)
        assert size <= largest or len(held) == 1
    r = CheckpointReader(tmp_path)
    r.verify(sums)
    assert set(r.keys()) == set(state) and r.torch_dtype == torch.bfloat16
    k = "model.layers.1.mlp.down_proj.weight"
    assert r.shape(k) == (32, 64) and r.dtype(k) == torch.bfloat16
    assert torch.equal(r.get(k), state[k])
    assert r.get(k, dtype=torch.float32).dtype == torch.float32
    layer1 = r.get_prefix("model.layers.1")
    assert set(layer1) == {n[len("model.layers.1."):] for n in state if n.startswith("model.layers.1.")}
    assert r.config.model_type == "llama"
    # plain transformers reads the shards as its own
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_one_shard_is_model_safetensors_without_index(tmp_path) -> None:
    model = tiny_llama()
    sums = write(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", SAFE_WEIGHTS_NAME]
    assert list(sums) == [SAFE_WEIGHTS_NAME]
    CheckpointReader(tmp_path).verify(sums)


def test_tied_tensors_are_written_once_each(tmp_path) -> None:
    w = ShardedWriter(tmp_path)
    t = torch.randn(4, 4)
    w.add("a", t)
    w.add("b", t)  # the same storage twice (tied weights)
    w.add("c", t[1])  # a view into a larger storage
    w.close()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = CheckpointReader(tmp_path, check_sizes=False)
    assert torch.equal(r.get("b"), t) and torch.equal(r.get("c"), t[1])


@pytest.mark.parametrize("size,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                           (1234, 1234)])
def test_parse_size(size, expected) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["abc", "-5GB", 0, -1, True, "5 parsecs"])
def test_parse_size_errors(size) -> None:
    with pytest.raises(RankwiseError) as exc:
        parse_size(size)
    assert "\n" not in str(exc.value)


def test_writer_refuses_duplicate_names_and_empty(tmp_path) -> None:
    w = ShardedWriter(tmp_path / "a")
    w.add("x", torch.zeros(2))
    with pytest.raises(RankwiseError, match="twice"):
        w.add("x", torch.zeros(2))
    with pytest.raises(RankwiseError, match="no tensors"):
        ShardedWriter(tmp_path / "b").close()


# -- hostile / broken folders: one line, before anything is read ---------------------------------------------------
def _sharded(tmp_path):
    model = tiny_llama()
    sums = write(model, tmp_path, max_shard_size=20_000)
    return json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text()), sums


def _set_index(tmp_path, index) -> None:
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))


def _mutate_outside(tmp_path, index):
    outside = tmp_path.parent / "outside.safetensors"
    first = next(iter(index["weight_map"].values()))
    outside.write_bytes((tmp_path / first).read_bytes())
    return outside, first


CASES = {
    "missing shard": lambda p, i: (p / sorted(set(i["weight_map"].values()))[-1]).unlink(),
    "dotdot": lambda p, i: _set_index(p, {**i, "weight_map": {k: "../outside.safetensors" for k in i["weight_map"]}}),
    "absolute": lambda p, i: _set_index(p, {**i, "weight_map": {k: "/etc/passwd" for k in i["weight_map"]}}),
    "symlink out": lambda p, i: (_mutate_outside(p, i),
                                 (p / "link.safetensors").symlink_to(p.parent / "outside.safetensors"),
                                 _set_index(p, {**i, "weight_map": {k: "link.safetensors" for k in i["weight_map"]}})),
    "key not in shard": lambda p, i: _set_index(p, {**i, "weight_map": {**i["weight_map"], "ghost.weight": sorted(
        set(i["weight_map"].values()))[0]}}),
    "index not json": lambda p, i: (p / SAFE_WEIGHTS_INDEX_NAME).write_text("{not json"),
    "index without weight_map": lambda p, i: _set_index(p, {"metadata": {}}),
    "truncated shard": lambda p, i: (lambda f: f.write_bytes(f.read_bytes()[:100]))(
        p / sorted(set(i["weight_map"].values()))[0]),
    "garbage header": lambda p, i: (lambda f: f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:]))(
        p / sorted(set(i["weight_map"].values()))[0]),
    "no model_type": lambda p, i: (p / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((p / "config.json").read_text()).items() if k != "model_type"})),
    "config not an object": lambda p, i: (p / "config.json").write_text("[1, 2]"),
    "absurd hidden size": lambda p, i: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "hidden_size": 10**12})),
    "absurd layer count": lambda p, i: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "num_hidden_layers": 10**9})),
    "config implies far more than on disk": lambda p, i: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "hidden_size": 65536, "intermediate_size": 200000})),
    "negative size": lambda p, i: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "vocab_size": -3})),
    "no weights": lambda p, i: [f.unlink() for f in list(p.glob("model*"))],
}


@pytest.mark.parametrize("case", list(CASES))
def test_reader_refuses_bad_folders_with_one_line(tmp_path, case) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index, _ = _sharded(folder)
    CASES[case](folder, index)
    with pytest.raises(RankwiseError) as exc:
        CheckpointReader(folder)
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400, msg


def test_flipped_bit_is_detected_by_checksum(tmp_path) -> None:
    index, sums = _sharded(tmp_path)
    shard = tmp_path / sorted(set(index["weight_map"].values()))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: the header still parses
    shard.write_bytes(bytes(data))
    r = CheckpointReader(tmp_path)  # headers are fine
    with pytest.raises(RankwiseError, match="damaged") as exc:
        r.verify(sums)
    assert shard.name in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(RankwiseError, match="no recorded sha256"):
        r.verify({})


def test_missing_tensor_and_wrong_shape_are_one_line(tmp_path) -> None:
    write(tiny_llama(), tmp_path)
    r = CheckpointReader(tmp_path)
    with pytest.raises(RankwiseError, match="not in the checkpoint"):
        r.get("nope")
    with pytest.raises(RankwiseError, match="config implies"):
        r.check_shapes({"model.embed_tokens.weight": (65, 32)})
    r.check_shapes({k: tuple(v.shape) for k, v in tiny_llama().state_dict().items()})
    assert os.path.getsize(tmp_path / SAFE_WEIGHTS_NAME) > r.total_size
