"""Request scopes: which layers each trains, which methods serve it; and where each model
architecture keeps those layers. The two tables.

    visual  forget recognising the target from images; what is known of it from text
            stays. The vision tower's MLPs and the projector train; text-only forget rows
            join the retain set.
    full    forget the target in every modality. The projector and the language model's
            attention (q, v) and MLP layers train.
    refuse  answer the target's questions with a refusal. The language model's attention
            (q, v) and MLP layers train, towards the refusal.

In a gated registry (`init --gated`, seqforget.gate) a `visual` request's term reaches only the
images its gate picks, and the rows that show them: there it also trains the language model's
layers, and its stopping rule and defaults are those of `Scope.gated` (docs/requests.md).

Each scope names its default method; each method (seqforget.methods) names the scopes it
serves. Scopes name the parts they train by role
(`ROLES`); `ARCHITECTURES` says, per model family (its config's model_type), which linear
layers play each role.
"""

import re
from dataclasses import dataclass

from torch import nn

from seqforget.errors import SeqforgetError


@dataclass(frozen=True)
class Layers:
    """Linear layers whose name contains `part` and ends with one of `suffixes` (any, if empty)."""

    part: str
    suffixes: tuple[str, ...] = ()

    def select(self, names: list[str]) -> list[str]:
        return [n for n in names if self.part in n and (not self.suffixes or n.endswith(self.suffixes))]


ROLES = ("vision_mlp", "projector", "language", "language_mlp")


@dataclass(frozen=True)
class Architecture:
    """Where one family of models keeps the parts the scopes train."""

    vision_mlp: Layers  # the vision tower's MLPs
    projector: str  # the module mapping vision features to the language model's width, token by token
    language: Layers  # the language model's attention (q, v) and MLP projections
    language_mlp: Layers  # its MLP projections alone

    def layers(self, role: str) -> Layers:
        return Layers(self.projector) if role == "projector" else getattr(self, role)


_ATTENTION, _MLP = ("self_attn.q_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ARCHITECTURES = {  # config.model_type -> its layers
    "llava": Architecture(Layers("vision_tower", ("mlp.fc1", "mlp.fc2")), "multi_modal_projector",
                          Layers("language_model", _ATTENTION + _MLP), Layers("language_model", _MLP)),
    # Idefics3 (SmolVLM's design): a SigLIP encoder, a pixel-shuffle connector's projection, a Llama text model
    "idefics3": Architecture(Layers("vision_model", ("mlp.fc1", "mlp.fc2")), "connector.modality_projection",
                             Layers("text_model", _ATTENTION + _MLP), Layers("text_model", _MLP)),
}


@dataclass(frozen=True)
class Gated:
    """What a request of a scope trains, and its defaults, in a gated registry."""

    layers: tuple[str, ...]  # roles (ROLES), in place of the scope's
    training: dict  # defaults of the request's training settings (seqforget.requests.Training), before the method's


@dataclass(frozen=True)
class Scope:
    name: str
    layers: tuple[str, ...]  # roles (ROLES)
    default: str  # the method a request of this scope gets when it names none (each method lists the scopes it serves)
    forgets_text_rows: bool  # False: text-only forget rows are knowledge that stays (retained)
    answers_refusal: bool  # forget rows are trained towards the request's refusal
    gated: Gated | None = None  # in a gated registry; None: as in any other registry


SCOPES = {
    s.name: s
    for s in (
        # gated: the language model's layers too (they change only the rows whose image the gate picks,
        # so what is known from text stays), every kind of question told from strangers' at most 0.6
        # of the time, checked every 5 steps (benchmarks/FINDINGS.md, "Gated registries")
        Scope("visual", ("vision_mlp", "projector"), "stranger", forgets_text_rows=False, answers_refusal=False,
              gated=Gated(("vision_mlp", "projector", "language"), {"known_limit": 0.6, "check_every": 5})),
        Scope("full", ("projector", "language"), "stranger", forgets_text_rows=True, answers_refusal=False),
        Scope("refuse", ("language",), "refusal", forgets_text_rows=True, answers_refusal=True),
    )
}


def linear_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def architecture(model: nn.Module) -> Architecture:
    """The model's entry in ARCHITECTURES, or a one-line error naming the layers it has."""
    kind = getattr(model.config, "model_type", None)
    if kind in ARCHITECTURES:
        return ARCHITECTURES[kind]
    found = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", n) for n in linear_layers(model)))
    shown = ", ".join(found[:24]) + (f" and {len(found) - 24} more" if len(found) > 24 else "")
    raise SeqforgetError(f"unknown model architecture {kind!r} (seqforget knows {', '.join(ARCHITECTURES)}); its linear "
                         f"layers: {shown}. Name the layers to train with target_modules")


def scope_layers(model: nn.Module, scope: str, roles: tuple[str, ...] | None = None) -> list[str]:
    """The linear layers a request of `scope` trains: the scope's roles, or `roles` (a method's own) if given."""
    arch, names = architecture(model), linear_layers(model)
    return [n for role in (roles or SCOPES[scope].layers) for n in arch.layers(role).select(names)]


def match_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """Linear layers whose name equals a pattern or ends with '.' + pattern."""
    return [n for n in linear_layers(model) if any(n == p or n.endswith("." + p) for p in patterns)]
