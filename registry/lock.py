"""The writer lock: one process at a time may change a registry.

An advisory flock on a file that exists from `init` on; the kernel drops it when
the holder dies, so a killed writer never leaves the registry locked. Taking the
lock writes nothing.
"""

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def writer_lock(path: Path, wait: bool = True):
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                from registry.errors import RegistryError

                raise RegistryError(f"registry is locked by another writer ({path})") from None
            print(f"waiting for the registry lock ({path}) ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
