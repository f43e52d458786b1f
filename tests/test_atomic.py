"""Write-then-rename: a write that fails leaves the old file as it was and no temporary behind."""

import pytest

from flowbench.atomic import atomic_write


def test_a_finished_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "table.parquet"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".parquet" and tmp != path
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["table.parquet"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
