"""Built-in data: procedurally drawn coloured shapes with captions that describe them.

Every sample is a pure function of ``(seed, index)``, so the dataset needs no files and no
downloads and is the same on every machine; different seeds give disjoint-in-practice
splits (the demo trains on seed 0 and evaluates on seed 1). Each image holds one or two
large shapes (four kinds, six colours) in the quadrants of a textured background; the
caption names each shape's colour, kind and quadrant, in reading order, in one of a few
templates. A shape is about 13 pixels across in a 16-pixel quadrant (with the demo's 8-pixel
patches it touches about four of the 16 patches): a random image mask usually leaves part of a shape
visible (its colour words can be read from the pixels) and sometimes hides all of it (then
only the caption can say what was there).

A colour or shape word cannot be guessed from the rest of the caption (every draw is
independent and uniform), only from the pixels: the text is informative about the image
and vice versa, which is what M3AE learns from.

The label is the kind of the first shape named in the caption (4 classes), for probing.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (225, 35, 35), "green": (40, 185, 60), "blue": (45, 85, 240), "yellow": (245, 225, 40),
    "white": (245, 245, 245), "pink": (250, 120, 210),
}
RADIUS = 0.2  # of the image side; a shape's quadrant is half the side across
ROWS = ["top", "bottom"]
COLS = ["left", "right"]
TEMPLATES = [
    "a {objects}.",
    "a picture of a {objects}.",
    "there is a {objects}.",
    "this image shows a {objects}.",
]
_SUPERSAMPLE = 4


def position_phrase(row: int, col: int) -> str:
    return f"at the {ROWS[row]} {COLS[col]}"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
               for k in range(4)]
        scale = r * 1.05
    elif shape == "triangle":
        pts = [(math.cos(-math.pi / 2 + angle + k * 2 * math.pi / 3), math.sin(-math.pi / 2 + angle + k * 2 * math.pi / 3))
               for k in range(3)]
        scale = r * 1.2
    elif shape == "cross":
        a = 0.36
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
               (-1, -a), (-a, -a)]
        scale = r * 1.05
    else:
        raise ValueError(shape)
    return [(cx + scale * x, cy + scale * y) for x, y in pts]


def render_sample(seed: int, index: int, image_size: int = 32):
    """-> (PIL RGB image, caption, label, structured description)."""
    # Content and texture draw from separate streams, so captions do not depend on image_size.
    rng = np.random.default_rng([seed, index, 0])
    tex = np.random.default_rng([seed, index, 1])
    s = image_size * _SUPERSAMPLE
    # Background: a dark, muted colour with a gradient, so every named colour stands out.
    base = rng.uniform(45, 105) + rng.uniform(-15, 15, size=3)
    tilt = rng.uniform(-25, 25, size=3)
    ramp = np.linspace(-0.5, 0.5, s)[:, None, None]
    bg = base + tilt * (ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2))
    bg = np.broadcast_to(np.clip(bg, 0, 255).astype(np.uint8), (s, s, 3))  # one row/column, then spread: fast
    img = Image.fromarray(np.ascontiguousarray(bg), "RGB")
    draw = ImageDraw.Draw(img)

    n_objects = 1 if rng.random() < 0.5 else 2
    cells = sorted(int(c) for c in rng.choice(4, size=n_objects, replace=False))  # reading order
    objects = []
    for cell in cells:
        row, col = divmod(cell, 2)
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        r = RADIUS * s * rng.uniform(0.9, 1.1)
        jitter = s * 0.04
        cx = (col + 0.5) * s / 2 + rng.uniform(-jitter, jitter)
        cy = (row + 0.5) * s / 2 + rng.uniform(-jitter, jitter)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.normal(0, 8, 3), 0, 255))
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.2, 0.2)), fill=fill)
        objects.append(dict(shape=shape, colour=colour, row=row, col=col,
                            centre=(cx / s, cy / s), radius=r / s))
    # Draw large, shrink (anti-aliased edges), then add pixel noise at the final size.
    small = np.asarray(img.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    small = small + tex.normal(0, 5, size=small.shape)
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "RGB")

    phrases = [f"{o['colour']} {o['shape']} {position_phrase(o['row'], o['col'])}" for o in objects]
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(objects=" and a ".join(phrases))
    return img, caption, SHAPES.index(objects[0]["shape"]), objects


def vocabulary() -> list[str]:
    """Every word the captions use, sorted: a closed vocabulary, so the tokenizer is fixed."""
    words = set(SHAPES) | set(COLOURS) | set(ROWS) | set(COLS) | {"and", "a", "."}
    for row in range(len(ROWS)):
        for col in range(len(COLS)):
            words |= set(position_phrase(row, col).split())
    for t in TEMPLATES:
        words |= set(t.replace("{objects}", "").replace(".", " ").split())
    return sorted(words)


class ShapesDataset(Dataset):
    """``size`` samples drawn from ``seed``; items are dicts with key, image, caption, label."""

    num_classes = len(SHAPES)
    class_names = SHAPES

    def __init__(self, size: int = 20000, image_size: int = 32, seed: int = 0, transform=None):
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        img, caption, label, _ = render_sample(self.seed, index, self.image_size)
        sample = dict(key=f"shapes-{self.seed}-{index:08d}", image=img, caption=caption, label=label)
        return self.transform(sample) if self.transform is not None else sample

    def captions(self, limit: int | None = None):
        """Captions only (cheap to iterate, e.g. to train a tokenizer)."""
        for i in range(self.size if limit is None else min(limit, self.size)):
            yield render_sample(self.seed, i, 8)[1]
