"""Models, texts and checkpoints in and out of rankwise.

Names are imported on first access (PEP 562) so that importing a light submodule
(``rankwise.io.atomic``, ``rankwise.io.texts``) does not import torch.
"""

from __future__ import annotations

from rankwise._lazy import attach

_LAZY: dict[str, str] = {
    "atomic_dir": "rankwise.io.atomic",
    "atomic_file": "rankwise.io.atomic",
    "check_writable": "rankwise.io.atomic",
    "BUILTIN_MODELS": "rankwise.io.models",
    "cache_dir": "rankwise.io.models",
    "load_model": "rankwise.io.models",
    "load_tokenizer": "rankwise.io.models",
    "resolve_model": "rankwise.io.models",
    "BUILTIN_TEXTS": "rankwise.io.texts",
    "load_labelled": "rankwise.io.texts",
    "load_text": "rankwise.io.texts",
    "text_fingerprint": "rankwise.io.texts",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = attach(__name__, _LAZY)
