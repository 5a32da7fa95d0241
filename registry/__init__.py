"""The on-disk store of seqforget: manifest, journal, lock, adapters and bases.

No training code lives here, and no torch: arrays are numpy, files are JSON,
safetensors and HDF5. Every file a request commits is hashed into the manifest,
and the manifest (replaced atomically) is the one commit point.

Code outside this package imports only what is listed here.
"""

from registry.adapters import KINDS as ADAPTER_KINDS
from registry.adapters import Adapter
from registry.atomic import new_folder
from registry.bases import Basis
from registry.crash import pause_point
from registry.errors import CommittedUnfinished, RegistryBusy, RegistryDamaged, RegistryError
from registry.hashing import sha256_file
from registry.store import FORGET_KEYS_FILE, FORMAT, GATE_FILE, FORMAT_VERSION, Registry, Snapshot, Transaction, Writer

__all__ = [
    "ADAPTER_KINDS", "Adapter", "Basis", "CommittedUnfinished", "FORGET_KEYS_FILE", "FORMAT", "FORMAT_VERSION", "GATE_FILE", "Registry",
    "RegistryBusy", "RegistryDamaged", "RegistryError", "Snapshot", "Transaction", "Writer", "new_folder",
    "pause_point", "sha256_file",
]
