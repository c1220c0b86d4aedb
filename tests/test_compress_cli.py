"""`rankwise compress` end to end on a tiny Llama folder with its own word-level tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.cli.main import main
from tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
    return d


ARGS = ["--ratio", "0.3", "--calib", "ptb", "--calib-samples", "4", "--seq-len", "32"]


def test_cli_compress_save_export_and_reload(tiny_dir, tmp_path, capsys):
    out, dense = tmp_path / "c", tmp_path / "d"
    rc = main(["compress", str(tiny_dir), *ARGS, "--out", str(out), "--export-dense", str(dense), "--json", "-"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["asked_ratio"] == 0.3 and 0.28 <= data["achieved_ratio"] <= 0.32
    assert data["method"] == "modegpt" and data["calibration"]["text"] == "ptb"  # method auto on a Llama layout
    assert data["method_choice"].startswith("auto → modegpt")
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["calibration"]["samples"] == 4 and meta["calibration"]["seed"] == 0
    assert len(meta["calibration"]["sha256"]) == 64
    model = rankwise.load(out)
    plain = AutoModelForCausalLM.from_pretrained(str(dense)).eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(x).logits, plain(x).logits, atol=1e-4)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out))("the market")["input_ids"]


def test_cli_refuses_existing_out_unless_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", str(tiny_dir), *ARGS, "--method", "svd", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["compress", str(tiny_dir), *ARGS, "--method", "svd", "--out", str(out), "--overwrite"]) == 0
    assert (out / "rankwise.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("ratio", ["0", "1", "-0.2", "abc"])
def test_cli_bad_ratio_is_one_line_error(tiny_dir, tmp_path, capsys, ratio):
    assert main(["compress", str(tiny_dir), "--ratio", ratio, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio" in err[0]
    assert not (tmp_path / "c").exists()


def test_cli_interrupt_leaves_no_folder(tiny_dir, tmp_path, monkeypatch, capsys):
    import rankwise.io.shards as sh

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sh.ShardedWriter, "close", boom)  # the last step of a streamed compress
    out = tmp_path / "c"
    assert main(["compress", str(tiny_dir), *ARGS, "--out", str(out)]) == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_cli_too_short_calibration_text(tiny_dir, tmp_path, capsys):
    f = tmp_path / "short.txt"
    f.write_text("the market fell")
    rc = main(["compress", str(tiny_dir), "--calib", str(f), "--calib-samples", "4", "--seq-len", "32",
               "--out", str(tmp_path / "c")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "need 124" in err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("args, words", [
    (["--device", "cuda"], ["--device cuda", "cpu"]),
    (["--dtype", "float8"], ["unknown --dtype", "bfloat16"]),
    (["--max-shard-size", "lots"], ["max_shard_size", "5GB"]),
    (["--threads", "0"], ["threads"]),
])
def test_cli_bad_device_dtype_shard_size_are_one_line_errors(tiny_dir, tmp_path, capsys, args, words):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["compress", str(tiny_dir), *args, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not (tmp_path / "c").exists()
