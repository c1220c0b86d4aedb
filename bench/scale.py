"""Peak memory and time of `rankwise compress` against depth, on SmolLM2, and on a GPU when there is one.

    .venv/bin/python bench/scale.py                       # everything (≈ 30 min on 2 busy cores)
    .venv/bin/python bench/scale.py --layers 4 --skip-smollm --skip-old    # a quick look

1. **Depth.** A Llama-shaped checkpoint with random weights (hidden 1536, intermediate 6144,
   12 query / 4 key-value heads of 128, SmolLM2's tokenizer and vocabulary, bf16, sharded in
   200 MB files) at 4, 8 and 16 layers, written once under ``~/.cache/rankwise/bench`` one
   tensor at a time. Each is compressed by the CLI, ``rankwise compress CKPT --dtype bfloat16``
   with the default pipeline (whiten + global allocation with loss sensitivity), but only
   ``--calib-samples 8 --seq-len 128`` calibration windows to keep the shared machine usable
   (the hidden states and statistics this saves are small next to a block; the goal is about
   depth). Goals: the 12 extra layers add ≤ 0.15× their fp32 bytes to the peak, and the
   16-layer peak is ≤ 0.6× the fp32 model.
2. **SmolLM2-135M**, default pipeline and default calibration (32 × 256), streamed: peak RSS
   against the fp32 model (goal ≤ 1.5×; 3.8× before streaming) and wall time against the
   pipeline of commit ``--old`` (default deb9b95, before streaming) run side by side from a
   ``git worktree`` (goal: ≤ 10 % slower).
3. **GPU** (only when CUDA is present, otherwise recorded as skipped): SmolLM2 and the
   16-layer model compressed with ``--device cuda --dtype bfloat16``, wall time against the
   CPU run above, and SmolLM2's PTB perplexity of the CUDA and CPU outputs (goal: within 1 %).

Peak RSS is the child's ``ru_maxrss`` read by a fresh wrapper process per run
(``resource.getrusage(RUSAGE_CHILDREN)``), so runs do not see each other's peaks. Writes
bench/results/scale.json with the load average before and after (the machine is shared:
times are comparable only side by side within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_info, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path("~/.cache/rankwise/bench").expanduser()
SHAPE = {"hidden": 1536, "inter": 6144, "heads": 12, "kv": 4, "head_dim": 128}
WRAP = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=open(sys.argv[1] + '.log', 'w'))\n"
    "series = []\n"
    "while p.poll() is None:\n"
    "    try:\n"
    "        kb = next(int(x.split()[1]) for x in open(f'/proc/{p.pid}/status') if x.startswith('VmRSS'))\n"
    "        series.append((round(time.perf_counter() - t, 2), kb * 1024))\n"
    "    except (OSError, StopIteration, ValueError):\n"
    "        pass\n"
    "    time.sleep(0.5)\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "json.dump({'rc': p.returncode, 'seconds': time.perf_counter() - t, 'rss_series': series,\n"
    "           'cpu_seconds': u.ru_utime + u.ru_stime,\n"
    "           'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024},\n"
    "          open(sys.argv[1], 'w'))\n"
)
STAGES = ("calibration_data", "sensitivity", "allocation", "factorisation")  # allocation includes the spectra pass


def stage_peaks(series: list, seconds: float, timings: dict | None) -> dict | None:
    """Peak RSS (sampled every 0.5 s) within each stage; stages placed back from the end of the run (approximate:
    what follows the factorisation, writing metadata, takes well under a second)."""
    if not timings or not series:
        return None
    end, out = seconds, {}
    bounds = []
    for name in reversed(STAGES):
        start = end - float(timings.get(name, 0.0))
        bounds.append((name, start, end))
        end = start
    bounds.append(("startup", 0.0, end))
    for name, a, b in reversed(bounds):
        vals = [rss for t, rss in series if a <= t <= b]
        out[name] = {"seconds": b - a, "peak_rss_bytes": max(vals) if vals else None}
    return out


def build_checkpoint(layers: int, shape: dict | None = None) -> tuple[Path, int]:
    """The random Llama-shaped bf16 checkpoint (written once, one tensor at a time); (folder, parameters)."""
    shape = shape or SHAPE
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.io.models import load_tokenizer
    from rankwise.io.shards import ShardedWriter

    folder = CACHE / f"scale-llama-{layers}L-{shape['hidden']}-{shape['inter']}-bf16"
    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                      head_dim=shape["head_dim"], num_hidden_layers=layers, vocab_size=len(tok),
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, dtype="bfloat16")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in skeleton.parameters())
    if (folder / "config.json").is_file():
        return folder, params
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardedWriter(tmp, max_shard_size="200MB")
    g = torch.Generator().manual_seed(0)
    for name, p in skeleton.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        writer.add(name, t)
    writer.close()
    cfg.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder, params


def measured(cmd: list[str], work: Path, name: str, env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh wrapper; its wall time and peak RSS (bytes), and the --json it wrote."""
    res_file = work / f"{name}.run.json"
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    subprocess.run([sys.executable, "-c", WRAP, str(res_file), *cmd], env=full_env, check=True)
    res = json.loads(res_file.read_text())
    if res["rc"] != 0:
        tail = Path(str(res_file) + ".log").read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed:\n{tail}")
    out_json = work / f"{name}.json"
    if out_json.is_file():
        data = json.loads(out_json.read_text())
        res["timings"] = data.get("timings")
        res["achieved_ratio"] = data.get("achieved_ratio")
    res["stage_peaks"] = stage_peaks(res.get("rss_series") or [], res["seconds"], res.get("timings"))
    return res


