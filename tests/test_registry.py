"""The registry on disk: commit, verify, tampering, crash safety, journal, lock.

Every test builds a real registry on tmp_path with real adapter and basis files.
No torch here: the registry is numpy, JSON, safetensors and HDF5.
"""

import builtins
import errno
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft import LoraConfig

from registry import (FORGET_KEYS_FILE, Adapter, Basis, Registry, RegistryBusy, RegistryDamaged, RegistryError, new_folder,
                      sha256_file)

BASE = {"path": "/models/tiny", "sha256": "abc", "signature": "def"}
MODULES = ("layers.0.q_proj", "layers.0.v_proj")
D_IN, D_OUT, R = 12, 10, 4
COLUMNS_PER_REQUEST = {"layers.0.q_proj": 3, "layers.0.v_proj": 2}
FILES = {"adapter_config.json", "adapter_model.safetensors", "basis.h5", "request.json", "metrics.json"}


def make_registry(root: Path) -> Registry:
    return Registry.create(root, base_model=BASE)


def entry_for(sign: int = 1) -> dict:
    return {"state": "active", "method": "gd", "scope": "full", "sign": sign, "metrics": {"forget_nll": [1.0, 3.0]}}


def lora(rng: np.random.Generator) -> Adapter:
    weights = {m: {"A": rng.standard_normal((R, D_IN)).astype(np.float32), "B": rng.standard_normal((D_OUT, R)).astype(np.float32)}
               for m in MODULES}
    config = LoraConfig(r=R, lora_alpha=8, target_modules=list(MODULES)).to_dict()
    config = json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    return Adapter("lora", weights, config)


def stage(txn, request_id: str, rng: np.random.Generator, columns: dict[str, np.ndarray] | None = None):
    """Put a request's files as the engine does; returns (adapter, bases)."""
    adapter = lora(rng)
    if columns is None:
        columns = {m: orthonormal(rng, D_IN, k) for m, k in COLUMNS_PER_REQUEST.items()}
    bases = {m: Basis(c, np.full(c.shape[1], 0.1, dtype=np.float32), [request_id] * c.shape[1]) for m, c in columns.items()}
    txn.put_adapter(adapter)
    txn.put_bases(bases)
    txn.put_record("request.json", {"id": request_id})
    txn.put_record("metrics.json", {"steps": 8})
    return adapter, bases


def orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.astype(np.float32)  # (d, k)


def apply(reg: Registry, request_id: str, rng: np.random.Generator, **stage_kw) -> tuple[dict, Adapter, dict]:
    with reg.writer() as w, w.begin(request_id) as txn:
        adapter, bases = stage(txn, request_id, rng, **stage_kw)
        entry = txn.commit(entry_for())
    return entry, adapter, bases


def unfinished(reg: Registry) -> list[str]:
    """Ids whose journal 'begin' has no later commit/abort/recovered record."""
    open_ids = []
    for record in reg.journal():
        if record["event"] == "begin":
            open_ids.append(record["id"])
        elif record["event"] in ("commit", "abort", "recovered") and record["id"] in open_ids:
            open_ids.remove(record["id"])
    return open_ids


# ---- creating and opening ----------------------------------------------------------------


def test_create_then_open_round_trips(tmp_path):
    Registry.create(tmp_path / "reg", base_model=BASE, default_retain={"rows": 3})
    opened = Registry.open(tmp_path / "reg")
    state = opened.snapshot()
    assert opened.root == (tmp_path / "reg").absolute()
    assert state.base_model == BASE
    assert state.default_retain == {"rows": 3}
    assert state.requests == []
    assert opened.verify() == []
    assert opened.leftovers() == []
    assert [r["event"] for r in opened.journal()] == ["init"]
    # the temp folder create() builds in is renamed away, not left beside the registry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg"]


