"""Text splits: BBC's validation slice is disjoint from train and test, and deterministic."""

from __future__ import annotations

import random

import pytest

from rankwise.errors import RankwiseError
from rankwise.io.texts import load_labelled, load_text, split_indices


def test_bbc_splits_are_disjoint_cover_the_corpus_and_have_the_documented_sizes():
    splits = {s: load_labelled("bbc", s) for s in ("train", "valid", "test")}
    sizes = {s: len(v[0]) for s, v in splits.items()}
    assert sizes == {"train": 1558, "valid": 197, "test": 445}  # valid: 222 minus 25 repeated articles
    sets = {s: set(v[0]) for s, v in splits.items()}
    assert not sets["valid"] & sets["train"] and not sets["valid"] & sets["test"]
    assert len(sets["valid"]) == sizes["valid"]  # no article twice
    assert sorted(set(splits["valid"][1])) == [0, 1, 2, 3, 4]  # every class appears in valid
    assert load_labelled("bbc", "valid") == splits["valid"]  # deterministic


def test_bbc_valid_text_is_not_the_train_text():
    valid, train, test = (load_text("bbc", s) for s in ("valid", "train", "test"))
    assert valid != train and valid != test
    assert load_text("bbc:valid") == valid
    first = valid.split("\n\n")[0]
    assert first not in train and first not in test


def test_test_split_and_train_order_match_the_earlier_80_20_split():
    """Test and the head of train are those of the previous two-way split (seeded shuffle, first 20 % test)."""
    n = 2225
    order = list(range(n))
    random.Random(0).shuffle(order)
    idx = split_indices(n)
    assert idx["test"] == order[:445]
    assert idx["train"] == order[445:445 + 1558]
    assert sorted(idx["test"] + idx["train"] + idx["valid"]) == list(range(n))


def test_labelled_folder_gets_three_splits_and_unknown_splits_fail(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(10):
            (tmp_path / label / f"{i}.txt").write_text(f"{label} article {i}")
    parts = {s: load_labelled(str(tmp_path), s)[0] for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [14, 2, 4]
    assert len(set().union(*map(set, parts.values()))) == 20
    assert load_text(str(tmp_path), "valid") == "\n\n".join(parts["valid"])
    # a valid article repeated word for word in train is dropped from valid
    idx = split_indices(20)
    train_item, valid_item = sorted(idx["train"])[0], idx["valid"][0]
    folder = lambda i: (tmp_path / ("a" if i < 10 else "b") / f"{i % 10}.txt")  # noqa: E731 (sorted order)
    folder(valid_item).write_text(folder(train_item).read_text())
    from rankwise.io.texts import _labelled_folder

    _labelled_folder.cache_clear()
    assert len(load_labelled(str(tmp_path), "valid")[0]) == 1
    with pytest.raises(RankwiseError, match="splits train, valid, test, not 'dev'"):
        load_labelled(str(tmp_path), "dev")
    with pytest.raises(RankwiseError, match="bbc has splits"):
        load_text("bbc", "dev")
