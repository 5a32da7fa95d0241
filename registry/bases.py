"""Null-space bases: one type, and its HDF5 file.

A `Basis` is an orthonormal set of columns U (d, k) spanning the inputs that retained
knowledge sends through one layer, with the share of retained energy each column carries
and the request that added it. A request stores the columns it added (`basis.h5` in its
folder); a layer's basis is the concatenation of these, in commit order.

The file (format 3) holds one group per basis, named after its first layer, with `columns`
(d, m) and `energy` (m,) in float32 (chunked and gzip-compressed from COMPRESS_FROM bytes on:
orthonormal columns shrink by about a tenth), and the attribute `layers`: every
layer that reads the same input, and so has the same basis (a transformer's q, k and v
projections, or an MLP's gate and up projections), stored once. The file's attribute `request`
is the id of the request that added its columns: the provenance of each column. Format 2
files (one group per layer, no attributes) are read as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from registry.errors import RegistryError

if TYPE_CHECKING:  # numpy is imported where arrays are read, not to open a registry
    import numpy as np

FORMAT = "seqforget-basis/3"
COMPRESS_FROM = 1 << 16  # bytes: smaller datasets are stored whole, since a chunk index would cost more than gzip saves
READABLE = (FORMAT, "seqforget-basis/2")


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


def write_bases(path: Path, bases: dict[str, Basis], owner: str) -> None:
    """Write one request's columns per layer; layers given the same Basis object share one group."""
    import h5py
    import numpy as np

    groups: dict[int, list[str]] = {}  # id of a Basis -> the layers that have it
    for layer in sorted(bases):
        groups.setdefault(id(bases[layer]), []).append(layer)
    with h5py.File(path, "w", libver="latest") as f:  # the compact layout of group metadata
        f.attrs["format"], f.attrs["request"] = FORMAT, owner
        for layers in groups.values():
            basis, g = bases[layers[0]], f.create_group(layers[0])
            g.attrs["layers"] = layers
            for name, values in (("columns", basis.columns), ("energy", basis.energy)):
                values = np.asarray(values, dtype=np.float32)
                packed = {"chunks": True, "compression": "gzip", "shuffle": True} if values.nbytes >= COMPRESS_FROM else {}
                g.create_dataset(name, data=values, **packed)


def read_bases(path: Path, owner: str) -> dict[str, Basis]:
    """One request's columns per layer; layers that share a group get the same Basis object."""
    import h5py

    with h5py.File(path, "r") as f:
        version = f.attrs.get("format", "seqforget-basis/2")
        if version not in READABLE:
            raise RegistryError(f"{path}: basis format {version!r} is not one this version reads ({', '.join(READABLE)})")
        out = {}
        for name, g in f.items():
            columns = g["columns"][()]
            basis = Basis(columns, g["energy"][()], [owner] * columns.shape[1])
            for layer in g.attrs.get("layers", [name]):
                out[str(layer)] = basis
        return out


def accumulate(parts: list[dict[str, Basis]]) -> dict[str, Basis]:
    """Join per-request bases, given in commit order, into one basis per layer. Layers that
    shared every part share the result (the same object)."""
    bases: dict[str, Basis] = {}
    joined: dict[tuple[int, int], Basis] = {}  # (id of the basis so far, id of the part) -> their join
    for per_layer in parts:
        for layer, part in per_layer.items():
            if layer not in bases:
                bases[layer] = part
                continue
            key = (id(bases[layer]), id(part))
            if key not in joined:
                joined[key] = bases[layer].join(part)
            bases[layer] = joined[key]
        joined.clear()
    return bases
