"""Write-then-rename: a write that fails leaves the old file as it was and no temporary behind;
a full disk or a read-only folder is one FlowbenchError line naming the path."""

import contextlib
import stat
import subprocess
import threading

import pytest
import torch

from flowbench.atomic import atomic_write
from flowbench.errors import FlowbenchError


@contextlib.contextmanager
def mounted_tmpfs(folder, size="1m", readonly=False):
    """A small tmpfs at ``folder`` (needs root and mount rights, as in CI); skips the test where
    mounting is not allowed. Unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root with mount rights"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def remount_readonly(folder):
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


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


def test_two_writers_of_one_file_do_not_share_a_temporary(tmp_path):
    """Both write at the same time: each through its own temporary, the file ends as one of them."""
    path = tmp_path / "record.json"
    both_open = threading.Barrier(2)
    temporaries = []

    def writer(text):
        with atomic_write(path) as tmp:
            temporaries.append(tmp)
            tmp.write_text(text[:5])
            both_open.wait(timeout=10)  # the other writer's temporary exists now too
            with open(tmp, "a") as f:
                f.write(text[5:])

    threads = [threading.Thread(target=writer, args=(t * 1000,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(temporaries)) == 2
    assert path.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_the_written_file_has_the_umask_mode_not_a_private_temporary_one(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "trials.parquet") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "trials.parquet").stat().st_mode) == 0o644  # others may read the tables


def test_torch_save_on_a_full_disk_is_one_line_and_the_old_checkpoint_stays(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", size="1m") as disk:
        path = disk / "checkpoint.pt"
        torch.save({"step": 10}, path)
        with pytest.raises(FlowbenchError) as caught, atomic_write(path) as tmp:
            torch.save({"weights": torch.zeros(1_000_000)}, tmp)  # 4 MB into 1 MiB
        assert str(caught.value).startswith(f"no space left on device writing {path}")
        assert torch.load(path, weights_only=True) == {"step": 10}
        assert [p.name for p in disk.iterdir()] == ["checkpoint.pt"]  # the temporary is gone, space freed


def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path):
    with mounted_tmpfs(tmp_path / "disk") as disk:
        (disk / "report.md").write_text("old")
        remount_readonly(disk)
        with pytest.raises(
            FlowbenchError, match=r"^read-only file system writing .*report.md \(its previous version is intact\)"
        ):
            with atomic_write(disk / "report.md") as tmp:
                tmp.write_text("new")
        assert (disk / "report.md").read_text() == "old"


def test_other_errors_pass_through_untranslated(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileExistsError), atomic_write(tmp_path / "a-file" / "x.json") as tmp:
        tmp.write_text("x")