def test_create_into_an_empty_folder_works_and_into_a_non_empty_one_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    make_registry(tmp_path / "empty")
    assert Registry.open(tmp_path / "empty").snapshot().requests == []

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(RegistryError, match="already exists"):
        make_registry(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["notes.txt"]

    with pytest.raises(RegistryError):
        make_registry(tmp_path / "empty")  # now a registry, so not empty


@pytest.mark.parametrize(
    "manifest",
    [None, "not json {", json.dumps({"format": "something-else", "version": 2}), json.dumps([1, 2])],
    ids=["missing", "unreadable", "foreign", "not-an-object"],
)
def test_open_of_a_non_registry_raises(tmp_path, manifest):
    folder = tmp_path / "folder"
    folder.mkdir()
    if manifest is not None:
        (folder / "manifest.json").write_text(manifest)
    with pytest.raises(RegistryError):
        Registry.open(folder)


def test_open_of_a_missing_folder_or_another_format_version_raises(tmp_path):
    with pytest.raises(RegistryError, match="no registry"):
        Registry.open(tmp_path / "nowhere")
    reg = make_registry(tmp_path / "reg")
    manifest = reg.snapshot().manifest
    (reg.root / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(RegistryError, match="version 99"):
        Registry.open(reg.root)


def test_the_registry_package_does_not_import_torch_or_heavy_libraries_to_read():
    code = ("import sys, registry; registry.Registry; "
            "print(sorted(m for m in ('torch', 'numpy', 'h5py', 'safetensors', 'filelock') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # `seqforget status` reads a registry without them


# ---- committing and reading back -------------------------------------------------------


def test_commit_makes_the_request_visible_with_every_file_hashed(tmp_path):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(0)
    with reg.writer() as w, w.begin("r1") as txn:
        stage(txn, "r1", rng)
        assert reg.snapshot().requests == []  # staged is invisible
        entry = txn.commit(entry_for())
        staged = txn.staged

    assert reg.snapshot().requests == [entry]
    assert entry["seq"] == 1 and entry["id"] == "r1" and entry["kind"] == "lora"
    assert entry["dir"] == "requests/r1"
    assert {k: entry[k] for k in entry_for()} == entry_for()
    folder = reg.root / "requests" / "r1"
    on_disk = {p.name for p in folder.iterdir()}
    assert on_disk == FILES
    assert entry["files"] == {name: sha256_file(folder / name) for name in on_disk}
    assert not staged.exists()
    assert reg.verify() == []
    assert reg.leftovers() == []
    assert [r["event"] for r in reg.journal()] == ["init", "begin", "commit"]
    assert reg.journal()[-1]["seq"] == 1

    second, _, _ = apply(reg, "r2", rng)
    assert second["seq"] == 2
    assert [e["id"] for e in reg.snapshot().requests] == ["r1", "r2"]


def test_a_writer_holds_what_it_wrote_as_the_committed_state_and_leaves_earlier_snapshots_alone(tmp_path):
    """A writer does not read the manifest back after writing it, and readers in the same process
    are given the manifest it wrote without parsing the file: what they hold must be what the
    file says, and a snapshot taken before a change must still say what it said."""
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(0)

    def on_disk() -> dict:
        return json.loads((reg.root / "manifest.json").read_text())

    with reg.writer() as w:
        with w.begin("a") as txn:
            stage(txn, "a", rng)
            txn.commit(entry_for())
        assert w.snapshot().manifest == on_disk() == Registry.open(reg.root).snapshot().manifest
        before = w.snapshot()
        w.set_state("a", "rolled_back")
        w.reject("stream.jsonl:3", "f" * 64, "not valid JSON")
        assert w.snapshot().manifest == on_disk() == Registry.open(reg.root).snapshot().manifest
        assert before.find("a")["state"] == "active" and not before.rejected
        assert w.snapshot().find("a")["state"] == "rolled_back" and len(w.snapshot().rejected) == 1


def test_a_manifest_changed_by_another_process_is_read_afresh(tmp_path):
    """Readers skip parsing a manifest whose bytes they have seen; any other bytes are read anew."""
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(0)
    apply(reg, "r1", rng)
    assert reg.snapshot().find("r1")["state"] == "active"
    path = reg.root / "manifest.json"
    edited = json.loads(path.read_text())
    edited["requests"][0]["state"] = "rolled_back"  # as another process's rollback leaves it
    path.write_text(json.dumps(edited))
    assert reg.snapshot().find("r1")["state"] == "rolled_back"


def test_beginning_an_id_already_committed_raises_and_changes_nothing(tmp_path):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(0)
    apply(reg, "r1", rng)
    before = (reg.root / "manifest.json").read_bytes(), (reg.root / "journal.jsonl").read_bytes()
    with pytest.raises(RegistryError, match="already"):
        apply(reg, "r1", rng)
    assert ((reg.root / "manifest.json").read_bytes(), (reg.root / "journal.jsonl").read_bytes()) == before
    assert reg.verify() == []


def test_a_commit_without_an_adapter_is_refused(tmp_path):
    reg = make_registry(tmp_path / "reg")
    with reg.writer() as w, pytest.raises(RegistryError, match="no adapter"):
        with w.begin("r1") as txn:
            txn.put_record("request.json", {"id": "r1"})
            txn.commit(entry_for())
    assert reg.snapshot().requests == [] and reg.journal()[-1]["event"] == "abort"


def test_an_adapter_round_trips_and_loads_in_peft_layout(tmp_path):
    reg = make_registry(tmp_path / "reg")
    entry, adapter, _ = apply(reg, "r1", np.random.default_rng(1))
    loaded = reg.snapshot().adapter(entry)
    assert loaded.kind == "lora" and loaded.scale == 8 / R and loaded.modules == sorted(MODULES)
    for module, parts in adapter.weights.items():
        assert loaded.weights[module]["A"].shape == (R, D_IN) and loaded.weights[module]["B"].shape == (D_OUT, R)
        np.testing.assert_array_equal(loaded.weights[module]["A"], parts["A"])
        np.testing.assert_array_equal(loaded.weights[module]["B"], parts["B"])
    # PEFT's own reader finds the same factors under the same keys
    from peft.utils import load_peft_weights

    peft_weights = load_peft_weights(str(reg.snapshot().folder(entry)), device="cpu")
    np.testing.assert_array_equal(peft_weights[f"base_model.model.{MODULES[0]}.lora_A.weight"].numpy(), adapter.weights[MODULES[0]]["A"])


@pytest.mark.parametrize("kind", ["sine", "masked"])
def test_sine_and_masked_adapters_round_trip_bit_for_bit(tmp_path, kind):
    rng = np.random.default_rng(2)
    if kind == "sine":
        weights = {m: {"dW": rng.standard_normal((D_OUT, D_IN)).astype(np.float32)} for m in MODULES}
        config = {}
    else:
        weights = {m: {"indices": np.sort(rng.choice(D_OUT * D_IN, 7, replace=False)).astype(np.int64),
                       "values": rng.standard_normal(7).astype(np.float32)} for m in MODULES}
        config = {"shapes": {m: [D_OUT, D_IN] for m in MODULES}}
    reg = make_registry(tmp_path / "reg")
    with reg.writer() as w, w.begin("r1") as txn:
        txn.put_adapter(Adapter(kind, weights, config))
        txn.put_record("request.json", {"id": "r1"})
        entry = txn.commit(entry_for())
    assert set(entry["files"]) == {f"{kind}_config.json", f"{kind}_model.safetensors", "request.json"}
    loaded = reg.snapshot().adapter(entry)
    assert (loaded.kind, loaded.config, loaded.modules) == (kind, config, sorted(MODULES))
    for module, parts in weights.items():
        for part, value in parts.items():
            assert loaded.weights[module][part].dtype == value.dtype
            np.testing.assert_array_equal(loaded.weights[module][part], value)


def test_a_lora_config_the_registry_would_scale_wrongly_is_refused(tmp_path):
    reg = make_registry(tmp_path / "reg")
    adapter = lora(np.random.default_rng(0))
    adapter.config["use_rslora"] = True
    with reg.writer() as w, w.begin("r1") as txn:
        txn.put_adapter(adapter)
        entry = txn.commit(entry_for())
    with pytest.raises(ValueError, match="rslora"):
        reg.snapshot().adapter(entry)


def _commit_with_basis_file(reg: Registry, request_id: str, rng, write) -> dict:
    with reg.writer() as w, w.begin(request_id) as txn:
        txn.put_adapter(lora(rng))
        write(txn)
        txn.put_record("request.json", {"id": request_id})
        return txn.commit(entry_for())


def test_forget_keys_are_a_file_of_their_own_read_back_hash_checked_and_absent_from_older_requests(tmp_path):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(6)
    q, v = MODULES
    keys = Basis(orthonormal(rng, D_IN, 2), np.array([0.05, 0.01], dtype=np.float32), ["one"] * 2)
    one = _commit_with_basis_file(reg, "one", rng, lambda txn: (txn.put_bases({q: keys, v: keys}),
                                                               txn.put_bases({q: keys}, FORGET_KEYS_FILE)))
    older, _, _ = apply(reg, "older", rng)  # a request committed without forget keys
    state = reg.snapshot()
    read = state.forget_keys(one)
    assert set(read) == {q} and read[q].owners == ["one", "one"]
    np.testing.assert_array_equal(read[q].columns, keys.columns)
    assert state.forget_keys(older) == {} and FORGET_KEYS_FILE in one["files"]
    assert state.bases()[q].rank == 2 + COLUMNS_PER_REQUEST[q]  # the keys do not join the retained columns
    path = state.folder(one) / FORGET_KEYS_FILE
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0xFF]))
    with pytest.raises(RegistryDamaged, match="one is damaged"):
        reg.snapshot().forget_keys(one)


