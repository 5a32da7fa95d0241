"""The vanilla model of a world, and its retrain oracles, trained from scratch and cached.

Two stages, because a tiny LLaVA trained jointly from scratch never learns to see:
  1. the vision tower alone, with linear heads on its patch features, learns to tell
     the people apart from their training views, and the general features (shape,
     colour, texture) of those views and of images without a person drawn afresh
     each epoch, as a pretrained encoder has seen many generic images;
  2. with the tower frozen, the projector and the language model learn every
     question (visual, identity, textual, cloze, general), and general questions
     on new images without a person each epoch.
Each stage stops once its training accuracy passes `target` (or at its epoch cap).
Neither ever reads the world's unseen people (World.unseen): selecting by
`world.names` and the "train" split leaves them out.

A retrain oracle is the same training on less data: without some people's images
(the target of a `visual` request) or without any of their items (of a `full` one).
Models are cached under a hash of everything that shapes them.
"""

import hashlib
import json
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from registry import new_folder
from seqforget import data
from seqforget.losses import answer_logprob
from seqforget.tiny import TinySpec, build_tiny_llava
from seqforget.bench.world import Item, World, draw_scenery


@dataclass(frozen=True)
class TrainSpec:
    vision_epochs: int = 60
    scenery: int = 480  # new images without a person per vision epoch
    scenery_target: float = 0.97  # the vision stage's accuracy on them, to stop
    lm_epochs: int = 80
    scenery_rows: int = 480  # general questions on new images per language epoch
    lr: float = 1e-3
    batch_size: int = 32
    target: float = 0.995  # stop a stage once its epoch accuracy reaches this
    seed: int = 0
    format: int = 2  # bump when the training code changes what it produces


@contextmanager
def trainable(module: nn.Module, params: list[nn.Parameter], lr: float):
    """AdamW over `params`, which stay trainable, and `module` in train mode, until the block ends."""
    for p in params:
        p.requires_grad_(True)
    module.train()
    try:
        yield torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    finally:
        module.eval()
        for p in params:
            p.requires_grad_(False)


def language_side(model) -> list[nn.Parameter]:
    """Every weight but the vision tower's: projector, embeddings, language model, head."""
    return [p for n, p in model.named_parameters() if "vision_tower" not in n]


def examples_for(world: World, items, processor) -> list[data.Example]:
    return [data.encode(processor, i.example(world.root)) for i in items]


class Scenery:
    """Images without a person, drawn afresh on every call (seeded) into a scratch folder: a
    stand-in for the many generic images a pretrained model has seen. The world's own general
    images (120 for training) are too few to learn shapes from: on them alone the tower told
    the shapes of new images at 0.54 (480 images: 0.86; fresh ones: 0.99), and the language
    model, even on a tower that knew shapes, answered 0.60 on the world's held-out images.
    The world's held-out images are not among these (another generator draws them)."""

    def __init__(self, world: World, folder: Path, seed: int):
        self.world, self.folder = world, Path(folder)
        self.rng, self.pix = random.Random(seed), np.random.default_rng(seed)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)

    def draw(self, images: int) -> list[Item]:
        """General items of `images` new images, one per feature each; images resolve against self.folder."""
        stems = [f"scenery-{k}" for k in range(images)]  # overwrites the last call's: its rows are encoded already
        return draw_scenery(self.world.style, self.folder, stems, self.world.spec.image_size, "train", self.rng, self.pix)


def _pixels(processor, root: Path, images: list[str]) -> torch.Tensor:
    """(N, 3, H, W) pixel values of image files under root."""
    return processor.image_processor([data.load_image(Path(root) / i) for i in images], return_tensors="pt")["pixel_values"]


