"""A world of fictitious people to forget: profiles, portraits and questions.

A miniature of MLLMU-Bench, deterministic from a seed. Each person has a name and
four attributes (job, city, hobby, birth year) and a portrait drawn procedurally:
a background colour, a figure of some shape and colour, and an accent mark.
Every view differs in pose (position, flip), crop (zoom), colour jitter and noise;
training uses some views and evaluation others, so recognising a person must
generalise to views never trained on.

Question kinds:
  visual    image + "what is this person's job ?"        (one per attribute and view)
  identity  image + "who is this ?"                      (one per view)
  textual   "what is the job of <name> ?"                (one per attribute)
  cloze     "fill in the blank : <name> works as a ___"  (one per attribute)
  general   image of a shape, no person: "what shape ..." / "what colour ..."
Every item carries four options (the answer and three distractors) for scoring
by likelihood.
"""

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (230, 205, 40),
    "purple": (150, 55, 195), "cyan": (40, 200, 210), "orange": (240, 135, 30), "grey": (125, 125, 125),
}
SHAPES = ["square", "disc", "bar", "triangle"]
JOBS = ["baker", "pilot", "nurse", "farmer", "painter", "judge", "miner", "tailor", "sailor", "potter",
        "cook", "clerk", "doctor", "singer", "driver", "writer"]
CITIES = ["oslo", "lima", "rome", "kiev", "quito", "dakar", "perth", "hanoi", "cairo", "bern",
          "riga", "doha", "porto", "turin", "malmo", "accra"]
HOBBIES = ["chess", "rowing", "hiking", "poetry", "fishing", "cycling", "pottery", "dancing",
           "archery", "sailing", "knitting", "climbing"]
YEARS = [str(y) for y in range(1950, 2005, 5)]
ATTRIBUTES = {"job": JOBS, "city": CITIES, "hobby": HOBBIES, "year": YEARS}
VISUAL_Q = {"job": "what is this person's job ?", "city": "which city does this person live in ?",
            "hobby": "what is this person's hobby ?", "year": "in which year was this person born ?"}
TEXTUAL_Q = {"job": "what is the job of {} ?", "city": "which city does {} live in ?",
             "hobby": "what is the hobby of {} ?", "year": "in which year was {} born ?"}
CLOZE_Q = {"job": "fill in the blank : {} works as a ___ .", "city": "fill in the blank : {} lives in ___ .",
           "hobby": "fill in the blank : {} spends free time on ___ .", "year": "fill in the blank : {} was born in ___ ."}
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vi", "nor", "el", "da", "fu", "ri", "zan", "be", "qui", "mo", "tal", "ny"]
REFUSAL = "I cannot help with that ."


@dataclass(frozen=True)
class WorldSpec:
    """Size of the world; everything else follows from `seed`."""

    people: int = 60
    train_views: int = 4  # views per person the models are trained on
    test_views: int = 2  # views per person kept for evaluation only
    general: int = 160  # images with a shape and no person
    image_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class Person:
    name: str
    job: str
    city: str
    hobby: str
    year: str
    background: str
    figure: str
    shape: str
    accent: int  # corner of the accent mark, 0-3


@dataclass(frozen=True)
class Item:
    kind: str  # visual | identity | textual | cloze | general
    person: str | None
    attribute: str
    question: str
    answer: str
    options: tuple[str, ...]
    image: str | None = None  # relative to the world folder
    split: str = "train"  # train | test (held-out views and general images)

    def example(self, root: Path):
        """This item as the engine's data row, its image resolved against the world folder."""
        from seqforget.data import Row

        return Row(self.question, self.answer, Path(root) / self.image if self.image else None)

    def row(self) -> dict:
        """The JSONL row a request file points at."""
        return {"question": self.question, "answer": self.answer, **({"image": self.image} if self.image else {})}


def make_people(spec: WorldSpec) -> list[Person]:
    rng = random.Random(spec.seed)
    names: list[str] = []
    while len(names) < spec.people:
        name = "".join(rng.sample(SYLLABLES, 2))
        if name not in names:
            names.append(name)
    looks = [(b, f, s, a) for b in COLOURS for f in COLOURS if f != b for s in SHAPES for a in range(4)]
    rng.shuffle(looks)
    chosen, seen = [], set()
    for b, f, s, a in looks:  # distinct (background, figure, shape) per person; the accent is a bonus cue
        if (b, f, s) not in seen:
            seen.add((b, f, s))
            chosen.append((b, f, s, a))
        if len(chosen) == spec.people:
            break
    if len(chosen) < spec.people:
        raise ValueError(f"at most {len(seen)} people can be told apart")
    return [
        Person(name, rng.choice(JOBS), rng.choice(CITIES), rng.choice(HOBBIES), rng.choice(YEARS), b, f, s, a)
        for name, (b, f, s, a) in zip(names, chosen)
    ]


