"""`seqforget stream`: apply requests as they arrive, each exactly once, resumable after any stop.

SOURCE is a folder of request files (YAML or JSON, taken in name order; names starting with
'.' are skipped, so a sender writes `.name.tmp` and renames it in, and a file is never read
half-written) or a JSONL file with one request per line, appended to as requests arrive (a
last line without its newline is not read yet). Relative data paths resolve against the
folder, or against the JSONL file's folder.

Exactly once, by the registry's own record: a request committed from the same text is
skipped at once (after a restart: everything done before it), and otherwise `apply`'s rules
hold: the same id with the same content is already done, a used id with another content is
refused. A refused request is recorded in the registry (`status` lists it) with the sha256
of its text, reported, and skipped: a later run skips it again unless its text changed.
A failure that is not the request's fault (a damaged registry, a full disk) stops the stream.

A kill -9 at any moment leaves what a killed `apply` leaves: the request in hand committed
or invisible, and the next start resumes from the registry. SIGTERM or SIGINT stops the
stream after the request in hand: one still training is abandoned at its next step (nothing
is committed), one past training commits.

The model, its processor and the bases are loaded once; each request brings the live model
up to date with the registry by differences (seqforget.live), so another process may apply
or roll back requests while the stream runs.
"""

import hashlib
import json
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

from registry import Registry
from seqforget.budget import budget_line, retained_words
from seqforget.engine import apply_request, base_model_dir, read_request
from seqforget.distributed import launched
from seqforget.errors import AlreadyDone, SeqforgetError, Stopped
from seqforget.live import Live
from seqforget.options import RunOptions
from seqforget.requests import read_request_file

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Item:
    """One request as the source holds it."""

    source: str  # "name.yaml" in a folder, "requests.jsonl:17" in a JSONL file
    path: Path  # the file it is in: relative data paths resolve against its folder
    digest: str  # sha256 of its text
    raw: dict | None  # its fields, or None if they could not be read
    problem: str | None = None  # why not

    @property
    def id(self) -> str | None:
        value = self.raw.get("id") if self.raw else None
        return value if isinstance(value, str) else None


def read_source(source: Path) -> list[Item]:
    """Every complete request SOURCE holds now, in order."""
    source = Path(source).absolute()
    if source.is_dir():
        return [_file_item(p) for p in sorted(source.iterdir())
                if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and p.is_file()]
    if source.is_file():
        return _jsonl_items(source)
    raise SeqforgetError(f"stream source {source} is neither a folder of request files nor a JSONL file")


def _file_item(path: Path) -> Item:
    text = path.read_bytes()
    digest = hashlib.sha256(text).hexdigest()
    try:
        return Item(path.name, path, digest, read_request_file(path))
    except SeqforgetError as e:
        return Item(path.name, path, digest, None, str(e))


def _jsonl_items(path: Path) -> list[Item]:
    text = path.read_bytes()
    complete = text[: text.rfind(b"\n") + 1]  # a line still being written has no newline yet
    items = []
    for number, line in enumerate(complete.split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        where, digest = f"{path.name}:{number}", hashlib.sha256(line).hexdigest()
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            items.append(Item(where, path, digest, None, f"invalid request {where}: not valid JSON ({e})"))
            continue
        problem = None if isinstance(raw, dict) else f"invalid request {where}: expected a JSON object"
        items.append(Item(where, path, digest, raw if problem is None else None, problem))
    return items


class StopSignal:
    """Set by SIGTERM or SIGINT while the stream runs; the previous handlers come back after."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        self.signal = signal.Signals(signum).name


@dataclass
class Tally:
    applied: int = 0
    skipped: int = 0  # done before: committed from the same text, or already applied
    rejected: int = 0
    abandoned: str | None = None  # the request a stop abandoned


def run_stream(root: Path, source: Path, run: RunOptions = RunOptions(), once: bool = False, poll: float = 2.0,
               log=print) -> Tally:
    """Apply SOURCE's requests in order until it is drained (`once`) or a stop is asked for
    (`run.stop`, a StopSignal). The registry's lock is held for each request in hand, not while
    the stream waits for more; `run.wait` false: a lock another process holds stops the stream
    (RegistryBusy) instead."""
    if launched():
        raise SeqforgetError("a stream runs in one process; under torchrun or accelerate launch, use `seqforget apply`")
    reg = Registry.open(root)
    state = reg.snapshot()
    live = Live.load(state, base_model_dir(state, run.model_dir), run.dtype, run.device)
    tally = Tally()
    stop = run.stop or StopSignal()  # one no `with` entered never fires
    run = replace(run, stop=stop)
    handled: set[tuple[str, str]] = set()  # items this run took, whatever came of them (an equal re-sent one leaves no record)
    while not stop():
        todo = [i for i in _not_applied(reg, read_source(source)) if (i.source, i.digest) not in handled]
        for n, item in enumerate(todo, start=1):
            if stop():
                break
            _one(reg, item, live, f"[{n}/{len(todo)}]", run, log, tally)
            if tally.abandoned:
                return tally
            handled.add((item.source, item.digest))
        if once and not todo:
            break
        if not todo:
            _sleep(poll, stop)
    return tally


def _not_applied(reg: Registry, items: list[Item]) -> list[Item]:
    """The items not yet done: neither committed from this very text nor rejected for it."""
    state = reg.snapshot()
    seen = {(e["stream"]["source"], e["stream"]["digest"]) for e in state.requests if e.get("stream")}
    seen |= {(r["source"], r["digest"]) for r in state.rejected}
    return [i for i in items if (i.source, i.digest) not in seen]


def _one(reg: Registry, item: Item, live: Live, counter: str, run: RunOptions, log, tally: Tally) -> None:
    start = time.perf_counter()
    try:
        if item.problem:
            raise SeqforgetError(item.problem)
        request = read_request(reg.snapshot(), item.path, item.raw, item.source)
        entry = apply_request(reg.root, request, run, live, source={"source": item.source, "digest": item.digest})
    except Stopped:
        tally.abandoned = item.id or item.source
        log(f"{counter} abandoned {tally.abandoned} ({run.stop.signal}): nothing of it was committed")
        return
    except AlreadyDone as e:
        tally.skipped += 1
        log(f"{counter} skipped {item.source}: {e}")
        return
    except SeqforgetError as e:  # the request's own fault; the registry's (RegistryError) stops the stream
        with reg.writer(wait=run.wait) as writer:
            writer.reject(item.source, item.digest, " ".join(str(e).split()), item.id)
        tally.rejected += 1
        state = reg.snapshot()
        log(f"{counter} rejected {item.source}: {' '.join(str(e).split())}"
            + (f" [{budget_line(state)}]" if state.guard else ""))
        return
    tally.applied += 1
    m = entry["metrics"]
    log(f"{counter} applied {entry['id']} ({entry['method']}, {entry['scope']}) in {time.perf_counter() - start:.1f}s: "
        f"forget acc {m['forget_acc'][0]:.2f} -> {m['forget_acc'][1]:.2f}, "
        f"retain acc {m['retain_acc'][0]:.2f} -> {m['retain_acc'][1]:.2f}"
        f"{', ' + retained_words(m['retained']) if m.get('retained') else ''}"
        f"{', partial' if entry.get('partial') else ''}")


def _sleep(seconds: float, stop: StopSignal) -> None:
    end = time.monotonic() + seconds
    while not stop() and time.monotonic() < end:
        time.sleep(min(0.2, end - time.monotonic()))
