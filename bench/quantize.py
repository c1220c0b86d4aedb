"""Quantisation of SmolLM2-135M: RTN vs GPTQ at 8/4/3/2 bits, EoRA ranks, low rank, low rank + 4-bit factors.

Every row: perplexity on PTB test and BBC test (first 2,048 tokens — the issue asks 4,096; halved to fit the
shared, oversubscribed machine —, 512-token windows, BOS: rankwise.evaluation.perplexity), 3-bit plain rows also
on PTB valid and BBC valid (the GPTQ setting and the default are chosen there, never on test), bytes on disk of
the saved folder, prefill of one 512-token prompt timed right after the dense model's in the same process
(ratio only), and the quantisation time. Calibration: 16 windows × 256 tokens of the train split, seed 0
(variants: ``ptb`` / ``ptb-act`` / ``mix`` = ptb+bbc / ``mix-act``; act = GPTQ act-order).

Jobs (``--jobs``; default ``DEFAULT_JOBS``, the whole grid): ``dense``, ``{rtn,gptq}{bits}[e{r1}/{r2}...][:variant]``
(EoRA ranks from ONE quantisation at the largest rank: rank r is an exact truncation of the same factorisation),
``lowrank{ρ}[+{rtn,gptq}{bits}][:variant]`` (the default ``rankwise compress`` pipeline, then optionally its factors
quantised; ``q4`` = ``+gptq4``; the dense statistics are computed once and shared by every ρ: the default pipeline is
not sequential). ``--no-prefill`` skips the prefill timing (noise on a loaded machine; saves ~25 % of a row);
``--stop-after MIN`` starts no further job once MIN minutes have passed (keeps a queue job under its limit). Runs write
``quantize_<part>.json``; ``--plot-only [--previous OLD.json]`` merges them into ``quantize.json``, marks the
goals, prints the README table and draws ``docs/img/quantize_pareto.png``.

Cheap re-runs: a row already measured in any ``quantize_*.json`` part (this run's own file included, so a killed
job resumes) is not measured again, and a job whose rows all exist is skipped before it quantises anything
(``--remeasure`` turns this off).

    python bench/quantize.py --jobs gptq3:mix-act,gptq3:mix --name quantize_p1   # e.g. one part
    python bench/quantize.py --plot-only
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, run_info, write_result  # noqa: E402
from rankwise.compression.api import CompressConfig, compress  # noqa: E402
from rankwise.compression.calibration.loops import text_windows  # noqa: E402
from rankwise.evaluation.perplexity import perplexity  # noqa: E402
from rankwise.io.models import load_model, load_tokenizer  # noqa: E402
from rankwise.io.texts import load_text  # noqa: E402
from rankwise.quantization import QuantizeConfig, QuantLinear, quantize, save_quantized  # noqa: E402

NAME = "quantize"
PNG = Path(__file__).resolve().parent.parent / "docs" / "img" / "quantize_pareto.png"
GROUP = 64
CALIB_SAMPLES = 16  # × 256 tokens: halved from the CLI default so the grid fits the shared machine
EVAL_TOKENS = 2048  # per test text (PTB, BBC), 512-token windows, BOS (the issue: 4,096; halved, see docstring)
VALID_TOKENS = 2048  # per validation text (PTB valid, BBC valid): the GPTQ setting is chosen on these
#: the issue's whole grid (one process; split it with --jobs / --name and merge with --plot-only)
DEFAULT_JOBS = ("dense,rtn8e32/16/64:mix,rtn4e32/16/64:mix,rtn3e32/16/64:mix,rtn2e32/16/64:mix,gptq8:mix-act,"
                "gptq4:mix-act,gptq3:mix-act,gptq2:mix-act,gptq8e32/16/64:mix-act,gptq4e32/16/64:mix-act,"
                "gptq3e32/16/64:mix-act,gptq2e32/16/64:mix-act,gptq3:ptb,gptq3:ptb-act,gptq3:mix,"
                "lowrank0.2+gptq4:mix-act,lowrank0.4+gptq4:mix-act,lowrank0.2+rtn4")
#: GPTQ variants compared on validation text at 3 bits: (calibration text, act_order)
VARIANTS = {"ptb": ("ptb", False), "ptb-act": ("ptb", True), "mix": ("ptb+bbc", False), "mix-act": ("ptb+bbc", True)}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))


def prefill_seconds(model, ids: torch.Tensor, reps: int = 2, warmup: bool = True) -> float:
    with torch.no_grad():
        if warmup:
            model(input_ids=ids)
        t = time.perf_counter()
        for _ in range(reps):
            model(input_ids=ids)
    return (time.perf_counter() - t) / reps


def truncate_eora(model, r: int) -> None:
    """Keep the first r directions of every EoRA correction (r = 0: drop them)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear) and mod.eora_A is not None:
            if r == 0:
                mod.eora_A = mod.eora_B = None
                mod.eora_rank = 0
            else:
                mod.set_eora(mod.eora_B.data[:, :r].clone(), mod.eora_A.data[:r].clone())


