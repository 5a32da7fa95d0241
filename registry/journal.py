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
    return [r for r in map(_parse, Path(path).read_bytes().splitlines()) if r is not None]


def since_last(path: Path, event: str, chunk: int = 1 << 16) -> list[dict]:
    """The records from the last one of `event` to the end (all of them if there is none),
    read backwards from the end of the file: what comes before it is never read, so the
    cost is that of the records since, however long the journal has grown."""
    if not Path(path).exists():
        return []
    newest_first: list[dict] = []
    with open(path, "rb") as f:
        pos, rest = f.seek(0, os.SEEK_END), b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + rest).split(b"\n")
            rest = lines.pop(0) if pos > 0 else b""  # perhaps only a line's end: read with the chunk before
            for line in reversed(lines):
                record = _parse(line)
                if record is None:
                    continue
                newest_first.append(record)
                if record.get("event") == event:
                    return newest_first[::-1]
    return newest_first[::-1]


def _parse(line: bytes) -> dict | None:
    """One record, or None for an empty, torn or unreadable line."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None
