"""Deletion requests: parsing and validation of the request file and its data.

A request is YAML or JSON:

    id: forget-person-07          # letters, digits, . _ - (a folder name in the registry)
    scope: full                   # visual | full | refuse
    method: gd                    # optional: the scope's default (seqforget.scopes.SCOPES)
    forget: forget.jsonl          # rows to forget
    retain: retain.jsonl          # rows to keep (optional if the registry has a default)
    reference: unseen.jsonl       # rows of the same kinds the model never saw: training stops
                                  # when the forget rows look like them (optional)
    partial: false                # commit even if that level is not reached, marked partial
    # optional: any field of `Training`, plus
    method_args: {retain_weight: 1.0}
    target_modules: [mlp.fc1]     # instead of the scope's default layers
    refusal: "I cannot help with that."

Relative paths resolve against the request file. `load_request` reports every
problem it finds in one error.
"""

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from registry import sha256_file
from seqforget.data import Row, read_rows
from seqforget.errors import SeqforgetError
from seqforget.projection import SKETCH_RANK
from seqforget.scopes import SCOPES
from seqforget.updates import UPDATES
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_LISTED = 12


@dataclass(frozen=True)
class Training:
    """Training settings of one request's adapter."""

    steps: int = 30  # optimiser steps: a budget; the stopping rule may end training sooner
    lr: float = 1e-3  # AdamW learning rate
    # (a method may bring its own defaults for these two: seqforget.methods, `budget`)
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha; the update is (alpha / r) * B A
    batch_size: int = 8  # rows per forget batch and per retain batch
    energy_threshold: float = 0.97  # share of retained input energy the null-space basis must hold
    sketch_rank: int = SKETCH_RANK  # layers wider than twice this keep a sketch of this rank of their retained inputs
    projection: bool = True  # project updates into the null space of retained inputs
    seed: int = 0
    check_every: int = 25  # steps between checks of the stopping rule and the retain guard
    retain_tolerance: float = 0.02  # retain token accuracy the guard lets go (1.0: no guard)
    guard_share: float = 0.2  # share of the retain images (and text rows) kept out of training for the guard to watch
    earlier_dropout: float = 0.0  # chance each earlier active request's term is off for an optimiser step (seqforget.live.EarlierOff)
    targets_from_base: bool = False  # compute what the method holds the model to (retained rows' answers, strangers'
    # answers, a reference model) under the base model, every earlier request off, not the live model before it
    keep_forgotten: bool = False  # also project updates off the directions earlier active requests' forget rows send
    # through the target layers (their forget keys): this request cannot move what they made of them
    apart_from_earlier: bool = False  # also project updates off every input direction the earlier active requests'
    # terms read, so that no two adapters share one (O3's orthogonal subspaces)
    known_limit: float = 1.0  # the reference level is reached only when every kind of forget question is told from
    # strangers' by at most this share (seqforget.stopping.by_kind; 0.5: not at all; 1.0: the median rule alone)


