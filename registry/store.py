"""The registry folder, its one write path and its one read path.

    REG/
      manifest.json      format, base model, every request and the sha256 of each of its
                         files, the requests a stream rejected; replaced atomically: the one
                         commit point
      journal.jsonl      append-only record of what was attempted
      lock               the writer lock; never written
      requests/<id>/     one immutable folder per committed request: the adapter's files,
                         basis.h5, forget_keys.h5, request.json, metrics.json; in a gated
                         registry, a visual request's gate.safetensors
      staging/           folders being written; never read, emptied on recovery

Write path: `with reg.writer() as w:` (the lock, after recovering from any crash), then
`with w.begin(request_id) as txn:` put the adapter, the bases and the records, and
`txn.commit(entry)`. The folder is staged, fsynced, renamed into requests/, and becomes
visible only when the manifest that names it replaces the old one.

Read path: `reg.snapshot()` reads the manifest once. Committed folders are never changed
or removed, so everything a snapshot names can be read from it, consistently, without
the lock, whatever writers do meanwhile.
"""

import json
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from registry import journal
from registry.adapters import Adapter, read_adapter, write_adapter
from registry.atomic import fsync_dir, new_folder, publish_folder, write_bytes
from registry.bases import Basis, accumulate, read_bases, write_bases
from registry.crash import pause_point
from registry.errors import CommittedUnfinished, RegistryDamaged, RegistryError
from registry.hashing import hash_tree
from registry.lock import writer_lock

FORMAT = "seqforget-registry"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
LOCK = "lock"
REQUESTS = "requests"
STAGING = "staging"
BASIS_FILE = "basis.h5"
FORGET_KEYS_FILE = "forget_keys.h5"  # the directions the request's forget rows send through its layers (basis format)
GATE_FILE = "gate.safetensors"  # in a gated registry, the statistics that say which images a request's term applies to
STATES = ("active", "rolled_back")


