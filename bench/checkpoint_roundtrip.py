"""The rankwise/2 checkpoint on a real model: save, load through transformers, refusal without rankwise.

SmolLM2-135M has every target matrix replaced by its rank-64 truncated SVD (randomized, data-free: the point
here is the format, not the quality),
saved sharded with ``rankwise.save(max_shard_size=...)``, then loaded three ways in this process:
``rankwise.load`` (validation + sha256 + from_pretrained), bare ``AutoModelForCausalLM.from_pretrained``
and ``rankwise.load(device_map="auto")``; logits on 4×128 PTB-test tokens are compared with the
in-memory model. A subprocess that never imports rankwise tries plain ``from_pretrained`` and must fail.
Times are wall seconds on a shared machine: compare them only with each other (same run).

    python bench/checkpoint_roundtrip.py [--shard 100MB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_info, write_result  # noqa: E402

PLAIN = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print("LOADED")
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc).strip().splitlines()[-1][:300])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard", default="100MB")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    import rankwise
    from rankwise.io.checkpoint import mark_factorised
    from rankwise.io.tokens import eval_windows
    from rankwise.surgery import LowRankLinear, find_targets, set_module

    info = run_info()
    model = rankwise.load_model("smollm2-135m")
    tok = rankwise.load_tokenizer("smollm2-135m")
    ids = eval_windows(tok, rankwise.load_text("ptb", "test"), seq_len=128, max_tokens=512)
    for t in find_targets(model):
        set_module(model, t.name, LowRankLinear.from_linear(t.module, 64, svd="randomized", niter=1))
    mark_factorised(model)
    with torch.no_grad():
        ref = model(ids).logits
    out: dict = {"model": "smollm2-135m", "factorised": "every target at rank 64 (randomized SVD)",
                 "max_shard_size": args.shard,
                 "factorised_layers": sum(isinstance(m, LowRankLinear) for m in model.modules())}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ck"
        t = time.perf_counter()
        rankwise.save(model, folder, tokenizer=tok, max_shard_size=args.shard)
        out["save_s"] = round(time.perf_counter() - t, 2)
        files = sorted(p.name for p in folder.iterdir())
        out["files"] = files
        out["shards"] = sum(f.endswith(".safetensors") for f in files)
        out["bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        rows = []
        for label, fn in (
            ("rankwise.load", lambda: rankwise.load(folder)),
            ("AutoModelForCausalLM.from_pretrained", lambda: AutoModelForCausalLM.from_pretrained(str(folder))),
            ("rankwise.load(device_map='auto')", lambda: rankwise.load(folder, device_map="auto")),
        ):
            t = time.perf_counter()
            m = fn()
            sec = time.perf_counter() - t
            with torch.no_grad():
                d = float((m(ids).logits - ref).abs().max())
            rows.append({"how": label, "load_s": round(sec, 2), "max_abs_logit_diff": d,
                         "factorised": sum(isinstance(x, LowRankLinear) for x in m.modules())})
            del m
        out["loads"] = rows
        r = subprocess.run([sys.executable, "-c", PLAIN, str(folder)], capture_output=True, text=True, timeout=600)
        out["plain_transformers"] = (r.stdout.strip().splitlines() or ["<no output>"])[-1]
    out["run"] = info
    path = write_result("checkpoint_roundtrip", out)
    print(f"{'load path':40s} {'s':>6s} {'max |Δlogit|':>13s} factorised")
    for row in rows:
        print(f"{row['how']:40s} {row['load_s']:6.2f} {row['max_abs_logit_diff']:13.2e} {row['factorised']}")
    print(f"save {out['save_s']} s, {out['shards']} shards, {out['bytes'] / 1e6:.1f} MB; plain transformers: "
          f"{out['plain_transformers'][:120]}")
    print(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    main()
