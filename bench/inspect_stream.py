"""Benchmark: peak memory of ``rankwise inspect FOLDER`` streamed tensor by tensor vs the model loaded whole.

Each run is a fresh process (so freed heap pages of one run cannot hide the next one's):
it imports torch/transformers/rankwise and the model's code (a meta-device skeleton, built and
dropped), records its RSS, then runs ``rankwise.inspect``
inside the project's sampler (``rankwise.evaluation.memory.PeakMemory``) and reports the
peak RSS *above* that baseline, the wall time and a digest of the rows (both modes must give
the same report). Models: the built-in SmolLM2-135M (float32 folder) and Llama-shaped
checkpoints with random weights (hidden 1536, intermediate 6144, 12 query / 4 key-value heads
of 128, vocabulary 49152, bfloat16, sharded at 200 MB) at 4 and 8 layers, so the growth with
depth shows. Writes ``bench/results/inspect_stream.json`` and prints a table.

Run: ``.venv/bin/python bench/inspect_stream.py [--layers 4,8] [--skip-smollm2]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

CHILD = r"""
import gc, json, sys, time, hashlib
from pathlib import Path
import torch, transformers, accelerate  # noqa: F401  (imported before the baseline)
from rankwise.inspection.api import InspectConfig, inspect
from rankwise.inspection.loading import build_skeleton
from rankwise.evaluation.memory import PeakMemory
folder, stream = sys.argv[1], sys.argv[2] == "1"
build_skeleton(Path(folder))  # imports the model's code (both modes need it) before the baseline
gc.collect()
cfg = InspectConfig(progress=False, threads=1, stream=stream)
with PeakMemory() as pm:
    t0 = time.perf_counter()
    rep = inspect(folder, cfg)
    secs = time.perf_counter() - t0
digest = hashlib.sha256(json.dumps([[r["name"], round(r["stable_rank"], 6), r["energy_rank_90"]]
                                    for r in rep.matrices]).encode()).hexdigest()[:16]
print(json.dumps({"seconds": secs, "peak_extra_mb": pm.extra_mb, "baseline_mb": pm.start_bytes / 2**20,
                  "matrices": len(rep.matrices), "params": rep.summary["params"],
                  "streamed": rep.settings["streamed"], "digest": digest,
                  "largest_matrix": max(r["params"] for r in rep.matrices)}))
"""


def make_llama(folder: Path, layers: int) -> Path:
    """A Llama-shaped bf16 checkpoint with random weights, sharded at 200 MB (built directly in bf16)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1536, intermediate_size=6144, num_attention_heads=12, num_key_value_heads=4,
                      head_dim=128, num_hidden_layers=layers, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=2048, dtype="bfloat16")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.save_pretrained(folder, max_shard_size="200MB")
    return folder


def run(folder: Path, stream: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), "1" if stream else "0"], capture_output=True,
                         text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="4,8", help="depths of the random Llama-shaped checkpoints")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--streamed-only", action="store_true", help="measure only the streamed runs")
    ap.add_argument("--name", default="inspect_stream", help="result name (bench/results/NAME.json)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "rankwise-bench-inspect-stream"))
    args = ap.parse_args()
    work = Path(args.workdir)
    cases: list[tuple[str, Path]] = []
    if not args.skip_smollm2:
        from rankwise.io.models import resolve_model

        cases.append(("smollm2-135m (fp32)", resolve_model("smollm2-135m")))
    for n in (int(x) for x in args.layers.split(",")):
        cases.append((f"llama-shaped {n} layers (bf16, sharded)", make_llama(work / f"llama-{n}", n)))
    rows = []
    for label, folder in cases:
        whole = None if args.streamed_only else run(folder, stream=False)
        streamed = run(folder, stream=True)
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        rows.append({"model": label, "folder_weights_mb": weights / 2**20, "loaded_whole": whole,
                     "streamed": streamed,
                     "same_report": None if whole is None else whole["digest"] == streamed["digest"],
                     "memory_ratio_streamed_over_whole": None if whole is None else
                     streamed["peak_extra_mb"] / max(whole["peak_extra_mb"], 1e-9),
                     "largest_matrix_fp64_mb": streamed["largest_matrix"] * 8 / 2**20})
        print(f"{label}: whole {whole['peak_extra_mb'] if whole else float('nan'):.0f} MB, streamed "
              f"{streamed['peak_extra_mb']:.0f} MB / {streamed['seconds']:.1f} s", file=sys.stderr)
    path = write_result(args.name, {"cases": rows})
    print("| model | weights on disk | peak RSS above baseline: loaded whole | streamed | largest matrix in "
          "float64 | time whole / streamed | same report |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        w, s = r["loaded_whole"] or {"peak_extra_mb": float("nan"), "seconds": float("nan")}, r["streamed"]
        same = "-" if r["same_report"] is None else "yes" if r["same_report"] else "NO"
        print(f"| {r['model']} | {r['folder_weights_mb']:.0f} MB | {w['peak_extra_mb']:.0f} MB | "
              f"{s['peak_extra_mb']:.0f} MB | {r['largest_matrix_fp64_mb']:.0f} MB | {w['seconds']:.1f} s / "
              f"{s['seconds']:.1f} s | {same} |")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
