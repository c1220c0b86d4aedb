"""What every benchmark records beside its numbers: git commit, torch threads, machine load, time.

``write_result(name, data)`` writes ``bench/results/<name>.json`` atomically with a ``run``
block, so every README number traces back to the commit and conditions that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The commit of the working tree (``+dirty`` when it has uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_info() -> dict[str, Any]:
    """Conditions of this run: commit, command, torch threads, load average, CPU count, device."""
    import torch

    info: dict[str, Any] = {
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` plus ``run`` (with the load average at the end too) to bench/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    run = dict(data.get("run") or run_info())
    run["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = {**data, "run": run}
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def parse_kv(spec: str) -> dict[str, Any]:
    """``"a=1,b=x,c=True,d=None"`` → ``{"a": 1, "b": "x", "c": True, "d": None}`` (bench rows on a command line)."""
    out: dict[str, Any] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        k, _, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if v in ("True", "False", "true", "false"):
            out[k] = v.lower() == "true"
        elif v in ("None", "none", ""):
            out[k] = None
        else:
            try:
                out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
            except ValueError:
                out[k] = v
    return out
