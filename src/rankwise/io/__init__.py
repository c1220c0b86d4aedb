"""Models, texts and checkpoints in and out of rankwise."""

from rankwise.io.atomic import atomic_dir, atomic_file, check_writable
from rankwise.io.models import BUILTIN_MODELS, cache_dir, load_model, load_tokenizer, resolve_model
from rankwise.io.texts import BUILTIN_TEXTS, load_labelled, load_text, text_fingerprint

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_TEXTS",
    "atomic_dir",
    "atomic_file",
    "cache_dir",
    "check_writable",
    "load_labelled",
    "load_model",
    "load_text",
    "load_tokenizer",
    "resolve_model",
    "text_fingerprint",
]