#: --method of this tree's compress runs (round 4's README rows: whiten, the default then; since round 5 the default
#: ``auto`` runs MoDeGPT on these Llama-layout checkpoints)
METHOD = ["--method", "auto"]


def rankwise_cmd(*args: str, src: Path | None = None) -> list[str]:
    if src is None:
        return [sys.executable, "-m", "rankwise", *args, *(METHOD if args[:1] == ("compress",) else [])]
    code = f"import sys; sys.path.insert(0, {str(src)!r}); from rankwise.cli.main import main; sys.exit(main())"
    return [sys.executable, "-c", code, *args]


def perplexity(folder: Path, work: Path, name: str) -> float:
    out = work / f"{name}.eval.json"
    subprocess.run([sys.executable, "-m", "rankwise", "eval", str(folder), "--text", "ptb", "--tokens", "4096",
                    "--json", str(out), "--quiet"], check=True, capture_output=True)
    data = json.loads(out.read_text())
    return float(data["models"][0]["perplexity"]["ptb"]) if "models" in data else float(data["perplexity"]["ptb"])


def goals(depth: list[dict]) -> dict | None:
    """The depth goals from the 4- and 16-layer rows (None without both)."""
    d = {row["layers"]: row for row in depth}
    if 4 not in d or 16 not in d:
        return None
    per_layer_fp32 = (d[16]["fp32_bytes"] - d[4]["fp32_bytes"]) / 12
    extra = d[16]["peak_rss_bytes"] - d[4]["peak_rss_bytes"]
    return {
        "extra_12_layers_over_their_fp32": extra / (12 * per_layer_fp32),
        "flat_in_depth_met": extra <= 0.15 * 12 * per_layer_fp32,
        "peak16_over_fp32": d[16]["rss_over_fp32"],
        "peak16_met": d[16]["rss_over_fp32"] <= 0.6,
    }


