"""The on-disk store of seqforget: manifest, journal, lock, adapters and bases.

No training code lives here, and no torch: arrays are numpy, files are JSON,
safetensors and HDF5. Every file a request commits is hashed into the manifest,
and the manifest (replaced atomically) is the one commit point.
"""

from registry.errors import RegistryError
from registry.store import FORMAT, FORMAT_VERSION, Registry, Writer

__all__ = ["FORMAT", "FORMAT_VERSION", "Registry", "RegistryError", "Writer"]
