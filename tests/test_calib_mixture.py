"""Calibration mixtures: ``ptb+bbc`` and weighted ``ptb:3+bbc:1`` (parsing, window shares, errors, records)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rankwise.compression.api import CompressConfig, compress
from rankwise.compression.calibration.loops import parse_mixture, text_windows
from rankwise.errors import RankwiseError
from rankwise.io.texts import text_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def largest_remainder(weights: list[float], n: int) -> list[int]:
    """Reference: Hamilton's method written out with exact fractions."""
    from fractions import Fraction

    w = [Fraction(x) for x in weights]
    quotas = [n * x / sum(w) for x in w]
    base = [math.floor(q) for q in quotas]
    rest = sorted(range(len(w)), key=lambda i: (-(quotas[i] - base[i]), i))[: n - sum(base)]
    return [b + (1 if i in rest else 0) for i, b in enumerate(base)]


@pytest.mark.parametrize(("spec", "n", "counts", "weights"), [
    ("ptb", 7, [7], [1.0]),
    ("ptb+bbc", 5, [3, 2], [0.5, 0.5]),
    ("ptb:3+bbc:1", 32, [24, 8], [0.75, 0.25]),
    ("ptb:3+bbc:1", 10, [8, 2], [0.75, 0.25]),  # 7.5 / 2.5: the tie goes to the earlier part
    ("ptb:1+bbc:1000", 4, [0, 4], [1 / 1001, 1000 / 1001]),  # a part may get no window
    ("ptb:0.5+bbc:1.5+ptb:valid:2", 8, [1, 3, 4], [0.125, 0.375, 0.5]),  # a split suffix is not a weight
])
def test_parse_mixture_weights_and_window_counts(spec, n, counts, weights):
    parts = parse_mixture(spec, n)
    assert [p.samples for p in parts] == counts
    assert [p.weight for p in parts] == pytest.approx(weights)
    assert sum(p.samples for p in parts) == n


def test_window_counts_match_the_largest_remainder_reference():
    for ws in itertools.product((1, 2, 3, 0.5, 7.25), repeat=3):
        spec = "+".join(f"{t}:{w}" for t, w in zip(("ptb", "bbc", "ptb"), ws))
        for n in (1, 3, 10, 33):
            got = [p.samples for p in parse_mixture(spec, n)]
            assert got == largest_remainder(list(ws), n), (spec, n)


@pytest.mark.parametrize(("spec", "words"), [
    ("wiki", ["unknown text 'wiki'", "ptb, bbc", ".txt"]),
    ("ptb+wiki:2", ["unknown text 'wiki'"]),
    ("ptb:0+bbc", ["weight", "positive"]),
    ("ptb:-2+bbc", ["weight", "positive"]),
    ("ptb:inf", ["weight", "positive"]),
    ("ptb:abc+bbc", ["'abc'", "not a number"]),
    ("ptb++bbc", ["empty part"]),
    ("ptb+", ["empty part"]),
    ("", ["empty"]),
    (":2+bbc", ["without a text name"]),
])
def test_bad_mixtures_are_one_line_errors(spec, words):
    with pytest.raises(RankwiseError) as e:
        parse_mixture(spec, 8)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    with pytest.raises(RankwiseError):  # the config refuses it before any work
        CompressConfig(calib=spec)


@pytest.fixture(scope="module")
def two_texts(tmp_path_factory):
    """Two .txt files with disjoint vocabularies and a word-level tokenizer over both."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("texts")
    g = torch.Generator().manual_seed(0)
    a_words = [f"a{i}" for i in range(20)]
    b_words = [f"b{i}" for i in range(20)]
    for name, words in (("a", a_words), ("b", b_words)):
        idx = torch.randint(0, len(words), (3000,), generator=g).tolist()
        (d / f"{name}.txt").write_text(" ".join(words[i] for i in idx))
    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(a_words + b_words)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")
    a_ids = set(range(2, 22))
    return d / "a.txt", d / "b.txt", tok, a_ids


def _source(row: torch.Tensor, a_ids: set[int]) -> str:
    body = set(row[1:].tolist())
    assert row[0] == 1  # BOS first
    if body <= a_ids:
        return "a"
    assert not body & a_ids
    return "b"


def test_weighted_windows_come_from_each_text_in_its_share_interleaved(two_texts):
    a, b, tok, a_ids = two_texts
    spec = f"{a}:3+{b}:1"
    x, info = text_windows(tok, spec, 8, 16, seed=5)
    src = [_source(r, a_ids) for r in x]
    assert src.count("a") == 6 and src.count("b") == 2
    assert src[:4].count("b") == 1  # interleaved: any prefix holds both texts in about their shares
    # deterministic per seed; another seed draws other windows
    x2, _ = text_windows(tok, spec, 8, 16, seed=5)
    assert torch.equal(x, x2)
    x3, _ = text_windows(tok, spec, 8, 16, seed=6)
    assert not torch.equal(x, x3)
    # each part's windows are the ones a single-text draw with seed + i gives
    xa, _ = text_windows(tok, str(a), 6, 16, seed=5)
    xb, _ = text_windows(tok, str(b), 2, 16, seed=6)
    assert torch.equal(x[[i for i, s in enumerate(src) if s == "a"]], xa)
    assert torch.equal(x[[i for i, s in enumerate(src) if s == "b"]], xb)
    mix = info.to_dict()["mixture"]
    assert [m["samples"] for m in mix] == [6, 2] and [m["weight"] for m in mix] == [0.75, 0.25]
    assert mix[0]["sha256"] == text_fingerprint(a.read_text()) and mix[1]["text"] == str(b)
    assert info.text == spec and info.samples == 8 and info.tokens == 8 * 16


def test_mixture_is_recorded_in_rankwise_json(two_texts, tmp_path):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    import rankwise

    a, b, tok, _ = two_texts
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, vocab_size=42,
                                         max_position_embeddings=64)).eval()
    spec = f"{a}:1+{b}:3"
    res = compress(model, calib=spec, tokenizer=tok, ratio=0.3, alloc="uniform", calib_samples=4, seq_len=16,
                   progress=False)
    assert [m["samples"] for m in res.calibration["mixture"]] == [1, 3]
    rankwise.save(model, tmp_path / "c", tokenizer=tok)
    meta = json.loads((tmp_path / "c" / "rankwise.json").read_text())
    assert meta["calibration"]["text"] == spec
    assert [(m["weight"], m["samples"]) for m in meta["calibration"]["mixture"]] == [(0.25, 1), (0.75, 3)]