@dataclass(frozen=True)
class Request:
    id: str
    scope: str
    method: str
    source: str  # where it was read: a file, or a JSONL file and line
    forget_path: Path
    retain_path: Path
    forget: list[Row]
    retain: list[Row]
    training: Training = Training()
    adapter: str = "lora"  # the adapter kind that trains (seqforget.updates): the method's default unless named
    method_args: dict = field(default_factory=dict)
    target_modules: list[str] | None = None
    refusal: str = "I cannot help with that."
    reference_path: Path | None = None  # rows the model never saw: the level to stop at
    reference: list[Row] = field(default_factory=list)
    partial: bool = False  # commit even if the level is not reached, marked partial
    data_sha256: dict = field(default_factory=dict)  # {"forget": ..., "retain": ..., "reference": ...} of the JSONL files

    def content(self) -> dict:
        """What the request asks for, independent of where its files lie."""
        return {
            "id": self.id,
            "scope": self.scope,
            "method": self.method,
            **({"adapter": self.adapter} if self.adapter != _default_adapter(self.method) else {}),
            "method_args": self.method_args,
            "training": {k: v for k, v in dataclasses.asdict(self.training).items()
                         if k not in _LATER or v != _TRAINING[k].default},
            "target_modules": self.target_modules,
            "refusal": self.refusal if SCOPES[self.scope].answers_refusal else None,
            "partial": self.partial,
            "data_sha256": self.data_sha256,
        }

    def sha256(self) -> str:
        """Identity of the request's content: a re-sent request has the same, an edited one not."""
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """A JSON-able record of the request, as stored beside its adapter."""
        return {
            **self.content(),
            "sha256": self.sha256(),
            "source": self.source,
            "forget": {"path": str(self.forget_path), "rows": len(self.forget)},
            "retain": {"path": str(self.retain_path), "rows": len(self.retain)},
            "reference": {"path": str(self.reference_path), "rows": len(self.reference)} if self.reference_path else None,
        }


_CONTRACT = {"id", "scope", "method", "adapter", "forget", "retain", "reference", "partial", "method_args", "target_modules",
             "refusal"}
_TRAINING = {f.name: f for f in dataclasses.fields(Training)}
# Training fields added since earlier_dropout: they count in a request's identity only when set,
# so that a request committed before them is still recognised when re-sent. A new field goes here.
_LATER = ("targets_from_base", "sketch_rank", "keep_forgotten", "apart_from_earlier", "known_limit")


