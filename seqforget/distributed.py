"""One request trained by several processes under torchrun or `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 4 -m seqforget apply REQUEST --registry REG
    torchrun --nproc_per_node 4 -m seqforget apply REQUEST --registry REG

Every process loads the live model, probes the same rows, grows the same bases and draws the
same batches; each optimiser step then takes its share of each batch's rows (rank, rank +
world, ...), and the gradients are averaged across processes before the step, so every process
holds the same adapter. The stopping checks and the retain guard see every row in every process,
so they decide alike. Only the main process (rank 0) takes the registry's writer lock
and writes; the others wait for its commit. If any process dies, the launcher stops the rest and
the request is not committed (the main process's unfinished write is removed by the next writer).

With `--shard` (or `accelerate launch --use_fsdp`), the processes pool their memory instead:

    torchrun --nproc_per_node 4 -m seqforget apply REQUEST --registry REG --shard

Each process holds 1/N of the weights of the model's stacks of blocks (`block_stacks`: its
transformer layers), and a block's weights are gathered whole only while it runs
(PyTorch's FSDP, `fully_shard`: what DeepSpeed calls ZeRO stage 3, here for frozen weights).
Every process then runs every row of every batch: each gather needs all the processes, and a
share of rows without images would skip the vision blocks that the others gather. The rest of
the model (embeddings, norms, the projector, the language model's head) and the update stay
whole in every process, so the update's gradients, its projection and the stored adapter are
those one process would compute. The live model's exact bookkeeping (seqforget.live) is split
with the weights. Each process loads and composes the whole model in host memory, then keeps
its share, one process after another.
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
    """The processes training one request: this one's rank and how many there are, and
    whether they share the model's weights (`shard`) or each hold all of them."""

    def __init__(self, shard: bool = False):
        self.world, self.sharded = world_size(), shard or _accelerate_asks_to_shard()
        if self.sharded and self.world == 1:
            raise SeqforgetError("--shard splits the model across the processes of a launcher (torchrun, accelerate launch); "
                                 "this process runs alone")
        if self.world > 1 and not torch.distributed.is_initialized():
            if torch.cuda.is_available():  # each process on its own GPU, as seqforget.models.torch_device places it
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group()  # gloo for tensors on the CPU, and NCCL for GPU ones where there is CUDA
        self.rank = torch.distributed.get_rank() if self.world > 1 else 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check(self, batch_size: int) -> None:
        if batch_size < self.world and not self.sharded:
            raise SeqforgetError(f"batch_size {batch_size} is smaller than the {self.world} processes sharing each batch")

    def share(self, batch: dict) -> dict:
        """This process's rows of a batch (rank, rank + world, ...), with the image inputs of those
        rows; all of them when the weights are sharded."""
        if self.world == 1 or self.sharded:
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

    def in_turn(self, load):
        """`load()` in every process: one process after another when the weights are sharded, so
        that a host holds one whole model at a time while each loads it and keeps its share."""
        if not self.sharded:
            return load()
        for turn in range(self.world):
            if turn == self.rank:
                out = load()
            self.wait()
        return out

    def shard(self, model, device: torch.device, keep=()) -> None:
        """Split the weights of the model's stacks of blocks across the processes, each holding
        its share on `device`; the rest of the model goes to `device` whole. `keep`: names of
        layers that stay whole in every process (an update that reparametrises a weight needs it
        whole)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        stacks = block_stacks(model)
        if not stacks:
            raise SeqforgetError(f"{type(model).__name__} has no stack of blocks to shard (its class names none in "
                                 "_no_split_modules)")
        named = dict(model.named_modules())
        kept = {p for name in keep for p in named[name].parameters()}
        mesh = init_device_mesh(device.type, (self.world,))
        for owner, stack in stacks:
            for block in stack:
                fully_shard(block, mesh=mesh, ignored_params=set(block.parameters()) & kept or None)
            # the stack's owner coordinates its blocks' gathers (with each block on its own, a
            # block run twice before the backward pass recomputes wrongly under checkpointing);
            # its own weights stay whole: a model may call them outside the owner's forward
            fully_shard(owner, mesh=mesh, ignored_params={p for p in owner.parameters() if not isinstance(p, DTensor)})
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if not isinstance(t, DTensor):
                    t.data = t.data.to(device)


def _accelerate_asks_to_shard() -> bool:
    """Whether `accelerate launch` was told to shard the model (--use_fsdp, or an FSDP config):
    that is --shard, whatever else the config sets. A DeepSpeed config is refused."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise SeqforgetError("DeepSpeed is not supported: launch without it, and pass --shard to split the model "
                             "across the processes (FSDP)")
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def block_stacks(model) -> list[tuple[torch.nn.Module, torch.nn.ModuleList]]:
    """(owner, blocks) for each list of the model's repeated blocks, outermost lists only, with
    the module holding the list. A block is a module that is, or holds, one of the classes the
    model names in `_no_split_modules` (transformers' transformer layers, or their attention)."""
    names = set(getattr(model, "_no_split_modules", None) or ())

    def block(m) -> bool:
        return any(type(s).__name__ in names for s in m.modules())

    stacks = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) and all(block(b) for b in m)}
    outer = [name for name in stacks if not any(name.startswith(other + ".") for other in stacks)]
    return [(model.get_submodule(name.rpartition(".")[0]), stacks[name]) for name in outer]


