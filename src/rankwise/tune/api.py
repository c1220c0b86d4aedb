"""Attach, merge, save, load and export spectral adapters (the ``rankwise.tune`` API).

``apply`` works in place, like PEFT's ``inject_adapter_in_model``: each targeted
layer is replaced by an :class:`~rankwise.tune.base.AdapterLayer` wrapping the
original module, every other parameter is frozen, and the model stays a plain
Hugging Face model (``Trainer``, ``generate`` and a hand-written loop all work).
The adapter's bookkeeping lives in ``model.rankwise_adapter``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import DAMAGED_FILE_ERRORS, RankwiseError
from rankwise.io.atomic import atomic_dir
from rankwise.progress import progress as progress_bar
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.modules import get_module, set_module
from rankwise.surgery.targets import find_targets, is_matrix_module
from rankwise.tune.base import AdapterLayer
from rankwise.tune.config import AdapterConfig
from rankwise.tune.registry import LOWRANK_METHODS, PEFT_EXPORTABLE, PEFT_METHODS, layer_factory

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "rankwise_adapter.json"
FORMAT = "rankwise-adapter/1"


# -- discovery ------------------------------------------------------------------------------------
def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """{module name: adapter layer} for every rankwise adapter layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _require_adapter(model: nn.Module) -> dict[str, AdapterLayer]:
    layers = adapter_layers(model)
    if not layers or not hasattr(model, "rankwise_adapter"):
        raise RankwiseError("the model has no rankwise adapter; call rankwise.tune.apply(model, AdapterConfig(...)).")
    return layers


def _modules_to_save(model: nn.Module, pattern: str | None) -> list[str]:
    """Top-level module names matching ``pattern`` (a matching module's children are included by it)."""
    if not pattern:
        return []
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise RankwiseError(f"modules_to_save is not a valid regular expression ({exc}).") from exc
    names: list[str] = []
    for name, mod in model.named_modules():
        if not name or not rx.search(name) or any(name.startswith(p + ".") for p in names):
            continue
        if next(mod.parameters(), None) is None:
            continue
        names.append(name)
    if not names:
        raise RankwiseError(f"modules_to_save {pattern!r} matches no module with parameters.")
    return names


