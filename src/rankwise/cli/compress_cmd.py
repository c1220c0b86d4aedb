"""``rankwise compress``: one-shot low-rank compression of a checkpoint, streamed block by block.

With only ``--out`` it runs the best pipeline we measured (the defaults of
:class:`rankwise.compression.api.CompressConfig`, from which every option and
default here is built) on the built-in SmolLM2-135M with PTB+BBC-train calibration.
MODEL is always a folder (built-in names resolve to one), so the command streams:
one decoder block in memory at a time (:mod:`rankwise.compression.streaming`),
output as sharded safetensors (``--max-shard-size``) in ``--dtype``. The output
folder is written atomically: an error or Ctrl-C leaves nothing behind, and an
existing folder is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse

from rankwise.cli.common import add_json_argument, add_model_argument, add_output_arguments, console, write_json
from rankwise.errors import RankwiseError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rankwise.compression.api import CompressConfig
    from rankwise.config import add_config_arguments

    add_model_argument(parser, "built-in name or HF checkpoint folder, sharded or not (default: smollm2-135m)")
    add_config_arguments(parser, CompressConfig)
    add_output_arguments(parser, "a rankwise checkpoint, sharded safetensors", dense="B A multiplied out")
    add_json_argument(parser)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from rankwise.compression.api import CompressConfig
    from rankwise.compression.streaming import compress_checkpoint, export_dense_checkpoint
    from rankwise.config import config_from_args
    from rankwise.io.atomic import atomic_outputs
    from rankwise.io.models import is_rankwise_checkpoint, resolve_model
    from rankwise.progress import quiet

    config = config_from_args(CompressConfig, args, progress=not quiet())
    out = Path(args.out).expanduser()
    if args.export_dense and Path(args.export_dense).expanduser().resolve() == out.resolve():
        raise RankwiseError("--export-dense must differ from --out.")
    # every output checked now, written under temporary names and put in place together at the end
    outputs = atomic_outputs(dirs=[args.out, args.export_dense], files=[args.json], overwrite=args.overwrite)
    src = resolve_model(args.model)
    if is_rankwise_checkpoint(src):
        raise RankwiseError(f"{src} is already a rankwise checkpoint; compress the dense model it came from.")
    from rankwise.compression.distributed import Dist

    dist = Dist.current(config.device)  # under torchrun: process 0 reports and writes, the others compute their share
    config.progress = config.progress and dist.is_writer
    if dist.is_writer:
        console.print(
            f"compressing {args.model or 'smollm2-135m'} with "
            + ("[bold]auto[/bold] (modegpt where every block decomposes, else whiten + global allocation)"
               if config.method == "auto" else f"[bold]{config.method}[/bold] + [bold]{config.alloc}[/bold] allocation")
            + f", ratio {config.ratio}, {'sequential' if config.sequential else 'one-pass'} "
            f"calibration on {config.calib} ({config.calib_samples}×{config.seq_len} tokens, seed {config.seed}), "
            f"streamed block by block (device {config.device}, dtype {config.dtype})"
        )
    with outputs:
        result = compress_checkpoint(src, out, config, overwrite=args.overwrite)
        if not dist.is_writer:
            return 0
        t1 = time.perf_counter()
        if args.export_dense:
            with console.status(f"writing dense copy {args.export_dense} …"):
                export_dense_checkpoint(outputs.staged(out), args.export_dense, overwrite=args.overwrite,
                                        max_shard_size=config.max_shard_size)
        export_s = time.perf_counter() - t1
        if args.json and args.json != "-":
            write_json({**result.to_dict(), "out": str(out)}, args.json)
    _table(result, export_s, Path(out), args.export_dense)
    if args.json == "-":
        write_json({**result.to_dict(), "out": str(out)}, args.json)
    return 0


def _table(result, export_s: float, out, dense_dir) -> None:
    from rich.table import Table

    n_low = sum(1 for r in result.ranks.values() if r is not None)
    table = Table(title="rankwise compress", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    alloc = "block influence" if result.method == "modegpt" else result.alloc  # modegpt allocates its own sparsity
    table.add_row("method / allocation", f"{result.method} / {alloc}" + (" / sequential" if result.sequential else ""))
    if getattr(result, "method_choice", None):
        table.add_row("method choice", result.method_choice)
    table.add_row("params before", f"{result.params_before:,}")
    table.add_row("params after", f"{result.params_after:,}")
    table.add_row("targeted params before → after",
                  f"{result.targeted_params_before:,} → {result.targeted_params_after:,}")
    table.add_row("asked ratio", f"{result.asked_ratio:.3f}")
    table.add_row("achieved ratio (of targeted params)", f"{result.achieved_ratio:.4f}")
    table.add_row("factorised / kept dense", f"{n_low} / {len(result.dense)}")
    if result.calibration:
        c = result.calibration
        table.add_row("calibration", f"{c.get('text')} ({c.get('samples')}×{c.get('seq_len')}, seed {c.get('seed')})")
    if getattr(result, "healing", None):
        h = result.healing
        table.add_row("healing (LoRA on each factor, folded; ranks unchanged)",
                      f"{h['steps']} steps, rank {h['rank']}, loss {h['first_loss']:.3f} → {h['final_loss']:.3f}")
    stages = " / ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    table.add_row("time: compress (stages)", f"{result.seconds:.1f} s ({stages})")
    if dense_dir:
        table.add_row("time: dense export", f"{export_s:.1f} s")
    table.add_row("written", str(out) + (f" (+ dense {dense_dir})" if dense_dir else ""))
    console.print(table)
