"""`rankwise eval`: perplexity against a hand-computed reference, CLI JSON contract, --compare, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise.cli.main import main
from rankwise.errors import RankwiseError
from rankwise.evaluation.perplexity import evaluate_texts, perplexity
from rankwise.evaluation.report import count_params, folder_bytes, size_report
from rankwise.io.checkpoint import save
from rankwise.io.texts import load_text
from rankwise.surgery import LowRankLinear, find_targets, set_module

WORDS = (
    "the market fell sharply on monday as investors sold shares of banks and insurers after the report "
    "showed that profits were lower than expected in the third quarter of the year while the dollar rose"
).split()


def make_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx)


def tiny_tokenizer():
    """A word-level tokenizer with a BOS token, built offline from WORDS (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(vocab: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=vocab, bos_token_id=1, eos_token_id=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def factorise(model: nn.Module, keep: float) -> nn.Module:
    """Uniform plain-SVD factorisation: every target keeps floor(keep·mn/(m+n)) singular values."""
    for t in find_targets(model):
        m, n = t.shape
        set_module(model, t.name, LowRankLinear.from_linear(t.module, max(1, math.floor(keep * m * n / (m + n)))))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tok = tiny_tokenizer()
    dense = tiny_llama(len(tok))
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    comp = factorise(tiny_llama(len(tok)), 0.6)
    save(comp, root / "comp", tokenizer=tok, meta={"method": "svd", "allocation": "uniform"})
    (root / "long.txt").write_text(make_text(3000))
    (root / "short.txt").write_text(make_text(20))
    return {"root": root, "dense": root / "dense", "comp": root / "comp", "long": root / "long.txt",
            "short": root / "short.txt"}


def reference_perplexity(model: nn.Module, ids: list[int], bos: int, seq_len: int, n_windows: int) -> float:
    """Hand-written loop: BOS + seq_len tokens per window, every text token scored, exp(mean NLL)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = [bos] + ids[w * seq_len : (w + 1) * seq_len]
            x = torch.tensor([window])
            logp = F.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
            for pos in range(1, len(window)):
                total -= float(logp[pos - 1, window[pos]])
                count += 1
    return math.exp(total / count)


def test_perplexity_matches_manual_reference(folders) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    text = folders["long"].read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    res = perplexity(model, tok, text, seq_len=32, max_tokens=100, name="long")
    assert (res.windows, res.tokens, res.seq_len, res.bos) == (3, 96, 32, True)
    ref = reference_perplexity(model, ids, tok.bos_token_id, 32, 3)
    assert res.perplexity == pytest.approx(ref, rel=1e-5)
    # batching windows does not change the number
    assert perplexity(model, tok, text, seq_len=32, max_tokens=100, batch_size=3).perplexity == pytest.approx(
        ref, rel=1e-5)


def test_evaluate_texts_uses_test_split(folders) -> None:
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    out = evaluate_texts(model, tok, [str(folders["long"])], seq_len=16, max_tokens=32)
    r = out[str(folders["long"])]
    assert r.windows == 2 and r.tokens == 32
    assert r.text_sha256 == __import__("hashlib").sha256(load_text(str(folders["long"])).encode()).hexdigest()


def test_too_short_text_error(folders) -> None:
    tok = tiny_tokenizer()
    with pytest.raises(RankwiseError, match=r"fewer than one 64-token window"):
        perplexity(tiny_llama(len(tok)), tok, folders["short"].read_text(), seq_len=64, name="short")


def test_size_report(folders) -> None:
    from rankwise.io.checkpoint import load

    comp = load(folders["comp"])
    rep = size_report(comp, folders["comp"])
    facts = [m for m in comp.modules() if isinstance(m, LowRankLinear)]
    assert rep.factorised_layers == len(facts) == 14
    assert rep.factorised_params == sum(m.rank * (m.in_features + m.out_features) for m in facts)
    assert rep.dense_matrix_params == 0
    n, b = count_params(comp)
    # tied embedding counted once
    assert n == rep.params == sum(p.numel() for p in {id(p): p for p in comp.parameters()}.values())
    assert b == 4 * n
    total, weights = folder_bytes(folders["comp"])
    assert rep.disk_bytes == total > weights == (folders["comp"] / "model.safetensors").stat().st_size
    assert size_report(comp).disk_bytes is None


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_eval_dense_folder_json_stdout(folders, capsys) -> None:
    rc, out, err = _run(["eval", str(folders["dense"]), "--text", str(folders["long"]), "--tokens", "64",
                         "--seq-len", "32", "--threads", "1", "--device", "cpu", "--json", "-"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    assert set(data) >= {"rankwise_version", "settings", "models", "comparison", "seconds"}
    assert data["settings"] == {"texts": [str(folders["long"])], "split": "test", "tokens": 64, "seq_len": 32,
                                "speed": None, "threads": 1, "device": "cpu", "device_map": None, "max_memory": None,
                                "dtype": "auto"}
    (m,) = data["models"]
    assert m["kind"] == "dense" and m["speed"] is None and data["comparison"] is None
    p = m["perplexity"][str(folders["long"])]
    assert (p["windows"], p["tokens"], p["seq_len"], p["bos"]) == (2, 64, 32, True)
    assert p["perplexity"] > 1 and math.isfinite(p["perplexity"])
    assert m["size"]["params"] > 0 and m["size"]["disk_bytes"] > 0
    assert "perplexity" in err  # the rich table goes to stderr


def test_cli_eval_checkpoint_compare_speed(folders, capsys, tmp_path) -> None:
    dest = tmp_path / "eval.json"
    rc, out, err = _run(["eval", str(folders["comp"]), "--compare", str(folders["dense"]), "--text",
                         f"{folders['long']}", "--tokens", "64", "--seq-len", "32", "--speed", "--prompt-tokens", "24",
                         "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--json", str(dest)], capsys)
    assert rc == 0, err
    data = json.loads(dest.read_text())
    assert [m["label"] for m in data["models"]] == ["model", "compare"]
    comp, dense = data["models"]
    assert (comp["kind"], dense["kind"]) == ("rankwise", "dense")
    assert comp["compression"]["method"] == "svd"
    assert comp["size"]["factorised_layers"] == 14 and dense["size"]["factorised_layers"] == 0
    assert comp["size"]["params"] < dense["size"]["params"]
    assert dense["slow_layers"] == {"prefill": [], "decode": []}
    assert set(comp["slow_layers"]) == {"prefill", "decode"}
    for m in (comp, dense):
        s = m["speed"]
        assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0 and s["peak_memory_mb"] > 0
        assert s["prompt_tokens"] == 24 and s["new_tokens"] == 4 and len(s["generated"]) == 4
    c = data["comparison"]
    assert c["params_ratio"] == pytest.approx(comp["size"]["params"] / dense["size"]["params"])
    key = str(folders["long"])
    assert c["perplexity_ratio"][key] == pytest.approx(
        comp["perplexity"][key]["perplexity"] / dense["perplexity"][key]["perplexity"])
    assert c["prefill_speedup"] > 0 and c["decode_speedup"] > 0
    assert data["settings"]["speed"]["prompt_tokens"] == 24


@pytest.mark.parametrize(
    ("argv_tail", "needle"),
    [
        (["--text", "SHORT", "--seq-len", "64"], "fewer than one 64-token window"),
        (["--text", "nosuchtext"], "unknown text 'nosuchtext'"),
    ],
)
def test_cli_eval_text_errors(folders, capsys, argv_tail, needle) -> None:
    argv_tail = [str(folders["short"]) if a == "SHORT" else a for a in argv_tail]
    rc, out, err = _run(["eval", str(folders["dense"]), *argv_tail], capsys)
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and needle in lines[0] and out == ""


def test_cli_eval_missing_model(tmp_path, capsys) -> None:
    rc, _, err = _run(["eval", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(["eval", "no-such-model"], capsys)
    assert rc == 2 and "unknown model" in err


def test_cli_eval_several_models_and_plot(folders, capsys, tmp_path) -> None:
    png, dest = tmp_path / "o" / "pareto.png", tmp_path / "o" / "eval.json"
    rc, out, err = _run(["eval", str(folders["dense"]), str(folders["comp"]), "--text", str(folders["long"]),
                         "--tokens", "64", "--seq-len", "32", "--prompt-tokens", "16", "--new-tokens", "2",
                         "--repeats", "1", "--warmup", "0", "--threads", "1", "--plot", str(png), "--json",
                         str(dest)], capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(dest.read_text())
    assert data["plot"] == str(png) and data["comparison"] is None
    assert [m["label"] for m in data["models"]] == ["model", "model_2"]
    assert [m["path"] for m in data["models"]] == [str(folders["dense"]), str(folders["comp"])]
    assert [m["kind"] for m in data["models"]] == ["dense", "rankwise"]
    assert all(m["speed"]["prefill_tokens_per_s"] > 0 for m in data["models"])  # --plot turned --speed on
    assert data["models"][1]["size"]["disk_bytes"] < data["models"][0]["size"]["disk_bytes"]
    assert sorted(p.name for p in png.parent.iterdir()) == ["eval.json", "pareto.png"]  # no temporary left


def test_cli_eval_nan_weight_is_one_line(folders, capsys, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from rankwise.io.checkpoint import load

    broken = tmp_path / "dense"  # a plain folder whose file holds a NaN
    __import__("shutil").copytree(folders["dense"], broken)
    sd = load_file(str(broken / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    comp = load(folders["comp"])  # a compressed checkpoint saved with an Inf in one factor
    layer = comp.get_submodule("model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        next(p for p in layer.parameters() if p.dim() == 2)[0, 0] = float("inf")
    save(comp, tmp_path / "comp", tokenizer=tiny_tokenizer())
    capsys.readouterr()
    for folder, needle in ((broken, "model.layers.1.mlp.down_proj"), (tmp_path / "comp", "layers.1.self_attn.v_proj")):
        rc, out, err = _run(["eval", str(folder), "--text", str(folders["long"]), "--tokens", "64", "--seq-len",
                             "32", "--json", "-", "--quiet"], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and out == "" and len(lines) == 1, err
        assert "NaN/Inf" in lines[0] and needle in lines[0] and "Traceback" not in err


def test_cli_eval_device_map_auto(folders, capsys) -> None:
    # 1 kB of CPU memory allowed: accelerate offloads the whole model to disk and streams it in per forward
    rc, out, err = _run(["eval", str(folders["dense"]), "--text", str(folders["long"]), "--tokens", "64",
                         "--seq-len", "32", "--device-map", "auto", "--max-memory", "cpu=1KB", "--json", "-"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    s = data["settings"]
    assert (s["device_map"], s["device"], s["max_memory"]) == ("auto", None, {"cpu": "1KB"})
    (m,) = data["models"]
    assert m["placement"] == {"disk": 1}  # accelerate placed it: everything offloaded
    rc0, out0, _ = _run(["eval", str(folders["dense"]), "--text", str(folders["long"]), "--tokens", "64",
                         "--seq-len", "32", "--device", "cpu", "--json", "-"], capsys)
    ref = json.loads(out0)["models"][0]["perplexity"]
    key = str(folders["long"])
    assert m["perplexity"][key]["perplexity"] == pytest.approx(ref[key]["perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    ("argv_tail", "needle"),
    [
        (["--warmup", "-1"], "--warmup must be a whole number 0 or more"),
        (["--tokens", "0"], "--tokens must be at least 1"),
        (["--threads", "two"], "--threads must be a whole number"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--device-map", "everywhere"], "unknown --device-map 'everywhere'"),
        (["--device", "cpu", "--device-map", "auto"], "pass only one of them"),
        (["--plot", "out.txt"], "name a .png"),
        (["--max-memory", "cpu=1KB"], "only applies with --device-map"),
        (["--device-map", "auto", "--max-memory", "lots"], "is not DEVICE=SIZE"),
    ],
)
def test_cli_eval_option_errors(folders, capsys, argv_tail, needle) -> None:
    rc, out, err = _run(["eval", str(folders["dense"]), *argv_tail, "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and needle in lines[0], err


def test_cli_eval_cuda_without_cuda(folders, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, out, err = _run(["eval", str(folders["dense"]), "--device", "cuda", "--quiet"], capsys)
    assert rc == 2 and "asked for CUDA" in err and len(err.strip().splitlines()) == 1
