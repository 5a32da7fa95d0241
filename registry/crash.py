"""Named points of a write, where a test can stop the process to kill it there.

With SEQFORGET_PAUSE_AT=<point>, a process that reaches that point stops itself
(SIGSTOP); the test that started it sees it stopped, kills it with SIGKILL and checks
what a crash at exactly that moment leaves behind. Unset, a pause point does nothing.
"""

import os
import signal

POINTS = ("training", "staged", "renamed", "manifest", "journaled")


def pause_point(name: str) -> None:
    if os.environ.get("SEQFORGET_PAUSE_AT") == name:
        os.kill(os.getpid(), signal.SIGSTOP)
