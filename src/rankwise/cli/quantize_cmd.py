"""``rankwise quantize``: low-bit weights (RTN or GPTQ) with optional EoRA compensation, saved as a rankwise folder.

With only ``--out`` it runs the best setting we measured (the defaults of
:class:`rankwise.quantization.api.QuantizeConfig`) on the built-in SmolLM2-135M with
PTB+BBC-train calibration. On a ``rankwise compress`` output it quantises the low-rank
factors (or, for ``--method modegpt``, the kept block of every MoDeGPT layer). The output
folder is written atomically; an existing folder is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import time

from rankwise.cli.common import add_json_argument, add_model_argument, add_output_arguments, console, write_json
from rankwise.config import add_config_arguments, config_from_args, positive_int
from rankwise.errors import RankwiseError
from rankwise.quantization.api import QuantizeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, "built-in name, HF folder or rankwise compress output (default: smollm2-135m)")
    add_config_arguments(parser, QuantizeConfig)
    add_output_arguments(parser, "a rankwise checkpoint with packed weights", dense="dequantised weights")
    add_json_argument(parser)
    parser.add_argument("--threads", type=positive_int("--threads"), default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy shared machine)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rankwise.io.atomic import atomic_outputs
    from rankwise.io.models import load_model, load_tokenizer, resolve_model
    from rankwise.quantization.api import quantize
    from rankwise.quantization.io import export_dense, is_quantized_folder, save_quantized

    config = config_from_args(QuantizeConfig, args)  # validates every option first
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    if args.export_dense and Path(args.export_dense).expanduser().resolve() == out.resolve():
        raise RankwiseError("--export-dense must differ from --out.")
    # every output checked now, written under temporary names and put in place together at the end
    outputs = atomic_outputs(dirs=[args.out, args.export_dense], files=[args.json], overwrite=args.overwrite)
    src = resolve_model(args.model)
    if is_quantized_folder(src):
        raise RankwiseError(f"{src} is already quantised; quantise the original (or `rankwise compress`) folder.")
    t0 = time.perf_counter()
    with console.status(f"loading {args.model or 'smollm2-135m'} …"):
        model = load_model(args.model)
        tok = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    calib = f"{config.calib} ({config.calib_samples}×{config.seq_len} tokens)" if (
        config.method == "gptq" or config.eora_rank) else "none needed"
    console.print(f"quantizing with [bold]{config.method}[/bold] to {config.bits} bits, groups of "
                  f"{config.group_size}" + (f", EoRA rank {config.eora_rank}" if config.eora_rank else "")
                  + f"; calibration: {calib}")
    result = quantize(model, config, tokenizer=tok)
    t1 = time.perf_counter()
    with console.status(f"saving {out} …"), outputs:
        save_quantized(model, out, tokenizer=tok, overwrite=args.overwrite)
        if args.export_dense:
            export_dense(model, args.export_dense, tokenizer=tok, overwrite=args.overwrite)
        if args.json and args.json != "-":
            write_json({**result.to_dict(), "out": str(out)}, args.json)
    save_s = time.perf_counter() - t1
    _table(result, load_s, save_s, out, args.export_dense)
    if args.json == "-":
        write_json({**result.to_dict(), "out": str(out)}, args.json)
    return 0


def _folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def _table(result, load_s: float, save_s: float, out, dense_dir) -> None:
    from rich.table import Table

    table = Table(title="rankwise quantize", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("method / bits / group size", f"{result.method} / {result.bits} / {result.group_size}")
    table.add_row("EoRA rank", str(result.eora_rank or "none"))
    table.add_row("quantised matrices", str(len(result.layers)))
    if result.mean_rel_err is not None:
        table.add_row("mean relative output error (calibration)", f"{result.mean_rel_err:.4g}")
    table.add_row("tensor bytes before → after", f"{result.bytes_before / 2**20:,.1f} MiB → "
                  f"{result.bytes_after / 2**20:,.1f} MiB ({result.bytes_after / result.bytes_before:.3f}×)")
    table.add_row("weights on disk", f"{_folder_bytes(out) / 2**20:,.1f} MiB")
    if result.calibration:
        c = result.calibration
        table.add_row("calibration", f"{c.get('text')} ({c.get('samples')}×{c.get('seq_len')}, seed {c.get('seed')})")
    table.add_row("time: load / quantize / save", f"{load_s:.1f} s / {result.seconds:.1f} s / {save_s:.1f} s")
    table.add_row("written", str(out) + (f" (+ dense {dense_dir})" if dense_dir else ""))
    console.print(table)
