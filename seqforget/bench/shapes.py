"""The "shapes" world style: flat shapes on a coloured ground, two-syllable names, word-level tokens.

A portrait is a background colour, a figure of some shape and colour, and a white
accent square in one corner. Every view differs in pose (shift, mirror), crop (zoom),
per-channel colour jitter and Gaussian noise. Images without a person are the same
drawing without the accent; their questions ask the shape and its colour.
"""

import random

import numpy as np

COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 215), "yellow": (230, 205, 40),
    "purple": (150, 55, 195), "cyan": (40, 200, 210), "orange": (240, 135, 30), "grey": (125, 125, 125),
}
SHAPES = ["square", "disc", "bar", "triangle"]
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "sa", "vi", "nor", "el", "da", "fu", "ri", "zan", "be", "qui", "mo", "tal", "ny"]


class Shapes:
    name = "shapes"
    tokenizer = "word"
    visual = {"job": "what is this person's job ?", "city": "which city does this person live in ?",
              "hobby": "what is this person's hobby ?", "year": "in which year was this person born ?"}
    identity = "who is this ?"
    textual = {"job": "what is the job of {} ?", "city": "which city does {} live in ?",
               "hobby": "what is the hobby of {} ?", "year": "in which year was {} born ?"}
    cloze = {"job": "fill in the blank : {} works as a ___ .", "city": "fill in the blank : {} lives in ___ .",
             "hobby": "fill in the blank : {} spends free time on ___ .", "year": "fill in the blank : {} was born in ___ ."}
    general = {"shape": ("what shape is in this image ?", SHAPES), "colour": ("what colour is the shape ?", list(COLOURS))}

    def names(self, rng: random.Random, n: int) -> list[str]:
        names: list[str] = []
        while len(names) < n:
            name = "".join(rng.sample(SYLLABLES, 2))
            if name not in names:
                names.append(name)
        return names

    def looks(self, rng: random.Random, n: int) -> list[dict[str, str]]:
        """Distinct (background, colour, shape) per person; the accent corner is a bonus cue."""
        combos = [(b, f, s) for b in COLOURS for f in COLOURS if f != b for s in SHAPES]
        if n > len(combos):
            raise ValueError(f"at most {len(combos)} people can be told apart")
        return [{"background": b, "colour": f, "shape": s, "accent": str(rng.randrange(4))} for b, f, s in rng.sample(combos, n)]

    def scenery(self, rng: random.Random) -> dict[str, str]:
        background, colour = rng.sample(list(COLOURS), 2)
        return {"background": background, "colour": colour, "shape": rng.choice(SHAPES), "accent": "none"}

    def draw(self, look: dict[str, str], rng: np.random.Generator, size: int) -> np.ndarray:
        """One view, (size, size, 3) uint8: pose (shift, mirror), crop (zoom), colour jitter, noise."""
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = COLOURS[look["background"]]
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        zoom = rng.uniform(0.8, 1.2)
        cy, cx = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
        r = size / 4 * zoom
        dy, dx = yy - cy, xx - cx
        if rng.random() < 0.5:
            dx = -dx
        shape = look["shape"]
        if shape == "square":
            inside = (abs(dy) < r) & (abs(dx) < r)
        elif shape == "disc":
            inside = dy**2 + dx**2 < r**2
        elif shape == "bar":
            inside = (abs(dy) < r / 2.2) & (abs(dx) < 1.4 * r)
        else:  # triangle, apex up
            inside = (dy < r) & (dy > -r) & (abs(dx) < (dy + r) / 2)
        img[inside] = COLOURS[look["colour"]]
        if look["accent"] != "none":
            corner = int(look["accent"])
            m = max(2, int(size / 8 * zoom))
            y0 = 1 if corner < 2 else size - 1 - m
            x0 = 1 if corner % 2 == 0 else size - 1 - m
            img[y0 : y0 + m, x0 : x0 + m] = (255, 255, 255)
        img *= rng.uniform(0.85, 1.15, size=3)  # colour jitter per channel
        img += rng.normal(0, 10, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)


STYLE = Shapes()
