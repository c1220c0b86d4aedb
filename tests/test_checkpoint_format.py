"""The rankwise/2 checkpoint format: plain transformers refuses it, transformers + rankwise rebuilds it exactly.

Covers J.1 (quantization_config registered through transformers' public quantizer hooks, from_pretrained,
save_pretrained round trips, old-format conversion), E.4 (device_map loading without a random full model)
and L.2 (checksums, rank maps, tokenizers) on a tiny Llama.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import rankwise
from rankwise.errors import RankwiseError
from rankwise.io.checkpoint import convert_old_checkpoint, load, mark_factorised, save
from rankwise.io.models import load_tokenizer
from rankwise.surgery import LowRankLinear, find_targets, set_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 64


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def compressed_llama(dtype=torch.float32, n: int = 9) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.max_new_tokens = 7  # must survive save/load
    for t in find_targets(model)[:n]:
        set_module(model, t.name, LowRankLinear.from_linear(t.module, 4 + len(t.name) % 3))
    return mark_factorised(model)


IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


PLAIN = """
import json, sys
from transformers import AutoModelForCausalLM
out = {}
for d in sys.argv[1:]:
    try:
        AutoModelForCausalLM.from_pretrained(d)
        out[d] = "loaded"
    except Exception as exc:
        out[d] = type(exc).__name__ + ": " + str(exc).strip().splitlines()[-1]