class Bench:
    def __init__(self, args) -> None:
        self.tok = load_tokenizer(None)
        self.base = load_model(None)
        self.texts = {s: load_text(s, "test") for s in ("ptb", "bbc")}
        self.valid = {s: load_text(s, "valid") for s in ("ptb", "bbc")}
        self.calibs: dict[str, tuple] = {}
        self.prompt = self.tok(self.texts["ptb"], return_tensors="pt").input_ids[:, :512]
        self.tmp = Path(tempfile.mkdtemp(prefix="rankwise-bench-quant-"))
        self.rows: list[dict] = []
        self.args = args
        self.stats_cache: dict = {}  # the dense statistics of the default compress pipeline, shared by every ρ
        self.done = set() if args.remeasure else measured_labels(args.name)
        own = RESULTS / f"{args.name}.json"
        if own.is_file() and not args.remeasure:  # resume a killed run: keep its rows
            import json

            self.rows.extend(json.loads(own.read_text())["rows"])
        self.dense_warm = False
        self.data = {"rows": self.rows, "calibration": {}, "group_size": GROUP, "run": run_info(),
                     "eval": {"tokens": EVAL_TOKENS, "valid_tokens": VALID_TOKENS, "seq_len": 512, "bos": True},
                     "jobs": args.jobs}

    def calib(self, spec: str) -> torch.Tensor:
        if spec not in self.calibs:
            self.calibs[spec] = text_windows(self.tok, spec, CALIB_SAMPLES, 256, 0)
            self.data["calibration"][spec] = self.calibs[spec][1].to_dict()
        return self.calibs[spec][0]

    def measure(self, model, label: str, kind: str, save, valid: bool = False, **extra) -> dict | None:
        if label in self.done:
            print(f"{label:36s} already measured (skipped)", flush=True)
            return None
        folder = self.tmp / label.replace(" ", "_").replace("/", "-")
        save(model, folder)
        row = {"label": label, "kind": kind, **extra, "disk_bytes": folder_bytes(folder)}
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        for s, text in self.texts.items():
            row[f"ppl_{s}"] = perplexity(model, self.tok, text, seq_len=512, max_tokens=EVAL_TOKENS, name=s).perplexity
        if valid:
            for s, text in self.valid.items():
                row[f"valid_{s}"] = perplexity(model, self.tok, text, seq_len=512, max_tokens=VALID_TOKENS,
                                               name=s).perplexity
        row["eval_seconds"] = time.perf_counter() - t
        if self.args.no_prefill:
            return self.finish(row, label, valid)
        # side by side: the dense model's prefill is timed right before this row's, in this process (no warm-up
        # pass for the row's model: it has just run the evaluation; the dense model is warmed once per process)
        row["dense_prefill_s"] = prefill_seconds(self.base, self.prompt, reps=1, warmup=not self.dense_warm)
        self.dense_warm = True
        row["prefill_s"] = prefill_seconds(model, self.prompt, reps=1, warmup=False)
        row["prefill_tok_s"] = self.prompt.shape[1] / row["prefill_s"]
        row["prefill_vs_dense"] = row["dense_prefill_s"] / row["prefill_s"]
        return self.finish(row, label, valid)

    def finish(self, row: dict, label: str, valid: bool) -> dict:
        self.rows.append(row)
        self.done.add(label)
        self.flush()
        print(f"{label:36s} ppl ptb {row['ppl_ptb']:9.2f} bbc {row['ppl_bbc']:9.2f} "
              + (f"valid {row['valid_ptb']:8.2f} {row['valid_bbc']:8.2f} " if valid else "")
              + f"{row['disk_bytes'] / 2**20:7.1f} MiB"
              + (f"  prefill {row['prefill_s']:.2f} s" if "prefill_s" in row else ""), flush=True)
        return row

    def flush(self) -> None:
        write_result(self.args.name, self.data)

    def save_q(self, m, folder) -> None:
        save_quantized(m, folder, tokenizer=self.tok)

    def quant(self, bits: int, method: str, variant: str, ranks: tuple[int, ...], label: str, valid: bool,
              plain: bool, model=None, kind: str = "quant", **extra) -> None:
        """One quantisation (EoRA at the largest of ``ranks``), measured at every rank (exact truncations)."""
        calib_text, act_order = VARIANTS[variant]
        # EoRA on RTN depends on the calibration text: its rows name it (a GPTQ label already does)
        suffix = f" [{variant}]" if method == "rtn" else ""
        wanted = ([label] if plain else []) + [f"{label} + EoRA {r}{suffix}" for r in ranks]
        if all(w in self.done for w in wanted):
            print(f"{label:36s} every row already measured (skipped)", flush=True)
            return
        model = model if model is not None else copy.deepcopy(self.base)
        cfg = QuantizeConfig(bits=bits, group_size=GROUP, method=method, eora_rank=max(ranks) if ranks else None,
                             calib=calib_text, act_order=act_order, progress=False)
        needs = method == "gptq" or ranks
        res = quantize(model, cfg, calib=self.calib(calib_text) if needs else None, tokenizer=self.tok)
        common = {"bits": bits, "method": method, "quant_seconds": res.seconds + extra.pop("seconds", 0.0),
                  "mean_rel_err": res.mean_rel_err, **extra}
        if method == "gptq" or ranks:
            common.update(calib=calib_text, act_order=act_order, variant=variant)
        full = {n: (mod.eora_B.data.clone(), mod.eora_A.data.clone()) for n, mod in model.named_modules()
                if isinstance(mod, QuantLinear) and mod.eora_A is not None}
        if plain and label not in self.done:  # first: the most important row of a job on a loaded machine
            truncate_eora(model, 0)
            # with EoRA ranks the later blocks were calibrated on the corrected model's outputs (GPTQ only)
            self.measure(model, label, kind, self.save_q, valid=valid, eora_rank=0,
                         calibrated_with_eora=max(ranks) if ranks and method == "gptq" else 0, **common)
        for r in ranks:  # in the order given: the most important rank first
            for n, (B, A) in full.items():
                model.get_submodule(n).set_eora(B[:, :r].clone(), A[:r].clone())
            self.measure(model, f"{label} + EoRA {r}{suffix}", "quant+eora" if kind == "quant" else kind, self.save_q,
                         eora_rank=r, **common)
        del model
        gc.collect()

    def job(self, job: str) -> None:
        """``dense`` | ``{rtn,gptq}{bits}[e{r1}/{r2}…][:variant]`` | ``lowrank{ρ}[+{rtn,gptq}{bits}|q4][:variant]``.

        EoRA ranks come from ONE quantisation at the largest rank (exact truncations); the plain row of an
        RTN job is then plain RTN exactly (RTN ignores data); GPTQ jobs with ranks measure no plain row (their
        later blocks were calibrated on the corrected model). 3-bit plain rows are also measured on validation.
        """
        name, _, variant = job.partition(":")
        variant = variant or "ptb"
        m = re.fullmatch(r"(rtn|gptq)(\d)(?:e([\d/]+))?", name)
        if name == "dense":
            self.measure(self.base, "dense fp32", "dense", lambda m, f: m.save_pretrained(str(f)), valid=True)
        elif m:
            method, bits = m.group(1), int(m.group(2))
            ranks = tuple(int(r) for r in m.group(3).split("/")) if m.group(3) else ()
            label = f"{method} {bits}-bit" + (f" [{variant}]" if method == "gptq" else "")
            self.quant(bits, method, variant, ranks, label, valid=bits == 3,
                       plain=method == "rtn" or not ranks)
        elif lr := re.fullmatch(r"lowrank([\d.]+)(q4|\+(rtn|gptq)(\d))?", name):
            ratio = float(lr.group(1))
            q4 = lr.group(2) is not None
            qmethod, qbits = (lr.group(3), int(lr.group(4))) if lr.group(3) else ("gptq", 4)
            label = f"low rank ρ={ratio}"
            qlabel = f"{label} + {qmethod} {qbits}-bit" + (f" [{variant}]" if qmethod == "gptq" else "")
            if label in self.done and (not q4 or qlabel in self.done):
                print(f"{label:36s} every row already measured (skipped)", flush=True)
                return
            model = copy.deepcopy(self.base)
            first = not self.stats_cache  # later ρ reuse the dense statistics (their time excludes that pass)
            t = time.perf_counter()
            # the default `rankwise compress` pipeline (its own calibration: CompressConfig's text and windows)
            cres = compress(model, CompressConfig(ratio=ratio, progress=False), tokenizer=self.tok,
                            stats_cache=self.stats_cache)
            secs = time.perf_counter() - t
            self.data["calibration"][f"compress ρ={ratio}"] = cres.calibration

            def save_lr(m, folder):
                import rankwise

                rankwise.save(m, folder, tokenizer=self.tok)

            self.measure(model, label, "lowrank", save_lr, ratio=ratio, quant_seconds=secs,
                         achieved_ratio=cres.achieved_ratio, shared_stats=len(self.stats_cache) > 0 and not first)
            if q4:
                self.quant(qbits, qmethod, variant, (), qlabel, valid=False, plain=True, model=model,
                           kind="lowrank+quant", ratio=ratio, seconds=secs)
        else:
            raise SystemExit(f"unknown job {job!r}")

    def run(self) -> None:
        t0 = time.perf_counter()
        for job in self.args.jobs.split(","):
            if self.args.stop_after is not None and time.perf_counter() - t0 > 60 * self.args.stop_after:
                print(f"--stop-after {self.args.stop_after} min reached: job {job} not started", flush=True)
                self.data.setdefault("not_started", []).append(job)
                continue
            self.job(job)
        self.flush()


