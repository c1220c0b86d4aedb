"""`rankwise quantize` end to end on a tiny Llama folder with its own word-level tokenizer: save, reload, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rankwise.cli.main import main
from rankwise.io.texts import load_text
from rankwise.quantization import QuantLinear, QuantLowRank, QuantSelect, load_quantized
from tiny_models import write_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIB: list[str] = []  # filled by the tiny_dir fixture: a small calibration file (tokenising all of PTB is slow)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
    calib = d.parent / "calib.txt"
    calib.write_text(" ".join(load_text("ptb", "train")[:100_000].split()[:3000]))
    CALIB[:] = ["--calib", str(calib), "--calib-samples", "4", "--seq-len", "32"]
    return d


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("q")
    out, dense = base / "q", base / "dense"
    rc = main(["quantize", str(tiny_dir), "--bits", "3", "--group-size", "32", "--method", "gptq", "--eora-rank", "4",
               *CALIB, "--out", str(out), "--export-dense", str(dense), "--json", str(base / "r.json")])
    assert rc == 0
    return out, dense, json.loads((base / "r.json").read_text())


def test_cli_quantize_save_reload_and_export_dense(quantized_dir):
    out, dense, data = quantized_dir
    assert data["bits"] == 3 and data["method"] == "gptq" and data["eora_rank"] == 4 and len(data["layers"]) == 14
    assert data["calibration"]["samples"] == 4 and data["calibration"]["seq_len"] == 32
    meta = json.loads((out / "rankwise.json").read_text())
    assert {s["type"] for s in meta["layers"].values()} == {"quant"}
    assert meta["quantization"]["bits"] == 3
    model = load_quantized(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    plain = AutoModelForCausalLM.from_pretrained(str(dense)).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(x).logits, plain(x).logits, atol=1e-4)
    w = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    wd = sum(p.stat().st_size for p in dense.glob("*.safetensors"))
    assert w < 0.6 * wd  # embeddings stay fp32 in this tiny model; the linear layers shrink ~8×


def test_cli_refuses_to_quantize_a_quantized_folder(quantized_dir, tmp_path, capsys):
    out, _, _ = quantized_dir
    rc = main(["quantize", str(out), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already quantised" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "again").exists()


def test_cli_quantizes_lowrank_factors(tiny_dir, tmp_path):
    comp = tmp_path / "c"
    assert main(["compress", str(tiny_dir), "--ratio", "0.3", "--method", "svd", "--alloc", "uniform",
                 "--alloc-sensitivity", "none", "--out", str(comp)]) == 0
    out = tmp_path / "cq"
    assert main(["quantize", str(comp), "--bits", "4", "--group-size", "32", *CALIB, "--out", str(out)]) == 0
    model = load_quantized(out)
    assert sum(isinstance(m, QuantLowRank) for m in model.modules()) > 0
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(model(x).logits).all()


def test_cli_quantizes_a_modegpt_output(tiny_dir, tmp_path):
    comp, out, dense = tmp_path / "m", tmp_path / "mq", tmp_path / "md"
    assert main(["compress", str(tiny_dir), "--ratio", "0.3", "--method", "modegpt", *CALIB, "--out", str(comp)]) == 0
    assert "select" in {s["type"] for s in json.loads((comp / "rankwise.json").read_text())["layers"].values()}
    assert main(["quantize", str(comp), "--bits", "4", "--group-size", "32", *CALIB, "--out", str(out),
                 "--export-dense", str(dense)]) == 0
    assert "quant_select" in {s["type"] for s in json.loads((out / "rankwise.json").read_text())["layers"].values()}
    model = load_quantized(out)
    assert sum(isinstance(m, QuantSelect) and isinstance(m.inner, QuantLinear) for m in model.modules()) > 0
    plain = AutoModelForCausalLM.from_pretrained(str(dense)).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x).logits, plain(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("args", "msg"), [
    (["--bits", "5"], "--bits must be one of 2, 3, 4, 8"),
    (["--group-size", "40"], "nearest valid group size is 32"),
    (["--eora-rank", "0"], "--eora-rank must be a positive"),
    (["--eora-rank", "40", "--group-size", "32"], "above break-even"),
])
def test_cli_errors_are_one_line(tiny_dir, tmp_path, capsys, args, msg):
    rc = main(["quantize", str(tiny_dir), *args, *CALIB, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err, err
    assert not (tmp_path / "x").exists()


def test_cli_unknown_method_lists_the_choices(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse's choices come from the METHODS registry
        main(["quantize", str(tiny_dir), "--method", "awq", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'awq' (choose from 'rtn', 'gptq')" in capsys.readouterr().err


def test_cli_eval_measures_a_quantized_folder(quantized_dir, tmp_path, capsys):
    out, dense, _ = quantized_dir
    calib = CALIB[1]
    rc = main(["eval", str(out), str(dense), "--text", calib, "--tokens", "128", "--seq-len", "32", "--json", "-",
               "--plot", str(tmp_path / "pareto.png")])
    assert rc == 0
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the one picture, packed folder on it
    data = json.loads(capsys.readouterr().out)
    models = data["models"] if isinstance(data, dict) and "models" in data else data
    ppl = [m["perplexity"][calib]["perplexity"] if isinstance(m["perplexity"], dict) and calib in m["perplexity"]
           else next(iter(m["perplexity"].values()))["perplexity"] for m in models]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4)  # the packed folder and its dense export agree


def test_cli_threads_must_be_positive(tiny_dir, tmp_path, capsys):
    rc = main(["quantize", str(tiny_dir), "--threads", "0", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--threads must be at least 1, got 0." in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
