"""Which linear layers a request's adapter trains, by scope.

visual: the vision tower's MLPs and the projector (the language model stays frozen);
full:   the projector and the language model's attention (q, v) and MLP layers;
refuse: the language model's attention (q, v) and MLP layers.
"""

from torch import nn

VISION_SUFFIXES = ("mlp.fc1", "mlp.fc2")
LANGUAGE_SUFFIXES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def default_targets(model: nn.Module, scope: str) -> list[str]:
    names = _linears(model)
    vision = [n for n in names if "vision_tower" in n and n.endswith(VISION_SUFFIXES)]
    projector = [n for n in names if "multi_modal_projector" in n]
    language = [n for n in names if "language_model" in n and n.endswith(LANGUAGE_SUFFIXES)]
    return {"visual": vision + projector, "full": projector + language, "refuse": language}[scope]


def match_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Linear layers whose name equals a pattern or ends with '.' + pattern."""
    return [n for n in _linears(model) if any(n == p or n.endswith("." + p) for p in patterns)]