def measured_labels(own: str) -> set[str]:
    """Labels of the rows already in ``bench/results/quantize_*.json`` (every part, this run's own included)."""
    import json

    out: set[str] = set()
    for part in RESULTS.glob(f"{NAME}_*.json"):
        out |= {r["label"] for r in json.loads(part.read_text()).get("rows", [])}
    return out


def _row(rows: list[dict], label: str) -> dict | None:
    return next((r for r in rows if r["label"] == label), None)


def _geo(r: dict) -> float:
    """Geometric mean of the PTB and BBC test perplexities (the picture's y axis)."""
    return (r["ppl_ptb"] * r["ppl_bbc"]) ** 0.5


def pareto(rows: list[dict], x_of, smaller_x: bool = True) -> list[dict]:
    """The rows no other row beats on both x (smaller bytes / higher speed) and perplexity, best x first."""
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: (x_of(r) if smaller_x else -x_of(r), _geo(r))):
        if _geo(r) < best:
            front.append(r)
            best = _geo(r)
    return front


def mib(r: dict) -> float:
    """Bytes on disk in MiB, to 0.1 MiB: folders that differ only in their JSON metadata are the same size."""
    return round(r["disk_bytes"] / 2**20, 1)


FAMILIES = ("dense", "quant", "quant+eora", "lowrank", "lowrank+quant")


