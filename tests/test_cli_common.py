"""Options shared by the verbs: one positive-integer type, one-line errors, exit status 2."""

from __future__ import annotations

import pytest
import torch

from rankwise.cli.main import main
from rankwise.engine.threads import torch_threads


@pytest.mark.parametrize("verb", ["eval", "tune", "train"])
@pytest.mark.parametrize("value, message", [("0", "--threads must be at least 1, got 0."),
                                            ("two", "--threads must be a whole number, got 'two'.")])
def test_threads_must_be_positive(verb: str, value: str, message: str, capsys: pytest.CaptureFixture) -> None:
    code = main([verb, "--threads", value, "--out", "unused"] if verb != "eval" else [verb, "x", "--threads", value])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"rankwise {verb}: error: {message}"  # one line, no usage block, no traceback


def test_torch_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None / 0 leave torch's setting alone
        assert torch.get_num_threads() == before


def test_quiet_silences_a_real_verb(tmp_path, capsys, monkeypatch, one_torch_thread):
    """`rankwise inspect --quiet` writes nothing on stderr; without it the table does."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = tmp_path / "r.json"
    assert main(["inspect", str(tmp_path / "m"), "--quiet", "--json", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert len(json.loads(out.read_text())["matrices"]) == 14
    assert main(["inspect", str(tmp_path / "m"), "--json", str(out)]) == 0
    assert "q_proj" in capsys.readouterr().err  # the table (and messages) when not quiet
