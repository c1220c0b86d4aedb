"""Read and write (possibly sharded) safetensors checkpoints, validating everything before reading a tensor.

:class:`CheckpointReader` opens a Hugging Face style folder (``config.json`` plus
``model.safetensors`` or ``model.safetensors.index.json`` with its shards) and
refuses, with one line and before any tensor is read or any memory allocated:

* a ``config.json`` that is missing, not a JSON object, or without ``model_type``
  (the class is always chosen through transformers' Auto mappings, never by a
  name looked up on the ``transformers`` module);
* an index that names a shard outside the folder (absolute path, ``..``, a
  symlink leading out) or a shard that does not exist, or a key that is not in
  the shard the index names;
* a shard whose header safetensors cannot parse (truncated, corrupt);
* a config whose sizes are absurd (non-positive or huge dimensions) or imply far
  more parameters than the files hold (checked from the headers alone).

Tensors are read one at a time with ``safetensors.safe_open`` (memory-mapped).

:class:`ShardedWriter` writes tensors as they come (a shard is flushed when the
next tensor would make it exceed ``max_shard_size``) and names the result the way
transformers does: ``model.safetensors`` when everything fits in one shard,
otherwise ``model-0000k-of-0000N.safetensors`` plus ``model.safetensors.index.json``
(``metadata.total_size`` and ``weight_map``). :meth:`ShardedWriter.close` returns
the sha256 of every file written, which :func:`rankwise.io.checkpoint.write_checkpoint_metadata`
records and :meth:`CheckpointReader.verify` checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from rankwise.errors import DAMAGED_FILE_ERRORS, RankwiseError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

#: safetensors dtype codes → torch dtypes (the ones torch can hold)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2} if hasattr(torch, "float8_e4m3fn") else {}),
    **({"U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64} if hasattr(torch, "uint16") else {}),
}

#: a config dimension above this is refused outright (2**24 = 16.7 M: no real hidden size or vocabulary is larger)
MAX_DIM = 1 << 24
#: a layer count above this is refused outright
MAX_LAYERS = 1 << 14
#: the parameters a config implies may exceed the parameters on disk by this factor (factorised and
#: quantised checkpoints hold fewer numbers than their dense config implies) before it is refused as absurd
MAX_IMPLIED_RATIO = 64.0
_SIZE_KEYS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "n_embd", "n_inner", "n_head", "n_positions", "d_model",
              "ffn_dim", "d_ff")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"`` (transformers' rules)."""
    if isinstance(size, bool):
        raise RankwiseError(f"max_shard_size must be a size such as '5GB' or a number of bytes, got {size!r}.")
    if isinstance(size, int):
        n = size
    else:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            n = convert_file_size_to_int(str(size).strip())
        except (ValueError, TypeError) as exc:
            raise RankwiseError(
                f"max_shard_size {size!r} is not a size; use e.g. '5GB', '500MB', '2GiB' or a number of bytes."
            ) from exc
        if not isinstance(n, int):
            raise RankwiseError(f"max_shard_size {size!r} is not a size; use e.g. '5GB' or a number of bytes.")
    if n < 1:
        raise RankwiseError(f"max_shard_size must be positive, got {size!r}.")
    return int(n)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:160] if text else type(exc).__name__)


def read_config_dict(folder: Path) -> dict[str, Any]:
    """``config.json`` as a dict, with one-line errors for a missing/unreadable file or a missing ``model_type``."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise RankwiseError(f"{folder} has no {CONFIG_NAME}; pass a folder written by save_pretrained "
                            "or rankwise.save.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RankwiseError(f"{path} is not readable JSON ({_first_line(exc)}); the checkpoint is corrupt.") from exc
    if not isinstance(cfg, dict):
        raise RankwiseError(f"{path} holds a JSON {type(cfg).__name__}, not an object; the checkpoint is corrupt.")
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise RankwiseError(
            f"{path} has no model_type, so no transformers architecture can be chosen for it; "
            "the config is incomplete (write it with save_pretrained)."
        )
    return cfg


def _inside(folder: Path, name: Any) -> Path:
    """``folder/name`` if ``name`` is a plain relative file name that stays inside ``folder``; else an error."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise RankwiseError(f"the shard index of {folder} names a file {name!r} that is not a file name; "
                            "the index is corrupt.")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise RankwiseError(f"the shard index of {folder} names {name!r}, outside the folder; refusing to read it.")
    root = folder.resolve()
    full = (folder / p).resolve()
    if full != root and root not in full.parents:
        raise RankwiseError(f"the shard index of {folder} names {name!r}, which leads outside the folder "
                            "(a symbolic link); refusing to read it.")
    return folder / p


