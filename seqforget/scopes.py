"""Request scopes: which layers each trains, which methods serve it. The one table.

    visual  forget recognising the target from images; what is known of it from text
            stays. The vision tower's MLPs and the projector train; text-only forget rows
            join the retain set.
    full    forget the target in every modality. The projector and the language model's
            attention (q, v) and MLP layers train.
    refuse  answer the target's questions with a refusal. The language model's attention
            (q, v) and MLP layers train, towards the refusal.

A method listed first for a scope is its default.
"""

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layers:
    """Linear layers whose name contains `part` and ends with one of `suffixes` (any, if empty)."""

    part: str
    suffixes: tuple[str, ...] = ()

    def select(self, names: list[str]) -> list[str]:
        return [n for n in names if self.part in n and (not self.suffixes or n.endswith(self.suffixes))]


@dataclass(frozen=True)
class Scope:
    name: str
    layers: tuple[Layers, ...]
    methods: tuple[str, ...]  # the methods that serve this scope; the first is the default
    forgets_text_rows: bool  # False: text-only forget rows are knowledge that stays (retained)
    answers_refusal: bool  # forget rows are trained towards the request's refusal


VISION_MLP = Layers("vision_tower", ("mlp.fc1", "mlp.fc2"))
PROJECTOR = Layers("multi_modal_projector")
LANGUAGE = Layers("language_model", ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))

SCOPES = {
    s.name: s
    for s in (
        Scope("visual", (VISION_MLP, PROJECTOR), ("stranger", "gd", "ga", "npo", "target", "contrastive", "sine", "mmunlearner"),
              forgets_text_rows=False, answers_refusal=False),
        Scope("full", (PROJECTOR, LANGUAGE), ("stranger", "gd", "ga", "npo", "mmunlearner", "vleraser"), forgets_text_rows=True, answers_refusal=False),
        Scope("refuse", (LANGUAGE,), ("refusal",), forgets_text_rows=True, answers_refusal=True),
    )
}


def linear_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def scope_layers(model: nn.Module, scope: str, layers: tuple[Layers, ...] | None = None) -> list[str]:
    """The linear layers a request of `scope` trains: the scope's, or `layers` (a method's own) if given."""
    names = linear_layers(model)
    return [n for part in (layers or SCOPES[scope].layers) for n in part.select(names)]


def match_layers(model: nn.Module, patterns: list[str]) -> list[str]:
    """Linear layers whose name equals a pattern or ends with '.' + pattern."""
    return [n for n in linear_layers(model) if any(n == p or n.endswith("." + p) for p in patterns)]