def test_a_shared_basis_is_stored_once_compressed_and_read_back_shared_and_format_2_files_still_read(tmp_path):
    import h5py

    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(5)
    q, v = MODULES
    shared = Basis(orthonormal(rng, D_IN, 3), np.full(3, 0.2, dtype=np.float32), ["one"] * 3)
    big = Basis(orthonormal(rng, 4096, 8), np.full(8, 0.1, dtype=np.float32), ["one"] * 8)  # 128 KB of columns
    sizes = []
    one = _commit_with_basis_file(reg, "one", rng,
                                  lambda txn: sizes.append(txn.put_bases({q: shared, v: shared, "wide": big})))
    path = reg.snapshot().folder(one) / "basis.h5"
    assert sizes == [path.stat().st_size]
    with h5py.File(path, "r") as f:
        assert sorted(f) == sorted([q, "wide"]) and list(f[q].attrs["layers"]) == [q, v] and f.attrs["request"] == "one"
        assert f["wide"]["columns"].compression == "gzip" and f["wide"]["columns"].chunks
        assert f[q]["columns"].compression is None  # too small for a chunk index to pay
    assert path.stat().st_size < big.columns.nbytes  # gzip after shuffling keeps less than the raw floats
    bases = reg.snapshot().bases()
    assert bases[q] is bases[v]
    np.testing.assert_array_equal(bases[q].columns, shared.columns)
    np.testing.assert_array_equal(bases["wide"].columns, big.columns)

    later = {m: orthonormal(rng, D_IN, k) for m, k in ((q, 2), (v, 1))}

    def format_2(txn):  # as earlier versions wrote it: one group per layer, no attributes
        with h5py.File(txn.staged / "basis.h5", "w") as f:
            f.attrs["format"] = "seqforget-basis/2"
            for m, c in later.items():
                f.create_group(m).create_dataset("columns", data=c)
                f[m].create_dataset("energy", data=np.full(c.shape[1], 0.1, dtype=np.float32))

    _commit_with_basis_file(reg, "two", rng, format_2)
    bases = reg.snapshot().bases()
    assert bases[q] is not bases[v] and (bases[q].rank, bases[v].rank) == (5, 4)
    assert bases[q].owners == ["one"] * 3 + ["two"] * 2
    np.testing.assert_array_equal(bases[v].columns[:, 3:], later[v])

    def unknown(txn):
        with h5py.File(txn.staged / "basis.h5", "w") as f:
            f.attrs["format"] = "seqforget-basis/99"

    _commit_with_basis_file(reg, "three", rng, unknown)
    with pytest.raises(RegistryError, match="basis format 'seqforget-basis/99' is not one this version reads"):
        reg.snapshot().bases()


