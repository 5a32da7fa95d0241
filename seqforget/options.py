"""How this process runs a request, as against what the request asks (seqforget.requests)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunOptions:
    """The command line's choices for one `apply` or `stream`; None: the registry's, chosen at `init`."""

    model_dir: Path | None = None  # the base model's folder, if it moved since `init` (it must be the same model)
    dtype: str | None = None  # precision to load, train and compose the model in (seqforget.models.DTYPES)
    device: str | None = None  # where the model runs (seqforget.models.DEVICES)
    checkpointing: bool = False  # gradient checkpointing: recompute activations in the backward pass (less memory, slower)
    shard: bool = False  # under a launcher, split the model's weights across the processes (seqforget.distributed)
    show_progress: bool = True  # a bar on a terminal, a line every half minute in a log (seqforget.progress)
    wait: bool = True  # wait for a registry lock another process holds, else raise RegistryBusy
    stop: Callable[[], bool] | None = None  # asked at every step: when true, the request is abandoned (errors.Stopped)