# torch.distributed.tensor is imported where a weight is looked at, not with this module: it
# takes half a second, which commands that load no model (init, rollback) need not pay


def own(weight: torch.Tensor) -> torch.Tensor:
    """The part of a weight this process holds: its rows if the weight is sharded, else all of it."""
    from torch.distributed.tensor import DTensor

    return weight.to_local() if isinstance(weight, DTensor) else weight


def rows(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Of `value`, a tensor shaped as the whole weight, the rows this process holds of it (where
    `value` is: the live model's bookkeeping stays off the device)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(weight, DTensor):
        return value
    share = distribute_tensor(value, weight.device_mesh, weight.placements, src_data_rank=None)  # no communication
    return share.to_local().to(value.device)


def held_bytes(model) -> int:
    """Bytes of the model's parameters this process holds: its shares of sharded ones, all of the others."""
    return sum(own(p).nbytes for p in model.parameters())


def registry_writer(registry, group: Group, wait: bool = True):
    """What `apply_request` writes through: in the main process the registry's writer, in every
    other process a Follower. The two sides meet at the same two barriers, both kept here: once
    the main process holds the registry's lock (on entering, before any process reads the
    registry), and once its commit is on disk (in `commit`, before any process returns the entry)."""
    return Leader(registry, group, wait) if group.main else Follower(registry, group)


class Leader:
    """The main process's side: the registry's writer, with the barriers the followers wait at."""

    def __init__(self, registry, group: Group, wait: bool):
        self.writer, self.group = registry.writer(wait=wait), group

    def __enter__(self) -> "Leader":
        self.writer.__enter__()
        try:
            self.group.wait()  # the first barrier: this process holds the lock
        except BaseException as e:  # no `with` body runs to release the lock: release it here
            self.writer.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, *exc):
        return self.writer.__exit__(*exc)

    def snapshot(self):
        return self.writer.snapshot()

    @contextmanager
    def begin(self, request_id: str, **info):
        with self.writer.begin(request_id, **info) as txn:
            yield _Led(txn, self.group)


class _Led:
    """The main process's write: the registry's, and the second barrier once it is committed."""

    def __init__(self, txn, group: Group):
        self.txn, self.group = txn, group

    def put_adapter(self, adapter) -> None:
        self.txn.put_adapter(adapter)

    def put_bases(self, bases, *name) -> int:
        return self.txn.put_bases(bases, *name)

    def put_arrays(self, name: str, arrays) -> int:
        return self.txn.put_arrays(name, arrays)

    def put_record(self, name: str, record) -> None:
        self.txn.put_record(name, record)

    def commit(self, fields: dict) -> dict:
        entry = self.txn.commit(fields)
        self.group.wait()  # the second barrier: the commit is on disk
        return entry


class Follower:
    """What a process other than the main one holds in place of the registry's writer: the
    registry as the main process locked it, and writes that only wait for the main process's
    commit and return the entry it wrote."""

    def __init__(self, registry, group: Group):
        self.registry, self.group = registry, group

    def __enter__(self) -> "Follower":
        self.group.wait()  # the first barrier: the main process holds the lock
        return self

    def __exit__(self, *exc) -> None:
        pass

    def snapshot(self):
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

    def put_bases(self, bases, name: str | None = None) -> int:
        return 0

    def put_arrays(self, name: str, arrays) -> int:
        return 0

    def put_record(self, name: str, record) -> None:
        pass

    def commit(self, fields: dict) -> dict:
        self.follower.group.wait()  # the second barrier: the main process committed
        return self.follower.registry.snapshot().find(self.request_id)