def _select_targets(model: nn.Module, config: AdapterConfig, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs the adapter attaches to, in module order."""
    inside = tuple(s + "." for s in skip)
    if config.method in LOWRANK_METHODS:
        try:
            rx = re.compile(config.targets) if config.targets else None
            ex = re.compile(config.exclude) if config.exclude else None
        except re.error as exc:
            raise RankwiseError(f"--targets is not a valid regular expression ({exc}).") from exc
        all_lrl = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
        if not all_lrl:
            raise RankwiseError(
                f"method {config.method} trains the factors of a compressed model, but this model has no "
                "LowRankLinear layers; load the output of `rankwise compress` (rankwise.load) or use lora/pissa."
            )
        out = [
            (n, m) for n, m in all_lrl
            if (rx is None or rx.search(n)) and not (ex and ex.search(n)) and n not in skip and not n.startswith(inside)
        ]
        if not out:
            names = ", ".join(n for n, _ in all_lrl[:5])
            raise RankwiseError(
                f"targets {config.targets!r} match no LowRankLinear layer; available names include: {names}."
            )
        return out
    found = find_targets(model, pattern=config.targets, exclude=config.exclude)
    out = [(t.name, t.module) for t in found if t.name not in skip and not t.name.startswith(inside)]
    if not out:
        raise RankwiseError(
            f"targets {config.targets!r} match only modules_to_save layers; give --targets that select "
            "linear layers of the body, e.g. 'q_proj|v_proj'."
        )
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def base_fingerprint(modules: list[tuple[str, nn.Module]]) -> str:
    """sha256 over (name, shape, dtype, bytes) of the targeted base weights, in the given order.

    For dense layers the weight is hashed in the module's own storage; for
    LowRankLinear layers its A and B factors. ``load_adapter`` recomputes it on
    the model it is given and refuses a different base.
    """
    h = hashlib.sha256()
    for name, mod in modules:
        tensors = [mod.A.weight, mod.B.weight] if isinstance(mod, LowRankLinear) else [mod.weight]
        for t in tensors:
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


# -- apply / merge --------------------------------------------------------------------------------
def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (adapter parameters and modules_to_save)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_loaded(layer: nn.Module, name: str) -> None:
    """A layer rebuilt from saved tensors must give an m×n update (wrong shapes fail here, not in forward)."""
    try:
        d = layer.delta_weight()
    except (RuntimeError, ValueError, IndexError) as exc:
        raise RankwiseError(f"the saved adapter tensors of {name} do not fit together "
                            f"({str(exc).splitlines()[0][:80]}); the adapter file is corrupt or from another "
                            "model.") from exc
    if tuple(d.shape) != (layer.m, layer.n):
        raise RankwiseError(f"the saved adapter tensors of {name} give a {tuple(d.shape)} update for its "
                            f"{layer.m}x{layer.n} weight; the adapter file is corrupt or from another model.")


def _attach(
    model: nn.Module,
    config: AdapterConfig,
    targets: list[tuple[str, nn.Module]],
    mts: list[str],
    states: dict[str, dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> nn.Module:
    factory = layer_factory(config.method)
    fingerprint = base_fingerprint(targets)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    it = progress_bar(targets, desc=f"rankwise.tune {config.method} init", unit="layer",
                      enabled=progress and len(targets) > 8)
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, mod in it:
            layer = factory(mod, config, name, state=None if states is None else states.get(name, {}))
            if states is not None:
                _check_loaded(layer, name)
            set_module(model, name, layer)
            done.append((name, layer))
    except BaseException:  # leave the model as it was (e.g. a rank error on the 5th layer)
        for name, layer in reversed(done):
            set_module(model, name, layer.original_module())
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    for name in mts:
        for p in get_module(model, name).parameters():
            p.requires_grad_(True)
    model.rankwise_adapter = {
        "config": config,
        "fingerprint": fingerprint,
        "targets": [n for n, _ in targets],
        "modules_to_save": mts,
    }
    return model


def apply(model: nn.Module, config: AdapterConfig, data: Iterable[dict[str, torch.Tensor]] | None = None,
          progress: bool = True) -> nn.Module:
    """Attach the adapter described by ``config`` to ``model`` and return the model to train.

    Native methods work in place and return ``model``; PEFT-backed methods
    (:data:`~rankwise.tune.registry.PEFT_METHODS`) return the ``peft.PeftModel``
    wrapping it. ``data``: training batches (dicts of tensors) for the
    data-driven inits (lora-ga's gradients, eva's and corda's activations); the
    first ``config.init_batches`` are used. Only adapter parameters (and
    ``config.modules_to_save``) require grad afterwards. Raises
    :class:`RankwiseError` for an unknown method, a rank outside
    (0, min(m, n)), targets that match nothing, a layer type the method cannot
    adapt, or a model that already carries an adapter (rankwise's or PEFT's:
    no LoRA on LoRA).
    """
    from rankwise.tune.peft_backend import PEFT_BUILDERS, is_peft_model, peft_layers

    if not isinstance(config, AdapterConfig):
        raise RankwiseError("apply needs an AdapterConfig, e.g. AdapterConfig(method='lora', rank=8).")
    config.validate()
    if adapter_layers(model):
        raise RankwiseError("the model already has a rankwise adapter; call rankwise.tune.unload(model) first.")
    if is_peft_model(model):
        kinds = sorted({type(m).__name__ for m in peft_layers(model).values()})
        raise RankwiseError(
            f"the model is already PEFT-wrapped ({', '.join(kinds) or 'PeftModel'} layers): no adapter on an "
            "adapter; merge it first (model.merge_and_unload()) or keep training that adapter."
        )
    mts = _modules_to_save(model, config.modules_to_save)
    if config.method in PEFT_METHODS:
        pm_targets = _select_peft_targets(model, config, mts)
        fingerprint = base_fingerprint(pm_targets)
        pm = PEFT_BUILDERS[config.method].build(model, config, pm_targets, mts, data=data, progress=progress)
        pm.rankwise_adapter = {"config": config, "fingerprint": fingerprint,
                               "targets": [n for n, _ in pm_targets], "modules_to_save": mts, "backend": "peft"}
        return pm
    targets = _select_targets(model, config, mts)
    if config.method == "lora-ga":
        _gradients_for_init(model, targets, data, config)
    try:
        return _attach(model, config, targets, mts, progress=progress)
    finally:
        from rankwise.tune.loraga import GRAD_ATTR

        for _, mod in targets:
            if hasattr(mod, GRAD_ATTR):
                delattr(mod, GRAD_ATTR)


def _select_peft_targets(model: nn.Module, config: AdapterConfig, skip: list[str]) -> list[tuple[str, nn.Module]]:
    """Targets handed to PEFT: the matching Linear/Conv1D layers and, in a compressed model, the
    ``nn.Linear`` factors (``.A``, ``.B``) of matching LowRankLinear layers (PEFT wraps those, not the
    composite). Modules of other types that the regex selects are returned too, so the method's check
    can name their type."""
    from rankwise.surgery.targets import Conv1D

    try:
        rx = re.compile(config.targets) if config.targets else None
        ex = re.compile(config.exclude) if config.exclude else None
    except re.error as exc:
        raise RankwiseError(f"--targets is not a valid regular expression ({exc}); e.g. 'q_proj|v_proj'.") from exc
    inside = tuple(s + "." for s in skip)
    heads = {t.name for t in find_targets(model, include_heads=True)} - {t.name for t in find_targets(model)} \
        if config.targets is None else set()
    out: list[tuple[str, nn.Module]] = []
    lowrank = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name, mod in model.named_modules():
        if not name or name in skip or name.startswith(inside) or name in heads or (ex and ex.search(name)):
            continue
        parent = name.rpartition(".")[0]
        if parent in lowrank:  # a factor: selected through its LowRankLinear
            continue
        if isinstance(mod, LowRankLinear):
            if rx is None or rx.search(name):
                kids = [(f"{name}.{k}", getattr(mod, k)) for k in ("A", "B")]
                out += kids if all(isinstance(m, nn.Module) for _, m in kids) else [(name, mod)]
            continue
        if isinstance(mod, (nn.Linear, Conv1D)):
            if rx is None or rx.search(name):
                out.append((name, mod))
        elif rx is not None and rx.search(name) and any(True for _ in mod.parameters(recurse=False)):
            out.append((name, mod))
    if not out:
        raise RankwiseError(f"targets {config.targets!r} match no linear layer; e.g. --targets 'q_proj|v_proj'.")
    return out


def _gradients_for_init(model: nn.Module, targets: list[tuple[str, nn.Module]],
                        data: Iterable[dict[str, torch.Tensor]] | None, config: AdapterConfig) -> None:
    """LoRA-GA: average ∂L/∂W of every target over the first ``config.init_batches`` batches (m×n, float32)."""
    from rankwise.surgery.targets import Target
    from rankwise.tune.loraga import GRAD_ATTR

    batches = [dict(b) for b in (data or [])][: config.init_batches]
    if not batches:
        raise RankwiseError("lora-ga initialises from gradients: pass training batches, "
                            "rankwise.tune.apply(model, config, data=batches) (the CLI uses --data).")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    sums = {name: None for name, _ in targets}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for _, mod in targets:
            mod.weight.requires_grad_(True)
        model.train()
        device = next(model.parameters()).device
        for b in batches:
            loss = model(**{k: v.to(device) for k, v in b.items()}).loss
            loss.backward()
            for name, mod in targets:
                g = mod.weight.grad.detach().float()
                sums[name] = g if sums[name] is None else sums[name] + g
                mod.weight.grad = None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    for name, mod in targets:
        g = sums[name] / len(batches)
        setattr(mod, GRAD_ATTR, g.T if Target(name, mod).transposed else g)


def set_eval_rank(model: nn.Module, rank: int) -> nn.Module:
    """DyLoRA: use the first ``rank`` components at inference in every layer (1 ≤ rank ≤ trained rank)."""
    layers = _require_adapter(model)
    cfg: AdapterConfig = model.rankwise_adapter["config"]
    if cfg.method != "dylora":
        raise RankwiseError(f"--eval-rank applies to dylora only (this adapter is {cfg.method}).")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= cfg.r:
        raise RankwiseError(f"--eval-rank {rank} is above the trained rank {cfg.r} (or below 1); DyLoRA serves "
                            f"every rank from 1 to {cfg.r}.")
    for layer in layers.values():
        layer.set_eval_rank(rank)
    cfg.eval_rank = rank
    return model


def _peft_backed(model: nn.Module) -> bool:
    info = getattr(model, "rankwise_adapter", None)
    return isinstance(info, dict) and info.get("backend") == "peft"


def _all_merged(layers: dict[str, AdapterLayer]) -> bool:
    return all(layer.merged for layer in layers.values())


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + ΔW); merging twice is an error."""
    if _peft_backed(model):
        if getattr(model, "_rankwise_merged", False):
            raise RankwiseError("the adapter is already merged; merge twice is an error (call unmerge first).")
        model.merge_adapter()
        model._rankwise_merged = True
        return model
    layers = _require_adapter(model)
    if any(layer.merged for layer in layers.values()):
        raise RankwiseError("the adapter is already merged; merge twice is an error (call unmerge first).")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (W ← W − ΔW), restoring the base weights within float rounding."""
    if _peft_backed(model):
        if not getattr(model, "_rankwise_merged", False):
            raise RankwiseError("the adapter is not merged; nothing to unmerge.")
        model.unmerge_adapter()
        model._rankwise_merged = False
        return model
    layers = _require_adapter(model)
    if not _all_merged(layers):
        raise RankwiseError("the adapter is not merged; nothing to unmerge.")
    for layer in layers.values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every adapter layer by its (now fine-tuned) base module: a plain model.

    Returns the plain model (for a PEFT-backed adapter, the unwrapped base; use the return value)."""
    if _peft_backed(model):
        if getattr(model, "_rankwise_merged", False):
            model.unmerge_adapter()
        return model.merge_and_unload()
    layers = _require_adapter(model)
    if not _all_merged(layers):
        merge(model)
    for name, layer in layers.items():
        set_module(model, name, layer.base)
    del model.rankwise_adapter
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter and give the original base weights back (residual methods add W_init back).

    PEFT-backed adapters: ``PeftModel.unload()`` (olora/corda/loftq leave PEFT's modified base weights)."""
    if _peft_backed(model):
        return model.unload()
    layers = _require_adapter(model)
    for name, layer in layers.items():
        set_module(model, name, layer.original_module())
    del model.rankwise_adapter
    return model


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the adapters' extra loss terms (SORSA's orthogonality penalty); 0 when there are none."""
    terms = [t for layer in adapter_layers(model).values() if (t := layer.regularization()) is not None]
    if not terms:
        p = next(model.parameters())
        return torch.zeros((), device=p.device, dtype=torch.float32)
    return torch.stack([t.float() for t in terms]).sum()


def closed_form_trainable(model: nn.Module) -> int:
    """Trainable parameters by each method's formula (plus modules_to_save); equals :func:`trainable_parameters`."""
    if _peft_backed(model):
        from rankwise.tune import peft_backend

        return peft_backend.closed_form_trainable(model)
    layers = _require_adapter(model)
    total = sum(layer.closed_form_params() for layer in layers.values())
    for name in model.rankwise_adapter["modules_to_save"]:
        total += sum(p.numel() for p in get_module(model, name).parameters())
    return total


def adapter_summary(model: nn.Module) -> dict[str, Any]:
    """Method, ranks, targets and parameter counts of the attached adapter (what rankwise_adapter.json holds)."""
    if _peft_backed(model):
        from rankwise.tune.peft_backend import peft_layers

        info = model.rankwise_adapter
        cfg = info["config"]
        base = model.get_base_model()
        return {
            "format": FORMAT, "backend": "peft", "method": cfg.method, "rank": cfg.rank,
            "ranks": {n.removeprefix("base_model.model."): int(m.r["default"]) for n, m in peft_layers(model).items()
                      if isinstance(getattr(m, "r", None), dict) and "default" in m.r},
            "targets": list(info["targets"]), "modules_to_save": list(info["modules_to_save"]),
            "trainable_parameters": int(closed_form_trainable(model)),
            "total_parameters": int(sum(p.numel() for p in model.parameters())),
            "base_fingerprint": info["fingerprint"],
            "base_model": str(getattr(getattr(base, "config", None), "_name_or_path", "") or ""),
            "config": cfg.to_dict(),
        }
    layers = _require_adapter(model)
    info = model.rankwise_adapter
    cfg: AdapterConfig = info["config"]
    total = sum(p.numel() for p in model.parameters())
    n_train = trainable_parameters(model) if any(p.requires_grad for p in model.parameters()) else (
        closed_form_trainable(model))
    return {
        "format": FORMAT,
        "method": cfg.method,
        "rank": cfg.rank,
        "ranks": {n: layer.rank for n, layer in layers.items()},
        "targets": list(info["targets"]),
        "modules_to_save": list(info["modules_to_save"]),
        "trainable_parameters": int(n_train),
        "total_parameters": int(total),
        "base_fingerprint": info["fingerprint"],
        "base_model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
        "config": cfg.to_dict(),
    }


# -- save / load ----------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``adapter.safetensors`` + ``rankwise_adapter.json`` to ``path`` (atomically).

    The tensors are each layer's parameters and the frozen buffers needed to
    rebuild it (``<module>.<tensor>``) plus the full state of modules_to_save.
    ``extra`` is merged into the JSON (e.g. task, labels, training record).
    """
    from safetensors.torch import save_file

    from rankwise import __version__

    if _peft_backed(model):
        from rankwise.tune import peft_backend

        record = {**adapter_summary(model), "rankwise_version": __version__, **(extra or {})}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            peft_backend.save(model, tmp, record)
        return Path(path)
    layers = _require_adapter(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for k, v in layer.saved_tensors().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    for name in model.rankwise_adapter["modules_to_save"]:
        for k, v in get_module(model, name).state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    record = {**adapter_summary(model), "rankwise_version": __version__, **(extra or {})}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(record, indent=2))
    return Path(path)


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rankwise_adapter.json`` of an adapter folder (one-line error if missing or unreadable)."""
    folder = Path(path).expanduser()
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise RankwiseError(f"{folder} has no {META_FILE}; pass a folder written by rankwise.tune.save_adapter.")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise RankwiseError(f"{meta_file} is not valid JSON ({exc}); save the adapter again.") from exc


def load_adapter(model: nn.Module, path: str | os.PathLike, progress: bool = True) -> nn.Module:
    """Attach the adapter saved in ``path`` to ``model`` (in place), after checking the base fingerprint."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    meta = read_adapter_meta(folder)
    if adapter_layers(model):
        raise RankwiseError("the model already has a rankwise adapter; call rankwise.tune.unload(model) first.")
    if meta.get("backend") == "peft":  # PEFT's own folder + rankwise_adapter.json: returns the PeftModel
        from rankwise.tune import peft_backend

        check_fingerprint(model, folder, meta)
        return peft_backend.load(model, folder, meta)
    try:
        config = AdapterConfig.from_dict(meta["config"]).validate()
        names: list[str] = list(meta["targets"])
        mts: list[str] = list(meta.get("modules_to_save", []))
        expected = meta["base_fingerprint"]
    except KeyError as exc:
        raise RankwiseError(f"{folder / META_FILE} lacks {exc}; save the adapter again.") from exc
    targets: list[tuple[str, nn.Module]] = []
    for name in names:
        try:
            mod = get_module(model, name)
        except AttributeError as exc:
            raise RankwiseError(
                f"the adapter in {folder} targets {name!r}, which this model lacks; load it on the base model "
                f"it was trained on ({meta.get('base_model') or 'see ' + META_FILE})."
            ) from exc
        ok = isinstance(mod, LowRankLinear) if config.method in LOWRANK_METHODS else is_matrix_module(mod)
        if not ok:
            raise RankwiseError(f"the adapter in {folder} targets {name!r}, which is not the right kind of layer here.")
        targets.append((name, mod))
    got = base_fingerprint(targets)
    if got != expected:
        raise RankwiseError(
            f"the adapter in {folder} was made for a different base model (weights fingerprint {expected[:12]}…, "
            f"this model {got[:12]}…); load it on the model it was trained on "
            f"({meta.get('base_model') or 'see ' + META_FILE})."
        )
    try:
        flat = load_file(str(folder / ADAPTER_FILE))
    except DAMAGED_FILE_ERRORS as exc:
        raise RankwiseError(
            f"cannot read {folder / ADAPTER_FILE} ({type(exc).__name__}); the adapter is corrupt, save it again."
        ) from exc
    for key, value in flat.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RankwiseError(f"adapter tensor {key} in {folder} holds {int((~torch.isfinite(value)).sum())} "
                                "NaN/Inf value(s); the adapter is broken, train or save it again.")
    states: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, value in flat.items():
        owner, _, leaf = key.rpartition(".")
        if owner in states:
            states[owner][leaf] = value
    for name in mts:
        mod = get_module(model, name)
        sub = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")}
        own = mod.state_dict()
        bad = [k for k, v in own.items() if k not in sub or tuple(sub[k].shape) != tuple(v.shape)]
        if bad:
            raise RankwiseError(
                f"saved tensors of {name} do not fit this model ({bad[0]}: "
                f"{tuple(own[bad[0]].shape)} here); build the model with the same head (e.g. num_labels)."
            )
        mod.load_state_dict({k: sub[k] for k in own})
    return _attach(model, config, targets, mts, states=states, progress=progress)


@torch.no_grad()
def restore_adapter_tensors(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Copy the tensors of a saved adapter into the adapter already attached to ``model`` (Trainer resume).

    The folder must hold the same method and layers (a checkpoint of this run); shapes are checked.
    """
    from safetensors.torch import load_file

    layers = _require_adapter(model)
    folder = Path(path).expanduser()
    meta = read_adapter_meta(folder)
    if meta.get("method") != model.rankwise_adapter["config"].method or sorted(meta.get("targets", [])) != sorted(
            model.rankwise_adapter["targets"]):
        raise RankwiseError(f"the checkpoint in {folder} holds another adapter ({meta.get('method')}); resume with "
                            "the same --method and --targets.")
    flat = load_file(str(folder / ADAPTER_FILE))
    own: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for k in layer.saved_tensors():
            own[f"{name}.{k}"] = getattr(layer, k)
    for name in model.rankwise_adapter["modules_to_save"]:
        for k, v in get_module(model, name).state_dict(keep_vars=True).items():
            own[f"{name}.{k}"] = v
    for key, dst in own.items():
        src = flat.get(key)
        if src is None or tuple(src.shape) != tuple(dst.shape):
            raise RankwiseError(f"the checkpoint in {folder} lacks {key} or has another shape; it is not from "
                                "this run.")
        dst.data.copy_(src.to(device=dst.device, dtype=dst.dtype))
    return model


def check_fingerprint(model: nn.Module, folder: Path, meta: dict[str, Any]) -> None:
    """One-line error unless the targets recorded in ``meta`` exist in ``model`` with the same weights."""
    try:
        names, expected = list(meta["targets"]), meta["base_fingerprint"]
    except KeyError as exc:
        raise RankwiseError(f"{folder / META_FILE} lacks {exc}; save the adapter again.") from exc
    targets: list[tuple[str, nn.Module]] = []
    for name in names:
        try:
            targets.append((name, get_module(model, name)))
        except AttributeError:
            raise RankwiseError(
                f"the adapter in {folder} was made for another base ({meta.get('base_model') or 'see ' + META_FILE}):"
                f" this model lacks {name!r}."
            ) from None
    try:
        got = base_fingerprint(targets)
    except AttributeError:
        got = ""
    if got != expected:
        raise RankwiseError(
            f"the adapter in {folder} was made for another base model (weights fingerprint {expected[:12]}…, "
            f"this model {got[:12] or 'other layer types'}…); load it on the model it was trained on "
            f"({meta.get('base_model') or 'see ' + META_FILE})."
        )


# -- PEFT export ----------------------------------------------------------------------------------
def _peft_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def _base_ref(model: nn.Module, given: str | None = None) -> str:
    """The base model as ``AutoPeftModel*`` should find it from any directory: a local folder made absolute,
    a hub id (or anything that is not a local folder) unchanged."""
    name = given or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name:
        inner = getattr(getattr(model, "base_model", None), "model", None)  # a PeftModel: its wrapped model
        name = str(getattr(getattr(inner, "config", None), "_name_or_path", "") or "")
    return str(Path(name).expanduser().resolve()) if name and Path(name).expanduser().is_dir() else name


def export_peft(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) equivalent to the adapter.

    ``peft.PeftModel.from_pretrained(original_base, path)`` then gives the same
    outputs as the rankwise-adapted model. ``lora`` maps 1:1. ``pissa`` is
    converted the way PEFT converts PiSSA to LoRA: ΔW = s(BA − B₀A₀) =
    (2α/2r)·[B, −B₀][A; A₀], a rank-2r LoRA on the *original* weights (no
    residual base needed). Other methods raise a one-line error pointing to the
    dense export.
    """
    from safetensors.torch import save_file

    if _peft_backed(model):  # already PEFT's own format (olora/corda converted to a LoRA on the original W)
        from rankwise.tune import peft_backend

        with atomic_dir(path, overwrite=overwrite) as tmp:
            peft_backend.save(model, tmp, None)
            cfg_file = tmp / "adapter_config.json"
            if cfg_file.is_file():  # PEFT writes the base's name as given; make a local folder absolute
                pcfg = json.loads(cfg_file.read_text())
                pcfg["base_model_name_or_path"] = _base_ref(model, pcfg.get("base_model_name_or_path"))
                cfg_file.write_text(json.dumps(pcfg, indent=2))
        return Path(path)
    layers = _require_adapter(model)
    cfg: AdapterConfig = model.rankwise_adapter["config"]
    if cfg.method not in PEFT_EXPORTABLE or any(l_.wraps_lowrank for l_ in layers.values()):
        raise RankwiseError(
            f"PEFT cannot represent a {cfg.method} adapter; export_peft supports {', '.join(PEFT_EXPORTABLE)} only. "
            "Merge it and write a dense folder instead: rankwise.tune.merge(model) + rankwise.export_dense(model, dir) "
            "(CLI: rankwise tune ... --merge DIR)."
        )
    tensors: dict[str, torch.Tensor] = {}
    rank = alpha = None
    fan_in_fan_out = False
    for name, layer in layers.items():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        r, al = layer.rank, layer.lora_alpha
        if cfg.method in ("pissa", "lora-ga"):
            a = torch.cat([a, layer.init_A.detach()], dim=0)
            b = torch.cat([b, -layer.init_B.detach()], dim=1)
            r, al = 2 * r, 2 * al
        rank, alpha = r, al
        fan_in_fan_out = fan_in_fan_out or layer.transposed
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.cpu().contiguous()
    mts = list(model.rankwise_adapter["modules_to_save"])
    for name in mts:
        for k, v in get_module(model, name).state_dict().items():
            tensors[f"base_model.model.{name}.{k}"] = v.detach().cpu().contiguous()
    peft_config = {
        "peft_type": "LORA",
        "task_type": _peft_task_type(model),
        "base_model_name_or_path": _base_ref(model),
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": float(cfg.dropout),
        "target_modules": sorted(layers),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "modules_to_save": mts or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return Path(path)


__all__ = [
    "ADAPTER_FILE",
    "META_FILE",
    "adapter_layers",
    "adapter_summary",
    "apply",
    "base_fingerprint",
    "check_fingerprint",
    "closed_form_trainable",
    "export_peft",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "read_adapter_meta",
    "regularization_loss",
    "restore_adapter_tensors",
    "save_adapter",
    "set_eval_rank",
    "trainable_parameters",
    "unload",
    "unmerge",
]
