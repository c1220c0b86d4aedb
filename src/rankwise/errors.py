"""User-facing errors.

Every mistake a user can make (a missing model, a bad ratio, targets that match
nothing, NaN weights, a corrupt checkpoint, ...) raises :class:`RankwiseError`
with a one-line message that names the problem and the fix. The CLI prints that
line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


def _damaged_file_errors() -> tuple[type[Exception], ...]:
    try:  # safetensors' module imports no torch (a Rust extension), so this stays cheap
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a hard dependency
        return (OSError, ValueError, KeyError)
    return (SafetensorError, OSError, ValueError, KeyError)


#: What reading a damaged or missing weights/JSON file raises: safetensors' own error for a bad
#: header or buffer, OSError for a missing/unreadable file, ValueError for invalid JSON (and
#: RankwiseError), KeyError for a JSON index without its keys. Catch these, not ``Exception``,
#: when turning a bad file into a one-line RankwiseError.
DAMAGED_FILE_ERRORS: tuple[type[Exception], ...] = _damaged_file_errors()


class RankwiseError(ValueError):
    """A user error with a one-line, actionable message (a ``ValueError``, so generic handlers catch it)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """Return ``ratio`` as float if it lies in the open interval (0, 1), else raise."""
    try:
        value = float(ratio)
    except (TypeError, ValueError) as exc:
        raise RankwiseError(f"{name} must be a number in (0, 1), got {ratio!r}.") from exc
    if not 0.0 < value < 1.0:
        raise RankwiseError(
            f"{name} must lie strictly between 0 and 1 (the fraction of parameters removed), "
            f"got {value}; e.g. use --{name} 0.2 to remove 20 %."
        )
    return value
