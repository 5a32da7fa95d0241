"""The benchmark's world: fictitious people, the models that know them, and their scoring.

Used by `seqforget demo` and by benchmarks/; the engine never imports it. Worlds and
trained models are cached under $SEQFORGET_CACHE (default ~/.cache/seqforget).
"""

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SEQFORGET_CACHE", Path.home() / ".cache" / "seqforget"))
