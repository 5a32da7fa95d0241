"""Gates: a gated registry applies each visual request's term only to the images near its forget set.

In a gated registry (`init --gated`), a `visual` request's term is not composed into the
weights. It is added to the outputs of its layers (forward hooks) for the images its gate
picks, and to no others: an image no gate picks goes through the base model's vision tower
and projector, bit for bit, whatever the registry holds. Retained drift on such images is
zero by construction; what a gated request costs is its gate's false positives.

A gate is a Mahalanobis test on what the vision tower hands the projector, pooled to a grid of
at most CELLS x CELLS cells of the image's patches (`features`), under the vision tower without
the gated terms. The grid keeps where things lie in the image: the mean over all tokens loses it,
and at the benchmark's scale lets neighbouring people's images into a gate
(benchmarks/FINDINGS.md, "Gated registries"). Its statistics come from the request's forget
images and random views of them (representations.augment): their mean and the principal
directions of their covariance, shrunk towards the mean variance per dimension so that views
off those directions stay near. The threshold lies midway (geometrically) between the farthest
forget view and the nearest retain image of the request; where they overlap, it takes every forget view in. Within the threshold, each of the
request's retain images vetoes what lies nearer to it than to the forget set's centre (in the
same distance): the threshold alone lets in retained faces that look like the forgotten one,
and the retain images of such faces keep them out. A gate is d x k numbers about the forget
set, like a basis (it reveals where a person's images lie in feature space, not the images),
and the features of the retain images the request brought.

A gated term may also change layers of the language model (a request's `target_modules`):
there it is added to the rows of the batch whose image its gate picked, at every position
and every decoding step of that row, and to no other row. A text-only row, or a row whose image
no gate picks, reads the base language model, so what is known of a person from text stays
whatever the gated terms hold. This is how a gated request can reach what the language model
makes of a face (its name, say) without touching what it answers about that person in words.

`Gating` is the hooks: before the vision tower runs on a batch, it runs the tower once more
with every gated term off, scores each image (or crop) against every gate, and the gated
layers of the tower and the projector then add each term to the rows of the images its gate
picked. A text-only pass never reaches those layers. Before the model runs a new sequence,
the rows that show an image (the model's image token) take their image's picks, for the
language model's gated layers; a decoding step keeps them. The language model's gated layers
need one image per row.

A request trains behind its own gate (`Gating.behind`): the gate is fitted before training,
and while the request's LoRA trains, its layers change only the images the gate picks. Its
retain rows then see what they will see once it is committed (the base vision side, but for
the gate's false positives), so the retain guard watches the model the registry will hold and
does not stop a request for drift that its gate keeps from retained images.

Gradient checkpointing is not offered with gates: it recomputes the tower's layers in the
backward pass, after the batch's picks are gone.
"""

from contextlib import contextmanager

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from registry import Adapter
from seqforget.composition import delta, low_rank
from seqforget.conditioning import projector_name
from seqforget.errors import SeqforgetError
from seqforget.models import device_of
from seqforget.representations import augment
from seqforget.scopes import ARCHITECTURES

VIEWS = 8  # random views of each forget image the gate's statistics see, besides the image itself
PRINCIPAL = 16  # the most covariance directions a gate keeps
CELLS = 4  # a gate's features pool the image's patches to at most CELLS x CELLS cells
TRAINEE = "(training)"  # Gating.picked's key for the gate of the request training behind it


