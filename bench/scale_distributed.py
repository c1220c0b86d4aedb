"""torchrun with 2 processes against 1: the same rank map, the same logits, and the wall-time ratio.

    .venv/bin/python bench/scale_distributed.py                 # 4-layer Llama-shaped bf16 checkpoint
    .venv/bin/python bench/scale_distributed.py --quick         # a 2-layer, narrow smoke run

The checkpoint: random weights in a Llama shape (hidden 1536, intermediate 6144, 12 query / 4
key-value heads of 128, SmolLM2's tokenizer and vocabulary, bf16, sharded safetensors), built once
under ``~/.cache/rankwise/bench``. Both runs are the CLI with the default pipeline and
``--dtype bfloat16``: ``python -m rankwise compress`` (one process) and ``torchrun --standalone
--nproc-per-node 2 -m rankwise compress`` (two gloo processes), run one after the other in this
process's presence, each with ``OMP_NUM_THREADS`` = cores / processes (so both runs use the same
number of cores). Then both outputs are loaded and their logits on PTB *validation* windows compared
(relative Frobenius error, bf16), and the rank maps compared entry by entry.

Writes bench/results/scale_distributed.json (with the load average before and after: the machine is
shared, the time ratio is only as good as the quiet it got).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_info, write_result  # noqa: E402

CACHE = Path("~/.cache/rankwise/bench").expanduser()


def build_checkpoint(layers: int, hidden: int, inter: int, heads: int, kv: int, folder: Path) -> Path:
    """A random Llama-shaped bf16 checkpoint, sharded, with SmolLM2's tokenizer (written once)."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.io.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hidden // heads, num_hidden_layers=layers,
                      vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(str(tmp), max_shard_size="100MB")
    tok.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder


def _compress(cmd: list[str], threads: int) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return seconds, proc


def _logits(folder: Path, windows: torch.Tensor) -> torch.Tensor:
    import rankwise

    model = rankwise.load(str(folder))
    with torch.no_grad():
        return model(windows).logits.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 narrow layers, 8 windows (smoke run)")
    ap.add_argument("--shape", default=None, metavar="LAYERS,HIDDEN,INTER,HEADS,KV",
                    help="another Llama shape (e.g. 4,512,2048,4,2 on a loaded machine)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the pipeline's)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the pipeline's)")
    ap.add_argument("--work", default=None, help="folder for the outputs (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="keep the runs already recorded in --work/runs.json")
    args = ap.parse_args()
    info = run_info()
    if args.quick:
        shape = {"layers": 2, "hidden": 256, "inter": 1024, "heads": 4, "kv": 2}
    else:
        shape = {"layers": 4, "hidden": 1536, "inter": 6144, "heads": 12, "kv": 4}
    if args.shape:
        shape = dict(zip(("layers", "hidden", "inter", "heads", "kv"), (int(v) for v in args.shape.split(","))))
    name = "llama-{layers}L-{hidden}-{inter}-bf16".format(**shape)
    ckpt = build_checkpoint(**shape, folder=CACHE / name)
    work = Path(args.work) if args.work else Path(
        __import__("tempfile").mkdtemp(prefix="rankwise-dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--dtype", "bfloat16", "--overwrite"]
    if args.quick:
        extra += ["--calib-samples", "8", "--seq-len", "64"]
    if args.calib_samples:
        extra += ["--calib-samples", str(args.calib_samples)]
    if args.seq_len:
        extra += ["--seq-len", str(args.seq_len)]
    cores = os.cpu_count() or 1
    base = [sys.executable, "-m", "rankwise", "compress", str(ckpt), *extra]
    dist_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "rankwise", "compress", str(ckpt), *extra]
    per = max(cores // 2, 1)
    saved = work / "runs.json"  # --reuse: a previous run's outputs and timings (to redo only the comparison)
    runs = json.loads(saved.read_text()) if args.reuse and saved.is_file() else {}
    for key, cmd, threads, procs in (("one", base, cores, 1), ("two", dist_cmd, per, 2)):
        if key in runs:
            continue
        load_before = list(os.getloadavg())
        seconds, _ = _compress([*cmd, "--out", str(work / key), "--json", str(work / f"{key}.json")], threads=threads)
        runs[key] = {"seconds": seconds, "processes": procs, "threads_per_process": threads,
                     "load_avg_before": load_before, "load_avg_after": list(os.getloadavg())}
        saved.write_text(json.dumps(runs))
    t1, t2 = runs["one"]["seconds"], runs["two"]["seconds"]
    meta1 = json.loads((work / "one" / "rankwise.json").read_text())
    meta2 = json.loads((work / "two" / "rankwise.json").read_text())
    r1, r2 = meta1["rank_per_matrix"], meta2["rank_per_matrix"]
    differ = {k: (r1[k], r2.get(k)) for k in r1 if r1[k] != r2.get(k)}

    from rankwise.io.models import load_tokenizer
    from rankwise.io.texts import load_text
    from rankwise.io.tokens import sample_windows

    tok = load_tokenizer(str(ckpt))
    windows = sample_windows(tok, load_text("ptb", split="valid"), 2, 128, seed=0)
    a, b = _logits(work / "one", windows), _logits(work / "two", windows)
    rel = float((a - b).norm() / b.norm())
    result = {
        "checkpoint": {"name": name, **shape, "dtype": "bfloat16"},
        "command_one": " ".join(["python -m rankwise compress CKPT", *extra]),
        "command_two": " ".join(["torchrun --standalone --nproc-per-node 2 -m rankwise compress CKPT", *extra]),
        "runs": runs,
        "time_ratio_two_over_one": t2 / t1,
        "same_rank_map": not differ,
        "rank_differences": differ,
        "logits_rel_error": rel,
        "goal_logits_rel_le_1e-2": rel <= 1e-2,
        "cores": cores,
        "run": info,
    }
    path = write_result("scale_distributed" + ("_quick" if args.quick else ""), result)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"torchrun 2 processes vs 1 ({name}, {cores} cores, load {os.getloadavg()[0]:.1f})")
    for col in ("processes", "wall s", "threads/proc", "same rank map", "logits rel. err (bf16)"):
        table.add_column(col, justify="right")
    table.add_row("1", f"{t1:.1f}", str(runs["one"]["threads_per_process"]), "", "")
    table.add_row("2", f"{t2:.1f}", str(runs["two"]["threads_per_process"]), str(not differ), f"{rel:.2e}")
    Console().print(table)
    print(f"time ratio 2/1 = {t2 / t1:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
