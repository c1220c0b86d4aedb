"""The HTML report opens and draws in headless Chromium (skipped where no Chromium is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rankwise.inspection.api import InspectConfig, inspect

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "html_screenshot.sh"


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_browser() is None, reason="needs chromium (apt-get install -y chromium)")
def test_html_report_draws_in_headless_chromium(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=3, vocab_size=128)).eval()
    html = tmp_path / "report.html"
    inspect(model, InspectConfig(progress=False)).write_html(html)
    png = tmp_path / "shot.png"
    proc = subprocess.run(["bash", str(SCRIPT), str(html), str(png), "1000", "1400"], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))[..., :3]
    assert img.shape[:2] == (1400, 1000)
    # the page drew the plots: many non-white pixels, and coloured ones (the plot lines), not a blank page
    non_white = (img < 0.95).any(axis=-1).mean()
    coloured = (img.max(axis=-1) - img.min(axis=-1) > 0.3).mean()
    assert non_white > 0.03
    assert coloured > 0.002
    assert len(np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
