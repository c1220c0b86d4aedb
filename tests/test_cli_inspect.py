"""The ``rankwise inspect`` command: smoke test on a tiny saved model, outputs, one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rankwise.cli.main import main
from rankwise.inspection.api import MATRIX_KEYS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=128, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_cli_smoke_json_stdout_is_pure(tiny_folder: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["inspect", str(tiny_folder), "--json", "-", "--farms"])
    cap = capsys.readouterr()
    assert rc == 0
    data = json.loads(cap.out)  # stdout holds the JSON and nothing else
    assert len(data["matrices"]) == 14
    for row in data["matrices"]:
        assert set(MATRIX_KEYS) | {"alpha_farms"} <= set(row)
    assert data["settings"]["streamed"] is True and data["settings"]["threads"] == 1  # a folder is streamed
    assert data["settings"]["device"] in ("cpu", "cuda") and data["settings"]["weights_dtype"] == ["float32"]
    assert "model.layers.0.self_attn.q_proj" in cap.err  # the table goes to stderr
    assert "per layer type" in cap.err


def test_cli_writes_json_and_html(tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_json, out_html = tmp_path / "o" / "r.json", tmp_path / "o" / "r.html"
    rc = main(["inspect", str(tiny_folder), "--json", str(out_json), "--html", str(out_html), "--ratio", "0.3",
               "--targets", "mlp", "--compare", str(tiny_folder), "--quiet"])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out == ""
    data = json.loads(out_json.read_text())
    assert len(data["matrices"]) == 6 and data["summary"]["welore"]["ratio"] == 0.3
    assert all(r["intruder_dimensions"] == 0 for r in data["matrices"])
    assert out_html.read_text().count("data:image/png;base64,") >= 5


@pytest.mark.parametrize(
    "args,expected",
    [
        (["no-such-model"], "unknown model"),
        (["./missing/folder"], "does not exist"),
        (["some-org/model-not-in-the-cache"], "no model hub is reachable"),
        (["{tiny}", "--targets", "zzz"], "available names include"),
        (["{tiny}", "--ratio", "1.5"], "between 0 and 1"),
        (["{tiny}", "--ratio", "0"], "between 0 and 1"),
        (["{tiny}", "--json", "{blocker}/r.json"], "not a writable directory"),
        (["{tiny}", "--html", "{tmp}"], "is a directory"),
        (["{tiny}", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["{tiny}", "--device", "tpu"], "unknown device 'tpu'"),
        (["{tiny}", "--threads", "-1"], "threads must be 0"),
        (["{tiny}", "--threads", "1.5"], "--threads must be a whole number"),
        (["{tiny}", "--intruder-eps", "nan"], "--intruder-eps must be a finite number"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(
    args: list[str], expected: str, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected")
    args = [a.format(tiny=tiny_folder, blocker=blocker, tmp=tmp_path) for a in args]
    rc = main(["inspect", *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert expected in err
    assert err.startswith("rankwise inspect: error:") and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_cli_nan_weight_and_corrupt_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=64, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "nan"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.v_proj" in err and "NaN/Inf" in err
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    capsys.readouterr()  # drop save_pretrained's own progress output
    assert main(["inspect", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read the" in err and "corrupt" in err and len(err.splitlines()) == 1


def test_cli_device_cuda_without_cuda_is_one_line(tiny_folder: Path, capsys: pytest.CaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["inspect", str(tiny_folder), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "asked for CUDA" in err and "cpu" in err


def test_cli_subprocess_no_traceback(tmp_path: Path) -> None:
    """The installed entry point (python -m rankwise) exits 2 with one line and no traceback."""
    env = {**os.environ, "RANKWISE_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "rankwise", "inspect", "no-such-model"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stdout == ""


@pytest.mark.real
def test_real_smollm2_json_keys_for_all_210_matrices(capsys: pytest.CaptureFixture) -> None:
    rc = main(["inspect", "smollm2-135m", "--json", "-", "--quiet"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "smollm2-135m"
    rows = data["matrices"]
    assert len(rows) == 210 and data["summary"]["matrices"] == 210
    for row in rows:
        assert set(MATRIX_KEYS) <= set(row)
        assert row["welore_class"] in ("LRC", "N-LRC")
        assert row["stable_rank"] > 1 and row["energy_rank_90"] <= row["energy_rank_95"] <= row["energy_rank_99"]
    names = {r["name"] for r in rows}
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.29.mlp.down_proj" in names
    assert "lm_head" not in names
    shapes = {r["name"]: r["shape"] for r in rows}
    assert shapes["model.layers.0.self_attn.k_proj"] == [192, 576]  # GQA: 3 kv heads × 64
    assert shapes["model.layers.0.mlp.down_proj"] == [576, 1536]
    assert data["summary"]["params"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert data["summary"]["alpha_fitted"] == 210


def test_cli_ctrl_c_leaves_no_partial_output(
    tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import rankwise.inspection.html as html_mod

    real_png = html_mod._png
    calls = {"n": 0}

    def interrupted(fig):  # Ctrl-C while the third figure is rendered
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_png(fig)

    monkeypatch.setattr(html_mod, "_png", interrupted)
    out = tmp_path / "o"
    rc = main(["inspect", str(tiny_folder), "--html", str(out / "r.html"), "--quiet"])
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (out / "r.html").exists()
    assert not out.exists() or list(out.iterdir()) == []