def _size(path: Path) -> int:
    """Bytes of a file, or of every file below a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# The manifests this process read or wrote last, by their bytes: one that has not changed is
# not parsed again, and a line of an entry already written is not encoded again. Committed
# manifests and their entries are never changed in place (`Writer.manifest_to_change`), so
# what is kept stays what the file says.
_PARSED: dict[bytes, dict] = {}
_ENCODED: dict[int, tuple[dict, str]] = {}  # id(item) -> (item, its line); holding the item keeps its id its own
KEPT = 2


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise RegistryError(f"no registry at {root} (run `seqforget init` first)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RegistryDamaged(f"unreadable manifest {path}: {e}") from None
    if data in _PARSED:
        return _PARSED[data]
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryDamaged(f"unreadable manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RegistryError(f"{path} is not a seqforget registry manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise RegistryError(
            f"registry format version {manifest.get('version')} is not supported "
            f"(this seqforget reads version {FORMAT_VERSION}; re-create the registry with `seqforget init`)"
        )
    _keep(data, manifest)
    return manifest


def _keep(data: bytes, manifest: dict) -> None:
    _PARSED.pop(data, None)
    _PARSED[data] = manifest
    while len(_PARSED) > KEPT:
        del _PARSED[next(iter(_PARSED))]


def _write_manifest(path: Path, manifest: dict) -> None:
    """The manifest, atomically: a key a line, and a line for each item of a list (each request),
    so that it reads and diffs well and is written at the JSON encoder's C speed (an indented
    dump is pure Python: its cost, per commit, grew with the history). An item's line is
    encoded once: a commit encodes its own entry, a rollback the one it changes."""
    lines, encoded = [], {}
    for key in sorted(manifest):
        value = manifest[key]
        if isinstance(value, list) and value:
            items = []
            for item in value:
                known = _ENCODED.get(id(item))
                line = known[1] if known is not None and known[0] is item else f"    {json.dumps(item, sort_keys=True)}"
                encoded[id(item)] = (item, line)
                items.append(line)
            lines.append(f"  {json.dumps(key)}: [\n" + ",\n".join(items) + "\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)}")
    data = ("{\n" + ",\n".join(lines) + "\n}\n").encode()
    write_bytes(path, data)
    _ENCODED.clear()
    _ENCODED.update(encoded)
    _keep(data, manifest)


@dataclass(frozen=True)
class Snapshot:
    """The registry as one manifest describes it: what is committed, in commit order."""

    root: Path
    manifest: dict

    @property
    def requests(self) -> list[dict]:
        return self.manifest["requests"]

    @property
    def active(self) -> list[dict]:
        return [e for e in self.requests if e["state"] == "active"]

    @property
    def base_model(self) -> dict:
        return self.manifest["base_model"]

    @property
    def default_retain(self) -> dict | None:
        return self.manifest["default_retain"]

    @property
    def default_reference(self) -> dict | None:
        return self.manifest.get("default_reference")

    @property
    def guard(self) -> dict | None:
        """The rows every request is measured on against the base model, and the share of the
        base model's accuracy on them the registry keeps (its budget); None: no budget."""
        return self.manifest.get("guard")

    @property
    def rejected(self) -> list[dict]:
        """Requests a stream read and refused, oldest first (`Writer.reject`)."""
        return self.manifest.get("rejected", [])

    def find(self, request_id: str) -> dict | None:
        return next((e for e in self.requests if e["id"] == request_id), None)

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

    def _checked(self, entry: dict) -> Path:
        problems = self.damage(entry)
        if problems:
            raise RegistryDamaged(f"request {entry['id']} is damaged: " + "; ".join(problems))
        return self.folder(entry)

    def adapter(self, entry: dict) -> Adapter:
        """A committed request's adapter, after checking its files against their sha256."""
        return read_adapter(self._checked(entry), entry["kind"])

    def record(self, entry: dict, name: str) -> dict:
        """A committed request's JSON record (request.json, metrics.json), hash-checked."""
        return self.records(entry, name)[0]

    def records(self, entry: dict, *names: str) -> list[dict]:
        """Several of its JSON records, after one check of the request's files."""
        folder = self._checked(entry)
        return [json.loads((folder / name).read_text()) for name in names]

    def bases(self, read=None) -> dict[str, Basis]:
        """Every module's accumulated basis over every committed request, in commit order;
        `read(entry)` gives one request's columns (default: `basis`; a caller may memoise it).

        Rolled-back requests keep their columns: what they retained is still retained knowledge.
        """
        return accumulate([(read or self.basis)(e) for e in self.requests])

    def basis(self, entry: dict) -> dict[str, Basis]:
        """The basis columns one committed request added, per module, hash-checked ({}: none)."""
        return self._bases_file(entry, BASIS_FILE)

    def forget_keys(self, entry: dict) -> dict[str, Basis]:
        """The directions one committed request's forget rows send through its layers beyond the
        retained basis, per module, hash-checked ({}: none stored)."""
        return self._bases_file(entry, FORGET_KEYS_FILE)

    def arrays(self, entry: dict, name: str) -> dict | None:
        """The named arrays a committed request stored in `name` (e.g. GATE_FILE), hash-checked;
        None if it stored no such file."""
        if name not in entry["files"]:
            return None
        from safetensors.numpy import load_file

        return load_file(self._checked(entry) / name)

    def _bases_file(self, entry: dict, name: str) -> dict[str, Basis]:
        if name not in entry["files"]:
            return {}
        return read_bases(self._checked(entry) / name, entry["id"])


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self._checked = False  # whether a manifest was read and found to be ours (by `open`)

    @classmethod
    def create(cls, root: Path, base_model: dict, default_retain: dict | None = None,
               default_reference: dict | None = None, guard: dict | None = None) -> "Registry":
        """Make a new registry at `root` (which must not exist or be empty), all at once.
        `guard`: the registry's guard set and budget, with the base model's figures on it."""
        root = Path(root).absolute()
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RegistryError(f"{root} already exists and is not an empty folder")
        with new_folder(root) as tmp:
            (tmp / REQUESTS).mkdir()
            (tmp / STAGING).mkdir()
            (tmp / LOCK).touch()
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "created": _now(),
                "base_model": base_model,
                "default_retain": default_retain,
                "default_reference": default_reference,
                "guard": guard,
                "requests": [],
                "rejected": [],
            }
            _write_manifest(tmp / MANIFEST, manifest)
            journal.append(tmp / JOURNAL, "init", base_model=base_model.get("sha256"))
        return cls(root)

    @classmethod
    def open(cls, root: Path) -> "Registry":
        reg = cls(root)
        reg.snapshot()  # raises if missing or not ours
        reg._checked = True
        return reg

    # ---- the read path ----------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(self.root, _read_manifest(self.root))

    def journal(self) -> list[dict]:
        return journal.read(self.root / JOURNAL)

    def leftovers(self, snap: Snapshot | None = None, records: list[dict] | None = None) -> list[Path]:
        """Uncommitted remains of interrupted writes: invisible, removed by the next writer
        (those of the last write) or by `gc` (all).

        A folder in requests/ counts only if the journal shows a write of that id began: any
        other folder the manifest does not name is not ours to delete (verify reports it)."""
        begun, _ = self._unlisted(snap or self.snapshot(), self.journal() if records is None else records)
        return self._leftovers(begun)

    def _leftovers(self, begun: list[Path]) -> list[Path]:
        """Staged folders and temporary manifests, and `begun`: folders in requests/ of writes that never committed."""
        return sorted((self.root / STAGING).glob("*")) + begun + sorted(self.root.glob(f".{MANIFEST}.tmp-*"))

    def _unlisted(self, snap: Snapshot, records: list[dict]) -> tuple[list[Path], list[Path]]:
        """Folders in requests/ that `snap` does not name: (those whose write the journal shows
        began, the others)."""
        known = {e["dir"] for e in snap.requests}
        attempted = {r.get("id") for r in records if r.get("event") == "begin"}
        unlisted = [p for p in sorted((self.root / REQUESTS).glob("*")) if f"{REQUESTS}/{p.name}" not in known]
        return [p for p in unlisted if p.name in attempted], [p for p in unlisted if p.name not in attempted]

    def verify(self, snap: Snapshot | None = None) -> list[str]:
        """Re-hash every committed file (of `snap`, default: now); return every problem found."""
        snap = snap or self.snapshot()
        problems, seen = [], set()
        for entry in snap.requests:
            if entry["id"] in seen:
                problems.append(f"request {entry['id']}: listed twice in the manifest")
            seen.add(entry["id"])
            if entry.get("state") not in STATES:
                problems.append(f"request {entry['id']}: unknown state {entry.get('state')!r}")
            problems += snap.damage(entry)
        if not (self.root / LOCK).is_file():
            problems.append("lock file missing")
        _, foreign = self._unlisted(snap, self.journal())
        problems += [f"{REQUESTS}/{p.name}: in the folder but not in the manifest, nor from an interrupted write" for p in foreign]
        return problems

    # ---- the write path ---------------------------------------------------------------

    def writer(self, wait: bool = True, thorough: bool = False) -> "Writer":
        """`with reg.writer() as w:` holds the lock, after clearing what a crashed writer left.
        thorough: look for the remains of every write the journal shows, not only of the last
        (`gc`; a writer's recovery reads the journal from its last `begin` on, see `Writer.begin`)."""
        if not self._checked:
            self.snapshot()  # a registry that is not there, or not ours, is refused before its lock is taken
        return Writer(self, wait, thorough)


