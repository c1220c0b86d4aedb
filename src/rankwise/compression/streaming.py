"""Streaming compress: a checkpoint folder in, a sharded compressed checkpoint out, one block in memory.

:func:`compress_checkpoint` never holds the model: it builds the skeleton on the meta device
(accelerate's ``init_empty_weights(include_buffers=False)``, so rotary buffers stay real),
materialises the parts outside the repeated blocks (embeddings, final norm, head: the loss of
the sensitivity pass needs them), and reads one decoder block at a time from the (possibly
sharded) safetensors through :class:`rankwise.io.shards.CheckpointReader`, straight into the
asked dtype on the work device. The block does its work and goes back to the meta device.

The pipeline is the in-memory one (:func:`rankwise.compression.api.run_pipeline`); the passes
over the checkpoint are:

1. loss sensitivity (default ``global`` allocation): forward block by block over the
   sensitivity windows keeping each block's input, then backward block by block from the top;
2. statistics + spectra (allocations that need spectra): every block once;
3. allocation (needs every spectrum, so it waits for pass 2);
4. statistics again + factorisation: every block once; a block's tensors are written to the
   output shards (:class:`rankwise.io.shards.ShardedWriter`) as soon as it is factorised.

Pass 4 *recomputes* the statistics of pass 2 instead of spilling them to disk: XᵀX of every
matrix is n×n float64 (2 GB per block for Llama-3-8B, 64 GB for the model), while recomputing
costs one more forward of the calibration windows through each block, which is small next to
the SVDs (docs/scale.md has the numbers). Sequential calibration needs pass 4 to recompute
anyway. The output is written into a temporary folder beside ``out`` and renamed at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.compression.api import (
    CompressConfig,
    CompressResult,
    _count,
    _dist,
    build_meta,
    choose_method,
    resolve_calib,
    run_pipeline,
    sensitivity_windows,
)
from rankwise.compression.calibration.loops import CalibInfo
from rankwise.compression.methods import get_method
from rankwise.compression.runner import SPILL_BYTES, find_blocks
from rankwise.engine.device import compute_dtype, resolve_device, resolve_dtype
from rankwise.engine.metrics import break_even_rank
from rankwise.engine.threads import torch_threads
from rankwise.errors import RankwiseError
from rankwise.surgery.targets import find_targets


def _skeleton(reader, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device (buffers real), built through transformers' Auto mapping."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(reader.config, dtype=dtype)
        except ValueError as exc:
            raise RankwiseError(
                f"{reader.folder} is not a causal language model transformers knows ({str(exc).splitlines()[0]}); "
                "streaming compress needs one (compress other models in memory with rankwise.compress)."
            ) from exc
    model.eval()
    return model


class _Materialiser:
    """Loads tensors of the skeleton from the checkpoint onto the device and puts them back on meta."""

    def __init__(self, model: nn.Module, reader, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.reader, self.device, self.dtype = model, reader, device, dtype
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._strip = prefix + "." if prefix else ""
        self.loads = 0  # blocks materialised so far (tests count them)

    def key(self, name: str) -> str | None:
        """The checkpoint key of the model tensor ``name`` (with or without the base-model prefix)."""
        if name in self.reader:
            return name
        if self._strip and name.startswith(self._strip) and name[len(self._strip):] in self.reader:
            return name[len(self._strip):]
        return None

    def load_module(self, prefix: str, module: nn.Module) -> None:
        """Fill every meta parameter (and persistent buffer) of ``module`` from the checkpoint."""
        from accelerate.utils import set_module_tensor_to_device

        pre = prefix + "." if prefix else ""
        for name, p in list(module.named_parameters(recurse=True)):
            if not p.is_meta:
                continue
            key = self.key(pre + name)
            if key is None:
                raise RankwiseError(f"the checkpoint {self.reader.folder} has no tensor for {pre + name}; "
                                    "it does not match its config.json.")
            value = _finite(self.reader.get(key), key, self.reader.folder)
            if tuple(value.shape) != tuple(p.shape):
                raise RankwiseError(f"tensor {key} in {self.reader.folder} has shape {list(value.shape)} but the "
                                    f"config implies {list(p.shape)}; the checkpoint does not match its config.json.")
            dt = self.dtype if value.is_floating_point() else value.dtype
            if dt == value.dtype and self.device.type == "cpu":
                value = value.clone()  # own memory, not pages of the file mapping (they would stay resident)
            set_module_tensor_to_device(module, name, self.device, value=value, dtype=dt)
            module.get_parameter(name).requires_grad_(False)
        for name, b in list(module.named_buffers(recurse=True)):
            if b.is_meta:
                key = self.key(pre + name)
                if key is None:
                    raise RankwiseError(f"the checkpoint {self.reader.folder} has no tensor for buffer {pre + name}.")
                set_module_tensor_to_device(module, name, self.device, value=self.reader.get(key))
        self.reader.close()  # unmap the shard files: pages read for this block must not stay in the process

    @staticmethod
    def release(module: nn.Module) -> None:
        """Every parameter of ``module`` back to the meta device (its memory is freed)."""
        for mod in module.modules():
            for key, p in list(mod._parameters.items()):
                if p is not None and not p.is_meta:
                    mod._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _cast_output(dtype: torch.dtype) -> Callable:
    """A forward hook casting a floating output to ``dtype`` (an embedding kept in the storage dtype)."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dtype != dtype:
            return output.to(dtype)
        return output

    return hook