def merge(names: list[str]) -> None:
    """Combine part results (run side by side, e.g. one process per depth) into bench/results/scale.json."""
    from _common import RESULTS

    parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    out = {"run": parts[0]["run"], "parts": {n: p["run"] for n, p in zip(names, parts)},
           "shape": parts[0].get("shape", SHAPE), "calibration": parts[0]["calibration"],
           "depth": sorted((r for p in parts for r in p["depth"]), key=lambda r: r["layers"]),
           "smollm2": next((p["smollm2"] for p in parts if p.get("smollm2")), None),
           "gpu": next((p["gpu"] for p in parts if p.get("gpu")), None)}
    out["goals"] = goals(out["depth"])
    write_result("scale", out)
    for r in out["depth"]:
        print(f"{r['layers']:>3} layers  fp32 {r['fp32_bytes'] / 2**30:5.2f} GiB  peak RSS "
              f"{r['peak_rss_bytes'] / 2**30:5.2f} GiB ({r['rss_over_fp32']:.2f}× fp32)  {r['seconds']:6.0f} s")
    print(json.dumps({"goals": out["goals"], "smollm2": out["smollm2"]}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[4, 8, 16])
    ap.add_argument("--name", default="scale", help="result name (bench/results/NAME.json), for runs split in parts")
    ap.add_argument("--merge", nargs="+", metavar="NAME", help="merge part results into scale.json and stop")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--skip-old", action="store_true", help="do not run the pre-streaming pipeline side by side")
    ap.add_argument("--old", default="deb9b95", help="commit of the pipeline to compare against")
    ap.add_argument("--shape", default=None, metavar="HIDDEN,INTER,HEADS,KV",
                    help="another Llama shape for the depth rows (heads of 128), e.g. 512,2048,4,2 on a loaded machine")
    ap.add_argument("--repeats", type=int, default=2, help="SmolLM2 runs of each pipeline, alternated")
    ap.add_argument("--method", default="auto", help="--method of this tree's compress runs (round 4's rows: whiten)")
    args = ap.parse_args()
    METHOD[1] = args.method
    if args.merge:
        merge(args.merge)
        return
    info = run_info()
    work = Path(tempfile.mkdtemp(prefix="rankwise-scale-"))
    threads = {"OMP_NUM_THREADS": str(args.threads)}
    shape = dict(SHAPE)
    if args.shape:
        h, i, nh, kv = (int(v) for v in args.shape.split(","))
        shape = {"hidden": h, "inter": i, "heads": nh, "kv": kv, "head_dim": h // nh}
    result: dict = {"run": info, "method": args.method, "shape": shape, "calibration": {"samples": args.calib_samples,
                                                                  "seq_len": args.seq_len},
                    "depth": [], "smollm2": None, "gpu": None}
    try:
        # 1. depth
        for n in args.layers:
            folder, params = build_checkpoint(n, shape)
            r = measured(rankwise_cmd("compress", str(folder), "--dtype", "bfloat16", "--threads", str(args.threads),
                                      "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
                                      "--out", str(work / f"L{n}"), "--overwrite", "--quiet",
                                      "--json", str(work / f"L{n}.json")), work, f"L{n}", threads)
            row = {"layers": n, "params": params, "fp32_bytes": 4 * params, "peak_rss_bytes": r["peak_rss_bytes"],
                   "seconds": r["seconds"], "cpu_seconds": r.get("cpu_seconds"), "timings": r.get("timings"),
                   "stage_peaks": r["stage_peaks"],
                   "rss_series": r["rss_series"][::4],  # every 2 s
                   "rss_over_fp32": r["peak_rss_bytes"] / (4 * params)}
            result["depth"].append(row)
            print(f"{n:>3} layers  {params / 1e6:7.1f} M params  fp32 {4 * params / 2**30:5.2f} GiB  "
                  f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB ({row['rss_over_fp32']:.2f}× fp32)  "
                  f"{r['seconds']:6.0f} s", flush=True)
            shutil.rmtree(work / f"L{n}", ignore_errors=True)
            write_result(args.name, result)  # after every run: a long benchmark keeps what it measured
        result["goals"] = goals(result["depth"])
        # 2. SmolLM2, default pipeline, against the old pipeline side by side
        if not args.skip_smollm:
            from rankwise.io.models import resolve_model

            src = resolve_model("smollm2-135m")
            fp32 = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            tree = work / "old-tree"
            if not args.skip_old:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.old],
                               check=True, capture_output=True)
            runs: dict[str, list[dict]] = {"streamed": [], "old": []}
            try:
                # alternate new/old (new, old, old, new, ...) so both see the same load on average
                order = [k for i in range(args.repeats) for k in (("streamed", "old") if i % 2 == 0
                                                                   else ("old", "streamed"))]
                for kind in order:
                    if kind == "old" and args.skip_old:
                        continue
                    i = len(runs[kind])
                    if kind == "streamed":
                        cmd = rankwise_cmd("compress", "--threads", str(args.threads), "--out", str(work / "smol"),
                                           "--overwrite", "--quiet", "--json", str(work / f"smol{i}.json"))
                    else:
                        cmd = rankwise_cmd("compress", "--out", str(work / "smol-old"), "--overwrite",
                                           "--json", str(work / f"smol-old{i}.json"), src=tree / "src")
                    load = [round(x, 2) for x in os.getloadavg()]
                    r = measured(cmd, work, f"smol{i}" if kind == "streamed" else f"smol-old{i}", threads)
                    runs[kind].append({"peak_rss_bytes": r["peak_rss_bytes"], "seconds": r["seconds"],
                                       "cpu_seconds": r.get("cpu_seconds"),
                                       "timings": r.get("timings"), "load_avg_before": load,
                                       "stage_peaks": r["stage_peaks"],
                                       "rss_over_fp32": r["peak_rss_bytes"] / fp32})
                    print(f"SmolLM2 {kind:>8} run {i}: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                          f"({r['peak_rss_bytes'] / fp32:.2f}× fp32), {r['seconds']:.0f} s, load {load[0]}",
                          flush=True)
            finally:
                if not args.skip_old:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
            new = min(runs["streamed"], key=lambda r: r["seconds"])
            sm = {"fp32_bytes": fp32, "runs": runs, "streamed": {**new, "peak_rss_bytes": max(
                r["peak_rss_bytes"] for r in runs["streamed"])}}
            sm["streamed"]["rss_over_fp32"] = sm["streamed"]["peak_rss_bytes"] / fp32
            if runs["old"]:
                old = min(runs["old"], key=lambda r: r["seconds"])
                sm["old"] = {"commit": args.old, **old,
                             "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs["old"])}
                sm["old"]["rss_over_fp32"] = sm["old"]["peak_rss_bytes"] / fp32
                # best of each (the least disturbed by other engineers' jobs) and the per-pair ratios
                sm["time_ratio_new_over_old"] = new["seconds"] / old["seconds"]
                sm["pair_ratios"] = [a["seconds"] / b["seconds"] for a, b in zip(runs["streamed"], runs["old"])]
                sm["time_goal_met"] = sm["time_ratio_new_over_old"] <= 1.10
                print(f"SmolLM2 best of {len(runs['old'])}: old ({args.old}) {old['seconds']:.0f} s, streamed "
                      f"{new['seconds']:.0f} s; time new/old {sm['time_ratio_new_over_old']:.2f}", flush=True)
            sm["rss_goal_met"] = sm["streamed"]["rss_over_fp32"] <= 1.5
            result["smollm2"] = sm
            write_result(args.name, result)
        # 3. GPU
        if not torch.cuda.is_available():
            result["gpu"] = "skipped: no CUDA"
        else:
            gpu: dict = {"device": torch.cuda.get_device_name(0)}
            gpu_runs = [("smol", [])]
            if 16 in args.layers:
                gpu_runs.append(("L16", [str(build_checkpoint(16)[0]), "--calib-samples", str(args.calib_samples),
                                     "--seq-len", str(args.seq_len)]))
            for name, extra in gpu_runs:
                g = measured(rankwise_cmd("compress", *extra, "--device", "cuda", "--dtype", "bfloat16",
                                          "--out", str(work / f"{name}-cuda"), "--overwrite", "--quiet",
                                          "--json", str(work / f"{name}-cuda.json")), work, f"{name}-cuda")
                cpu_s = (result["smollm2"] or {}).get("streamed", {}).get("seconds") if name == "smol" else \
                    next((row["seconds"] for row in result["depth"] if row["layers"] == 16), None)
                gpu[name] = {"seconds": g["seconds"], "cpu_seconds": cpu_s,
                             "speedup": (cpu_s / g["seconds"]) if cpu_s else None}
            if (work / "smol").is_dir():
                # the CPU run above kept float32 (the checkpoint's dtype): compare with a CPU bf16 run
                measured(rankwise_cmd("compress", "--dtype", "bfloat16", "--device", "cpu", "--out",
                                      str(work / "smol-cpu-bf16"), "--overwrite", "--quiet"), work, "smol-cpu-bf16")
                p_gpu = perplexity(work / "smol-cuda", work, "smol-cuda")
                p_cpu = perplexity(work / "smol-cpu-bf16", work, "smol-cpu-bf16")
                gpu["smol_ppl"] = {"cuda_bf16": p_gpu, "cpu_bf16": p_cpu, "rel_diff": abs(p_gpu - p_cpu) / p_cpu,
                                   "met": abs(p_gpu - p_cpu) / p_cpu <= 0.01}
            result["gpu"] = gpu
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.name, result)
    if result.get("goals"):
        print(json.dumps(result["goals"], indent=2))


if __name__ == "__main__":
    main()