class Writer:
    """What a holder of the writer lock may do. Obtain one with `with reg.writer() as w:`."""

    def __init__(self, registry: Registry, wait: bool, thorough: bool = False):
        self.reg, self.root, self._wait, self._thorough, self._lock = registry, registry.root, wait, thorough, None
        self.removed: list[tuple[Path, int]] = []
        self._snap: Snapshot | None = None  # the committed state, read once while the lock is held
        self._open: str | None = None  # the request whose write began and is not yet committed or aborted

    def __enter__(self) -> "Writer":
        self._lock = writer_lock(self.root / LOCK, wait=self._wait)
        self._lock.__enter__()
        try:
            self._recover()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def snapshot(self) -> Snapshot:
        """The committed state; while the lock is held only this writer changes it, so it is
        read once and again only after this writer wrote the manifest."""
        if self._snap is None:
            self._snap = self.reg.snapshot()
        return self._snap

    def manifest_to_change(self) -> dict:
        """A copy of the committed manifest to change and `write`: its own lists of requests and
        rejections, whose entries are shared with the committed state: replace an entry, never
        change it in place."""
        manifest = self.snapshot().manifest
        return {**manifest, "requests": list(manifest["requests"]), "rejected": list(manifest.get("rejected", []))}

    def write(self, manifest: dict) -> None:
        """Write `manifest` atomically: the commit point of every change. Once written it is the
        committed state, with no need to read it back."""
        _write_manifest(self.root / MANIFEST, manifest)
        self._snap = Snapshot(self.root, manifest)

    def _recover(self) -> None:
        """Remove what interrupted writes left, and journal how each ended. Each writer recovers
        before it begins a write, and begins one only when its last has ended (`begin`): so every
        `begin` in the journal but the last one was closed before the next, and only the records
        from the last `begin` on need reading, however long the journal has grown."""
        state = self.snapshot()
        if self._thorough:
            records = self.reg.journal()
            leftovers = self.reg.leftovers(state, records)
        else:
            records = journal.since_last(self.root / JOURNAL, "begin")
            begun = [self.root / REQUESTS / i for i in _unfinished(records) if state.find(i) is None]
            leftovers = self.reg._leftovers([p for p in begun if p.exists()])
        self.removed = [(path, _size(path)) for path in leftovers]  # what recovery freed, for `gc`
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        for request_id in _unfinished(records):
            outcome = "committed" if state.find(request_id) is not None else "discarded"
            journal.append(self.root / JOURNAL, "recovered", id=request_id, outcome=outcome)
        if leftovers:
            fsync_dir(self.root / STAGING)
            fsync_dir(self.root / REQUESTS)

    def begin(self, request_id: str, **info) -> "Transaction":
        """Journal the attempt and open a staging folder for the request's files. One write at a
        time: a write that has not ended (committed, or aborted) is for the next writer's recovery."""
        if self._open is not None:
            raise RegistryError(f"the write of request {self._open} has not ended; open the registry's writer again to recover it")
        if self.snapshot().find(request_id) is not None:
            raise RegistryError(f"request {request_id} is already in the registry")
        folder = self.root / REQUESTS / request_id
        if folder.exists():  # an earlier write of this id whose abort could not remove its folder
            if folder not in self.reg.leftovers(self.snapshot()):
                raise RegistryError(f"{REQUESTS}/{request_id} is in the way: the manifest does not name it and no write "
                                    "of it began (see `seqforget verify`)")
            shutil.rmtree(folder)
        journal.append(self.root / JOURNAL, "begin", id=request_id, **info)
        self._open = request_id
        staged = self.root / STAGING / f"{request_id}.{uuid.uuid4().hex[:8]}"
        staged.mkdir()
        return Transaction(self, request_id, staged)

    def set_state(self, request_id: str, state: str) -> dict:
        if state not in STATES:
            raise RegistryError(f"unknown state {state!r}")
        manifest = self.manifest_to_change()
        at = next((i for i, e in enumerate(manifest["requests"]) if e["id"] == request_id), None)
        if at is None:
            raise RegistryError(f"no request {request_id!r} in the registry")
        if manifest["requests"][at]["state"] == state:
            raise RegistryError(f"request {request_id} is already {state.replace('_', ' ')}")
        entry = manifest["requests"][at] = {**manifest["requests"][at], "state": state, f"{state}_at": _now()}
        self.write(manifest)
        journal.append(self.root / JOURNAL, state, id=request_id)
        return entry

    def reject(self, source: str, digest: str, reason: str, request_id: str | None = None) -> dict:
        """Record that the request read from `source` (its text's sha256 `digest`) was refused:
        `status` lists it, and a stream does not try the same text again."""
        manifest = self.manifest_to_change()
        record = {"source": source, "digest": digest, "id": request_id, "reason": reason[:1000], "rejected_at": _now()}
        manifest["rejected"].append(record)
        self.write(manifest)
        journal.append(self.root / JOURNAL, "reject", id=request_id, source=source)
        return record