@dataclass
class Gate:
    mean: torch.Tensor  # (d,) float64
    directions: torch.Tensor  # (d, k) orthonormal: the forget views' principal directions
    weights: torch.Tensor  # (k,) 1 / (variance along each + floor) - 1 / floor
    floor: float  # the shrinkage: the forget views' mean variance per dimension
    threshold: float  # a score at most this picks the image
    retain: torch.Tensor | None = None  # (m, d) float64: the request's retain images, each of which vetoes what lies nearer it

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(n,) the squared Mahalanobis distance of each feature row (n, d) to the forget set, per dimension."""
        c = features.double() - self.mean
        along = c @ self.directions  # (n, k)
        return ((c * c).sum(1) / self.floor + (along * along) @ self.weights) / c.shape[1]

    def between(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(n, m) the same distance between each row of a (n, d) and each row of b (m, d)."""
        a, b = a.double(), b.double()
        plain = torch.cdist(a, b).pow(2) / self.floor  # (n, m)
        along = (a @ self.directions)[:, None, :] - (b @ self.directions)[None, :, :]  # (n, m, k)
        return (plain + (along * along) @ self.weights) / a.shape[1]

    def picks(self, features: torch.Tensor) -> torch.Tensor:
        """Images within the threshold that lie nearer the forget set's centre than any retain image."""
        s = self.scores(features)
        picked = s <= self.threshold
        if self.retain is not None and len(self.retain) and picked.any():
            picked &= s < self.between(features, self.retain).min(1).values
        return picked

    def arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean.numpy(), "directions": self.directions.numpy(), "weights": self.weights.numpy(),
                "floor": np.array([self.floor]), "threshold": np.array([self.threshold]),
                **({"retain": self.retain.float().numpy()} if self.retain is not None else {})}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Gate":
        try:
            gate = cls(torch.from_numpy(arrays["mean"]).double(), torch.from_numpy(arrays["directions"]).double(),
                       torch.from_numpy(arrays["weights"]).double(), float(arrays["floor"][0]),
                       float(arrays["threshold"][0]),
                       torch.from_numpy(arrays["retain"]).double() if "retain" in arrays else None)
        except (KeyError, IndexError) as e:
            raise SeqforgetError(f"a stored gate lacks its {e}") from e
        d, k = gate.directions.shape
        if (gate.mean.shape != (d,) or gate.weights.shape != (k,) or not gate.floor > 0
                or (gate.retain is not None and (gate.retain.dim() != 2 or gate.retain.shape[1] != d))):
            raise SeqforgetError("a stored gate's arrays do not fit together")
        return gate


def _statistics(x: torch.Tensor) -> Gate:
    """A gate's mean, directions and shrinkage from feature rows x (n, d); its threshold unset."""
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    variance = s * s / len(x)  # along vt's rows
    floor = max(float(variance.sum()) / x.shape[1], 1e-12)
    k = min(PRINCIPAL, int((variance > 1e-12 * variance.max().clamp_min(1e-300)).sum()))
    return Gate(mean, vt[:k].T.contiguous(), 1 / (variance[:k] + floor) - 1 / floor, floor, 0.0)


def fit(forget: list[torch.Tensor], retain: torch.Tensor) -> tuple[Gate, dict]:
    """A gate for the features of each forget image's views (a list of (v, d)), its threshold
    set against retain features (m, d); and its figures.

    The gate must take in views of the person it never saw. How far those lie is measured by
    leaving each image out in turn (its views scored by the gate of the others): `unseen`, the
    farthest of them. The gate takes in up to the geometric mean of that and the farthest
    view it was fitted on, and where the nearest retain image lies beyond, up to midway
    (geometrically) to it."""
    x = torch.cat(forget).double()
    gate = _statistics(x)
    farthest = float(gate.scores(x).max())
    unseen = max((float(_statistics(torch.cat(forget[:i] + forget[i + 1:]).double()).scores(forget[i]).max())
                  for i in range(len(forget))), default=farthest) if len(forget) > 1 else farthest
    takes = (farthest * max(unseen, farthest)) ** 0.5
    nearest = float(gate.scores(retain).min()) if len(retain) else float("inf")
    gate.threshold = (takes * nearest) ** 0.5 if nearest > takes else takes
    gate.retain = retain.float().double()  # as it is stored: in float32
    return gate, {"farthest_forget": farthest, "unseen_forget": unseen, "nearest_retain": nearest,
                  "threshold": gate.threshold, "views": len(x), "retain_picked": _retain_picked(gate)}


