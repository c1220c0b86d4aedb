"""``rankwise train`` end to end on a tiny Llama folder (real MiniLM tokenizer, small text file)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rankwise.cli.main import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama saved with a real tokenizer (MiniLM's WordPiece, no download)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rankwise.io.models import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("minilm-l6")))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=128,
                      tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from rankwise.io.texts import load_text

    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text(load_text("ptb", "train")[:20_000])
    return p


def _common(tiny_folder: Path, text_file: Path, out: Path) -> list[str]:
    return [
        "train", str(tiny_folder), "--data", str(text_file), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
        "--rank", "4", "--update-gap", "2", "--eval-tokens", "64", "--eval-seq-len", "32", "--out", str(out),
        "--no-progress",
    ]


def _reeval(model, folder: Path) -> float:
    from transformers import AutoTokenizer

    from rankwise.evaluation.perplexity import perplexity
    from rankwise.io.texts import load_text

    tok = AutoTokenizer.from_pretrained(str(folder))
    return perplexity(model, tok, load_text("ptb", "test"), seq_len=32, max_tokens=64).perplexity


@pytest.mark.parametrize("optimizer", ["galore", "galore-dct", "fira", "adamw"])
def test_train_saves_the_trained_model_and_reports_perplexity(tiny_folder, text_file, tmp_path, optimizer) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    rc = main([*_common(tiny_folder, text_file, out), "--optimizer", optimizer, "--lr", "3e-3",
               "--json", str(tmp_path / "run.json")])
    assert rc == 0
    summary = json.loads((out / "train.json").read_text())
    assert json.loads((tmp_path / "run.json").read_text()) == summary
    assert summary["optimizer"] == optimizer
    assert summary["projection"] == {"galore": "svd", "galore-dct": "dct", "fira": "svd", "adamw": None}[optimizer]
    train = summary["train"]
    assert train["steps"] == 3 and len(train["losses"]) == 3 and train["tokens"] == 3 * 2 * 32
    assert train["state"]["total"] > 0
    if optimizer != "adamw":
        assert train["refresh_seconds"] and len(train["refresh_seconds"]) == 2 * 2 * 7  # steps 0, 2; 2 layers x 7
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert _reeval(model, out) == pytest.approx(summary["perplexity"]["perplexity"], rel=1e-5)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    # the machine-readable headline numbers
    assert summary["final_loss"] == pytest.approx(sum(train["losses"]) / 3) and summary["steps"] == 3
    assert summary["tokens_per_second"] == pytest.approx(train["tokens"] / summary["train_seconds"])
    assert summary["optimizer_state_bytes_per_rank"] == train["state"]["total"]
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["peak_memory_bytes"] > 4 * summary["parameters"]  # at least the fp32 weights were resident
    assert summary["processes"] == 1 and summary["parallel"] is None


def test_train_with_trp_writes_a_factorised_checkpoint(tiny_folder, text_file, tmp_path) -> None:
    import rankwise
    from rankwise.surgery.lowrank import LowRankLinear

    out = tmp_path / "trp"
    rc = main([*_common(tiny_folder, text_file, out), "--optimizer", "adamw", "--callback", "trp",
               "--trp-every", "2", "--trp-energy", "0.5"])
    assert rc == 0
    meta = json.loads((out / "rankwise.json").read_text())
    assert meta["ranks"] and meta["method"] == "train:adamw+trp"
    model = rankwise.load(out)
    low = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(low) == len(meta["ranks"])
    summary = json.loads((out / "train.json").read_text())
    assert summary["params_after"] < summary["params_before"]
    assert summary["params_after"] == sum(p.numel() for p in model.parameters())
    assert _reeval(model, out) == pytest.approx(summary["perplexity"]["perplexity"], rel=1e-5)


def test_train_from_scratch_is_seeded(tiny_folder, text_file, tmp_path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([*_common(tiny_folder, text_file, out), "--optimizer", "galore", "--from-scratch",
                     "--steps", "1", "--eval-tokens", "0"]) == 0
        runs.append(json.loads((out / "train.json").read_text()))
    assert runs[0]["train"]["losses"] == runs[1]["train"]["losses"]
    # a fresh random init predicts uniformly-ish: loss ≈ ln(vocab)
    vocab = json.loads((tiny_folder / "config.json").read_text())["vocab_size"]
    assert abs(runs[0]["train"]["losses"][0] - math.log(vocab)) < 0.5
    assert runs[0]["perplexity"] is None


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--rank", "0"], "rank must be a positive integer"),
        (["--rank", "-2"], "rank must be a positive integer"),
        (["--update-gap", "0"], "update_proj_gap must be a positive"),
        (["--rank", "20"], "larger than the 16x32 matrix"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--fsdp"], "launch it with torchrun: torchrun --nproc-per-node 2 -m rankwise train --fsdp"),
    ],
)
def test_train_errors_are_one_line(tiny_folder, text_file, tmp_path, capsys, extra, match) -> None:
    out = tmp_path / "bad"
    rc = main([*_common(tiny_folder, text_file, out), "--optimizer", "galore", *extra])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # (transformers' load bar aside)
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("rankwise train: error: ") and match in lines[0], lines
    assert not out.exists()


def test_existing_output_is_refused_before_training(tiny_folder, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    rc = main([*_common(tiny_folder, text_file, out), "--optimizer", "galore"])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_cuttlefish_run_resumes_from_a_trainer_checkpoint(tiny_folder, text_file, tmp_path) -> None:
    """--checkpoints/--save-steps, then --resume from the checkpoint written after Cuttlefish's switch (step 3): the
    resumed run rebuilds the factorised layers and ends with the uninterrupted run's weights and losses."""
    import rankwise

    base = [*_common(tiny_folder, text_file, tmp_path / "x"), "--optimizer", "adamw", "--callback", "cuttlefish",
            "--cf-check-every", "1", "--cf-tol", "10", "--steps", "5", "--eval-tokens", "0"]
    base = base[: base.index("--out")] + base[base.index("--out") + 2:]
    assert main([*base, "--out", str(tmp_path / "full"), "--checkpoints", str(tmp_path / "ck"),
                 "--save-steps", "3"]) == 0
    assert main([*base, "--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "ck" / "checkpoint-3")]) == 0
    full, resumed = (json.loads((tmp_path / n / "train.json").read_text()) for n in ("full", "resumed"))
    assert [e["step"] for e in full["callback_events"] if e["action"] == "factorise"] == [3] * 14  # 2 layers x 7
    assert resumed["callback_events"] == full["callback_events"]  # restored from the checkpoint, not re-decided
    assert resumed["train"]["losses"] == pytest.approx(full["train"]["losses"], rel=1e-6)
    a, b = rankwise.load(tmp_path / "full"), rankwise.load(tmp_path / "resumed")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and any(".A.weight" in k for k in sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--save-steps", "2"], "--save-steps needs --checkpoints"),
        (["--resume", "last"], "--resume last needs --checkpoints"),
        (["--resume", "nowhere"], "not a Trainer checkpoint folder"),
    ],
)
def test_checkpoint_option_errors(tiny_folder, text_file, tmp_path, capsys, extra, match) -> None:
    rc = main([*_common(tiny_folder, text_file, tmp_path / "bad"), "--optimizer", "adamw", *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(err) == 1 and match in err[0], err
