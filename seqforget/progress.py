"""Progress of a long loop: a bar on a terminal, a line every half minute in a log.

tqdm redraws in place on a terminal; written to a file or a pipe it would leave one line
per update, which floods logs and CI. Off a terminal this prints at most one line every
`every` seconds, and the caller prints its own summary line at the end.
"""

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from seqforget.errors import Stopped


class Progress:
    """`update` once a step; it raises Stopped when `stop` (if given) says to stop."""

    def __init__(self, total: int, label: str, enabled: bool = True, every: float = 30.0, stream=None,
                 stop: Callable[[], bool] | None = None):
        self.total, self.label, self.every, self.stop = total, label, every, stop
        self.stream = stream or sys.stderr
        self.done, self.last = 0, time.monotonic()
        self.bar = None
        self.enabled = enabled
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, desc=label, unit="step", leave=False, file=self.stream)

    def update(self, **figures: float) -> None:
        if self.stop is not None and self.stop():
            raise Stopped(f"{self.label}: stopped at step {self.done} of {self.total}")
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in figures.items()})
        elif self.enabled and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            shown = " ".join(f"{k} {v:.3f}" for k, v in figures.items())
            print(f"{self.label}: step {self.done}/{self.total} {shown}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
