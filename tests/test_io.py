"""sparsegrad.io: a folder written with atomic_directory replaces the old one whole, or not at all."""

import pytest

from sparsegrad.io import atomic_directory


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "sub" / "adapter"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and not final.exists()
        (tmp / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"

    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(final) as tmp:
            (tmp / "b.txt").write_text("two")
            raise RuntimeError("died half-way")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]  # untouched

    with atomic_directory(final) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # replaced, not merged
    assert [p.name for p in final.parent.iterdir()] == ["adapter"]  # no temporary or old folders left