def read_request_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SeqforgetError(f"request file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        obj = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).replace("\n", " ")
        raise SeqforgetError(f"invalid request {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
    if not isinstance(obj, dict):
        raise SeqforgetError(f"invalid request {path}: expected a mapping of fields")
    return obj


def load_request(path: Path, default_retain: str | None = None, default_reference: str | None = None,
                 gated: bool = False) -> Request:
    """Parse and validate a request file and the data it names; raise with every problem at once."""
    path = Path(path).absolute()
    return parse_request(read_request_file(path), path, str(path), default_retain, default_reference, gated)


def parse_request(raw: dict, path: Path, source: str, default_retain: str | None = None,
                  default_reference: str | None = None, gated: bool = False) -> Request:
    """Validate a request given as a mapping, read from the file `path` (relative data paths
    resolve against its folder; `source` names it, e.g. a JSONL line), and the data it names.
    gated: it is for a gated registry, where a scope's `Gated` defaults (seqforget.scopes) and its
    method's `gated_args` come before the request's own fields."""
    path = Path(path).absolute()
    if not isinstance(raw, dict):
        raise SeqforgetError(f"invalid request {source}: expected a mapping of fields")
    problems: list[str] = []
    fields, chosen = _fields(raw, problems, gated)
    data = _data(raw, path, default_retain, default_reference, problems)
    partial = raw.get("partial", False)  # checked after the data, so that its problem keeps its place in the list
    if not isinstance(partial, bool):
        problems.append(f"partial: expected true or false, got {partial!r}")
    problems += _row_problems(fields["scope"], chosen, "method" not in raw, data["forget"], data["retain"],
                              data["reference"])
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise SeqforgetError(f"invalid request {Path(source).name}: " + "; ".join(shown))
    hashes = {"forget": sha256_file(data["forget_path"]), "retain": sha256_file(data["retain_path"]),
              **({"reference": sha256_file(data["reference_path"])} if data["reference_path"] else {})}
    return Request(**fields, **data, source=source, partial=partial, data_sha256=hashes)


def _fields(raw: dict, problems: list[str], gated: bool = False) -> tuple[dict, object]:
    """The request's own fields, checked, by Request's names for them, and its method built from
    its arguments (None unless they and the scope are valid), with a gated registry's defaults
    under them (`gated`). Each problem joins `problems`."""
    for key in sorted(set(raw) - _CONTRACT - set(_TRAINING)):
        problems.append(f"unknown field {key!r}")
    request_id = raw.get("id")
    if not isinstance(request_id, str) or not ID_PATTERN.match(request_id):
        problems.append("id: required, 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    scope = raw.get("scope")
    if not isinstance(scope, str) or scope not in SCOPES:
        problems.append(f"scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
        scope = None
    behind = SCOPES[scope].gated if gated and scope else None
    name, method_args, chosen, adapter = _method(raw, scope, problems, behind is not None)
    kind = UPDATES.get(adapter) if isinstance(adapter, str) else None
    training = _training(raw, problems, {**(behind.training if behind else {}), **(chosen.budget if chosen else {}),
                                         **(kind.budget if kind else {})})
    targets = raw.get("target_modules")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets) or not targets):
        problems.append("target_modules: expected a non-empty list of layer names")
    refusal = raw.get("refusal", Request.refusal)
    if not isinstance(refusal, str) or not refusal.strip():
        problems.append("refusal: expected a non-empty string")
        refusal = Request.refusal  # a stand-in: the request is refused
    return {"id": request_id, "scope": scope, "method": name, "adapter": adapter if kind else "lora",
            "method_args": method_args, "training": training, "target_modules": targets, "refusal": refusal.strip()}, chosen


def _method(raw: dict, scope: str | None, problems: list[str], gated: bool = False) -> tuple[object, dict, object, object]:
    """(name, arguments, method, adapter kind): the method the request names, else its scope's
    default, the method built from them (None unless they and the scope are valid), and the kind
    the request names, else the method's default; `gated`: the method's `gated_args` under the
    request's arguments. `method: sine` (with `method_args: {objective: M}`, default stranger)
    reads as method M with `adapter: sine`."""
    from seqforget.methods import METHODS, make_method, method_problems

    name = raw.get("method", SCOPES[scope].default if scope else None)
    method_args = raw.get("method_args") or {}
    adapter = raw.get("adapter")
    if not isinstance(method_args, dict):
        problems.append("method_args: expected a mapping")
        method_args = {}
    if name == "sine" and adapter in (None, "sine"):
        method_args = dict(method_args)
        name, adapter = method_args.pop("objective", "stranger"), "sine"
    if not isinstance(name, str):
        problems.append("method: expected a method name" if "method" in raw else "method: required when the scope is not known")
        return name, method_args, None, None
    if gated and name in METHODS:
        method_args = {**METHODS[name].gated_args, **method_args}
    found = method_problems(name, scope, method_args)
    if name in METHODS:
        kinds = METHODS[name].adapters
        if adapter is None:
            adapter = _default_adapter(name)
        elif adapter not in kinds:
            found.append(f"adapter: {name} trains {' or '.join(kinds)}, not {adapter!r}" if isinstance(adapter, str)
                         else f"adapter: expected one of {', '.join(kinds)}")
    problems += found
    return name, method_args, None if found or scope is None else make_method(name, method_args), adapter


def _default_adapter(method: str) -> str:
    """The adapter kind `method` trains unless a request names another."""
    from seqforget.methods import METHODS

    return METHODS[method].adapters[0] if method in METHODS else "lora"


def _data(raw: dict, path: Path, default_retain: str | None, default_reference: str | None,
          problems: list[str]) -> dict:
    """The request's data files, relative ones resolved against the folder of `path`, and their
    rows, by Request's names for them; the registry's defaults where it names no retain or
    reference set."""
    forget_path = _data_path(raw.get("forget"), path, "forget", problems)
    retain_value = raw.get("retain", default_retain)
    if retain_value is None:
        problems.append("retain: required (the registry has no default retain set)")
    retain_path = _data_path(retain_value, path, "retain", problems) if retain_value is not None else None
    forget = read_rows(forget_path, problems, "forget") if forget_path else []
    retain = read_rows(retain_path, problems, "retain") if retain_path else []
    reference_value = raw.get("reference", default_reference)
    reference_path = _data_path(reference_value, path, "reference", problems) if reference_value is not None else None
    reference = read_rows(reference_path, problems, "reference") if reference_path else []
    return {"forget_path": forget_path, "retain_path": retain_path, "reference_path": reference_path,
            "forget": forget, "retain": retain, "reference": reference}


def _row_problems(scope: str | None, method, by_default: bool, forget: list[Row], retain: list[Row],
                  reference: list[Row]) -> list[str]:
    """What the rows lack for the scope and the method (`by_default`: the scope's), and rows that
    are in two sets that must not share any."""
    problems = []
    if scope and not SCOPES[scope].forgets_text_rows and forget and not any(r.image for r in forget):
        problems.append("forget: a visual request needs rows with an image")
    if scope and not SCOPES[scope].forgets_text_rows and reference and not any(r.image for r in reference):
        problems.append("reference: a visual request needs reference rows with an image (its level is set by image rows)")
    problems += _reference_problems(method, scope, by_default, forget, reference)
    shared = set(forget) & set(retain)
    if shared:
        problems.append(f"forget and retain share {len(shared)} row(s): the basis would protect what is to be forgotten")
    if set(forget) & set(reference):
        problems.append("forget and reference share rows: reference rows must be about what the model never saw")
    return problems


def _reference_problems(method, scope, by_default: bool, forget: list[Row], reference: list[Row]) -> list[str]:
    """A method that answers the forgotten as it answers strangers needs reference rows like each forget row."""
    if method is None or not method.needs_reference:
        return []
    kinds = {r.image is not None for r in forget if r.image is not None or SCOPES[scope].forgets_text_rows}
    missing = kinds - {r.image is not None for r in reference}
    if not missing:
        return []
    which = " and ".join(label for has_image, label in ((True, "with an image"), (False, "with text only")) if has_image in missing)
    return [f"reference: method {method.name}{' (the default for ' + scope + ')' if by_default else ''} answers the forgotten as "
            f"it answers people the model never saw, and needs such rows {which}, like the forget rows: set reference, "
            "run init --reference, or name another method"]


def _data_path(value, request_path: Path, label: str, problems: list[str]) -> Path | None:
    if not isinstance(value, str) or not value:
        problems.append(f"{label}: required, a path to a JSONL file")
        return None
    p = Path(value)
    return p if p.is_absolute() else (request_path.parent / p).resolve()


def _training(raw: dict, problems: list[str], budget: dict) -> Training:
    values = dict(budget)
    for name, f in _TRAINING.items():
        if name not in raw:
            continue
        value = raw[name]
        if isinstance(value, str) and f.type is float:
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        kind = f.type
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            problems.append(f"{name}: expected {kind.__name__}, got {value!r}")
            continue
        values[name] = kind(value)
    bounds = {
        "steps": (1, 100_000),
        "lr": (1e-8, 1.0),
        "rank": (1, 1024),
        "alpha": (1e-6, 1e6),
        "batch_size": (1, 4096),
        "energy_threshold": (0.0, 1.0),
        "sketch_rank": (1, 65_536),
        "seed": (0, 2**32 - 1),
        "check_every": (1, 100_000),
        "retain_tolerance": (0.0, 1.0),
        "guard_share": (0.0, 0.5),
        "earlier_dropout": (0.0, 1.0),
        "known_limit": (0.5, 1.0),
    }
    for name, (lo, hi) in bounds.items():
        if name in values and not lo <= values[name] <= hi:
            problems.append(f"{name}: {values[name]} is outside [{lo}, {hi}]")
    for name in ("keep_forgotten", "apart_from_earlier"):
        if values.get(name) and values.get("projection") is False:
            problems.append(f"{name}: works by projection, which projection: false turns off")
    return Training(**values)
