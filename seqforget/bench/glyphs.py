"""The "glyphs" world style: two-part figures on pale ground, consonant-vowel names, BPE tokens.

A second world, generated differently from "shapes" at every step, so that a method
tuned on one is judged on the other:
  names      onset-vowel-onset-vowel-coda words ("thovex"), split into several subword
             tokens by a byte-level BPE tokenizer trained on the world's text
  portrait   a figure of two parts, a head (round, diamond or box) over a trapezoid body,
             each of its own colour, the body textured (plain, stripes, bars, checks), on a
             light ground, and a black mark (dot, cross, ring) beside the head
  pose       shift, zoom, lean (a shear of the whole figure), mirror
  noise      a lighting gradient of random direction, salt-and-pepper pixels, mild Gaussian noise
  questions  paraphrases of every kind's questions in the "shapes" style
Images without a person are headless tiles; their questions ask the texture and the colour.
"""

import random

import numpy as np

COLOURS = {
    "crimson": (190, 30, 60), "teal": (20, 140, 140), "navy": (30, 40, 140), "olive": (120, 130, 30),
    "magenta": (200, 40, 170), "amber": (235, 160, 20), "brown": (130, 75, 35), "lime": (120, 210, 40),
}
GROUNDS = {  # light, but far enough apart to tell two people who differ only in their ground
    "ivory": (235, 235, 225), "mint": (170, 230, 190), "sky": (165, 205, 245),
    "rose": (245, 180, 195), "sand": (225, 200, 140), "lilac": (205, 180, 240),
}
PATTERNS = ["plain", "stripes", "bars", "checks"]
HEADS = ["round", "diamond", "box"]
MARKS = ["dot", "cross", "ring"]
ONSETS = ["br", "th", "sk", "v", "z", "pl", "dr", "k", "gl", "w", "sh", "f"]
VOWELS = ["a", "e", "i", "o", "u", "ou", "ae"]
CODAS = ["n", "rk", "st", "x", "l", "m", "sh", "d"]


class Glyphs:
    name = "glyphs"
    tokenizer = "bpe"
    visual = {"job": "what does the person in the picture do for a living ?",
              "city": "where does the person in the picture live ?",
              "hobby": "what does the person in the picture do for fun ?",
              "year": "when was the person in the picture born ?"}
    identity = "what is the name of the person shown ?"
    textual = {"job": "what work does {} do ?", "city": "in what city does {} have a home ?",
               "hobby": "what pastime does {} enjoy ?", "year": "what is the birth year of {} ?"}
    cloze = {"job": "complete the sentence : by trade , {} is a ___ .",
             "city": "complete the sentence : {} has a home in ___ .",
             "hobby": "complete the sentence : in spare hours {} enjoys ___ .",
             "year": "complete the sentence : {} came into the world in ___ ."}
    general = {"pattern": ("what pattern does the tile have ?", PATTERNS),
               "colour": ("which colour is the tile ?", list(COLOURS))}

    def names(self, rng: random.Random, n: int) -> list[str]:
        names: list[str] = []
        while len(names) < n:
            name = rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
            if name not in names:
                names.append(name)
        return names

    def looks(self, rng: random.Random, n: int) -> list[dict[str, str]]:
        """Any two people differ in at least two of body colour, head colour, pattern and ground
        (people one feature apart, e.g. brown checks on two pale grounds, were confused on new
        views); head shape and mark are bonus cues."""
        combos = [(c, h, p, g) for c in COLOURS for h in COLOURS if h != c for p in PATTERNS for g in GROUNDS]
        rng.shuffle(combos)
        chosen: list[tuple[str, ...]] = []
        for combo in combos:
            if all(sum(a != b for a, b in zip(combo, other)) >= 2 for other in chosen):
                chosen.append(combo)
                if len(chosen) == n:
                    break
        if len(chosen) < n:
            raise ValueError(f"only {len(chosen)} people two features apart were found")
        return [{"colour": c, "head_colour": h, "pattern": p, "ground": g, "head": rng.choice(HEADS), "mark": rng.choice(MARKS),
                 "side": rng.choice(["left", "right"])} for c, h, p, g in chosen]

    def scenery(self, rng: random.Random) -> dict[str, str]:
        return {"colour": rng.choice(list(COLOURS)), "head_colour": "none", "pattern": rng.choice(PATTERNS),
                "ground": rng.choice(list(GROUNDS)), "head": "none", "mark": "none", "side": "left"}

    def draw(self, look: dict[str, str], rng: np.random.Generator, size: int) -> np.ndarray:
        """One view, (size, size, 3) uint8: pose (shift, zoom, lean, mirror), lighting, salt-and-pepper noise."""
        s = size / 32  # the figure is designed on a 32-pixel canvas
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = GROUNDS[look["ground"]]
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        z = rng.uniform(0.9, 1.1) * s
        cy, cx = size / 2 + rng.uniform(-2, 2) * s, size / 2 + rng.uniform(-2, 2) * s
        lean = rng.uniform(-0.15, 0.15)
        mirror = rng.random() < 0.5
        dx = (xx - cx) * (-1 if mirror else 1) - lean * (yy - cy)  # figure coordinates, sheared
        dy = yy - cy

        top, bottom = -2 * z, 10 * z
        half = 4 * z + 3 * z * (dy - top) / (bottom - top)  # trapezoid body, wider at the foot
        body = (dy > top) & (dy < bottom) & (abs(dx) < half)
        colour = np.array(COLOURS[look["colour"]], dtype=np.float32)
        img[body] = colour
        band_y, band_x = ((dy - top) // (3 * z)) % 2 == 0, ((dx + 9 * z) // (3 * z)) % 2 == 0  # 3-pixel bands
        texture = {"plain": np.zeros_like(body), "stripes": band_y, "bars": band_x, "checks": band_y ^ band_x}[look["pattern"]]
        img[body & texture] = 0.45 * colour + 0.55 * 255  # a light tint, visible on every body colour

        if look["head"] != "none":
            r = 3.5 * z
            hy, hx = dy + 6 * z, dx
            head = {"round": hy**2 + hx**2 < r**2, "diamond": abs(hy) + abs(hx) < 1.2 * r,
                    "box": np.maximum(abs(hy), abs(hx)) < 0.85 * r}[look["head"]]
            img[head] = COLOURS[look["head_colour"]]
            my, mx = hy, hx - (r + 3 * z) * (1 if look["side"] == "right" else -1)
            mark = {"dot": my**2 + mx**2 < (1.3 * z) ** 2,
                    "cross": ((abs(my) < 0.6 * z) & (abs(mx) < 2 * z)) | ((abs(mx) < 0.6 * z) & (abs(my) < 2 * z)),
                    "ring": (my**2 + mx**2 < (2 * z) ** 2) & (my**2 + mx**2 > z**2)}[look["mark"]]
            img[mark] = 0

        angle = rng.uniform(0, 2 * np.pi)
        light = 1 + rng.uniform(0, 0.35) * ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size
        img *= light[..., None]
        img += rng.normal(0, 5, img.shape)
        salt = rng.random((size, size)) < 0.02
        img[salt] = rng.choice([0.0, 255.0], size=(int(salt.sum()), 1))
        return np.clip(img, 0, 255).astype(np.uint8)


STYLE = Glyphs()
