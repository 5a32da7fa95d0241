"""Unlearning methods. Each is one file here and one line in METHODS.

A method is a small object with:
  name           its registry name
  scopes         the scopes it serves (seqforget.scopes.SCOPES; each scope names its default)
  source         where its mechanism comes from
  sign           +1 if the update it learns is added to the model, -1 if it is subtracted
                 (distil-then-delete methods; the stored adapter holds the negated factor)
  prepare(model, forget, retain, reference, original, update)  called once before training,
                 with every forget and retain row (seqforget.data.Rows), the reference rows
                 (never-seen strangers asked the forget rows' questions, answered with
                 the forget rows' answers, Rows.stands_for saying which; or None) and the
                 trainable update (seqforget.updates): where a method computes what its loss
                 needs from the whole request (a target, say), or restricts the update (a mask)
  loss(model, forget, retain, original)    its loss on a forget and a retain batch
In both, `with original():` runs the model as it was before this request (the update
switched off); wrap it in torch.no_grad().
It inherits these, at their defaults (seqforget.methods.base.Defaults), and may set them:
  adapters         the adapter kinds it can train (seqforget.updates: "lora", "sine", "masked"), its
                   default first; a request names another with `adapter` (by default a method
                   trains a LoRA or a sine residual)
  budget           a dict of defaults for the request's `steps` and `lr`
  needs_reference  True if it cannot train without reference rows like the forget rows
  layers           a tuple of roles (seqforget.scopes.ROLES): the layers it trains, in place of the
                   scope's (a request's target_modules still override both)
  gated_args       defaults of its arguments in a gated registry's requests of a scope that
                   gates (seqforget.scopes.Gated), under the request's own method_args
  step_guard       a bound (nats per answer token): each optimiser step that raises the retain
                   batch's loss by more is halved or undone (seqforget.training.guarded_step)
Its hyper-parameters are dataclass fields, set from the request's `method_args`; a number's
metadata "range" (low, high) bounds it (default: any finite number >= 0); a string field
lists its allowed values in metadata "choices".
"""

import dataclasses
import math
from typing import Callable, ContextManager, Protocol

import torch

from seqforget.data import Rows
from seqforget.methods.contrastive import ContrastiveVisual
from seqforget.methods.ga import GradientAscent
from seqforget.methods.gd import GradientDifference
from seqforget.methods.mmunlearner import MMUnlearner
from seqforget.methods.npo import NPO
from seqforget.methods.refusal import Refusal
from seqforget.methods.stranger import StrangerTarget
from seqforget.methods.target import AnswerTarget
from seqforget.methods.vleraser import VLEraser
from seqforget.scopes import SCOPES

Batch = dict[str, torch.Tensor]


class Method(Protocol):
    name: str
    scopes: tuple[str, ...]
    sign: int
    adapters: tuple[str, ...]
    source: str
    budget: dict
    needs_reference: bool
    layers: tuple[str, ...] | None
    gated_args: dict
    step_guard: float | None

    def prepare(self, model, forget: Rows, retain: Rows, reference: Rows | None, original: Callable[[], ContextManager],
                update) -> None: ...

    def loss(
        self, model, forget: Batch, retain: Batch, original: Callable[[], ContextManager]
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


METHODS: dict[str, type] = {m.name: m for m in (StrangerTarget, GradientDifference, GradientAscent, NPO, AnswerTarget,
                                                 ContrastiveVisual, MMUnlearner, VLEraser, Refusal)}


def served(scope: str) -> tuple[str, ...]:
    """The methods that serve `scope`, its default first, the others in METHODS' order."""
    default = SCOPES[scope].default
    return (default,) + tuple(name for name, cls in METHODS.items() if scope in cls.scopes and name != default)


def method_problems(name: str, scope: str, args: dict) -> list[str]:
    """Everything wrong with choosing method `name` for `scope` with `args`."""
    cls = METHODS.get(name)
    if cls is None:
        return [f"method: unknown {name!r} (known: {', '.join(sorted(METHODS))})"]
    problems = []
    if scope in SCOPES and scope not in cls.scopes:
        problems.append(f"method: {name} does not serve scope {scope!r} ({name} serves: {', '.join(scopes_of(name)) or 'none'}; "
                        f"methods for {scope}: {', '.join(served(scope))})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in args.items():
        if key not in fields:
            problems.append(f"method_args: {name} has no argument {key!r} (it has {', '.join(fields) or 'none'})")
        elif "choices" in fields[key].metadata:
            if value not in fields[key].metadata["choices"]:
                problems.append(f"method_args.{key}: expected one of {', '.join(fields[key].metadata['choices'])}, got {value!r}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            problems.append(f"method_args.{key}: expected a finite number, got {value!r}")
        else:
            low, high = fields[key].metadata.get("range", (0.0, math.inf))
            if not low <= value <= high:
                problems.append(f"method_args.{key}: {value} is outside [{low}, {high}]")
    return problems


def scopes_of(name: str) -> list[str]:
    return [scope for scope in SCOPES if scope in METHODS[name].scopes]


def describe() -> list[dict]:
    """Every method as `seqforget methods` shows it: scopes (and those it is the default of),
    adapter kind, arguments with defaults and bounds, step budget, and its source."""
    out = []
    for name, cls in sorted(METHODS.items()):
        method = cls()  # at its defaults: a method's budget may depend on its arguments
        args = [{"name": f.name, "default": f.default, **({"choices": list(f.metadata["choices"])} if "choices" in f.metadata else
                 {"range": [None if math.isinf(b) else b for b in f.metadata.get("range", (0.0, math.inf))]})}
                for f in dataclasses.fields(cls)]  # None: unbounded
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).rstrip(":")
        out.append({"name": name, "scopes": scopes_of(name),
                    "default_for": [scope for scope, s in SCOPES.items() if s.default == name],
                    "adapters": list(cls.adapters), "sign": cls.sign, "args": args,
                    "budget": dict(method.budget), "needs_reference": method.needs_reference,
                    "gated_args": dict(cls.gated_args), "gated_scopes": [s for s in scopes_of(name) if SCOPES[s].gated],
                    "summary": summary, "source": cls.source})
    return out


def make_method(name: str, args: dict) -> Method:
    return METHODS[name](**args)
