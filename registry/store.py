"""The registry folder and its one commit point, the manifest.

    REG/
      manifest.json      format, base model fingerprint, every request and the sha256
                         of each of its files; replaced atomically (the commit point)
      journal.jsonl      append-only record of what was attempted
      lock               the writer lock (flock); never written
      requests/<id>/     one immutable folder per committed request:
                         adapter_config.json, adapter_model.safetensors (PEFT layout),
                         basis.h5, request.json, metrics.json
      staging/           folders being written; never read, emptied on recovery

A request's folder is written under staging/, fsynced, renamed into requests/,
and becomes visible only when the manifest that names it replaces the old one.
A crash before that leaves an unreferenced folder, which the next writer removes.
"""

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from registry import journal
from registry.adapters import read_lora
from registry.atomic import fsync_dir, fsync_tree, write_json
from registry.bases import Basis, assemble, read_blocks
from registry.errors import RegistryError
from registry.hashing import hash_tree
from registry.lock import writer_lock

FORMAT = "seqforget-registry"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
LOCK = "lock"
REQUESTS = "requests"
STAGING = "staging"
BASIS_FILE = "basis.h5"
STATES = ("active", "rolled_back")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    # ---- creating and opening -------------------------------------------------------

    @classmethod
    def create(cls, root: Path, base_model: dict, default_retain: dict | None = None) -> "Registry":
        """Make a new registry at `root` (which must not exist or be empty), all at once."""
        root = Path(root).absolute()
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RegistryError(f"{root} already exists and is not an empty folder")
        tmp = root.with_name(f".{root.name}.init-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            (tmp / REQUESTS).mkdir()
            (tmp / STAGING).mkdir()
            (tmp / LOCK).touch()
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "created": _now(),
                "base_model": base_model,
                "default_retain": default_retain,
                "requests": [],
            }
            write_json(tmp / MANIFEST, manifest)
            journal.append(tmp / JOURNAL, "init", base_model=base_model.get("fingerprint"))
            fsync_tree(tmp)
            if root.exists():
                root.rmdir()
            os.rename(tmp, root)
            fsync_dir(root.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(root)

    @classmethod
    def open(cls, root: Path) -> "Registry":
        reg = cls(Path(root).absolute())
        reg.manifest()  # raises if missing or not ours
        return reg

    # ---- reading ----------------------------------------------------------------------

    def manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            raise RegistryError(f"no registry at {self.root} (run `seqforget init` first)")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RegistryError(f"unreadable manifest {path}: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise RegistryError(f"{path} is not a seqforget registry manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise RegistryError(
                f"registry format version {manifest.get('version')} is not supported "
                f"(this seqforget reads version {FORMAT_VERSION})"
            )
        return manifest

    def requests(self) -> list[dict]:
        return self.manifest()["requests"]

    def find(self, request_id: str) -> dict | None:
        return next((e for e in self.requests() if e["id"] == request_id), None)

    def active(self) -> list[dict]:
        return [e for e in self.requests() if e["state"] == "active"]

    def folder(self, entry: dict) -> Path:
        return self.root / entry["dir"]

    def damage(self, entry: dict) -> list[str]:
        """Every file of `entry` that is missing, altered, or not in the manifest."""
        folder = self.folder(entry)
        if not folder.is_dir():
            return [f"{entry['dir']}: folder missing"]
        problems = []
        found = hash_tree(folder)
        for name, digest in sorted(entry["files"].items()):
            if name not in found:
                problems.append(f"{entry['dir']}/{name}: missing")
            elif found[name] != digest:
                problems.append(f"{entry['dir']}/{name}: sha256 mismatch (file altered)")
        for name in sorted(set(found) - set(entry["files"])):
            problems.append(f"{entry['dir']}/{name}: not in the manifest")
        return problems

    def checked_folder(self, entry: dict) -> Path:
        """The folder of `entry`, after checking every file against its recorded sha256."""
        problems = self.damage(entry)
        if problems:
            raise RegistryError(f"request {entry['id']} is damaged: " + "; ".join(problems))
        return self.folder(entry)

    def load_lora(self, entry: dict):
        """({module: (A, B)}, scale) of a committed request, hash-checked."""
        return read_lora(self.checked_folder(entry))

    def load_bases(self, entries: list[dict] | None = None) -> dict[str, Basis]:
        """Accumulated bases over `entries` (default: every committed request), in commit order.

        Rolled-back requests keep their columns: the knowledge they retained is still
        retained knowledge.
        """
        entries = self.requests() if entries is None else entries
        blocks = []
        for entry in sorted(entries, key=lambda e: e["seq"]):
            if BASIS_FILE in entry["files"]:
                blocks.append((entry["id"], read_blocks(self.checked_folder(entry) / BASIS_FILE)))
        return assemble(blocks)

    def journal(self) -> list[dict]:
        return journal.read(self.root / JOURNAL)

    def leftovers(self) -> list[Path]:
        """Uncommitted remains of interrupted writes: invisible, removed by the next writer."""
        known = {e["dir"] for e in self.requests()}
        out = sorted((self.root / STAGING).glob("*"))
        out += [p for p in sorted((self.root / REQUESTS).glob("*")) if f"{REQUESTS}/{p.name}" not in known]
        out += sorted(self.root.glob(f".{MANIFEST}.tmp-*"))
        return out

    def verify(self) -> list[str]:
        """Re-hash every committed file; return every problem found (empty when sound)."""
        problems = []
        manifest = self.manifest()
        seen = set()
        for entry in manifest["requests"]:
            if entry["id"] in seen:
                problems.append(f"request {entry['id']}: listed twice in the manifest")
            seen.add(entry["id"])
            if entry.get("state") not in STATES:
                problems.append(f"request {entry['id']}: unknown state {entry.get('state')!r}")
            problems += self.damage(entry)
        if not (self.root / LOCK).is_file():
            problems.append("lock file missing")
        return problems

    # ---- writing -----------------------------------------------------------------------

    @contextmanager
    def writer(self, wait: bool = True):
        """Hold the writer lock; clear what an interrupted writer left behind first."""
        self.manifest()
        with writer_lock(self.root / LOCK, wait=wait):
            w = Writer(self)
            w.recover()
            yield w


class Writer:
    """What a holder of the writer lock may do. Obtain one from `Registry.writer()`."""

    def __init__(self, registry: Registry):
        self.reg = registry
        self.root = registry.root

    def recover(self) -> None:
        leftovers = self.reg.leftovers()
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        committed = {e["id"] for e in self.reg.requests()}
        for request_id in self._unfinished():
            outcome = "committed" if request_id in committed else "discarded"
            journal.append(self.root / JOURNAL, "recovered", id=request_id, outcome=outcome)
        if leftovers:
            fsync_dir(self.root / STAGING)
            fsync_dir(self.root / REQUESTS)

    def _unfinished(self) -> list[str]:
        open_ids: dict[str, None] = {}
        for record in self.reg.journal():
            if record.get("event") == "begin":
                open_ids[record["id"]] = None
            elif record.get("event") in ("commit", "abort", "recovered"):
                open_ids.pop(record.get("id"), None)
        return list(open_ids)

    def begin(self, request_id: str, **info) -> None:
        journal.append(self.root / JOURNAL, "begin", id=request_id, **info)

    def staging(self, request_id: str) -> Path:
        path = self.root / STAGING / f"{request_id}.{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def commit(self, entry: dict, staged: Path) -> dict:
        """Make `staged` the committed folder of a new request described by `entry`.

        `entry` needs `id`, `state`; the registry adds `seq`, `dir`, `files`, `applied_at`.
        """
        manifest = self.reg.manifest()
        request_id = entry["id"]
        if any(e["id"] == request_id for e in manifest["requests"]):
            raise RegistryError(f"request {request_id} is already in the registry")
        files = hash_tree(staged)
        fsync_tree(staged)
        final = self.root / REQUESTS / request_id
        os.rename(staged, final)
        fsync_dir(self.root / REQUESTS)
        fsync_dir(self.root / STAGING)
        entry = {
            **entry,
            "seq": max((e["seq"] for e in manifest["requests"]), default=0) + 1,
            "dir": f"{REQUESTS}/{request_id}",
            "files": files,
            "applied_at": _now(),
        }
        manifest["requests"].append(entry)
        write_json(self.root / MANIFEST, manifest)  # the commit point
        journal.append(self.root / JOURNAL, "commit", id=request_id, seq=entry["seq"])
        return entry

    def abort(self, request_id: str, reason: str) -> None:
        """Record a failed attempt and drop its staged files; never raises.

        A failure after the commit point (the manifest already names the request) is
        no abort: the begin stays open and recovery records it as committed.
        """
        try:
            if self.reg.find(request_id) is not None:
                return
            for path in (self.root / STAGING).glob(f"{request_id}.*"):
                shutil.rmtree(path, ignore_errors=True)
            journal.append(self.root / JOURNAL, "abort", id=request_id, reason=reason[:500])
        except (OSError, RegistryError):
            pass  # the next writer's recovery finishes the job

    def set_state(self, request_id: str, state: str) -> dict:
        if state not in STATES:
            raise RegistryError(f"unknown state {state!r}")
        manifest = self.reg.manifest()
        entry = next((e for e in manifest["requests"] if e["id"] == request_id), None)
        if entry is None:
            raise RegistryError(f"no request {request_id!r} in the registry")
        if entry["state"] == state:
            raise RegistryError(f"request {request_id} is already {state.replace('_', ' ')}")
        entry["state"] = state
        entry[f"{state}_at"] = _now()
        write_json(self.root / MANIFEST, manifest)
        journal.append(self.root / JOURNAL, state, id=request_id)
        return entry
