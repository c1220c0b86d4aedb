"""A small real-model check: SmolLM2-135M at ρ = 0.2 beats plain SVD on PTB perplexity."""

from __future__ import annotations

import copy
import math

import pytest

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    from rankwise.io.models import load_model, load_tokenizer

    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_default_pipeline_beats_plain_svd_on_smollm2(smollm2):
    from rankwise.compression.api import CompressConfig, compress
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.io.texts import load_text

    base, tok = smollm2
    text = load_text("ptb", "test")
    # the first 8 of 30 blocks, 8×64 calibration tokens, 1024 evaluation tokens: a minute on 2 cores
    common = {"ratio": 0.2, "targets": r"layers\.[0-7]\.", "calib_samples": 8, "seq_len": 64, "progress": False}
    ppl = {}
    for name, cfg in {"svd": CompressConfig(method="svd", alloc="uniform", **common),
                      "best": CompressConfig(**common)}.items():
        model = copy.deepcopy(base)
        res = compress(model, cfg, tokenizer=tok)
        assert 0.19 <= res.achieved_ratio <= 0.25
        ppl[name] = perplexity(model, tok, text, seq_len=256, max_tokens=1024).perplexity
    assert math.isfinite(ppl["best"])
    assert ppl["best"] < ppl["svd"]