def _unfinished(records: list[dict]) -> list[str]:
    """Ids the journal shows begun and never committed, aborted or recovered."""
    open_ids: dict[str, None] = {}
    for record in records:
        if record.get("event") == "begin":
            open_ids[record["id"]] = None
        elif record.get("event") in ("commit", "abort", "recovered"):
            open_ids.pop(record.get("id"), None)
    return list(open_ids)


class Transaction:
    """One request being written: put its files, then commit. Obtain one from `Writer.begin`.

    As a context manager, an error before the commit aborts it (the staged files go, the
    journal says so); an error after the commit point re-raises saying the request stands.
    """

    def __init__(self, writer: Writer, request_id: str, staged: Path):
        self.writer, self.id, self.staged = writer, request_id, staged
        self.kind: str | None = None
        self.committed: dict | None = None

    def put_adapter(self, adapter: Adapter) -> None:
        with self._writing("adapter"):
            write_adapter(self.staged, adapter)
        self.kind = adapter.kind

    def put_bases(self, bases: dict[str, Basis], name: str = BASIS_FILE) -> int:
        """Stage the basis columns this request adds (layers given the same Basis share them), or
        with name=FORGET_KEYS_FILE its forget keys; returns the file's bytes."""
        with self._writing(name):
            write_bases(self.staged / name, bases, self.id)
        return (self.staged / name).stat().st_size

    def put_arrays(self, name: str, arrays: dict) -> int:
        """Stage named numpy arrays as the safetensors file `name` (e.g. GATE_FILE); returns its bytes."""
        import numpy as np
        from safetensors.numpy import save_file

        with self._writing(name):
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(self.staged / name))
        return (self.staged / name).stat().st_size

    def put_record(self, name: str, record: dict) -> None:
        with self._writing(name):
            (self.staged / name).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    @contextmanager
    def _writing(self, what: str):
        """A failed write (a full disk, a file-size limit) as a RegistryError that says what it was."""
        try:
            yield
        except Exception as e:
            from safetensors import SafetensorError

            if not isinstance(e, (OSError, SafetensorError)):
                raise
            reason = " ".join(str(e).split())
            raise RegistryError(f"cannot write the {what} of request {self.id} into the registry ({reason}); "
                                "nothing was committed") from e

    def commit(self, entry: dict) -> dict:
        """Make the staged folder the committed request described by `entry` (which needs
        `state`; the registry adds `id`, `kind`, `seq`, `dir`, `files`, `applied_at`)."""
        if self.kind is None:
            raise RegistryError(f"request {self.id} has no adapter to commit")
        root = self.writer.root
        manifest = self.writer.manifest_to_change()
        files = hash_tree(self.staged)
        pause_point("staged")
        publish_folder(self.staged, root / REQUESTS / self.id)
        fsync_dir(root / STAGING)
        pause_point("renamed")
        entry = {
            **entry,
            "id": self.id,
            "kind": self.kind,
            "seq": max((e["seq"] for e in manifest["requests"]), default=0) + 1,
            "dir": f"{REQUESTS}/{self.id}",
            "files": files,
            "applied_at": _now(),
        }
        manifest["requests"].append(entry)
        self.writer.write(manifest)  # the commit point
        self.committed = entry
        pause_point("manifest")
        journal.append(root / JOURNAL, "commit", id=self.id, seq=entry["seq"])
        self.writer._open = None
        pause_point("journaled")
        return entry

    def abort(self, reason: str) -> None:
        """Record a failed attempt and drop its staged files; never raises.

        After the commit point (the manifest names the request) there is nothing to abort:
        the begin stays open and the next writer's recovery records it as committed.
        """
        try:
            if self.writer.reg.snapshot().find(self.id) is not None:  # read afresh: did the commit happen?
                return
            shutil.rmtree(self.staged, ignore_errors=True)
            shutil.rmtree(self.writer.root / REQUESTS / self.id, ignore_errors=True)  # renamed in, never committed
            journal.append(self.writer.root / JOURNAL, "abort", id=self.id, reason=reason[:500])
            self.writer._open = None
        except (OSError, RegistryError):
            pass  # the next writer's recovery finishes the job

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, kind, error, _tb) -> None:
        if error is None:
            return
        self.abort(f"{kind.__name__}: {error}")
        if isinstance(error, Exception) and self.writer.reg.snapshot().find(self.id) is not None:
            raise CommittedUnfinished(f"request {self.id} is committed, but finishing the commit failed ({error})") from error
