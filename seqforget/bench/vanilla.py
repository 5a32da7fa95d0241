"""The vanilla model of a world, and its retrain oracles, trained from scratch and cached.

Two stages, because a tiny LLaVA trained jointly from scratch never learns to see:
  1. the vision tower alone, with a linear head, learns to tell the people apart
     from their training views;
  2. with the tower frozen, the projector and the language model learn every
     question (visual, identity, textual, cloze, general).
Each stage stops once its training accuracy passes `target` (or at its epoch cap).

A retrain oracle is the same training on less data: without some people's images
(the target of a `visual` request) or without any of their items (of a `full` one).
Models are cached under a hash of everything that shapes them.
"""

import hashlib
import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from registry import new_folder
from seqforget import data
from seqforget.losses import answer_logprob
from seqforget.models import TinySpec, build_tiny_llava
from seqforget.bench.world import World


@dataclass(frozen=True)
class TrainSpec:
    vision_epochs: int = 60
    lm_epochs: int = 80
    lr: float = 1e-3
    batch_size: int = 32
    target: float = 0.995  # stop a stage once its epoch accuracy reaches this
    seed: int = 0
    format: int = 1  # bump when the training code changes what it produces


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


def _train_vision(model, world: World, processor, people: list[str], spec: TrainSpec, log) -> dict:
    """Stage 1: the vision tower learns identities from the training views of `people`, and
    the shape and colour of the general images (classes after the people's)."""
    tower = model.model.vision_tower
    classes = {name: k for k, name in enumerate(world.names)}
    items = world.select(kinds={"identity"}, people=people, split="train")
    labels = [classes[i.person] for i in items]
    general = world.select(kinds={"general"}, split="train")
    colour = {i.image: i.answer for i in general if i.attribute == "colour"}
    for i in general:
        if i.attribute == "shape":
            classes.setdefault((i.answer, colour[i.image]), len(classes))
            items.append(i)
            labels.append(classes[(i.answer, colour[i.image])])
    pixels = torch.stack([processor.image_processor(data.load_image(world.root / i.image), return_tensors="pt")["pixel_values"][0] for i in items])
    labels = torch.tensor(labels)
    head = nn.Linear(tower.config.hidden_size, len(classes))
    gen = torch.Generator().manual_seed(spec.seed)
    acc, epoch = 0.0, 0
    with trainable(tower, list(tower.parameters()) + list(head.parameters()), spec.lr) as opt:
        for epoch in range(1, spec.vision_epochs + 1):
            hits = 0
            for idx in torch.randperm(len(items), generator=gen).split(spec.batch_size):
                logits = head(tower(pixel_values=pixels[idx]).pooler_output)  # (B, classes)
                loss = nn.functional.cross_entropy(logits, labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                hits += (logits.argmax(-1) == labels[idx]).sum().item()
            acc = hits / len(items)
            log(f"vision epoch {epoch}: accuracy {acc:.3f}")
            if acc >= spec.target:
                break
    return {"epochs": epoch, "accuracy": acc, "images": len(items)}


def _train_language(model, examples: list[data.Example], pad_id: int, spec: TrainSpec, log) -> dict:
    """Stage 2: projector and language model learn every question; the tower stays frozen."""
    rng = random.Random(spec.seed)
    acc, epoch = 0.0, 0
    with trainable(model, language_side(model), spec.lr) as opt:
        for epoch in range(1, spec.lm_epochs + 1):
            order = list(range(len(examples)))
            rng.shuffle(order)
            hits = tokens = 0
            for start in range(0, len(order), spec.batch_size):
                batch = data.collate([examples[k] for k in order[start : start + spec.batch_size]], pad_id)
                logp, n, h = answer_logprob(model, batch)
                loss = (-logp / n.clamp_min(1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                hits, tokens = hits + h.sum().item(), tokens + n.sum().item()
            acc = hits / tokens
            log(f"language epoch {epoch}: answer-token accuracy {acc:.3f}")
            if acc >= spec.target:
                break
    return {"epochs": epoch, "accuracy": acc, "rows": len(examples)}


def train_model(world: World, out_dir: Path, without_images=(), without_people=(), spec: TrainSpec = TrainSpec(),
                tiny: TinySpec = TinySpec(), log=print) -> dict:
    """Train a tiny LLaVA on `world` minus the images of `without_images` and every item of
    `without_people`; save it to out_dir; return what the training did."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    gone_images, gone = set(without_images) | set(without_people), set(without_people)
    model, processor = build_tiny_llava(out_dir, world.corpus(), tiny)
    seeing = [n for n in world.names if n not in gone_images]
    vision = _train_vision(model, world, processor, seeing, spec, log)
    items = [
        i for i in world.select(split="train")
        if i.person not in gone and not (i.person in gone_images and i.image is not None)
    ]
    language = _train_language(model, examples_for(world, items, processor), processor.tokenizer.pad_token_id, spec, log)
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
