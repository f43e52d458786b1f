"""Where Ray Tune keeps a sweep's trial state and checkpoints: a local folder (one machine, or a
folder every node mounts) or an S3 URI that every node of a cluster reaches.

The driver and the trials on worker nodes resolve the same ``--storage`` text here, so a trial
restarted on another node finds the checkpoints of its earlier attempt.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from flowbench.errors import FlowbenchError


def tune_storage(location: str):
    """``(filesystem, path)`` for Tune's ``storage_filesystem`` and ``storage_path``.

    A URI (``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http&region=us-east-1``) goes
    through pyarrow's own parser, which reads the S3 options from the query; its credentials come
    from the environment (``AWS_ACCESS_KEY_ID``…, an instance profile), never from the URI, which
    Tune writes into every trial's state. A plain path is Tune's local storage (filesystem None).
    """
    if "://" not in location:
        return None, location
    import pyarrow.fs

    if "@" in urlsplit(location).netloc:
        raise FlowbenchError(
            "--storage: the URI holds credentials (…@ before the bucket), which would end up in every "
            "trial's saved state; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or an instance profile) instead"
        )
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
        # reachable, and the bucket exists: fail here, not in every trial
        bucket = path.split("/", 1)[0]
        if filesystem.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise FlowbenchError(f"--storage {location}: bucket {bucket!r} does not exist there; create it first")
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise FlowbenchError(
            f"--storage {location}: {str(err).splitlines()[0]}; give s3://BUCKET/PREFIX of an existing "
            "bucket (options as pyarrow reads them: ?endpoint_override=HOST:PORT&scheme=http&region=R) "
            "or a folder every node mounts"
        ) from None
    return filesystem, path.rstrip("/")


def copy_from_checkpoint(checkpoint, name: str, dest: Path) -> bool:
    """Copy the file ``name`` of a Tune checkpoint, local or in S3, to the local path ``dest``
    (one file, not the whole checkpoint with its weights). False when the checkpoint has none
    (a diverged trial has no figures)."""
    import pyarrow.fs

    src = f"{checkpoint.path}/{name}"
    if checkpoint.filesystem.get_file_info(src).type != pyarrow.fs.FileType.File:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")  # renamed once whole: a killed copy leaves no half file
    pyarrow.fs.copy_files(
        src, str(partial), source_filesystem=checkpoint.filesystem, destination_filesystem=pyarrow.fs.LocalFileSystem()
    )
    partial.replace(dest)
    return True


def read_from_checkpoint(checkpoint, name: str) -> str | None:
    """The text of the file ``name`` of a Tune checkpoint, local or in S3; None when it has none."""
    import pyarrow.fs

    src = f"{checkpoint.path}/{name}"
    if checkpoint.filesystem.get_file_info(src).type != pyarrow.fs.FileType.File:
        return None
    with checkpoint.filesystem.open_input_stream(src) as stream:
        return stream.read().decode()


def stored_checkpoints(storage: str, experiment: str, trial: str) -> list[str]:
    """The checkpoint folders (Tune's ``checkpoint_NNNNNN``) that a trial of ``experiment`` left in
    storage, newest first; paths in ``tune_storage(storage)``'s filesystem."""
    import pyarrow.fs

    filesystem, root = tune_storage(storage)
    if filesystem is None:
        filesystem, root = pyarrow.fs.LocalFileSystem(), str(Path(root).resolve())
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(f"{root}/{experiment}/{trial}", allow_not_found=True))
    return sorted(
        (f.path for f in found if f.type == pyarrow.fs.FileType.Directory and f.base_name.startswith("checkpoint_")),
        reverse=True,
    )