def test_bases_join_in_commit_order_with_owners(tmp_path):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(2)
    # one orthonormal set per module, split across three requests (as extend_basis grows it);
    # the ids sort neither alphabetically nor in reverse as they were committed
    sizes = {"mid": 3, "zeta": 2, "alpha": 1}
    full = {m: orthonormal(rng, D_IN, sum(sizes.values())) for m in MODULES}
    start, parts = 0, {}
    for rid, k in sizes.items():
        parts[rid] = {m: full[m][:, start : start + k] for m in MODULES}
        start += k
    parts["zeta"] = {MODULES[0]: parts["zeta"][MODULES[0]]}  # zeta adds nothing to the second module
    entries = {rid: apply(reg, rid, rng, columns=cols)[0] for rid, cols in parts.items()}
    assert [entries[rid]["seq"] for rid in sizes] == [1, 2, 3]
    with reg.writer() as w:
        w.set_state("mid", "rolled_back")  # rolled-back requests keep their columns

    bases = reg.snapshot().bases()
    q, v = bases[MODULES[0]], bases[MODULES[1]]
    np.testing.assert_array_equal(q.columns, full[MODULES[0]])
    assert q.owners == ["mid", "mid", "mid", "zeta", "zeta", "alpha"]
    np.testing.assert_array_equal(v.columns, np.concatenate([full[MODULES[1]][:, :3], full[MODULES[1]][:, 5:]], axis=1))
    assert v.owners == ["mid", "mid", "mid", "alpha"]
    assert q.dim == D_IN and q.rank == 6
    assert q.energy.shape == (6,)
    np.testing.assert_allclose(q.columns.T @ q.columns, np.eye(6), atol=1e-6)