def _train_vision(model, world: World, processor, people: list[str], scenery: Scenery, spec: TrainSpec, log) -> dict:
    """Stage 1: the vision tower learns to see. Linear heads read the whole grid of patch
    features, which is what the projector reads (a head on CLIP's class token, which the
    language model never reads, left shape in the patch features at chance level: a linear
    probe told shapes at 0.30; a head on their mean cost held-out visual accuracy). They learn
      - who each of `people` is, from their training views;
      - the general features (e.g. shape and colour) of those views and of `spec.scenery`
        new images without a person per epoch (one head per feature: one class per
        shape-and-colour pair left 4 images a class).
    Their accuracy on each epoch's new images is a held-out estimate; the stage stops when
    identity reaches `target` and every feature `scenery_target`."""
    tower, features = model.model.vision_tower, {f: values for f, (_, values) in world.style.general.items()}
    views = world.select(kinds={"identity"}, people=people, split="train")
    view_pixels = _pixels(processor, world.root, [i.image for i in views])  # (V, 3, H, W)
    who = {name: k for k, name in enumerate(people)}
    view_labels = {"person": [who[i.person] for i in views]}
    view_labels |= {f: [values.index(world.person(i.person).look[f]) for i in views] for f, values in features.items()}
    grid = tower.config.hidden_size * (tower.config.image_size // tower.config.patch_size) ** 2
    heads = nn.ModuleDict({"person": nn.Linear(grid, len(people))} | {f: nn.Linear(grid, len(v)) for f, v in features.items()})
    gen = torch.Generator().manual_seed(spec.seed)
    acc, epoch = {}, 0
    with trainable(tower, list(tower.parameters()) + list(heads.parameters()), spec.lr) as opt:
        for epoch in range(1, spec.vision_epochs + 1):
            fresh = scenery.draw(spec.scenery)
            images = list(dict.fromkeys(i.image for i in fresh))
            answers = {(i.image, i.attribute): i.answer for i in fresh}
            pixels = torch.cat([view_pixels, _pixels(processor, scenery.folder, images)])  # (V + S, 3, H, W)
            labels = {"person": torch.tensor(view_labels["person"] + [data.IGNORE] * len(images))}
            labels |= {f: torch.tensor(view_labels[f] + [values.index(answers[i, f]) for i in images]) for f, values in features.items()}
            hits = dict.fromkeys(heads, 0)
            for idx in torch.randperm(len(pixels), generator=gen).split(spec.batch_size):
                grid_features = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:].flatten(1)  # (B, patches * d)
                loss = 0.0
                for h, head in heads.items():
                    logits, y = head(grid_features), labels[h][idx]  # (B, classes), (B,)
                    if (y != data.IGNORE).any():
                        loss = loss + nn.functional.cross_entropy(logits, y, ignore_index=data.IGNORE)
                    hits[h] += (logits.argmax(-1) == y).sum().item()
                opt.zero_grad()
                loss.backward()
                opt.step()
            acc = {"person": hits["person"] / len(views)} | {f: hits[f] / len(pixels) for f in features}
            log(f"vision epoch {epoch}: " + ", ".join(f"{h} {a:.3f}" for h, a in acc.items()))
            if acc["person"] >= spec.target and min(acc[f] for f in features) >= spec.scenery_target:
                break
    return {"epochs": epoch, "accuracy": acc, "images": len(views), "scenery": spec.scenery * epoch}


def _train_language(model, examples: list[data.Example], fresh, pad_id: int, spec: TrainSpec, log) -> dict:
    """Stage 2: projector and language model learn every question, the world's training rows and
    the general questions of `fresh()` new images each epoch; the tower stays frozen. The stage
    stops when the world's rows are answered to `target` (the new ones cannot be memorised)."""
    rng = random.Random(spec.seed)
    acc, epoch = 0.0, 0
    with trainable(model, language_side(model), spec.lr) as opt:
        for epoch in range(1, spec.lm_epochs + 1):
            rows = [(e, True) for e in examples] + [(e, False) for e in fresh()]
            rng.shuffle(rows)
            hits, tokens = [0, 0], [0, 0]  # world rows, new rows
            for start in range(0, len(rows), spec.batch_size):
                chunk = rows[start : start + spec.batch_size]
                logp, n, h = answer_logprob(model, data.collate([e for e, _ in chunk], pad_id))
                loss = (-logp / n.clamp_min(1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                for (_, own), hk, nk in zip(chunk, h.tolist(), n.tolist()):
                    hits[not own] += hk
                    tokens[not own] += nk
            acc, new = hits[0] / tokens[0], hits[1] / max(tokens[1], 1)
            log(f"language epoch {epoch}: answer-token accuracy {acc:.3f} (new general images {new:.3f})")
            if acc >= spec.target:
                break
    return {"epochs": epoch, "accuracy": acc, "rows": len(examples), "scenery": spec.scenery_rows * epoch}


def train_model(world: World, out_dir: Path, without_images=(), without_people=(), spec: TrainSpec = TrainSpec(),
                tiny: TinySpec = TinySpec(), log=print) -> dict:
    """Train a tiny LLaVA on `world` minus the images of `without_images` and every item of
    `without_people`; save it to out_dir; return what the training did."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    gone_images, gone = set(without_images) | set(without_people), set(without_people)
    model, processor = build_tiny_llava(out_dir, world.corpus(), tiny, tokenizer=world.tokenizer())
    seeing = [n for n in world.names if n not in gone_images]
    with tempfile.TemporaryDirectory() as scratch:
        scenery = Scenery(world, Path(scratch), spec.seed)
        vision = _train_vision(model, world, processor, seeing, scenery, spec, log)
        items = [
            i for i in world.select(split="train")
            if i.person not in gone and not (i.person in gone_images and i.image is not None)
        ]

        def fresh() -> list[data.Example]:
            return [data.encode(processor, i.example(scenery.folder)) for i in scenery.draw(spec.scenery_rows // len(world.style.general))]

        language = _train_language(model, examples_for(world, items, processor), fresh, processor.tokenizer.pad_token_id, spec, log)
    model.save_pretrained(out_dir)
    record = {"vision": vision, "language": language, "seconds": time.perf_counter() - start,
              "without_images": sorted(without_images), "without_people": sorted(without_people)}
    (Path(out_dir) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def cached_model(world: World, cache: Path, without_images=(), without_people=(), spec: TrainSpec = TrainSpec(),
                 tiny: TinySpec = TinySpec(), log=print) -> Path:
    """The folder of the model trained as `train_model` would, building it on first use."""
    key = hashlib.sha256(json.dumps({
        "world": asdict(world.spec), "train": asdict(spec), "tiny": asdict(tiny),
        "without_images": sorted(without_images), "without_people": sorted(without_people),
    }, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache) / f"model-{key}"
    if not (final / "training.json").is_file():
        with new_folder(final, keep_existing=True) as tmp:
            train_model(world, tmp, without_images, without_people, spec, tiny, log)
    return final