def implied_parameters(cfg: dict[str, Any]) -> int:
    """A rough count of the parameters a (decoder or encoder) config implies, from its sizes alone.

    Used only to refuse configs that would need absurd memory before anything is built;
    exact shapes are compared against a meta-device skeleton later.
    """
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg

    def num(*keys: str) -> int | None:
        for k in keys:
            v = text.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    h = num("hidden_size", "n_embd", "d_model") or 0
    inter = num("intermediate_size", "n_inner", "ffn_dim", "d_ff") or 4 * h
    layers = num(*_LAYER_KEYS) or 0
    vocab = num("vocab_size") or 0
    return layers * (4 * h * h + 3 * h * inter) + vocab * h


def check_config_sizes(cfg: dict[str, Any], where: Path) -> None:
    """Refuse non-positive, non-integer or absurdly large sizes in a config (one line naming the key)."""
    dicts = [cfg] + [v for v in cfg.values() if isinstance(v, dict) and "model_type" in v]
    for d in dicts:
        for key in (*_SIZE_KEYS, *_LAYER_KEYS):
            if key not in d or d[key] is None:
                continue
            v = d[key]
            limit = MAX_LAYERS if key in _LAYER_KEYS else MAX_DIM
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > limit:
                raise RankwiseError(
                    f"{where / CONFIG_NAME}: {key} = {v!r} is not a plausible size (an integer in 0..{limit}); "
                    "refusing the checkpoint before allocating anything."
                )