def test_new_folder_publishes_all_at_once_or_not_at_all(tmp_path):
    with new_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()  # nothing visible before the block ends
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]

    with pytest.raises(ValueError):
        with new_folder(tmp_path / "failed") as tmp:
            (tmp / "half.txt").write_text("h")
            raise ValueError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no folder, no temp left

    with pytest.raises(OSError):  # a folder with content is never replaced ...
        with new_folder(tmp_path / "out") as tmp:
            (tmp / "b.txt").write_text("b")
    with new_folder(tmp_path / "out", keep_existing=True) as tmp:  # ... and a cache keeps the first one
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- tampering --------------------------------------------------------------------------

WEIGHTS = "adapter_model.safetensors"


def flip_a_byte(folder: Path) -> str:
    path = folder / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte is tensor data, so the file still parses
    path.write_bytes(bytes(data))
    return f"{WEIGHTS}: sha256 mismatch"


def delete_a_file(folder: Path) -> str:
    (folder / WEIGHTS).unlink()
    return f"{WEIGHTS}: missing"


def add_a_file(folder: Path) -> str:
    (folder / "extra.bin").write_bytes(b"\0")
    return "extra.bin: not in the manifest"


def remove_the_folder(folder: Path) -> str:
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    return "folder missing"


@pytest.mark.parametrize("tamper", [flip_a_byte, delete_a_file, add_a_file, remove_the_folder])
def test_tampering_is_reported_by_verify_and_refused_by_load(tmp_path, tamper):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(3)
    apply(reg, "r1", rng)
    entry, _, _ = apply(reg, "r2", rng)
    assert reg.verify() == []

    expected = tamper(reg.snapshot().folder(entry))

    problems = reg.verify()
    assert len(problems) == 1
    assert "requests/r2" in problems[0] and expected in problems[0]
    state = reg.snapshot()
    with pytest.raises(RegistryDamaged, match="r2 is damaged"):
        state.adapter(entry)
    with pytest.raises(RegistryDamaged, match="r2 is damaged"):
        state.bases()
    state.adapter(state.find("r1"))  # the sound request still loads


def test_verify_reports_a_duplicate_id_and_an_unknown_state(tmp_path):
    reg = make_registry(tmp_path / "reg")
    entry, _, _ = apply(reg, "r1", np.random.default_rng(0))
    manifest = reg.snapshot().manifest
    manifest["requests"].append({**entry, "state": "half-done"})
    (reg.root / "manifest.json").write_text(json.dumps(manifest))
    problems = reg.verify()
    assert any("listed twice" in p for p in problems)
    assert any("unknown state 'half-done'" in p for p in problems)


def test_a_snapshot_stays_consistent_while_a_writer_changes_the_registry(tmp_path):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(9)
    apply(reg, "r1", rng)
    state = reg.snapshot()
    with reg.writer() as w:
        w.set_state("r1", "rolled_back")
    apply(reg, "r2", rng)
    assert [e["id"] for e in state.active] == ["r1"]  # what the snapshot saw, not what is now
    assert state.adapter(state.find("r1")).kind == "lora"
    assert [e["id"] for e in reg.snapshot().active] == ["r2"]


# ---- crash safety -------------------------------------------------------------------------


class Faults:
    """Fail the n-th call (counted across every patched function) with OSError, once.

    Patches the system calls and file opens a commit makes (the journal's appends
    included: they are os.open, os.write and os.fsync), so that every step of the commit
    path can be made to fail in turn.
    """

    def __init__(self, patch, fail_at: int):
        self.fail_at, self.calls, self.fired = fail_at, 0, None
        for owner, name in [(os, "replace"), (os, "rename"), (os, "fsync"), (os, "open"), (os, "write"),
                            (builtins, "open")]:
            patch.setattr(owner, name, self._wrap(getattr(owner, name), f"{owner.__name__}.{name}"))

    def _wrap(self, real, label):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                self.fired = label
                raise OSError(errno.EIO, f"injected failure at call {self.fail_at} ({label})")
            return real(*args, **kwargs)

        return call