out["rankwise imported"] = any(m.startswith("rankwise") for m in sys.modules)
print(json.dumps(out))
"""


def test_plain_transformers_refuses_and_with_rankwise_from_pretrained_equals_load(tmp_path: Path) -> None:
    model = compressed_llama()
    ref = logits(model)
    ck = save(model, tmp_path / "ck", tokenizer=tiny_tokenizer(), max_shard_size=6000)
    files = {p.name for p in ck.iterdir()}
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    assert {"generation_config.json", "tokenizer.json", "rankwise.json"} <= files
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "rankwise"
    assert cfg["quantization_config"]["layers"] == json.loads((ck / "rankwise.json").read_text())["layers"]
    # with rankwise: from_pretrained rebuilds the factorised layers; rankwise.load is the same path
    hf = AutoModelForCausalLM.from_pretrained(str(ck))
    rw = rankwise.load(ck)
    for m in (hf, rw):
        assert sum(isinstance(x, LowRankLinear) for x in m.modules()) == 9
        assert m.generation_config.max_new_tokens == 7
    assert torch.equal(logits(hf), logits(rw))
    assert rw.double().dtype == torch.float64 and rw.float().dtype == torch.float32  # casts allowed
    assert torch.equal(logits(rw), ref)
    # save_pretrained of the loaded model (what Trainer.save_model does) stays a rankwise folder
    hf.save_pretrained(str(tmp_path / "resaved"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved"))
    assert torch.equal(logits(again), logits(hf))
    # without rankwise, plain transformers refuses both folders (never loads random factor weights)
    r = subprocess.run([sys.executable, "-c", PLAIN, str(ck), str(tmp_path / "resaved")],
                       capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.pop("rankwise imported") is False
    assert "rankwise" in out[str(ck)] and out[str(ck)] != "loaded"
    assert out[str(tmp_path / "resaved")].startswith("RuntimeError")  # size mismatch on the placeholders


def test_bf16_sharded_and_tokenizer_kept(tmp_path: Path) -> None:
    model = compressed_llama(torch.bfloat16)
    ck = save(model, tmp_path / "ck", tokenizer=tiny_tokenizer(), max_shard_size="3KB")
    back = load(ck)
    assert back.dtype == torch.bfloat16 and torch.allclose(logits(back), logits(model), atol=1e-2, rtol=0)
    assert load(ck, dtype=torch.float32).dtype == torch.float32
    assert len(load_tokenizer(ck)) == VOCAB


def test_flipped_bit_is_a_one_line_error(tmp_path: Path) -> None:
    ck = save(compressed_llama(), tmp_path / "ck")
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(RankwiseError, match="damaged") as exc:
        load(ck)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("rank", [None, 2.5, "4", -1, True, 10**9])
def test_bad_rank_maps_are_one_line_errors(tmp_path: Path, rank) -> None:
    ck = save(compressed_llama(), tmp_path / "ck")
    meta, cfg = json.loads((ck / "rankwise.json").read_text()), json.loads((ck / "config.json").read_text())
    name = next(iter(meta["layers"]))
    for layers in (meta["layers"], cfg["quantization_config"]["layers"]):
        layers[name]["rank"] = rank
    (ck / "rankwise.json").write_text(json.dumps(meta))
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RankwiseError) as exc:
        load(ck)
    assert "\n" not in str(exc.value) and ("rank" in str(exc.value))


def test_unknown_layer_type_and_newer_format(tmp_path: Path) -> None:
    ck = save(compressed_llama(), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["format"] = "rankwise/9"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RankwiseError, match="newer rankwise"):
        AutoModelForCausalLM.from_pretrained(str(ck))
    meta = json.loads((ck / "rankwise.json").read_text())
    meta["layers"][next(iter(meta["layers"]))]["type"] = "nonsense"
    with pytest.raises(RankwiseError, match="unknown layer type 'nonsense'"):
        load_layers(meta["layers"])


def load_layers(layers):
    from rankwise.surgery.layers import build_layer

    return [build_layer(n, s, device="meta") for n, s in layers.items()]


def _write_old_format(model, folder: Path) -> None:
    """The round-1 layout: name.A, name.B, name.bias; no quantization_config; rankwise.json without checksums."""
    folder.mkdir()
    state = {}
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            layers[name] = {"rank": mod.rank, "in_features": mod.in_features, "out_features": mod.out_features,
                            "bias": mod.bias is not None, "kind": mod.orig_kind}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        for name in layers:
            if k == f"{name}.A.weight":
                k = f"{name}.A"
            elif k == f"{name}.B.weight":
                k = f"{name}.B"
            elif k == f"{name}.B.bias":
                k = f"{name}.bias"
        state[k] = v.contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "rankwise.json").write_text(json.dumps({"format": "rankwise-lowrank/1", "method": "svd",
                                                       "ranks": {k: v["rank"] for k, v in layers.items()},
                                                       "layers": layers}))


def test_old_format_loads_and_converts(tmp_path: Path) -> None:
    model = compressed_llama()
    _write_old_format(model, tmp_path / "old")
    back = load(tmp_path / "old")
    assert torch.equal(logits(back), logits(model))
    assert back.rankwise_meta["method"] == "svd"
    new = convert_old_checkpoint(tmp_path / "old", tmp_path / "new")
    hf = AutoModelForCausalLM.from_pretrained(str(new))
    assert torch.equal(logits(hf), logits(back))
    assert json.loads((new / "rankwise.json").read_text())["converted_from"] == "rankwise-lowrank/1"


def test_device_map_offload_and_no_random_full_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = compressed_llama()
    ck = save(model, tmp_path / "ck")
    inits = []
    orig = LlamaForCausalLM._init_weights

    def counting(self, module):
        inits.append(module)
        return orig(self, module)

    monkeypatch.setattr(LlamaForCausalLM, "_init_weights", counting)
    placed = load(ck, device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"},
                  offload_folder=tmp_path / "offload")
    # nothing is built randomly and then overwritten: only the tied LM head (which shares the embedding) is visited
    assert [m for m in inits if isinstance(m, (torch.nn.Linear, LowRankLinear))] == [placed.lm_head]
    assert any(isinstance(m, LowRankLinear) for m in placed.model.layers[1].modules())
    lr1 = next(m for m in placed.model.layers[1].modules() if isinstance(m, LowRankLinear))
    assert lr1.A.weight.is_meta and placed.hf_device_map["model.layers.1"] == "disk"  # really offloaded
    assert torch.equal(logits(placed), logits(model))
    auto = load(ck, device_map="auto")
    assert torch.equal(logits(auto), logits(load(ck)))


def test_folder_without_tokenizer_and_out_of_vocab_tokenizer(tmp_path: Path) -> None:
    ck = save(compressed_llama(), tmp_path / "ck")
    with pytest.raises(RankwiseError, match="no tokenizer") as exc:
        load_tokenizer(ck)
    assert "\n" not in str(exc.value)
    tiny_tokenizer(VOCAB + 10).save_pretrained(str(ck))
    with pytest.raises(RankwiseError, match="beyond the model's vocabulary"):
        load_tokenizer(ck)


def test_compressed_model_carries_quantization_config(tmp_path: Path) -> None:
    from rankwise.compression.api import CompressConfig, compress

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    windows = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    compress(model, CompressConfig(ratio=0.3, method="svd", alloc="uniform"), calib=windows)
    assert model.config.quantization_config.quant_method == "rankwise"
    n = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert n > 0 and len(model.config.quantization_config.layers) == n
    model.save_pretrained(str(tmp_path / "sp"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sp"))
    assert sum(isinstance(m, LowRankLinear) for m in back.modules()) == n
    assert torch.equal(logits(back), logits(model))
    dense = rankwise.to_dense(model)  # a plain model again: no rankwise config left
    assert not hasattr(dense.config, "quantization_config")
    assert hasattr(model.config, "quantization_config")


HOOKED = """
import sys
import rankwise
assert "transformers" not in sys.modules and "torch" not in sys.modules  # import rankwise stays light
from transformers import AutoModelForCausalLM  # the import hook registers quant_method "rankwise" here
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(sum(type(m).__name__ == "LowRankLinear" for m in model.modules()))
"""


def test_import_rankwise_first_registers_through_the_import_hook(tmp_path: Path) -> None:
    ck = save(compressed_llama(), tmp_path / "ck")
    r = subprocess.run([sys.executable, "-c", HOOKED, str(ck)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "9"