@contextlib.contextmanager
def _upcast(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """``module``'s own floating parameters in ``dtype`` for the ``with`` (shared, i.e. tied, ones included)."""
    saved = []
    for p in module.parameters(recurse=False):
        if p.is_floating_point() and p.dtype != dtype:
            saved.append((p, p.data))
            p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


@contextlib.contextmanager
def _materialised(module: nn.Module, mat: _Materialiser, prefix: str) -> Iterator[None]:
    """``module`` read from the checkpoint (compute dtype) for the ``with``, then back on the meta device."""
    mat.load_module(prefix, module)
    try:
        yield
    finally:
        mat.release(module)


def _tokenizer(folder: Path):
    """The folder's tokenizer (checked against the vocabulary: one line when corrupt or too large), None if absent."""
    from rankwise.io.models import _TOKENIZER_FILES, load_tokenizer

    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)


def _write_metadata(folder: Path, hf_config, layers: dict, meta: dict, tokenizer, generation_config,
                    checksums: dict) -> None:
    try:
        from rankwise.io.checkpoint import write_checkpoint_metadata
    except ImportError:  # TODO(checkpoint engineer): remove once io/checkpoint.py provides it
        import json

        hf_config.save_pretrained(str(folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        if generation_config is not None:
            generation_config.save_pretrained(str(folder))
        from rankwise.io.checkpoint import FORMAT, _version

        record = {**meta, "format": FORMAT, "rankwise_version": _version(),
                  "ranks": {k: v["rank"] for k, v in layers.items()}, "layers": layers, "checksums": checksums}
        (folder / "rankwise.json").write_text(json.dumps(record, indent=2))
        return
    write_checkpoint_metadata(folder, hf_config, layers, meta, tokenizer=tokenizer,
                              generation_config=generation_config, checksums=checksums)



def _finite(value: torch.Tensor, key: str, folder) -> torch.Tensor:
    """``value``, or a one-line error naming the tensor when it holds NaN/Inf (before it poisons an SVD)."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise RankwiseError(f"{folder}: weight {key} holds {int((~torch.isfinite(value)).sum())} NaN/Inf value(s) "
                            f"(of {value.numel()}); the model is broken, re-save or re-download it.")
    return value

def compress_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: CompressConfig | None = None,
    calib: Any = None,
    tokenizer=None,
    overwrite: bool = False,
    spill_bytes: int = SPILL_BYTES,
    on_block: Callable[[str, int], None] | None = None,
) -> CompressResult:
    """Compress the checkpoint folder ``src`` block by block and write it to ``out`` (sharded safetensors).

    ``src``: a built-in model name or a folder with ``config.json`` and (sharded) safetensors.
    ``calib``: ``None`` (``config.calib`` text, tokenized with ``src``'s tokenizer or ``tokenizer``),
    a text spec, or a LongTensor of token windows (a forward loop cannot be streamed). The output
    keeps ``config.dtype`` (``auto``: the checkpoint's), holds ``rankwise.json`` and the tokenizer,
    and is written atomically (a temporary folder renamed at the end; ``overwrite`` replaces ``out``).
    ``on_block(event, i)`` is called with ``("load", i)`` / ``("release", i)`` (tests count blocks).
    """
    from rankwise.io.atomic import atomic_dir, check_writable
    from rankwise.io.models import resolve_model
    from rankwise.io.shards import CheckpointReader, ShardedWriter
    from rankwise.surgery.layers import layer_map

    config = config if config is not None else CompressConfig()
    if not isinstance(config, CompressConfig):
        raise RankwiseError(f"compress_checkpoint takes a CompressConfig, got {type(config).__name__}.")
    if callable(calib) and not isinstance(calib, torch.Tensor):
        raise RankwiseError("a streamed compress cannot run a forward_loop callable (the model is never whole); "
                            "pass text or token windows as calib, or use rankwise.compress on a model in memory.")
    if config.heal_steps:
        from rankwise.compression.heal import check_heal_supported

        check_heal_supported(config)
    dest = check_writable(out, is_dir=True)
    if dest.exists() and not overwrite:
        raise RankwiseError(f"output folder {dest} already exists; pass --overwrite (overwrite=True) or another --out.")
    t0 = time.perf_counter()
    folder = resolve_model(src)
    reader = CheckpointReader(folder)
    device = resolve_device(config.device)
    dist = _dist(device)
    device = dist.device(device)
    dtype = resolve_dtype(config.dtype, reader.torch_dtype)
    # blocks (and the parts outside them) are read straight into the compute dtype: float32 where the device has
    # no fast kernels for the storage dtype (bf16 on an AVX2 CPU); written back in the storage dtype ``dtype``
    compute = compute_dtype(device, dtype, config.compute_dtype)
    with torch_threads(config.threads):
        model = _skeleton(reader, compute)
        targets = find_targets(model, config.targets, config.exclude)
        blocks = find_blocks(model, targets)
        if blocks is None:
            raise RankwiseError(f"{folder}: no repeated blocks hold the targeted layers, so there is nothing to "
                                "stream; compress it in memory with rankwise.compress.")
        shapes = [t.shape for t in targets]
        from rankwise.compression.allocation import check_reachable

        check_reachable(shapes, config.ratio)
        config, choice = choose_method(model, targets, config)  # method="auto": modegpt or whiten, from structure
        method = get_method(config.method)
        targeted_before = sum(m * n for m, n in shapes)
        mat = _Materialiser(model, reader, device, compute)
        block_names = {id(b): f"{blocks.prefix}.{i}" for i, b in enumerate(blocks.modules)}
        # everything outside the blocks: embeddings, final norm, head (tied weights re-tied afterwards).
        # The embedding tables and the head (the largest tensors outside the blocks: 2 × 302 MB in float32 for a
        # 49k vocabulary at width 1536) stay in the storage dtype; only their lookups' outputs are cast to the
        # compute dtype, and the head is upcast for the passes that run it (loss sensitivity, fwsvd gradients).
        in_blocks = {id(p) for b in blocks.modules for p in b.parameters()}
        narrow = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)} if dtype != compute else set()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and dtype != compute:
            narrow.add(id(head))
        # an untied head is only needed by the passes that compute a loss: it stays on the meta device until then
        # (read from the checkpoint inside head_scope) and is copied from the checkpoint when the output is written
        head_keys: dict[str, str] = {}
        if head is not None and not getattr(reader.config, "tie_word_embeddings", False) and id(head) not in {
                id(m) for b in blocks.modules for m in b.modules()}:
            hname = next(n for n, m in model.named_modules() if m is head)
            for k, p in head._parameters.items():
                if p is None:
                    continue
                key = mat.key(f"{hname}.{k}" if hname else k)
                if key is None:
                    head_keys = {}
                    break
                head_keys[f"{hname}.{k}" if hname else k] = key
        lazy_head = bool(head_keys)
        for mname, mod in model.named_modules():
            if any(mname == n or mname.startswith(n + ".") for n in block_names.values()):
                continue
            if lazy_head and mod is head:
                continue
            own = [k for k, p in mod._parameters.items() if p is not None and p.is_meta and id(p) not in in_blocks]
            for k in own:
                key = mat.key(f"{mname}.{k}" if mname else k)
                if key is None:
                    continue  # a tied weight: filled by tie_weights below
                from accelerate.utils import set_module_tensor_to_device

                value = _finite(reader.get(key), key, reader.folder)
                want = (dtype if id(mod) in narrow else compute) if value.is_floating_point() else value.dtype
                set_module_tensor_to_device(mod, k, device, value=value, dtype=want)
                mod._parameters[k].requires_grad_(False)
        if getattr(reader.config, "tie_word_embeddings", False):
            model.tie_weights()
        params_before = _count(model)  # after tying: a tied head is the embedding, counted once
        hooks = [m.register_forward_hook(_cast_output(compute)) for m in model.modules()
                 if isinstance(m, nn.Embedding) and id(m) in narrow]
        if lazy_head:
            head_scope = lambda: _materialised(head, mat, next(iter(head_keys)).rpartition(".")[0])  # noqa: E731
        elif head is not None and id(head) in narrow:
            head_scope = lambda: _upcast(head, compute)  # noqa: E731
        else:
            head_scope = None
        outside_meta = [n for n, p in model.named_parameters()
                        if p.is_meta and id(p) not in in_blocks and n not in head_keys]
        if outside_meta:
            raise RankwiseError(f"the checkpoint {folder} has no tensor for {outside_meta[0]}; "
                                "it does not match its config.json.")

        if tokenizer is None:
            tokenizer = _tokenizer(folder)
        info: CalibInfo | None = None
        loop = None
        needs_windows = method.needs_data or (config.alloc_sensitivity == "fisher" and config.alloc != "uniform")
        if needs_windows and (calib is not None or tokenizer is not None or method.needs_data):
            if calib is None and tokenizer is None:
                raise RankwiseError(f"{folder} has no tokenizer for the calibration text {config.calib!r}; pass "
                                    "tokenizer=... or token windows as calib.")
            loop, info = resolve_calib(model, config, calib, tokenizer, with_loss=method.needs_grad)
        sens_windows, sens_info = sensitivity_windows(model, config, loop, tokenizer)
        if dist.enabled:  # each process takes its share of the windows one process would use (info: all of them)
            if sens_windows is not None:  # the first sens_samples of *all* windows, then shared out
                sens_windows = dist.shard_windows(sens_windows)
            if getattr(loop, "windows", None) is not None:
                loop, _ = resolve_calib(model, config, dist.shard_windows(loop.windows, config.batch_size),
                                        with_loss=method.needs_grad)
        if not method.needs_data:
            loop = None
        timings = {"calibration_data": time.perf_counter() - t0}

        def load(i: int, block: nn.Module) -> None:
            mat.loads += 1
            if on_block is not None:
                on_block("load", i)
            mat.load_module(f"{blocks.prefix}.{i}", block)

        def release(i: int, block: nn.Module) -> None:
            mat.release(block)
            if on_block is not None:
                on_block("release", i)

        layers: dict[str, dict] = {}
        with atomic_dir(dest, overwrite=overwrite) if dist.is_writer else _nullpath() as tmp:
            writer = ShardedWriter(tmp, max_shard_size=config.max_shard_size) if dist.is_writer else None

            def done(i: int, block: nn.Module) -> None:
                name = f"{blocks.prefix}.{i}"
                for k, spec in layer_map(block).items():
                    layers[f"{name}.{k}"] = spec
                if writer is not None:
                    for k, v in block.state_dict().items():
                        writer.add(f"{name}.{k}", v.to(dtype) if v.is_floating_point() else v)
                    # end the shard with the block: the writer would otherwise hold up to max_shard_size
                    # (5 GB) of finished blocks in RAM, which grows with depth (measured: docs/scale.md)
                    flush = getattr(writer, "flush", None) or writer._flush
                    flush()

            out_ = run_pipeline(model, targets, config, device=device, loop=loop, sens_windows=sens_windows,
                                load=load, release=release, on_block_done=done, spill_bytes=spill_bytes,
                                head_scope=head_scope)
            for h in hooks:
                h.remove()
            timings.update(out_.timings)
            ranks = {t.name: out_.rank_of[t.name] for t in targets}
            targeted_after = out_.targeted_after if out_.targeted_after is not None else sum(
                m * n if ranks[t.name] is None else ranks[t.name] * (m + n) for t, (m, n) in zip(targets, shapes))
            params_after = _count(model)
            calibration = info.to_dict() if info else None
            if sens_info is not None:
                calibration = {**(calibration or {}), "sensitivity": sens_info.to_dict()}
            result = CompressResult(
                ranks=ranks, asked_ratio=config.ratio, achieved_ratio=1.0 - targeted_after / targeted_before,
                params_before=params_before, params_after=params_after, targeted_params_before=targeted_before,
                targeted_params_after=targeted_after, seconds=time.perf_counter() - t0, method=config.method,
                alloc=config.alloc, sequential=out_.sequential, calibration=calibration, timings=timings,
                break_even={t.name: break_even_rank(*t.shape) for t in targets}, method_choice=choice,
            )
            if writer is not None:
                # the tensors outside the blocks, each storage once (a tied head is the embedding)
                seen: set[int] = set()
                prefixes = tuple(n + "." for n in block_names.values())
                for k, v in model.state_dict(keep_vars=False).items():
                    if k in head_keys:  # the lazily read head: copied from the checkpoint
                        v = _finite(reader.get(head_keys[k]), head_keys[k], reader.folder)
                        writer.add(k, v.to(dtype) if v.is_floating_point() else v)
                        continue
                    if k.startswith(prefixes) or v.is_meta:
                        continue
                    if v.data_ptr() in seen:
                        continue
                    seen.add(v.data_ptr())
                    writer.add(k, v.to(dtype) if v.is_floating_point() else v)
                sums = writer.close()
                meta = build_meta(config, out_, result, params_before, params_after, device, dtype, compute)
                meta["streamed"] = True
                meta["source"] = str(folder)
                hf_config = reader.config
                hf_config.dtype = dtype
                gen = None
                try:
                    from transformers import GenerationConfig

                    gen = GenerationConfig.from_pretrained(str(folder))
                except (OSError, ValueError):
                    gen = None
                _write_metadata(tmp, hf_config, layers, meta, tokenizer, gen, sums)
                if config.heal_steps:  # the whole (factorised) model is needed to train: load the output, heal it
                    from rankwise.compression.heal import heal_folder

                    t3 = time.perf_counter()
                    import dataclasses

                    heal_cfg = dataclasses.replace(config, calib=calib) if isinstance(calib, str) else config
                    result.healing = heal_folder(tmp, heal_cfg, tokenizer=tokenizer, dtype=dtype, windows=calib if
                                                 isinstance(calib, torch.Tensor) else None).to_dict()
                    result.timings["healing"] = time.perf_counter() - t3
        dist.barrier()
    reader.close()
    result.seconds = time.perf_counter() - t0
    return result


class _nullpath:
    """``with`` stand-in for :func:`atomic_dir` on processes that do not write (yields None)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def export_dense_checkpoint(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                            max_shard_size: str = "5GB") -> Path:
    """Stream a rankwise checkpoint into a plain HF folder (each B A multiplied out, one tensor at a time).

    The result loads with plain ``from_pretrained``; its ``config.json`` has no ``quantization_config``.
    """
    import json

    from rankwise.io.atomic import atomic_dir
    from rankwise.io.shards import CheckpointReader, ShardedWriter

    folder = Path(src)
    meta = json.loads((folder / "rankwise.json").read_text())
    layers = meta.get("layers", {})
    reader = CheckpointReader(folder, check_sizes=False)
    select = {n for n, sp in layers.items() if sp.get("type") == "select"}  # modegpt's SelectLinear
    owned = {f"{n}.{s}" for n in layers for s in ("A.weight", "B.weight", "B.bias")}
    owned |= {f"{n}.{s}" for n in select for s in ("weight", "bias", "out_index", "in_index")}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size=max_shard_size)
        for key in reader.keys():
            if key not in owned:
                writer.add(key, reader.get(key))
        for name, spec in layers.items():
            if name in select:
                from rankwise.surgery.select import dense_select_tensors

                for k, v in dense_select_tensors(spec, lambda key, n=name: reader.get(f"{n}.{key}")).items():
                    writer.add(f"{name}.{k}", v)
                continue
            B, A = reader.get(f"{name}.B.weight"), reader.get(f"{name}.A.weight")
            dt = torch.promote_types(A.dtype, torch.float32)
            W = (B.to(dt) @ A.to(dt)).to(A.dtype)
            writer.add(f"{name}.weight", W.T.contiguous() if spec.get("kind") == "conv1d" else W)
            if spec.get("bias"):
                writer.add(f"{name}.bias", reader.get(f"{name}.B.bias"))
        writer.close()
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg.pop("transformers_weights", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for extra in folder.iterdir():
            if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name not in (
                    "config.json", "rankwise.json", "model.safetensors.index.json"):
                (tmp / extra.name).write_bytes(extra.read_bytes())
    reader.close()
    return Path(out)
