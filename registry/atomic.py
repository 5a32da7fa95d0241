"""Durable writes: temp file (or folder) beside the target, fsync, rename, fsync the parent.

Readers see the old file or the new one, never a mix. `new_folder` is the one helper for
"build a folder in a temporary place, then publish it all at once", used by the registry
itself, by `seqforget export` and by the benchmark's caches.
"""

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root` (files first), then `root` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def publish_folder(tmp: Path, final: Path) -> None:
    """Make the finished folder `tmp` appear as `final` in one rename (an empty `final` is replaced)."""
    fsync_tree(tmp)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.rename(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def new_folder(final: Path, keep_existing: bool = False):
    """Yield an empty temporary folder beside `final`; when the block ends, publish it as `final`.

    `final` must not exist or be an empty folder. With keep_existing, a `final` that another
    process published meanwhile wins and ours is dropped (for caches of deterministic results).
    On an error nothing is published and the temporary folder is removed.
    """
    final = Path(final).absolute()
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            publish_folder(tmp, final)
        except OSError:
            if not (keep_existing and final.is_dir() and any(final.iterdir())):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
