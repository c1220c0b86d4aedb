"""What `rankwise --help` and `import rankwise` cost: wall time, CPU time, peak RSS, and whether torch loads.

Each probe runs in a fresh interpreter (``--repeats`` times, median reported), side by side with
``import torch`` and ``import transformers`` as the reference of what a heavy import costs on the
same machine at the same time. Peak RSS comes from ``resource.getrusage(RUSAGE_CHILDREN)`` of a
one-probe wrapper process.

    python bench/import_cost.py [--repeats 5] [--before REV]

``--before REV`` also runs the rankwise probes on the source tree of commit REV (extracted with
``git archive`` into a temporary folder and put first on PYTHONPATH), interleaved with the
current tree's, so the before/after ratio is measured under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_result

PROBES = {
    "rankwise --help": "import sys; sys.argv = ['rankwise', '--help']\n"
                       "from rankwise.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "import rankwise": "import rankwise",
    "rankwise compress --help": "from rankwise.cli.main import main\n"
                                "try:\n    main(['compress', '--help'])\nexcept SystemExit:\n    pass",
    "import torch": "import torch",
    "import transformers": "import transformers",
}

WRAPPER = """
import json, resource, subprocess, sys, time
code = sys.argv[1]
heavy = "sorted(m for m in ('torch', 'transformers', 'numpy') if m in _s.modules)"
probe = code + "\\nimport sys as _s, json as _j\\n_s.stderr.write(_j.dumps(" + heavy + "))"
t0 = time.perf_counter()
out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024,
                  "heavy_loaded": json.loads(out.stderr.strip().splitlines()[-1]), "rc": out.returncode}))
"""


def measure(code: str, src: str | None = None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", WRAPPER, code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def extract(rev: str, dest: str) -> str:
    """The ``src`` folder of commit ``rev``, written under ``dest``; returns its path."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return str(Path(dest) / "src")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default=None, metavar="REV", help="also probe the source tree of this commit")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    probes = [(name, code, None) for name, code in PROBES.items()]
    if args.before:
        src = extract(args.before, tmp.name)
        probes += [(f"{name} @ {args.before[:10]}", code, src) for name, code in PROBES.items()
                   if "rankwise" in name]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in probes}
    t0 = time.time()
    for _ in range(args.repeats):  # alternate the probes so load changes hit all of them alike
        for name, code, src in probes:
            runs[name].append(measure(code, src))
    tmp.cleanup()
    rows = {}
    for name, rs in runs.items():
        rows[name] = {
            "wall_s": round(statistics.median(r["wall_s"] for r in rs), 3),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 3),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
            "heavy_loaded": rs[0]["heavy_loaded"],
            "rc": rs[0]["rc"],
        }
    torch_cpu = rows["import torch"]["cpu_s"]
    for row in rows.values():
        row["cpu_vs_import_torch"] = round(row["cpu_s"] / torch_cpu, 3) if torch_cpu else None
    print(f"{'probe':40s} {'wall s':>8s} {'cpu s':>7s} {'RSS MB':>7s} {'÷ torch cpu':>11s}  heavy modules loaded")
    for name, r in rows.items():
        print(f"{name:40s} {r['wall_s']:8.3f} {r['cpu_s']:7.3f} {r['peak_rss_mb']:7.1f} "
              f"{r['cpu_vs_import_torch']:11.3f}  {','.join(r['heavy_loaded']) or '-'}")
    write_result("import_cost", {"repeats": args.repeats, "before": args.before,
                                 "seconds": round(time.time() - t0, 1), "probes": rows})


if __name__ == "__main__":
    main()
