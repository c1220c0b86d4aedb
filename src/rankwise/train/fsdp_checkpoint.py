"""Trainer checkpoints of a model sharded with FSDP2 (``fully_shard``) before the Trainer saw it.

``rankwise train --fsdp`` shards the model itself (:func:`rankwise.cli.train_cmd._shard`) and builds
GaLoreAdamW on the row shards, so the Trainer neither wraps nor knows the sharding and has no
checkpoint path for it: its own FSDP save/load goes through Accelerate's FSDP plugin, which is not
in use, and its plain path would write process 0's shards only. :class:`rankwise.training.RankwiseTrainer`
calls these functions instead:

* **model**: :func:`full_state_dict` gathers every DTensor to a full CPU tensor (a collective: every
  process takes part; process 0 receives the tensors) and process 0 writes the usual
  ``model.safetensors`` through ``save_pretrained``, so a checkpoint folder is an ordinary
  transformers folder (``from_pretrained`` reads it). :func:`load_full_state_dict` reads it back on
  every process and distributes each tensor to the local shard (``set_model_state_dict``).
* **optimizer**: its state is sharded like the parameters (GaLoreAdamW's moments and basis chunks,
  AdamW's moments of the local rows), so each process writes its own
  ``optimizer-rank{r}-of-{N}.pt`` and reads its own back. A checkpoint written by another number of
  processes is refused with a one-line error (re-sharding optimizer state is not implemented).

The scheduler, RNG states and ``trainer_state.json`` stay the Trainer's own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError

OPTIMIZER_FILE = "optimizer-rank{rank}-of-{world}.pt"
_OPTIMIZER_RE = re.compile(r"optimizer-rank(\d+)-of-(\d+)\.pt$")


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict as CPU tensors on process 0 (empty elsewhere); call on every process."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_state_dict(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load a checkpoint folder's (whole) weights into the sharded ``model``; call on every process.

    Tied weights that ``save_pretrained`` wrote once (the LM head tied to the embeddings) are filled from
    the tensor they are tied to; any other missing or unexpected key is a one-line error.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    from rankwise.io.shards import CheckpointReader

    reader = CheckpointReader(folder)
    state = {k: reader.get(k, device="cpu") for k in reader.keys()}
    expected = set(model.state_dict())
    tied = _tied_keys(model)
    for key, source in tied.items():
        if key not in state and source in state:
            state[key] = state[source]
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RankwiseError(f"cannot resume from {folder}: the checkpoint's weights do not match this model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); start from the same model.")
    set_model_state_dict(model, state, options=_options(strict=True))


def _tied_keys(model: nn.Module) -> dict[str, str]:
    """State-dict keys of parameters shared with an earlier key (tied weights): later key → first key."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def save_optimizer_shard(optimizer: torch.optim.Optimizer, folder: str | os.PathLike, rank: int,
                         world: int) -> Path:
    """Write this process's optimizer state as ``optimizer-rank{rank}-of-{world}.pt`` (temp name + rename)."""
    path = Path(folder) / OPTIMIZER_FILE.format(rank=rank, world=world)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def has_optimizer_shards(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds per-process optimizer files (a checkpoint of an FSDP run)."""
    return Path(folder).is_dir() and any(_OPTIMIZER_RE.match(p.name) for p in Path(folder).iterdir())


def refuse_unsharded_resume(folder: str | os.PathLike) -> None:
    """One-line error when a run that is not sharded would resume an --fsdp checkpoint (whose optimizer state it
    cannot read: the Trainer would silently start with a fresh optimizer)."""
    if not Path(folder).is_dir() or (Path(folder) / "optimizer.pt").is_file():
        return
    worlds = sorted({int(m.group(2)) for p in Path(folder).iterdir() if (m := _OPTIMIZER_RE.match(p.name))})
    if worlds:
        n = worlds[0]
        raise RankwiseError(f"{folder} was written by an --fsdp run over {n} processes; resume it the same way: "
                            f"torchrun --nproc-per-node {n} -m rankwise train --fsdp ... --resume {folder}")


def load_optimizer_shard(optimizer: torch.optim.Optimizer, folder: str | os.PathLike, rank: int, world: int) -> None:
    """Load this process's optimizer state; one-line error when the checkpoint was written by another world size."""
    folder = Path(folder)
    worlds = sorted({int(m.group(2)) for p in folder.iterdir() if (m := _OPTIMIZER_RE.match(p.name))})
    if not worlds:
        raise RankwiseError(f"cannot resume from {folder}: it holds no per-process optimizer state "
                            "(optimizer-rank*-of-*.pt); it was not written by an --fsdp run.")
    if worlds != [world]:
        raise RankwiseError(f"cannot resume from {folder}: its optimizer state is sharded over {worlds[0]} processes, "
                            f"this run has {world}; resume with torchrun --nproc-per-node {worlds[0]}.")
    path = folder / OPTIMIZER_FILE.format(rank=rank, world=world)
    if not path.is_file():
        raise RankwiseError(f"cannot resume from {folder}: {path.name} is missing (an incomplete checkpoint).")
    optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


__all__ = ["full_state_dict", "has_optimizer_shards", "load_full_state_dict", "load_optimizer_shard",
           "refuse_unsharded_resume", "save_optimizer_shard"]
