"""Null-space bases in HDF5.

Each request stores the columns it added to each target module's basis
(`basis.h5` in its folder): per module a group holding

    columns  (d, m) float32   orthonormal, and orthogonal to every earlier column
    energy   (m,)   float32   fraction of the request's retained energy each column carries

with attributes `captured_before`/`captured_after` (the fraction of that energy the
accumulated basis held before and after the request) and `threshold`.
The accumulated basis of a module is the concatenation of these blocks in commit
order; which request added which columns follows from the order.
"""

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np


@dataclass
class Block:
    columns: np.ndarray  # (d, m)
    energy: np.ndarray  # (m,)
    captured_before: float
    captured_after: float
    threshold: float


@dataclass
class Basis:
    """The accumulated basis U (d, k) of one module and the owner of each column."""

    columns: np.ndarray  # (d, k)
    energy: np.ndarray  # (k,)
    owners: list[str]  # (k,) request id per column

    @property
    def dim(self) -> int:
        return self.columns.shape[0]


def write_blocks(path: Path, blocks: dict[str, Block]) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "seqforget-basis-block/1"
        for module, block in sorted(blocks.items()):
            g = f.create_group(module)
            g.create_dataset("columns", data=np.asarray(block.columns, dtype=np.float32))
            g.create_dataset("energy", data=np.asarray(block.energy, dtype=np.float32))
            g.attrs["captured_before"] = float(block.captured_before)
            g.attrs["captured_after"] = float(block.captured_after)
            g.attrs["threshold"] = float(block.threshold)


def read_blocks(path: Path) -> dict[str, Block]:
    with h5py.File(path, "r") as f:
        return {
            module: Block(
                columns=g["columns"][()],
                energy=g["energy"][()],
                captured_before=float(g.attrs["captured_before"]),
                captured_after=float(g.attrs["captured_after"]),
                threshold=float(g.attrs["threshold"]),
            )
            for module, g in f.items()
        }


def assemble(blocks: list[tuple[str, dict[str, Block]]]) -> dict[str, Basis]:
    """Concatenate per-request blocks, given in commit order, into one basis per module."""
    parts: dict[str, list[tuple[str, Block]]] = {}
    for request_id, per_module in blocks:
        for module, block in per_module.items():
            parts.setdefault(module, []).append((request_id, block))
    bases = {}
    for module, owned in parts.items():
        bases[module] = Basis(
            columns=np.concatenate([b.columns for _, b in owned], axis=1),
            energy=np.concatenate([b.energy for _, b in owned]),
            owners=[rid for rid, b in owned for _ in range(b.columns.shape[1])],
        )
    return bases
