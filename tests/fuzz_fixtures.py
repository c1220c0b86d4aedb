"""Generated fixtures of the fuzz suite (tests/test_fuzz_*.py): tiny models, broken copies of them, hostile files.

Everything is built offline in a few hundred milliseconds: a 2-block Llama (hidden 32, vocabulary 64)
with a word-level tokenizer, its rankwise-compressed checkpoint, and functions that derive a broken
variant from a clean copy (NaN/Inf weights, truncated or bit-flipped shards, crafted config.json /
index / rankwise.json, an out-of-vocabulary tokenizer, ...). Each variant is a ``Case``: a name, a
function that corrupts a folder in place, and the verbs that must refuse it.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = ("the market fell sharply on monday as investors sold shares of banks and insurers after the report "
         "showed that profits were lower than expected in the third quarter of the year while the dollar rose").split()
VOCAB = 64


def tokenizer(extra_words: int = 0):
    """Word-level tokenizer over WORDS (+ ``extra_words`` made-up words, to overflow the model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(extra_words):
        vocab[f"w{i}"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def text(n_words: int, seed: int = 0, extra_words: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    pool = WORDS + [f"w{i}" for i in range(extra_words)]
    return " ".join(pool[i] for i in torch.randint(0, len(pool), (n_words,), generator=g).tolist())


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                      max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def build_base(root: Path) -> dict[str, Path]:
    """Clean fixtures under ``root``: ``dense`` (HF folder + tokenizer), ``comp`` (rankwise checkpoint),
    ``adapter`` (a LoRA adapter of ``dense``), ``text`` (a .txt file) and ``binary`` (bytes named .txt)."""
    import rankwise
    from rankwise.surgery import LowRankLinear, find_targets, set_module

    tok = tokenizer()
    dense = tiny_llama()
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    comp = tiny_llama()
    for t in find_targets(comp):
        m, n = t.shape
        set_module(comp, t.name, LowRankLinear.from_linear(t.module, max(1, m * n // (2 * (m + n)))))
    rankwise.save(comp, root / "comp", tokenizer=tok, meta={"method": "svd", "allocation": "uniform"})
    from rankwise.tune import AdapterConfig, apply, save_adapter

    lora = tiny_llama()
    apply(lora, AdapterConfig(method="lora", rank=2))
    save_adapter(lora, root / "adapter")
    (root / "text.txt").write_text(text(4000))
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64 + b"\x00\xff\xfe" * 100)
    return {"dense": root / "dense", "comp": root / "comp", "adapter": root / "adapter",
            "text": root / "text.txt", "binary": root / "binary.txt"}


# -- corruptions: each takes a copy of a clean folder and breaks it in place -------------------------------
def _weights(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return files[0]


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def poison(value: float, which: str = "last") -> Callable[[Path], None]:
    """Write ``value`` (nan/inf/-inf) into one weight, rewriting the safetensors file properly."""

    def apply(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = _weights(folder)
        tensors = load_file(str(path))
        keys = sorted(k for k, v in tensors.items() if v.dim() == 2)
        key = keys[-1] if which == "last" else [k for k in keys if which in k][0]
        t = tensors[key].clone()
        t.view(-1)[t.numel() // 2] = value
        tensors[key] = t
        save_file(tensors, str(path), metadata={"format": "pt"})
        _rechecksum(folder, path)  # the file is well-formed and its recorded checksum right: only the value is bad

    return apply


def _rechecksum(folder: Path, path: Path) -> None:
    import hashlib

    meta = folder / "rankwise.json"
    if meta.is_file():
        data = json.loads(meta.read_text())
        if path.name in data.get("checksums", {}):
            data["checksums"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            meta.write_text(json.dumps(data))


def hostile_architecture(name: str) -> Callable[[Path], None]:
    """Name an arbitrary attribute of transformers (or a dunder) as the model class, everywhere it is recorded."""

    def apply(folder: Path) -> None:
        edit_json("config.json", lambda d: d.__setitem__("architectures", [name]))(folder)
        if (folder / "rankwise.json").is_file():
            edit_json("rankwise.json", lambda d: d.__setitem__("architecture", name))(folder)

    return apply


def truncate(fraction: float) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = _weights(folder)
        raw = path.read_bytes()
        path.write_bytes(raw[: max(1, int(len(raw) * fraction))])

    return apply


def flip_bit(where: str) -> Callable[[Path], None]:
    """Flip one bit in the JSON header (``header``) or in the tensor data (``data``)."""

    def apply(folder: Path) -> None:
        path = _weights(folder)
        raw = bytearray(path.read_bytes())
        n = struct.unpack("<Q", raw[:8])[0]
        pos = 8 + n // 2 if where == "header" else len(raw) - 3
        if where == "header":  # turn a digit of an offset into another digit: header stays valid JSON
            digits = [i for i in range(8, 8 + n) if chr(raw[i]).isdigit()]
            pos = digits[len(digits) // 2]
            raw[pos] = ord("9") if raw[pos] != ord("9") else ord("1")
        else:
            raw[pos] ^= 0x40  # an exponent bit of a float: a finite but different value
        path.write_bytes(bytes(raw))

    return apply


def header_length(value: int) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = _weights(folder)
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + raw[8:])

    return apply


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        p = folder / name
        data = json.loads(p.read_text())
        change(data)
        p.write_text(json.dumps(data))

    return apply


def write_file(name: str, content: str | bytes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        p = folder / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)

    return apply


def remove(*patterns: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        for pat in patterns:
            for p in folder.glob(pat):
                p.unlink()

    return apply


def as_index(outside: str | None = None) -> Callable[[Path], None]:
    """Turn model.safetensors into a one-shard index; ``outside`` renames the shard in the index."""

    def apply(folder: Path) -> None:
        src = _weights(folder)
        shard = folder / "model-00001-of-00001.safetensors"
        src.rename(shard)
        _, header = _header(shard)
        target = outside or shard.name
        wm = {k: target for k in header if k != "__metadata__"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))

    return apply


def big_config(key: str, value) -> Callable[[Path], None]:
    return edit_json("config.json", lambda d: d.__setitem__(key, value))


def oov_tokenizer(folder: Path) -> None:
    """Replace the tokenizer by one whose ids run past the model's vocabulary (64)."""
    for p in folder.glob("tokenizer*"):
        p.unlink()
    tokenizer(extra_words=3 * VOCAB).save_pretrained(folder)


def set_ranks(value) -> Callable[[Path], None]:
    def change(d: dict) -> None:
        first = sorted(d["ranks"])[0]
        d["ranks"][first] = value
        if "layers" in d and first in d["layers"]:
            d["layers"][first]["rank"] = value

    return edit_json("rankwise.json", change)


@dataclass(frozen=True)
class Case:
    """A broken variant of the ``base`` fixture and the verbs that must refuse it."""

    name: str
    base: str  # "dense" or "comp"
    corrupt: Callable[[Path], None]
    verbs: tuple[str, ...] = ("inspect", "compress", "eval", "tune", "train")

    def make(self, fixtures: dict[str, Path], dest: Path) -> Path:
        shutil.copytree(fixtures[self.base], dest)
        self.corrupt(dest)
        return dest


ALL = ("inspect", "compress", "eval", "tune", "train", "quantize")
LOADERS = ("compress", "eval", "tune", "train", "quantize")  # verbs that load every weight
EVAL = ("eval",)

MODEL_CASES: list[Case] = [
    # non-finite weights: one line naming the tensor, in every verb
    Case("nan-weight", "dense", poison(math.nan), ALL),
    Case("inf-weight", "dense", poison(math.inf), ALL),
    Case("neg-inf-weight", "dense", poison(-math.inf), ALL),
    Case("nan-embedding", "dense", poison(math.nan, "embed_tokens"), LOADERS),
    Case("nan-factor", "comp", poison(math.nan), ("inspect", "eval", "tune")),
    # broken tensor files
    Case("truncated-half", "dense", truncate(0.5), ALL),
    Case("truncated-header", "dense", truncate(0.001), ALL),
    Case("empty-weights", "dense", truncate(0.0), ALL),
    Case("header-length-huge", "dense", header_length(2**62), ALL),
    Case("header-bitflip", "dense", flip_bit("header"), ALL),
    Case("comp-truncated", "comp", truncate(0.5), ("inspect", "eval", "tune")),
    Case("comp-data-bitflip", "comp", flip_bit("data"), ("eval",)),
    Case("no-weights", "dense", remove("*.safetensors"), ALL),
    # crafted config.json
    Case("config-no-model-type", "dense", edit_json("config.json", lambda d: d.pop("model_type")), ALL),
    Case("config-bogus-model-type", "dense", big_config("model_type", "definitely-not-a-model"), ALL),
    Case("config-huge-hidden", "dense", big_config("hidden_size", 2**40), ALL),
    Case("config-huge-vocab", "dense", big_config("vocab_size", 2**40), ALL),
    Case("config-huge-layers", "dense", big_config("num_hidden_layers", 10**9), ALL),
    Case("config-negative-size", "dense", big_config("intermediate_size", -5), ALL),
    Case("config-not-json", "dense", write_file("config.json", "{ this is not json"), ALL),
    Case("config-binary", "dense", write_file("config.json", b"\x00\xff\xfe\x80" * 64), ALL),
    Case("config-list", "dense", write_file("config.json", "[1, 2, 3]"), ALL),
    # crafted shard indexes
    Case("index-outside-relative", "dense", as_index("../outside.safetensors"), ALL),
    Case("index-outside-absolute", "dense", as_index("/etc/hostname"), ALL),
    Case("index-missing-shard", "dense", as_index("model-00009-of-00009.safetensors"), ALL),
    Case("index-not-json", "dense",
         lambda f: (as_index()(f), (f / "model.safetensors.index.json").write_text("{]")), ALL),
    # crafted rank maps (rankwise.json)
    Case("ranks-string", "comp", set_ranks("abc"), ("inspect", "eval", "tune")),
    Case("ranks-null", "comp", set_ranks(None), ("inspect", "eval", "tune")),
    Case("ranks-float", "comp", set_ranks(2.5), ("inspect", "eval", "tune")),
    Case("ranks-negative", "comp", set_ranks(-3), ("inspect", "eval", "tune")),
    Case("ranks-huge", "comp", set_ranks(10**12), ("inspect", "eval", "tune")),
    Case("rankwise-json-garbage", "comp", write_file("rankwise.json", "\x00garbage"), ("inspect", "eval", "tune")),
    Case("rankwise-json-list", "comp", write_file("rankwise.json", "[]"), ("inspect", "eval", "tune")),
    # tokenizers
    Case("oov-tokenizer", "dense", oov_tokenizer, LOADERS),
    Case("no-tokenizer", "dense", remove("tokenizer*", "special_tokens_map.json"), LOADERS),
    Case("tokenizer-garbage", "dense", write_file("tokenizer.json", "{not json"), LOADERS),
]