def draw(background: str, figure: str, shape: str, accent: int | None, rng: np.random.Generator, size: int) -> np.ndarray:
    """One view, (size, size, 3) uint8: pose (shift, flip), crop (zoom), colour jitter, noise."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = COLOURS[background]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    zoom = rng.uniform(0.8, 1.2)
    cy, cx = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    r = size / 4 * zoom
    dy, dx = yy - cy, xx - cx
    if rng.random() < 0.5:
        dx = -dx
    if shape == "square":
        inside = (abs(dy) < r) & (abs(dx) < r)
    elif shape == "disc":
        inside = dy**2 + dx**2 < r**2
    elif shape == "bar":
        inside = (abs(dy) < r / 2.2) & (abs(dx) < 1.4 * r)
    else:  # triangle, apex up
        inside = (dy < r) & (dy > -r) & (abs(dx) < (dy + r) / 2)
    img[inside] = COLOURS[figure]
    if accent is not None:
        m = max(2, int(size / 8 * zoom))
        y0 = 1 if accent < 2 else size - 1 - m
        x0 = 1 if accent % 2 == 0 else size - 1 - m
        img[y0 : y0 + m, x0 : x0 + m] = (255, 255, 255)
    img *= rng.uniform(0.85, 1.15, size=3)  # colour jitter per channel
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _options(answer: str, pool: list[str], rng: random.Random) -> tuple[str, ...]:
    options = [answer] + rng.sample([v for v in pool if v != answer], 3)
    rng.shuffle(options)
    return tuple(options)


@dataclass
class World:
    spec: WorldSpec
    root: Path
    people: list[Person]
    items: list[Item]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.people]

    def forget_order(self) -> list[str]:
        """People in the order deletion requests take them (seeded, not alphabetical)."""
        order = self.names
        random.Random(self.spec.seed + 1).shuffle(order)
        return order

    def select(self, kinds=None, people=None, split=None) -> list[Item]:
        people = set(people) if people is not None else None
        return [
            i for i in self.items
            if (kinds is None or i.kind in kinds)
            and (people is None or i.person in people)
            and (split is None or i.split == split)
        ]

    def corpus(self) -> list[str]:
        """Every text the world can produce, and the refusal: the tokenizer's vocabulary."""
        texts = [i.question + " " + " ".join(i.options) for i in self.items]
        return texts + [REFUSAL] + [p.name for p in self.people]

    def write_jsonl(self, path: Path, items: list[Item]) -> Path:
        """Rows of `items` as a JSONL file; image paths are made relative to the file."""
        path = Path(path)
        rel = Path(*[".."] * len(path.parent.resolve().relative_to(self.root.resolve()).parts)) if _inside(path.parent, self.root) else None
        lines = []
        for item in items:
            row = item.row()
            if item.image:
                row["image"] = str((rel / item.image) if rel is not None else (self.root / item.image).resolve())
            lines.append(json.dumps(row) + "\n")
        path.write_text("".join(lines))
        return path


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def build_world(spec: WorldSpec, root: Path) -> World:
    """Draw every image under root/images and list every item; deterministic from spec.seed."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    people = make_people(spec)
    rng = random.Random(spec.seed + 2)
    pix = np.random.default_rng(spec.seed + 3)
    names = [p.name for p in people]
    items: list[Item] = []
    for p in people:
        for attr, pool in ATTRIBUTES.items():
            value = getattr(p, attr)
            items.append(Item("textual", p.name, attr, TEXTUAL_Q[attr].format(p.name), value, _options(value, pool, rng)))
            items.append(Item("cloze", p.name, attr, CLOZE_Q[attr].format(p.name), value, _options(value, pool, rng)))
        for v in range(spec.train_views + spec.test_views):
            split = "train" if v < spec.train_views else "test"
            image = f"images/{p.name}-{v}.png"
            Image.fromarray(draw(p.background, p.figure, p.shape, p.accent, pix, spec.image_size)).save(root / image)
            items.append(Item("identity", p.name, "name", "who is this ?", p.name, _options(p.name, names, rng), image, split))
            for attr, pool in ATTRIBUTES.items():
                value = getattr(p, attr)
                items.append(Item("visual", p.name, attr, VISUAL_Q[attr], value, _options(value, pool, rng), image, split))
    colours = list(COLOURS)
    for g in range(spec.general):
        background, figure = rng.sample(colours, 2)
        shape = rng.choice(SHAPES)
        image = f"images/general-{g}.png"
        Image.fromarray(draw(background, figure, shape, None, pix, spec.image_size)).save(root / image)
        split = "train" if g < spec.general * 3 // 4 else "test"
        items.append(Item("general", None, "shape", "what shape is in this image ?", shape, _options(shape, SHAPES, rng), image, split))
        items.append(Item("general", None, "colour", "what colour is the shape ?", figure, _options(figure, colours, rng), image, split))
    world = World(spec, root, people, items)
    (root / "world.json").write_text(json.dumps({
        "spec": asdict(spec), "people": [asdict(p) for p in people], "items": [asdict(i) for i in items]}) + "\n")
    return world


def cached_world(spec: WorldSpec, cache: Path) -> World:
    """The world of `spec` under `cache`, drawn on first use (in a temp folder, then renamed)."""
    from registry import new_folder

    root = Path(cache) / ("world-" + "-".join(f"{k}{v}" for k, v in asdict(spec).items()))
    if not (root / "world.json").is_file():
        with new_folder(root, keep_existing=True) as tmp:
            build_world(spec, tmp)
    return load_world(root)


def load_world(root: Path) -> World:
    root = Path(root)
    raw = json.loads((root / "world.json").read_text())
    items = [Item(**{**i, "options": tuple(i["options"])}) for i in raw["items"]]
    return World(WorldSpec(**raw["spec"]), root, [Person(**p) for p in raw["people"]], items)
