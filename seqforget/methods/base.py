"""What a method may leave out, at its defaults: every method inherits them (seqforget.methods)."""

from typing import ClassVar


class Defaults:
    adapters: ClassVar[tuple[str, ...]] = ("lora", "sine")  # the adapter kinds it trains (seqforget.updates), its default first
    budget: ClassVar[dict] = {}  # defaults of the request's `steps` and `lr` (none: 30 steps at 1e-3)
    needs_reference: ClassVar[bool] = False  # True: it cannot train without reference rows like the forget rows
    layers: ClassVar[tuple[str, ...] | None] = None  # roles (seqforget.scopes.ROLES) it trains in place of the scope's
    gated_args: ClassVar[dict] = {}  # defaults of its arguments for a gated registry's requests (seqforget.scopes.Gated)
    step_guard: ClassVar[float | None] = None  # a bound (nats per answer token) on each step's rise of the retain loss
