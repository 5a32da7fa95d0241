"""One request trained by several processes: data parallel under torchrun or `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 4 -m seqforget apply REQUEST --registry REG
    torchrun --nproc_per_node 4 -m seqforget apply REQUEST --registry REG

Every process loads the live model, probes the same rows, grows the same bases and draws the
same batches; each optimiser step then takes its share of each batch's rows (rank, rank +
world, ...), and the gradients are averaged across processes before the step, so every process
holds the same adapter. The stopping checks and the retain guard see every row in every process,
so they decide alike. Only the main process (rank 0) takes the registry's writer lock
and writes; the others wait for its commit. If any process dies, the launcher stops the rest and
the request is not committed (the main process's unfinished write is removed by the next writer).
"""

import os
from contextlib import contextmanager

import torch

from seqforget.data import subset
from seqforget.errors import SeqforgetError


def is_main_process() -> bool:
    """Whether this process is the main one (rank 0) of its launcher's, or runs alone."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return world_size() > 1


class Group:
    """The processes training one request: this one's rank and how many there are."""

    def __init__(self):
        self.world = world_size()
        if self.world > 1 and not torch.distributed.is_initialized():
            if torch.cuda.is_available():  # each process on its own GPU, as seqforget.models.torch_device places it
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group()  # gloo for tensors on the CPU, and NCCL for GPU ones where there is CUDA
        self.rank = torch.distributed.get_rank() if self.world > 1 else 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check(self, batch_size: int) -> None:
        if batch_size < self.world:
            raise SeqforgetError(f"batch_size {batch_size} is smaller than the {self.world} processes sharing each batch")

    def share(self, batch: dict) -> dict:
        """This process's rows of a batch (rank, rank + world, ...), with the image inputs of those rows."""
        if self.world == 1:
            return batch
        rows = torch.zeros(len(batch["input_ids"]), dtype=torch.bool)
        rows[self.rank::self.world] = True
        return subset(batch, rows)

    def average(self, parameters: list[torch.Tensor]) -> None:
        """Average the parameters' gradients over the processes (a missing gradient counts as zero)."""
        if self.world == 1:
            return
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world

    def wait(self) -> None:
        """Until every process is here."""
        if self.world > 1:
            torch.distributed.barrier()


class Follower:
    """What a process other than the main one holds in place of the registry's writer: the
    registry as the main process locked it, and writes that only wait for the main process's
    commit and return the entry it wrote."""

    def __init__(self, registry, group: Group):
        self.registry, self.group = registry, group

    def __enter__(self) -> "Follower":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def snapshot(self):
        self.group.wait()  # until the main process holds the lock
        return self.registry.snapshot()

    @contextmanager
    def begin(self, request_id: str, **_):
        yield _Unwritten(self, request_id)


class _Unwritten:
    """A follower's write: nothing goes to disk."""

    def __init__(self, follower: Follower, request_id: str):
        self.follower, self.request_id = follower, request_id

    def put_adapter(self, adapter) -> None:
        pass

    def put_bases(self, bases) -> int:
        return 0

    def put_record(self, name: str, record) -> None:
        pass

    def commit(self, fields: dict) -> dict:
        self.follower.group.wait()  # the main process committed
        return self.follower.registry.snapshot().find(self.request_id)
