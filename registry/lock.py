"""The writer lock: one process at a time may change a registry.

filelock's flock on a file that exists from `init` on: the kernel drops the lock when
the holder dies, so a killed writer never leaves the registry locked, and taking the
lock writes nothing into the file.
"""

import sys
from contextlib import contextmanager
from pathlib import Path

from registry.errors import RegistryBusy, RegistryError


@contextmanager
def writer_lock(path: Path, wait: bool = True):
    from filelock import FileLock, Timeout  # here, so that read-only commands start at once

    # no fallback to a lock file's mere existence where flock is missing (some network
    # filesystems): our lock file always exists, so that lock would look held forever
    lock = FileLock(str(path), fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:  # an OSError too, so it comes first
        if not wait:
            raise RegistryBusy(f"registry is busy: another process holds its lock ({path})") from None
        print(f"waiting for the registry lock ({path}) ...", file=sys.stderr)
        lock.acquire()
    except OSError as e:
        raise RegistryError(f"cannot take the registry's lock {path}: {e.strerror or e} (is the registry read-only?); "
                            "nothing was changed") from None
    try:
        yield
    finally:
        lock.release()
