"""The one picture of a multi-model eval: perplexity against bytes on disk and against prefill tokens/s.

Each model is a point labelled with its folder name; lower-left is better in the first panel
(small and accurate), lower-right in the second (fast and accurate). Drawn with matplotlib's
Agg backend (no display needed) and written atomically (temporary name, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _label(entry: dict[str, Any]) -> str:
    name = str(entry["model"]).rstrip("/")
    return Path(name).name or name


def plot_models(entries: list[dict[str, Any]], text: str, path: str | os.PathLike) -> Path:
    """Draw the eval ``entries`` (JSON model entries) for ``text`` into ``path`` (.png/.svg/.pdf)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from rankwise.io.atomic import atomic_file

    speed = all(e.get("speed") for e in entries)
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(11 if speed else 6, 4.2), squeeze=False)
    ppl = [e["perplexity"][text]["perplexity"] for e in entries]
    mb = [(e["size"]["disk_bytes"] or e["size"]["param_bytes"]) / 2**20 for e in entries]
    panels = [(axes[0][0], mb, "bytes on disk (MiB)")]
    if speed:
        panels.append((axes[0][1], [e["speed"]["prefill_tokens_per_s"] for e in entries], "prefill tokens/s"))
    for ax, xs, xlabel in panels:
        for e, x, y in zip(entries, xs, ppl):
            marker = "s" if e["kind"] == "dense" else "o"
            ax.scatter([x], [y], marker=marker, s=40, zorder=3)
            ax.annotate(_label(e), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"perplexity ({text}, test)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_title("perplexity against size")
    if speed:
        axes[0][1].set_title("perplexity against prefill speed")
    fig.suptitle(f"rankwise eval: {len(entries)} models (squares: dense, circles: compressed)", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fmt = out.suffix.lower().lstrip(".") or "png"
    try:
        with atomic_file(out, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=110)
    finally:
        plt.close(fig)
    return out