def _retain_picked(gate: Gate) -> float:
    """The share of the gate's retain images it would pick if each were not among them: a retain
    image vetoes itself, so each is judged by the others' vetoes (a retained person the request
    did not bring has none of their own)."""
    r = gate.retain
    if r is None or not len(r):
        return 0.0
    others = gate.between(r, r).fill_diagonal_(float("inf")).min(1).values
    s = gate.scores(r)
    return float(((s <= gate.threshold) & (s < others)).double().mean())


def vision_tower(model: nn.Module) -> tuple[str, nn.Module]:
    """The vision tower of a known architecture (seqforget.scopes.ARCHITECTURES), by name."""
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", None))
    names = [n for n, _ in model.named_modules() if arch is not None and n.split(".")[-1] == arch.vision_mlp.part]
    if not names:
        raise SeqforgetError(f"a gated registry needs a model whose vision tower seqforget knows "
                             f"({', '.join(ARCHITECTURES)}); this one is {getattr(model.config, 'model_type', None)}")
    name = min(names, key=len)
    return name, model.get_submodule(name)


def _feature_layer(model: nn.Module) -> int:
    layer = getattr(model.config, "vision_feature_layer", -1)
    return layer if isinstance(layer, int) else -1


class Gating:
    """The gated terms of a live model and the hooks that apply them where their gates pick."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tower_name, self.tower = vision_tower(model)
        self.layer = _feature_layer(model)
        self._terms: dict[str, tuple[Adapter, Gate]] = {}  # key -> (its adapter, its gate)
        self._parts: dict[str, list[tuple[str, tuple]]] = {}  # layer -> [(key, (B', A) or ("dense", D))]
        self._picked: dict[str, torch.Tensor] | None = None  # key -> (N,) bool for the batch the tower runs on
        self._picked_rows: dict[str, torch.Tensor] | None = None  # key -> (B,) bool: the language model's rows picked
        self._image_rows: torch.Tensor | None = None  # (B,) bool: the rows of the batch about to run that show an image
        self._scored: dict[str, torch.Tensor] | None = None  # the picks of the images the tower ran on last
        self._trainee: Gate | None = None  # the gate of the request training behind it (`behind`)
        self._inside = False  # the tower's gate pass is running
        self.image_token = _image_token(model)
        self._hooks = [self.tower.register_forward_pre_hook(self._before_tower, with_kwargs=True)]
        parent = self.tower_name.rpartition(".")[0]  # the module that runs the tower, then the language model
        self._hooks.append(model.get_submodule(parent).register_forward_pre_hook(self._before_model, with_kwargs=True))
        self.projector_name = projector_name(model)
        if self.projector_name is not None:  # the last gated layers an image passes: a later direct call is not of its batch
            self._hooks.append(model.get_submodule(self.projector_name).register_forward_hook(
                lambda *_: setattr(self, "_picked", None)))
        self._layer_hooks: dict[str, object] = {}

    @property
    def keys(self) -> list[str]:
        return list(self._terms)

    def outside(self, names) -> list[str]:
        """The layers among `names` that lie neither in the vision tower nor in the projector: a
        gated term changes them for the rows (not the images) whose image its gate picks."""
        inside = [self.tower_name] + ([self.projector_name] if self.projector_name else [])
        return [n for n in names if not any(n.startswith(part + ".") for part in inside)]

    def add(self, key: str, adapter: Adapter, gate: Gate) -> None:
        self.refuse_rows_unknown(adapter.weights)
        modules = dict(self.model.named_modules())
        for name in adapter.weights:
            factors = low_rank(adapter, name)
            part = ("factors", *factors) if factors is not None else ("dense", delta(adapter, name).float())
            self._parts.setdefault(name, []).append((key, part))
            if name not in self._layer_hooks:
                self._layer_hooks[name] = modules[name].register_forward_hook(
                    self._after_layer(name, by_row=bool(self.outside([name]))))
        self._terms[key] = (adapter, gate)

    def remove(self, key: str) -> None:
        adapter, _ = self._terms.pop(key)
        for name in adapter.weights:
            self._parts[name] = [(k, p) for k, p in self._parts[name] if k != key]
            if not self._parts[name]:
                del self._parts[name]
                self._layer_hooks.pop(name).remove()

    def rename(self, key: str, new: str) -> None:
        self._terms[new] = self._terms.pop(key)
        for name, parts in self._parts.items():
            self._parts[name] = [(new if k == key else k, p) for k, p in parts]

    def adapter(self, key: str) -> Adapter:
        return self._terms[key][0]

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, D): what the vision tower hands over for each image of pixel_values (as the tower
        takes them), with every gated term off, pooled (`pooled`)."""
        was, self._inside = self._inside, True
        try:
            out = self.tower(pixel_values.to(device_of(self.model)), output_hidden_states=True)
        finally:
            self._inside = was
        return pooled(out.hidden_states[self.layer].float())

    def picked(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per gated term, which images of pixel_values (as the tower takes them) its gate picks
        (and under TRAINEE, those the gate of a request training behind it picks)."""
        gates = {key: gate for key, (_, gate) in self._terms.items()}
        if self._trainee is not None:
            gates[TRAINEE] = self._trainee
        if not gates:
            return {}
        f = self.features(pixel_values).cpu()
        return {key: gate.picks(f) for key, gate in gates.items()}

    @contextmanager
    def behind(self, gate: Gate, layers: dict[str, nn.Module]):
        """While a request trains: its PEFT LoRA layers (name -> the layer, which wraps its
        `base_layer`) change only the images `gate` picks; every other row gets the base layer's
        output, with any earlier gated terms."""
        self.refuse_rows_unknown(layers)
        self._trainee = gate
        hooks = [layer.register_forward_hook(self._behind_gate(by_row=bool(self.outside([name]))))
                 for name, layer in layers.items()]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            self._trainee = None

    def remove_hooks(self) -> None:
        for hook in self._hooks + list(self._layer_hooks.values()):
            hook.remove()
        self._hooks, self._layer_hooks = [], {}

    def refuse_rows_unknown(self, names) -> None:
        """A term on layers past the projector needs to know which of a batch's rows show an image."""
        if self.image_token is None and self.outside(names):
            raise SeqforgetError(f"this model's config names no image token, so a gated term may change only the vision "
                                 f"tower and the projector, not {', '.join(self.outside(names)[:3])}")

    def _before_model(self, module, args, kwargs):
        """Before the model runs a batch: a new sequence's rows that show an image get the picks
        of their images (those the tower is about to score, or, where the images' features came
        ready, as in `generate`, those it scored last); a decoding step keeps the picks it had."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        rows = (ids == self.image_token).any(1).cpu() if ids is not None and self.image_token is not None else None
        self._picked_rows, self._image_rows = None, None
        if rows is None or not rows.any():
            return None
        if kwargs.get("pixel_values") is not None:
            self._image_rows = rows  # the tower runs next (`_before_tower`)
        elif self._scored is not None:
            self._picked_rows = _by_row(self._scored, rows)
        return None

    def _before_tower(self, module, args, kwargs):
        if self._inside:
            return None
        pixels = args[0] if args else kwargs.get("pixel_values")
        self._picked = self._scored = self.picked(pixels) if pixels is not None else None
        if self._image_rows is not None and self._picked is not None:
            self._picked_rows = _by_row(self._picked, self._image_rows)
        self._image_rows = None
        return None

    def _behind_gate(self, by_row: bool):
        def hook(module, inputs, output):
            picked = self._picked_rows if by_row else self._picked
            if self._inside or picked is None:
                return module.base_layer(inputs[0])  # the gate pass (every gated term off), or a call not through the tower
            rows = self._rows(picked, TRAINEE, inputs[0])
            if rows.all():
                return output
            return torch.where(rows.to(output.device).view(-1, *([1] * (output.dim() - 1))), output,
                               module.base_layer(inputs[0]))
        return hook

    @staticmethod
    def _rows(picked: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> torch.Tensor:
        rows = picked[key]
        if rows.shape[0] != x.shape[0]:
            raise SeqforgetError(f"a gated layer runs on {x.shape[0]} rows but its gate picked among {rows.shape[0]}: "
                                 f"a gated registry needs one image per row")
        return rows

    def _after_layer(self, name: str, by_row: bool):
        def hook(module, inputs, output):
            picked = self._picked_rows if by_row else self._picked
            if self._inside or picked is None:
                return output  # the gate pass, or a call that did not come through the tower: the base layer
            x = inputs[0]
            for key, part in self._parts[name]:
                rows = self._rows(picked, key, x)
                if not rows.any():
                    continue
                change = (x @ part[2].to(x).T) @ part[1].to(x).T if part[0] == "factors" else x @ part[1].to(x).T
                mask = rows.to(x.device).view(-1, *([1] * (x.dim() - 1)))
                output = output + change * mask.to(x.dtype)
            return output
        return hook


def _by_row(picked: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per key, (B,) which rows are picked, from the picks of the images of the rows that show one
    (`rows`, (B,) bool); not one image per row: the picks by image, which the rows' layers refuse (`_rows`)."""
    if any(len(p) != int(rows.sum()) for p in picked.values()):
        return picked
    out = {}
    for key, picks in picked.items():
        out[key] = torch.zeros(len(rows), dtype=torch.bool)
        out[key][rows] = picks
    return out


def _image_token(model: nn.Module) -> int | None:
    """The token id that stands for an image in the model's input ids, from its config."""
    for field in ("image_token_id", "image_token_index"):
        value = getattr(model.config, field, None)
        if isinstance(value, int):
            return value
    return None


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, d) -> (N, cells * d): the patch tokens averaged over a grid of at most CELLS x CELLS
    cells, row by row. A leading class token (T = 1 + a square) is left out; tokens that form no
    square grid are averaged whole (one cell)."""
    n, t, d = tokens.shape
    side = round((t - 1) ** 0.5)
    if side * side == t - 1 and round(t ** 0.5) ** 2 != t:
        tokens, t = tokens[:, 1:], t - 1
    side = round(t ** 0.5)
    if side * side != t:
        return tokens.mean(1)
    grid = tokens.transpose(1, 2).reshape(n, d, side, side)
    return torch.nn.functional.adaptive_avg_pool2d(grid, min(CELLS, side)).flatten(2).transpose(1, 2).reshape(n, -1)


def image_features(gating: Gating, images: list[torch.Tensor]) -> torch.Tensor:
    """(n', D): the features (Gating.features) of the images (each (3, S, S), or crops (c, 3, S, S)), crop by crop."""
    if not images:
        return torch.zeros(0, 0)
    return gating.features(torch.stack(images).reshape(-1, *images[0].shape[-3:])).cpu()


def views_features(gating: Gating, images: list[torch.Tensor], views: int, seed: int) -> list[torch.Tensor]:
    """Per image, the features of the image and of `views` random views of it (representations.augment)."""
    pixels = torch.stack(images)
    generator = torch.Generator().manual_seed(seed)
    batches = [pixels] + [augment(pixels, generator) for _ in range(views)]
    features = [image_features(gating, list(b)) for b in batches]  # (n * crops, d) each
    per_image = [f.reshape(len(images), -1, f.shape[-1]) for f in features]  # (n, crops, d) each
    return [torch.cat([f[i] for f in per_image]) for i in range(len(images))]
