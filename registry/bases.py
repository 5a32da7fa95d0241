"""Null-space bases: one type, and its HDF5 file.

A `Basis` is an orthonormal set of columns U (d, k) spanning the inputs that retained
knowledge sends through one layer, with the share of retained energy each column carries
and the request that added it. A request stores the columns it added (`basis.h5` in its
folder: per module a group with `columns` (d, m) and `energy` (m,), float32); the layer's
basis is the concatenation of these, in commit order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FORMAT = "seqforget-basis/2"


@dataclass
class Basis:
    columns: np.ndarray  # (d, k), orthonormal
    energy: np.ndarray  # (k,)
    owners: list[str]  # (k,) id of the request that added each column

    @property
    def dim(self) -> int:
        return self.columns.shape[0]

    @property
    def rank(self) -> int:
        return self.columns.shape[1]

    def join(self, other: Basis) -> Basis:
        """This basis followed by `other`'s columns (which must be orthogonal to these)."""
        import numpy as np

        return Basis(
            np.concatenate([self.columns, other.columns], axis=1),
            np.concatenate([self.energy, other.energy]),
            self.owners + other.owners,
        )


# numpy and h5py are imported where used, so that `seqforget status` starts at once


def write_bases(path: Path, bases: dict[str, Basis]) -> None:
    import h5py
    import numpy as np

    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        for module, basis in sorted(bases.items()):
            g = f.create_group(module)
            g.create_dataset("columns", data=np.asarray(basis.columns, dtype=np.float32))
            g.create_dataset("energy", data=np.asarray(basis.energy, dtype=np.float32))


def read_bases(path: Path, owner: str) -> dict[str, Basis]:
    import h5py

    with h5py.File(path, "r") as f:
        out = {}
        for module, g in f.items():
            columns = g["columns"][()]
            out[module] = Basis(columns, g["energy"][()], [owner] * columns.shape[1])
        return out


def accumulate(parts: list[dict[str, Basis]]) -> dict[str, Basis]:
    """Join per-request bases, given in commit order, into one basis per module."""
    bases: dict[str, Basis] = {}
    for per_module in parts:
        for module, basis in per_module.items():
            bases[module] = bases[module].join(basis) if module in bases else basis
    return bases