def goals(rows: list[dict]) -> dict:
    """The issue's goals, each with the numbers behind it and met / not met (GPTQ: every 3-bit variant measured)."""
    out: dict = {}
    dense = _row(rows, "dense fp32")
    bases = [r["label"] for r in rows if r.get("bits") == 3 and r.get("eora_rank") == 0 and "ratio" not in r]
    for base in bases:
        q = _row(rows, base)
        for e in (x for x in rows if x.get("eora_rank") == 32 and x["label"].startswith(f"{base} + EoRA 32")):
            if dense and q:
                closed = {s: (q[f"ppl_{s}"] - e[f"ppl_{s}"]) / (q[f"ppl_{s}"] - dense[f"ppl_{s}"])
                          for s in ("ptb", "bbc")}
                out[f"eora32_closes_40pct_of_3bit_gap [{e['label']}]"] = {
                    "base": base, "closed": closed, "met": all(v >= 0.4 for v in closed.values())}
    r = _row(rows, "rtn 3-bit")
    for g in (x for x in rows if x.get("method") == "gptq" and x.get("bits") == 3 and x.get("eora_rank") == 0
              and "ratio" not in x):
        if r:
            out[f"gptq_3bit_beats_rtn_3bit [{g['label']}]"] = {
                "gptq": [g["ppl_ptb"], g["ppl_bbc"]], "rtn": [r["ppl_ptb"], r["ppl_bbc"]],
                "met": g["ppl_ptb"] < r["ppl_ptb"] and g["ppl_bbc"] < r["ppl_bbc"]}
    if r and r.get("bytes_vs_fp32"):
        out["3bit_bytes_at_most_0.40x_fp32"] = {"label": r["label"], "ratio": r["bytes_vs_fp32"],
                                                "met": r["bytes_vs_fp32"] <= 0.40}
    # the picture: every family of the issue present; the Pareto front (by bytes on disk) says who wins at each size
    present = sorted({x["kind"] for x in rows})
    front = pareto([x for x in rows if x["ppl_ptb"] < 1e3], mib)
    out["pareto_picture_shows_every_family"] = {
        "families_present": present, "missing": [f for f in FAMILIES if f not in present],
        "front_by_bytes": [[x["label"], round(x["disk_bytes"] / 2**20, 1), round(_geo(x), 2)] for x in front],
        "met": all(f in present for f in FAMILIES)}
    return out


