"""`rankwise eval` on the real built-in model (SmolLM2-135M), a few tokens only."""

from __future__ import annotations

import json
import math

import pytest

from rankwise.cli.main import main


@pytest.mark.real
def test_eval_builtin_model_few_tokens(capsys) -> None:
    rc = main(["eval", "smollm2-135m", "--text", "ptb", "--tokens", "128", "--seq-len", "64", "--json", "-"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    (m,) = json.loads(cap.out)["models"]
    p = m["perplexity"]["ptb"]
    assert (p["windows"], p["tokens"], p["bos"]) == (2, 128, True)
    # a real model on real text: far better than uniform guessing over 49152 tokens, and finite
    assert math.isfinite(p["perplexity"]) and 10 < p["perplexity"] < 1000
    assert 134_000_000 < m["size"]["params"] < 135_000_000
    assert m["kind"] == "dense" and m["size"]["disk_bytes"] > 500e6
