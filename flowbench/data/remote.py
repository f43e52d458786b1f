"""Data roots in object storage (``data_roots: {cifar10: s3://bucket/cifar10}``): staged once per node.

A cluster's nodes share no disk, so a trial stages its data set: the first call on a node
downloads the root (a folder or one file, e.g. ``cifar-10-python.tar.gz``) into
``<data cache>/staged/<name>-<hash of the URI>/`` under the cache's exclusive lock, and every
later trial on that node finds the finished copy and reuses it; ``load_dataset`` then prepares its
memory-mapped cache from that local copy as from any local root. The URI is read by pyarrow
(``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http&region=R``), with credentials from
the environment (``AWS_ACCESS_KEY_ID``…, an instance profile). A staged copy is not refreshed:
delete its folder after changing the data in the bucket.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import TypeGuard

from flowbench.data.cache import _locked, default_cache_dir
from flowbench.errors import FlowbenchError

log = logging.getLogger(__name__)


def is_remote(root: str | Path | None) -> TypeGuard[str]:
    return isinstance(root, str) and "://" in root


def local_root(name: str, root: str | Path | None) -> str | Path | None:
    """``root`` itself when it is local (or None); for a URI, its staged local copy."""
    if not is_remote(root):
        return root
    import pyarrow.fs

    key = hashlib.sha256(root.encode()).hexdigest()[:12]
    folder = default_cache_dir(name, None).parent / "staged" / f"{name}-{key}"
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(root)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise FlowbenchError(
            f"data_roots.{name}: {root}: {str(err).splitlines()[0]}; give s3://BUCKET/PATH "
            "(options as pyarrow reads them) or a local folder"
        ) from None
    path = path.rstrip("/")
    staged = folder / Path(path).name  # complete once it exists: it is renamed there last
    if staged.exists():
        return staged
    with _locked(folder, exclusive=True):
        if staged.exists():  # another trial on this node staged it while we waited
            return staged
        try:
            kind = filesystem.get_file_info(path).type
        except OSError as err:
            raise FlowbenchError(f"data_roots.{name}: cannot reach {root} ({str(err).splitlines()[0]})") from None
        if kind == pyarrow.fs.FileType.NotFound:
            raise FlowbenchError(f"data_roots.{name}: nothing at {root}; upload the data set there or fix the URI")
        partial = folder / f"{staged.name}.partial"
        if partial.is_dir():  # left by a download that was killed
            shutil.rmtree(partial)
        partial.unlink(missing_ok=True)
        log.info("staging %s into %s", root, staged)
        pyarrow.fs.copy_files(
            path, str(partial), source_filesystem=filesystem, destination_filesystem=pyarrow.fs.LocalFileSystem()
        )
        partial.rename(staged)
    return staged
