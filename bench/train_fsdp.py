"""GaLore under FSDP2 with 2 processes against one process: optimizer state per process, loss, speed.

    .venv/bin/python bench/train_fsdp.py                  # SmolLM2-135M architecture from scratch, PTB train
    .venv/bin/python bench/train_fsdp.py --steps 4        # shorter

Both runs are the CLI with the same global batches: ``rankwise train --batch-size 2B`` in one
process and ``torchrun --standalone --nproc-per-node 2 -m rankwise train --fsdp --batch-size B``
(each process takes B of the 2B windows of a step), GaLore (exact SVD projection, rank 128),
one thread per process. Reported from each run's ``--json``: optimizer-state bytes of the largest
process, peak memory (RSS) of the largest process, final loss (mean of the last steps, averaged over
the processes), tokens/s, PTB-test perplexity. Goal (issue I): FSDP with 2 processes holds ≤ 0.55×
the optimizer state per process of one process, with the same loss curve.

Writes bench/results/train_fsdp.json (load average recorded: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_info, write_result  # noqa: E402


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per process per step (default 1)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=512)
    args = ap.parse_args()
    info = run_info()
    work = Path(tempfile.mkdtemp(prefix="rankwise-fsdp-bench-"))
    common = [args.model, "--from-scratch", "--optimizer", "galore", "--rank", str(args.rank), "--steps",
              str(args.steps), "--seq-len", str(args.seq_len), "--eval-tokens", str(args.eval_tokens),
              "--eval-seq-len", str(min(512, args.eval_tokens)), "--threads", "1", "--no-progress"]
    rows = {}
    one = [sys.executable, "-m", "rankwise", "train", *common, "--batch-size", str(2 * args.batch_size)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rankwise",
           "train", *common, "--batch-size", str(args.batch_size), "--fsdp"]
    for key, cmd in (("one", one), ("fsdp2", two)):
        load = list(os.getloadavg())
        seconds = _run([*cmd, "--out", str(work / key), "--json", str(work / f"{key}.json")])
        data = json.loads((work / f"{key}.json").read_text())
        rows[key] = {
            "processes": data["processes"], "wall_seconds": seconds, "load_avg_before": load,
            "optimizer_state_bytes_per_rank": data["optimizer_state_bytes_per_rank"],
            "peak_memory_bytes": data["peak_memory_bytes"], "final_loss": data["final_loss"],
            "losses_rank0": data["train"]["losses"], "tokens_per_second": data["tokens_per_second"],
            "perplexity": (data.get("perplexity") or {}).get("perplexity"), "parameters": data["parameters"],
        }
    ratio = rows["fsdp2"]["optimizer_state_bytes_per_rank"] / rows["one"]["optimizer_state_bytes_per_rank"]
    dloss = abs(rows["fsdp2"]["final_loss"] - rows["one"]["final_loss"]) / rows["one"]["final_loss"]
    result = {
        "settings": vars(args), "rows": rows, "state_ratio_fsdp2_over_one": ratio,
        "goal_state_ratio_le_0.55": ratio <= 0.55, "final_loss_rel_diff": dloss, "run": info,
    }
    path = write_result("train_fsdp", result)
    print(f"{'run':8} {'procs':>5} {'state/proc MiB':>15} {'peak RSS MiB':>13} {'final loss':>10} {'tok/s':>8} "
          f"{'ppl':>8}")
    for key, r in rows.items():
        print(f"{key:8} {r['processes']:>5} {r['optimizer_state_bytes_per_rank'] / 2**20:>15.1f} "
              f"{r['peak_memory_bytes'] / 2**20:>13.0f} {r['final_loss']:>10.4f} {r['tokens_per_second']:>8.1f} "
              f"{(r['perplexity'] or float('nan')):>8.1f}")
    print(f"state ratio {ratio:.3f} (goal ≤ 0.55: {'met' if ratio <= 0.55 else 'not met'}); "
          f"final-loss difference {dloss:.2e}; wrote {path}")


if __name__ == "__main__":
    main()