def test_a_failure_at_every_step_of_a_commit_leaves_old_or_new_never_between(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    fired = []
    for n in itertools.count(1):
        reg = make_registry(tmp_path / f"reg{n}")
        apply(reg, "r1", rng)
        old = reg.snapshot().manifest
        with reg.writer() as w:
            txn = w.begin("r2")
            adapter, _ = stage(txn, "r2", rng)
            with monkeypatch.context() as patch:
                faults = Faults(patch, fail_at=n)
                try:
                    txn.commit(entry_for())
                except OSError as e:
                    assert "injected failure" in str(e)
        if faults.fired is None:
            break  # the commit ran past its last patched call: every step has been failed once
        fired.append(faults.fired)

        # the crash is over: readers see the old manifest or the whole new request
        now = reg.snapshot().manifest
        committed = now != old
        if committed:
            assert now["requests"][:-1] == old["requests"]
            new = now["requests"][-1]
            assert new["id"] == "r2" and new["seq"] == 2
            assert set(new["files"]) == FILES
        assert reg.verify() == [], f"failure at {faults.fired} (call {n})"

        # the next writer clears what the crash left and closes the journal
        with reg.writer():
            pass
        assert reg.leftovers() == []
        assert reg.verify() == []
        assert unfinished(reg) == []
        recovered = [r for r in reg.journal() if r["event"] == "recovered"]
        if recovered:
            assert recovered == [{**recovered[0], "id": "r2", "outcome": "committed" if committed else "discarded"}]
        else:
            assert committed  # only a commit whose journal record was written needs no recovery

        if not committed:
            _, adapter, _ = apply(reg, "r2", rng)
        state = reg.snapshot()
        assert [e["id"] for e in state.requests] == ["r1", "r2"] and state.find("r2")["seq"] == 2
        loaded = state.adapter(state.find("r2"))
        np.testing.assert_array_equal(loaded.weights[MODULES[0]]["A"], adapter.weights[MODULES[0]]["A"])
        assert reg.verify() == [] and reg.leftovers() == []

    # the injection really fired, at every kind of step the commit takes
    assert len(fired) == n - 1 >= 15
    kinds = {label.rsplit(".", 1)[-1] for label in fired}
    assert {"replace", "rename", "fsync", "open", "write"} <= kinds


def test_recovery_removes_every_kind_of_leftover_and_nothing_committed(tmp_path):
    reg = make_registry(tmp_path / "reg")
    apply(reg, "r1", np.random.default_rng(5))
    before = reg.snapshot().manifest
    (reg.root / "staging" / "r2.0123abcd").mkdir()
    (reg.root / "staging" / "r2.0123abcd" / WEIGHTS).write_bytes(b"half")
    (reg.root / "requests" / "r3").mkdir()  # renamed in by a writer that died before the manifest
    with open(reg.root / "journal.jsonl", "a") as f:
        f.write(json.dumps({"event": "begin", "id": "r3"}) + "\n")
    (reg.root / ".manifest.json.tmp-12345").write_text("{")
    assert {p.name for p in reg.leftovers()} == {"r2.0123abcd", "r3", ".manifest.json.tmp-12345"}
    assert reg.verify() == []  # leftovers are invisible, not damage

    with reg.writer():
        pass

    assert reg.leftovers() == []
    assert reg.snapshot().manifest == before
    assert (reg.root / "requests" / "r1").is_dir()
    assert reg.verify() == []


def test_a_folder_no_write_of_ours_left_is_reported_and_never_deleted(tmp_path):
    reg = make_registry(tmp_path / "reg")
    apply(reg, "r1", np.random.default_rng(5))
    (reg.root / "requests" / "stranger").mkdir()
    (reg.root / "requests" / "stranger" / "adapter_model.safetensors").write_bytes(b"someone's")
    assert reg.leftovers() == []
    assert any("requests/stranger" in p and "not in the manifest" in p for p in reg.verify())
    with reg.writer():
        pass
    assert (reg.root / "requests" / "stranger" / "adapter_model.safetensors").read_bytes() == b"someone's"


def test_an_error_inside_a_transaction_drops_its_files_and_closes_the_attempt(tmp_path):
    reg = make_registry(tmp_path / "reg")
    with reg.writer() as w, pytest.raises(ValueError):
        with w.begin("r1") as txn:
            stage(txn, "r1", np.random.default_rng(6))
            raise ValueError("x" * 1000)
    assert not txn.staged.exists()
    assert reg.leftovers() == []
    assert reg.snapshot().requests == []
    last = reg.journal()[-1]
    assert last["event"] == "abort" and last["id"] == "r1" and len(last["reason"]) == 500
    with reg.writer():
        pass
    assert not any(r["event"] == "recovered" for r in reg.journal())


def test_an_error_after_the_commit_point_says_the_request_stands(tmp_path, monkeypatch):
    reg = make_registry(tmp_path / "reg")
    with reg.writer() as w, pytest.raises(RegistryError, match="r1 is committed"):
        with w.begin("r1") as txn:
            stage(txn, "r1", np.random.default_rng(7))
            txn.commit(entry_for())
            raise OSError("journal device gone")
    events = [(r["event"], r.get("id")) for r in reg.journal()]
    assert ("abort", "r1") not in events  # the journal must not contradict the manifest
    assert reg.snapshot().find("r1")["state"] == "active" and reg.verify() == []


# ---- journal ------------------------------------------------------------------------------


def test_journal_records_begin_commit_and_abort(tmp_path):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(7)
    apply(reg, "r1", rng)
    with reg.writer() as w:
        w.begin("r2", method="gd").abort("no luck")
    events = [(r["event"], r.get("id")) for r in reg.journal()]
    assert events == [("init", None), ("begin", "r1"), ("commit", "r1"), ("begin", "r2"), ("abort", "r2")]
    assert reg.journal()[3]["method"] == "gd"
    assert all("time" in r for r in reg.journal())


def test_a_torn_last_line_is_skipped_and_the_next_append_starts_a_fresh_line(tmp_path):
    reg = make_registry(tmp_path / "reg")
    path = reg.root / "journal.jsonl"
    before = reg.journal()
    with open(path, "ab") as f:
        f.write(b'{"event": "begin", "id": "r')  # a crash in the middle of a line
    assert reg.journal() == before

    with reg.writer() as w:
        w.begin("r9").abort("test")

    records = reg.journal()
    assert [r["event"] for r in records] == ["init", "begin", "abort"]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a newline
    assert lines[1] == b'{"event": "begin", "id": "r'  # the torn line stays alone on its line
    assert [json.loads(line)["id"] for line in lines[2:-1]] == ["r9", "r9"]


def test_recovery_closes_a_begin_that_has_no_outcome(tmp_path):
    reg = make_registry(tmp_path / "reg")
    with reg.writer() as w:
        w.begin("r1")  # the writer dies here: no commit, no abort
    assert unfinished(reg) == ["r1"]

    with reg.writer():
        pass
    last = reg.journal()[-1]
    assert (last["event"], last["id"], last["outcome"]) == ("recovered", "r1", "discarded")
    assert unfinished(reg) == []
    assert reg.leftovers() == []  # its staging folder went too

    with reg.writer():  # recovered once, not again
        pass
    assert sum(r["event"] == "recovered" for r in reg.journal()) == 1


def test_recovery_reads_the_journal_from_its_last_begin_and_gc_reads_all_of_it(tmp_path):
    """Every writer recovers before it begins, so only the last begin can be open: a writer reads
    the journal from there on. A begin left open further back (which no writer of this registry
    leaves) is found by `gc`'s thorough recovery, with the folder it left."""
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(8)
    apply(reg, "r1", rng)
    apply(reg, "r2", rng)
    path = reg.root / "journal.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + json.dumps({"event": "begin", "id": "old"}) + "\n" + "".join(lines[1:]))
    (reg.root / "requests" / "old").mkdir()
    with reg.writer():
        pass
    assert unfinished(reg) == ["old"] and (reg.root / "requests" / "old").is_dir()
    assert [p.name for p in reg.leftovers()] == ["old"]

    with reg.writer(thorough=True) as w:
        assert [p.name for p, _ in w.removed] == ["old"]
    assert unfinished(reg) == [] and reg.leftovers() == []
    assert [e["id"] for e in reg.snapshot().requests] == ["r1", "r2"] and reg.verify() == []


@pytest.mark.parametrize("cut", [0.25, 0.5, 0.75])
def test_a_begin_left_open_is_found_wherever_the_journal_tail_is_cut(tmp_path, cut):
    """A writer reads the journal backwards in 64 KiB pieces: an open begin whose line a piece
    cuts is still read whole, and records after it (a torn last line too) do not hide it."""
    reg = make_registry(tmp_path / "reg")
    apply(reg, "r1", np.random.default_rng(11))
    begin = json.dumps({"event": "begin", "id": "r2", "padding": "x" * 400}) + "\n"
    after = []
    while len("".join(after)) < (1 << 16) - len(begin) * cut:
        after.append(json.dumps({"event": "reject", "id": None, "source": f"s{len(after)}"}) + "\n")
    with open(reg.root / "journal.jsonl", "a") as f:
        f.write(json.dumps({"event": "reject", "id": None, "source": "x" * (1 << 16)}) + "\n" + begin + "".join(after))
        f.write('{"event": "commit", "id": "r')  # torn by a crash
    (reg.root / "staging" / "r2.0123abcd").mkdir()
    with reg.writer():
        pass
    last = reg.journal()[-1]
    assert (last["event"], last["id"], last["outcome"]) == ("recovered", "r2", "discarded")
    assert unfinished(reg) == [] and reg.leftovers() == []


def test_a_writer_begins_one_write_at_a_time(tmp_path):
    reg = make_registry(tmp_path / "reg")
    with reg.writer() as w:
        w.begin("r1")  # never committed nor aborted
        with pytest.raises(RegistryError, match="r1 has not ended"):
            w.begin("r2")
    assert [r.get("id") for r in reg.journal() if r["event"] == "begin"] == ["r1"]
    apply(reg, "r2", np.random.default_rng(9))  # the next writer recovers r1 first
    assert unfinished(reg) == [] and reg.snapshot().find("r2") is not None


def test_a_folder_an_abort_could_not_remove_is_cleared_when_its_id_begins_again(tmp_path, monkeypatch):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(10)
    with reg.writer() as w, pytest.raises(ValueError):
        with w.begin("r1") as txn:
            stage(txn, "r1", rng)
            (reg.root / "requests" / "r1").mkdir()  # as if renamed in, and then ...
            monkeypatch.setattr("shutil.rmtree", lambda *a, **k: None)  # ... the abort cannot remove it
            raise ValueError("training failed")
    monkeypatch.undo()
    assert unfinished(reg) == [] and (reg.root / "requests" / "r1").is_dir()
    entry, _, _ = apply(reg, "r1", rng)
    assert entry["id"] == "r1" and reg.verify() == [] and reg.leftovers() == []

    (reg.root / "requests" / "r2").mkdir()  # no write of ours began it: not ours to delete
    with reg.writer() as w, pytest.raises(RegistryError, match="requests/r2 is in the way"):
        w.begin("r2")
    assert (reg.root / "requests" / "r2").is_dir()


# ---- states -------------------------------------------------------------------------------


def test_set_state_rolls_back_once_and_back(tmp_path):
    reg = make_registry(tmp_path / "reg")
    rng = np.random.default_rng(8)
    apply(reg, "r1", rng)
    apply(reg, "r2", rng)
    with reg.writer() as w:
        entry = w.set_state("r1", "rolled_back")
    assert entry["state"] == "rolled_back" and "rolled_back_at" in entry
    state = reg.snapshot()
    assert state.find("r1")["state"] == "rolled_back"
    assert [e["id"] for e in state.active] == ["r2"]
    assert reg.journal()[-1] == {**reg.journal()[-1], "event": "rolled_back", "id": "r1"}
    assert reg.verify() == []  # a state change touches no request file

    before = reg.snapshot().manifest
    with reg.writer() as w:
        with pytest.raises(RegistryError, match="already rolled back"):
            w.set_state("r1", "rolled_back")
        with pytest.raises(RegistryError, match="no request 'r7'"):
            w.set_state("r7", "rolled_back")
        with pytest.raises(RegistryError, match="unknown state"):
            w.set_state("r2", "deleted")
    assert reg.snapshot().manifest == before

    with reg.writer() as w:
        w.set_state("r1", "active")
    assert [e["id"] for e in reg.snapshot().active] == ["r1", "r2"]
    with reg.writer() as w, pytest.raises(RegistryError, match="already active"):
        w.set_state("r1", "active")


# ---- the writer lock ------------------------------------------------------------------------

HOLD = """
import sys, time
from registry import Registry
with Registry.open(sys.argv[1]).writer():
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_until_the_holder_is_killed(tmp_path):
    reg = make_registry(tmp_path / "reg")
    lock_bytes = (reg.root / "lock").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(reg.root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n", holder.stderr.read()
        with pytest.raises(RegistryBusy, match="busy"):
            with reg.writer(wait=False):
                pass
        assert holder.poll() is None  # refused while the holder was alive, not after
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        holder.stdout.close()
        holder.stderr.close()
    assert holder.returncode == -signal.SIGKILL

    with reg.writer(wait=False) as w:  # the kernel dropped the dead holder's lock
        w.begin("r1")
    assert reg.verify() == []
    assert (reg.root / "lock").read_bytes() == lock_bytes  # taking the lock writes nothing