class CheckpointReader:
    """Validated, tensor-at-a-time access to the safetensors of a Hugging Face style folder.

    ``keys()``, ``shape(k)``, ``dtype(k)`` read only the headers; ``get(k)`` reads one
    tensor; ``get_prefix(p)`` all tensors under ``p.``; ``config`` is the
    transformers config (built through ``AutoConfig``, i.e. from ``model_type``);
    ``torch_dtype`` the checkpoint's dtype; ``files`` the tensor files (relative names).
    """

    def __init__(self, folder: str | os.PathLike, check_sizes: bool = True) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise RankwiseError(f"checkpoint folder {self.folder} does not exist.")
        self.config_dict = read_config_dict(self.folder)
        check_config_sizes(self.config_dict, self.folder)
        self._where: dict[str, str] = {}  # key → relative file name
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # key → (shape, dtype code)
        self.index: dict[str, Any] | None = None
        single = self.folder / SAFE_WEIGHTS_NAME
        index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            self.index = self._read_index(index)
            files = sorted(set(self.index["weight_map"].values()))
        elif single.is_file():
            files = [SAFE_WEIGHTS_NAME]
        else:
            raise RankwiseError(
                f"{self.folder} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; "
                "it holds no safetensors weights."
            )
        self.files: list[str] = files
        for f in files:
            self._read_header(f)
        if self.index is not None:
            for key, f in self.index["weight_map"].items():
                if self._where.get(key) != f:
                    raise RankwiseError(
                        f"the shard index of {self.folder} puts {key} in {f}, but that shard does not hold it; "
                        "the checkpoint is incomplete or the index is stale."
                    )
        if check_sizes:
            self._check_implied_size()
        self._handles: dict[str, Any] = {}
        self._config = None

    # -- validation --------------------------------------------------------------------------------------------
    def _read_index(self, path: Path) -> dict[str, Any]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RankwiseError(f"{path} is not readable JSON ({_first_line(exc)}); the index is corrupt.") from exc
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise RankwiseError(f"{path} has no weight_map; the shard index is corrupt.")
        for f in set(wm.values()):
            full = _inside(self.folder, f)
            if not full.is_file():
                raise RankwiseError(f"shard {f} named by {path.name} is missing from {self.folder}; "
                                    "copy the complete checkpoint.")
        return index

    def _read_header(self, rel: str) -> None:
        """Shapes and dtypes of one file from its header (safetensors validates offsets against the file size)."""
        from safetensors import safe_open

        path = _inside(self.folder, rel)
        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    shape, code = tuple(int(d) for d in sl.get_shape()), sl.get_dtype()
                    if key in self._where:
                        raise RankwiseError(f"tensor {key} is stored twice ({self._where[key]} and {rel}) in "
                                            f"{self.folder}; the checkpoint is inconsistent.")
                    self._where[key] = rel
                    self._meta[key] = (shape, code)
        except RankwiseError:
            raise
        except DAMAGED_FILE_ERRORS as exc:  # safetensors raises SafetensorError / OSError for damaged headers
            raise RankwiseError(
                f"cannot read the header of {rel} in {self.folder} ({_first_line(exc)}); "
                "the file is truncated or corrupt, copy or write the checkpoint again."
            ) from exc

    def _check_implied_size(self) -> None:
        on_disk = sum(math.prod(s) for s, _ in self._meta.values())
        implied = implied_parameters(self.config_dict)
        if implied > MAX_IMPLIED_RATIO * on_disk + 10_000_000:
            raise RankwiseError(
                f"{self.folder / CONFIG_NAME} implies about {implied:,} parameters but the safetensors hold "
                f"{on_disk:,}; the config does not match its weights (refusing before allocating memory)."
            )

    def verify(self, checksums: dict[str, str]) -> None:
        """Compare the sha256 of every tensor file with ``checksums`` ({file: hex}); one line naming a mismatch."""
        if not isinstance(checksums, dict):
            raise RankwiseError(f"the checksums recorded for {self.folder} are not a mapping; the metadata is corrupt.")
        for name in sorted(set(self.files) | ({SAFE_WEIGHTS_INDEX_NAME} if self.index is not None else set())):
            want = checksums.get(name)
            if want is None:
                if name == SAFE_WEIGHTS_INDEX_NAME:
                    continue
                raise RankwiseError(f"{name} in {self.folder} has no recorded sha256; the metadata does not "
                                    "describe these weights (write the checkpoint again).")
            got = sha256_file(self.folder / name)
            if got != want:
                raise RankwiseError(
                    f"{name} in {self.folder} has sha256 {got[:12]}…, but {want[:12]}… was recorded when it was "
                    "written: the file is damaged (a flipped bit or a partial copy); copy it again."
                )

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every key of ``expected`` that the checkpoint holds must have that shape (one line naming the first not)."""
        for key, shape in expected.items():
            got = self._meta.get(key)
            if got is not None and tuple(got[0]) != tuple(shape):
                raise RankwiseError(
                    f"tensor {key} in {self.folder} has shape {list(got[0])} but the config implies {list(shape)}; "
                    "the checkpoint does not match its config.json."
                )

    # -- access ------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def _entry(self, key: str) -> tuple[tuple[int, ...], str]:
        try:
            return self._meta[key]
        except KeyError:
            raise RankwiseError(f"tensor {key} is not in the checkpoint {self.folder}.") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        code = self._entry(key)[1]
        if code not in _DTYPES:
            raise RankwiseError(f"tensor {key} in {self.folder} has dtype {code}, which torch cannot hold.")
        return _DTYPES[code]

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * self.dtype(key).itemsize

    @property
    def total_size(self) -> int:
        """Bytes of tensor data over all files."""
        return sum(self.nbytes(k) for k in self._where)

    def get(self, key: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from its file (optionally moved/cast)."""
        from safetensors import safe_open

        rel = self._where.get(key)
        if rel is None:
            raise RankwiseError(f"tensor {key} is not in the checkpoint {self.folder}.")
        try:
            fh = self._handles.get(rel)
            if fh is None:
                fh = self._handles[rel] = safe_open(str(self.folder / rel), framework="pt")
            t = fh.get_tensor(key)
        except DAMAGED_FILE_ERRORS as exc:  # SafetensorError for a truncated buffer, OSError for a vanished file
            raise RankwiseError(f"cannot read tensor {key} from {rel} in {self.folder} ({_first_line(exc)}); "
                                "the file is damaged, copy or write it again.") from exc
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype)
        return t

    def get_prefix(self, prefix: str, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{key without ``prefix.``: tensor} for every key under ``prefix`` (all keys for ``""``)."""
        p = prefix + "." if prefix else ""
        return {k[len(p):]: self.get(k, device, dtype) for k in self._where if k.startswith(p)}

    @property
    def config(self):
        """The transformers config (``AutoConfig``: the class comes from ``model_type`` via its mapping)."""
        if self._config is None:
            from transformers import AutoConfig

            try:
                self._config = AutoConfig.from_pretrained(str(self.folder))
            except (ValueError, KeyError, OSError, TypeError) as exc:
                raise RankwiseError(f"cannot read the config of {self.folder} ({_first_line(exc)}).") from exc
        return self._config

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The checkpoint's dtype: ``config.json``'s ``dtype``/``torch_dtype``, else the first float tensor's."""
        name = self.config_dict.get("dtype") or self.config_dict.get("torch_dtype")
        by_name = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float64": torch.float64}
        if isinstance(name, str) and name in by_name:
            return by_name[name]
        for key in self._where:
            dt = _DTYPES.get(self._meta[key][1])
            if dt is not None and dt.is_floating_point:
                return dt
        return None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardedWriter:
    """Write tensors as they come into transformers-named safetensors shards.

    ``add(name, tensor)`` buffers a tensor on the CPU; when the buffer would exceed
    ``max_shard_size`` bytes it is written out as one shard, so at most one shard is
    held in memory. ``close()`` names the files (``model.safetensors`` for one
    shard, ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``
    otherwise) and returns ``{file name: sha256}``. ``folder`` should be a
    temporary folder that the caller renames into place (see :mod:`rankwise.io.atomic`).
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "5GB",
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._ptrs: set[int] = set()
        self._parts: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_size = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name`` (copied to the CPU; flushed with its shard)."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if name in self._names:
            raise RankwiseError(f"tensor {name} was written twice; a checkpoint holds each name once.")
        t = tensor.detach()
        if t.device.type == "meta":
            raise RankwiseError(f"tensor {name} is on the meta device (never loaded); nothing to write.")
        t = t.to("cpu").contiguous()
        if t.numel() and (t.data_ptr() in self._ptrs or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()  # shared (tied) or partial storage: safetensors stores each tensor on its own
        nbytes = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_bytes:
            self._flush()
        self._names.add(name)
        self._buf[name] = t
        if t.numel():
            self._ptrs.add(t.data_ptr())
        self._buf_bytes += nbytes
        self.total_size += nbytes

    def add_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.add(k, v)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        path = self.folder / f".part-{len(self._parts):05d}.safetensors.tmp"
        save_file(self._buf, str(path), metadata=self.metadata)
        self._parts.append((path, list(self._buf)))
        self._buf, self._buf_bytes, self._ptrs = {}, 0, set()

    def close(self) -> dict[str, str]:
        """Write the last shard, name all files (and the index); ``{file name: sha256}`` of every file written."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if not self._parts and not self._buf:
            raise RankwiseError("no tensors to write; the model has no parameters.")
        self._flush()
        self._closed = True
        n = len(self._parts)
        sums: dict[str, str] = {}
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._parts, 1):
            final = SAFE_WEIGHTS_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / final)
            sums[final] = sha256_file(self.folder / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            sums[SAFE_WEIGHTS_INDEX_NAME] = sha256_file(self.folder / SAFE_WEIGHTS_INDEX_NAME)
        return sums

    def abort(self) -> None:
        """Remove the shards written so far (the caller's temporary folder usually takes care of this)."""
        for tmp, _ in self._parts:
            tmp.unlink(missing_ok=True)
        self._parts, self._buf, self._closed = [], {}, True
