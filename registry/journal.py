"""The append-only journal: one JSON object a line, each fsynced before returning.

The journal records what was attempted; the manifest records what is committed.
A crash can leave a torn last line, which readers skip and the next append closes.
"""

import json
import os
import time
from pathlib import Path


def append(path: Path, event: str, **fields) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
    line = json.dumps(record, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(path, size) != b"\n":
            line = "\n" + line  # close a line torn by a crash
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def read(path: Path) -> list[dict]:
    """Every whole record; a torn or unreadable line is skipped."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
