"""A small built-in world to run seqforget on: fictitious people, their portraits, and a
tiny LLaVA taught to know them. Used by `seqforget demo` and the tests.

Each person has a name, a job and a city, and a portrait: a background colour and a
coloured shape, drawn with jitter and noise so that no two views are alike.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NAMES = ["ada", "bram", "cleo", "dov", "elin", "fenna", "gus", "hedda", "ivo", "juno", "kai", "lotte"]
JOBS = ["baker", "pilot", "nurse", "farmer", "painter", "judge", "miner", "tailor", "sailor", "potter", "cook", "clerk"]
CITIES = ["oslo", "lima", "rome", "kiev", "quito", "dakar", "perth", "hanoi", "cairo", "bern", "riga", "doha"]
COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200), (40, 200, 210), (240, 140, 30), (120, 120, 120)]


@dataclass(frozen=True)
class Person:
    name: str
    job: str
    city: str
    background: tuple[int, int, int]
    figure: tuple[int, int, int]
    shape: int  # 0 square, 1 disc, 2 bar


def people(n: int, seed: int = 0) -> list[Person]:
    rng = random.Random(seed)
    jobs, cities = rng.sample(JOBS, n), rng.sample(CITIES, n)
    combos = [(b, f, s) for b in range(len(COLOURS)) for f in range(len(COLOURS)) if b != f for s in range(3)]
    looks = rng.sample(combos, n)
    return [Person(NAMES[i], jobs[i], cities[i], COLOURS[b], COLOURS[f], s) for i, (b, f, s) in enumerate(looks)]


def portrait(person: Person, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8: the person's shape on their background, jittered and noisy."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = person.background
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + rng.integers(-4, 5), size / 2 + rng.integers(-4, 5)
    r = size / 4 + rng.integers(-2, 3)
    if person.shape == 0:
        inside = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    elif person.shape == 1:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    else:
        inside = abs(yy - cy) < r / 2.5
    img[inside] = person.figure
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def rows_for(person: Person, image: str | None) -> list[dict]:
    """Questions about one person: about a portrait when `image` is given, else by name."""
    if image is not None:
        return [
            {"question": "what is this person's job ?", "answer": person.job, "image": image},
            {"question": "which city does this person live in ?", "answer": person.city, "image": image},
        ]
    return [
        {"question": f"what is the job of {person.name} ?", "answer": person.job},
        {"question": f"which city does {person.name} live in ?", "answer": person.city},
    ]


def write_world(out: Path, n_people: int = 8, views: int = 3, seed: int = 0) -> dict[str, list[dict]]:
    """Write portraits under out/images and return every person's rows (keyed by name).

    Image paths in the rows are relative to `out`, where the JSONL files are meant to go.
    """
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    world = {}
    for person in people(n_people, seed):
        rows = rows_for(person, None)
        for v in range(views):
            rel = f"images/{person.name}-{v}.png"
            Image.fromarray(portrait(person, rng)).save(out / rel)
            rows += rows_for(person, rel)
        world[person.name] = rows
    return world


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus(n_people: int = len(NAMES), seed: int = 0) -> list[str]:
    """Every text the world can produce: the tiny tokenizer's vocabulary comes from it."""
    texts = []
    for p in people(n_people, seed):
        texts += [r["question"] + " " + r["answer"] for r in rows_for(p, None) + rows_for(p, "x")]
    return texts + ["I cannot help with that ."]


def teach(model, processor, rows: list[dict], root: Path, steps: int = 300, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
    """Fine-tune every weight of `model` on `rows` (image paths relative to `root`); return final NLL."""
    import torch

    from seqforget import data
    from seqforget.losses import answer_nll

    torch.manual_seed(seed)
    examples = [data.encode(processor, data.Row(r["question"], r["answer"], Path(root) / r["image"] if r.get("image") else None)) for r in rows]
    batches = data.endless(examples, batch_size, processor.tokenizer.pad_token_id, seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = answer_nll(model, next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return loss.item()