def side_goals(rows: list[dict]) -> dict:
    """Beyond the issue's goals: GPTQ against RTN at every width measured (default GPTQ setting, no EoRA)."""
    out = {}
    for bits in (8, 4, 3, 2):
        r = _row(rows, f"rtn {bits}-bit")
        g = _row(rows, f"gptq {bits}-bit [mix-act]")
        if r and g:
            out[f"gptq_beats_rtn_at_{bits}bit"] = {"gptq": [g["ppl_ptb"], g["ppl_bbc"]],
                                                 "rtn": [r["ppl_ptb"], r["ppl_bbc"]],
                                                 "met": g["ppl_ptb"] < r["ppl_ptb"] and g["ppl_bbc"] < r["ppl_bbc"]}
    return out


def plot(rows: list[dict]) -> None:
    """Perplexity against bytes on disk and against prefill speed, one marker per family; Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dense": ("k", "*"), "quant": ("tab:blue", "o"), "quant+eora": ("tab:orange", "^"),
             "lowrank": ("tab:green", "s"), "lowrank+quant": ("tab:red", "D")}
    names = {"dense": "dense fp32", "quant": "quantised (rtn/gptq)", "quant+eora": "quantised + EoRA",
             "lowrank": "low rank", "lowrank+quant": "low rank + 4-bit factors"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    interleaved = any(r.get("speed_vs_dense") for r in rows)
    speed_key_, speed_label = (("speed_vs_dense", "prefill speed × dense fp32 (512-token prompt; layouts timed "
                                                  "interleaved, medians)") if interleaved else
                               ("prefill_vs_dense", "prefill speed × dense fp32 (one timing per row beside the dense "
                                                    "model's; loaded machine: noise)"))
    for ax, x_of, xlabel in ((axes[0], lambda r: r["disk_bytes"] / 2**20, "bytes on disk (MiB)"),
                             (axes[1], lambda r: r.get(speed_key_, 0), speed_label)):
        pts = [(x_of(r), _geo(r), r) for r in rows if r["ppl_ptb"] < 1e3 and x_of(r)]
        ax.set_xlabel(xlabel)
        if not pts:
            ax.text(0.5, 0.5, "not measured (bench/quantize.py --speed)", ha="center", transform=ax.transAxes)
            continue
        for kind, (c, mk) in style.items():
            sel = [p for p in pts if p[2]["kind"] == kind]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], c=c, marker=mk, label=names[kind], s=40)
        for x, y, r in pts:
            short = (r["label"].replace("EoRA ", "E").replace(" + gptq 4-bit", "+q4").replace(" + rtn 4-bit", "+r4")
                     .replace("low rank ", "").replace(" [mix-act]", "").replace("-bit", "b"))
            ax.annotate(short, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        # Pareto front: smaller size (or higher speed) and lower perplexity
        front = pareto([p[2] for p in pts], mib if ax is axes[0] else x_of, smaller_x=ax is axes[0])
        ax.plot([x_of(r) for r in front], [_geo(r) for r in front], "k--", lw=0.8, label="Pareto front")
        ax.set_ylabel("perplexity (geometric mean of PTB and BBC test)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: every way to shrink it (rows with perplexity > 1000 left out)")
    fig.tight_layout()
    PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PNG, dpi=120)
    print(f"wrote {PNG}")


def merge_and_plot(previous: str | None) -> None:
    """Merge the parts ``bench/results/quantize_*.json`` (parallel runs) into ``quantize.json``, mark goals, draw."""
    import json

    data: dict = {"rows": [], "parts": {}, "group_size": GROUP,
                  "eval": {"tokens": EVAL_TOKENS, "valid_tokens": VALID_TOKENS, "seq_len": 512, "bos": True}}
    for part in sorted(RESULTS.glob(f"{NAME}_*.json")):
        d = json.loads(part.read_text())
        data["parts"][part.name] = {"jobs": d.get("jobs"), "run": d.get("run"), "calibration": d.get("calibration")}
        for r in d["rows"]:
            if _row(data["rows"], r["label"]) is None:
                data["rows"].append({**r, "source": part.name})
    if previous:
        old = json.loads(Path(previous).read_text())
        for r in old["rows"]:
            r = dict(r)
            if str(r.get("source", "")).startswith("previous") and "variant" not in r and (
                    r.get("method") == "gptq" or r.get("eora_rank")) and not r["label"].endswith("]"):
                # rows of the round before the PTB+BBC default: calibrated on PTB, natural column order
                r.update(label=r["label"] + " [ptb]", calib="ptb", act_order=False, variant="ptb")
            if _row(data["rows"], r["label"]) is None:
                data["rows"].append({**r, "source": r.get("source") if str(r.get("source", "")).startswith(
                    "previous") else f"previous run {old['run'].get('git_commit', '?')} (same protocol; prefill "
                    "ratio vs that run's dense row)"})
        data["previous"] = {"run": old.get("run"), "calibration": old.get("calibration")}
    dense = _row(data["rows"], "dense fp32")
    sp_path = RESULTS / f"{SPEED}.json"
    sp = json.loads(sp_path.read_text()) if sp_path.is_file() else None
    if sp:
        data["speed"] = {"configs": sp["configs"], "run": sp.get("run"), "reps": sp.get("reps")}
    for r in data["rows"]:
        if dense:
            r["bytes_vs_fp32"] = r["disk_bytes"] / dense["disk_bytes"]
        layout = sp["configs"].get(speed_key(r) or "") if sp else None
        if layout:  # the interleaved timing of this row's storage layout (quantize-speed.json)
            r["speed_layout"], r["speed_vs_dense"], r["speed_tok_s"] = speed_key(r), layout["vs_dense"], \
                layout["tok_s"]
    data["goals"] = goals(data["rows"])
    data["side_goals"] = side_goals(data["rows"])
    data["default_choice"] = default_choice(data["rows"])
    write_result(NAME, data)
    print(json.dumps({"goals": data["goals"], "side_goals": data["side_goals"],
                      "default_choice": data["default_choice"]}, indent=1))
    table(data["rows"])
    plot(data["rows"])


def default_choice(rows: list[dict]) -> dict:
    """The 3-bit setting with the lowest geometric-mean perplexity on PTB valid and BBC valid (never test text)."""
    cands = [r for r in rows if r.get("bits") == 3 and r.get("eora_rank", 0) == 0 and "valid_bbc" in r]
    score = {r["label"]: (r["valid_ptb"] * r["valid_bbc"]) ** 0.5 for r in cands}
    return {"valid_geomean": score, "best": min(score, key=score.get) if score else None}


def table(rows: list[dict]) -> None:
    """The README table: one line per row."""
    print("| row | PTB test | BBC test | PTB valid | BBC valid | MiB on disk | × fp32 | prefill × dense | quantise s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    def cell(r: dict, k: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(r[k]) if r.get(k) is not None else "–"

    def order(r: dict) -> tuple:
        return (r.get("ratio", 0), FAMILIES.index(r["kind"]) if r["kind"] in FAMILIES else 9, -r.get("bits", 99),
                r.get("method", ""), r.get("eora_rank", 0), r["label"])

    for r in sorted(rows, key=order):
        f = functools.partial(cell, r)
        mark = " †" if str(r.get("source", "")).startswith("previous") else ""
        print(f"| {r['label']}{mark} | {f('ppl_ptb')} | {f('ppl_bbc')} | {f('valid_ptb')} | {f('valid_bbc')} | "
              f"{r['disk_bytes'] / 2**20:.1f} | {f('bytes_vs_fp32', '{:.3f}')} | {f('speed_vs_dense')} | "
              f"{f('quant_seconds', '{:.0f}')} |")


SPEED = "quantize-speed"  # bench/results/quantize-speed.json (not a quantize_* part)


def speed(reps: int, configs: str) -> None:
    """Prefill of one 512-token prompt for every storage layout, the layouts interleaved ``reps`` times (medians).

    Speed depends on the layer shapes and kernels, not on the weights' values: quantised layouts use RTN codes
    (stored like GPTQ's), EoRA factors are random of the right shapes, low rank uses SVD factors at uniform ranks
    with the same parameter count as ρ (the default pipeline's allocation differs per matrix). Interleaving puts
    every layout under the same machine load.
    """
    from rankwise.quantization import QuantizeConfig, quantize

    tok, base = load_tokenizer(None), load_model(None)
    ids = tok(load_text("ptb", "test"), return_tensors="pt").input_ids[:, :512]
    models: dict[str, torch.nn.Module] = {"dense": base}
    lowrank: dict[float, torch.nn.Module] = {}
    for name in configs.split(","):
        m = re.fullmatch(r"(?:lr([\d.]+))?\+?(?:q(\d))?(?:\+E(\d+))?", name)
        if name == "dense" or not m:
            continue
        ratio, bits, rank = m.group(1), m.group(2), m.group(3)
        if ratio is not None:
            r = float(ratio)
            if r not in lowrank:
                lowrank[r] = copy.deepcopy(base)
                compress(lowrank[r], CompressConfig(ratio=r, method="svd", alloc="uniform", alloc_sensitivity="none",
                                                    speed_guard="off", progress=False))
            model = copy.deepcopy(lowrank[r])
        else:
            model = copy.deepcopy(base)
        if bits is not None:
            quantize(model, QuantizeConfig(bits=int(bits), group_size=GROUP, method="rtn", progress=False))
            g = torch.Generator().manual_seed(0)
            for mod in (x for x in model.modules() if isinstance(x, QuantLinear) and rank):
                mod.set_eora(1e-3 * torch.randn(mod.out_features, int(rank), generator=g),
                             1e-3 * torch.randn(int(rank), mod.in_features, generator=g))
        models[name] = model
    times: dict[str, list[float]] = {k: [] for k in models}
    for k in models:  # warm-up: one pass each
        prefill_seconds(models[k], ids, reps=1, warmup=False)
    for rep in range(reps):  # written after every round: a run cut short keeps its complete rounds
        for k, model in models.items():
            times[k].append(prefill_seconds(model, ids, reps=1, warmup=False))
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        out = {k: {"prefill_s": times[k], "median_s": med[k], "tok_s": ids.shape[1] / med[k],
                   "vs_dense": med["dense"] / med[k]} for k in models}
        write_result(SPEED, {"configs": out, "tokens": int(ids.shape[1]), "reps": rep + 1, "group_size": GROUP})
    for k, v in out.items():
        print(f"{k:14s} {v['median_s']:7.2f} s  {v['tok_s']:7.1f} tok/s  {v['vs_dense']:.2f}× dense", flush=True)


def speed_key(r: dict) -> str | None:
    """The layout of a row in ``quantize-speed.json`` (``dense``, ``q3``, ``q3+E32``, ``lr0.2``, ``lr0.2+q4``)."""
    if r["kind"] == "dense":
        return "dense"
    key = f"lr{r['ratio']}" if r.get("ratio") is not None else ""
    if r.get("bits"):
        key += ("+" if key else "") + f"q{r['bits']}"
    if r.get("eora_rank"):
        key += f"+E{r['eora_rank']}"
    return key or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot-only", action="store_true", help="merge bench/results/quantize*.json, redraw, print goals")
    p.add_argument("--jobs", default=DEFAULT_JOBS, help="comma-separated jobs (see Bench.job); parallel runs use "
                                                         "different --name quantize_X, merged by --plot-only")
    p.add_argument("--name", default=NAME, help="result name (bench/results/NAME.json)")
    p.add_argument("--previous", default=None, metavar="JSON",
                   help="--plot-only: also take rows (same protocol) from an earlier quantize.json that no part "
                        "re-measured")
    p.add_argument("--no-prefill", action="store_true", help="skip the prefill timing of every row")
    p.add_argument("--stop-after", type=float, default=None, metavar="MIN",
                   help="start no further job once MIN minutes have passed")
    p.add_argument("--speed", default=None, metavar="LAYOUTS",
                   help="only time the prefill of these layouts, interleaved (e.g. dense,q8,q4,q3,q3+E32,lr0.2,"
                        "lr0.2+q4) -> bench/results/quantize-speed.json")
    p.add_argument("--reps", type=int, default=5, help="--speed: interleaved repetitions (median reported)")
    p.add_argument("--remeasure", action="store_true",
                   help="measure every row of the jobs even when a quantize_*.json part already has it")
    args = p.parse_args()
    if args.plot_only:
        merge_and_plot(args.previous)
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the machine is shared and oversubscribed: one thread wastes no time spinning
    if args.speed:
        speed(args.reps, args.speed)
        return
    Bench(args).run()


if __name__ == "__main__":
    main()
