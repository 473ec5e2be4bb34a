"""The shapes world: captions, a renderer that draws a correct scene, and a fixed split.

Scenes are 32x32 RGB on a white background with 1-3 filled shapes (circle, square,
upward triangle, 8-12 px across) in four palette colours. Captions come from a small
grammar with five *kinds*:

    single   a {color} {shape}
    count    two {color} {shape}s / three {color} {shape}s
    and      a {color} {shape} and a {color} {shape}
    left     a {color} {shape} to the left of a {color} {shape}
    above    a {color} {shape} above a {color} {shape}

The train / held-out split holds out colour-shape-relation *combinations* (a fixed hash
of the caption's content), not seeds, and every kind appears in both splits.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw

SIZE = 32
BACKGROUND = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
MIN_SHAPE, MAX_SHAPE = 8, 12
NUMBERS = {"two": 2, "three": 3}
KINDS = ("single", "count", "and", "left", "above")
RELATIONS = ("left", "above")  # kinds that carry a spatial relation
GAP = 2  # minimum empty pixels between two shapes' bounding boxes when rendering


@dataclass(frozen=True)
class Parsed:
    """A caption's meaning: the objects it asks for (in caption order) and its relation."""

    kind: str
    objects: tuple[tuple[str, str], ...]  # (color, shape), with multiplicity
    relation: str | None = None  # "left" / "above": objects[0] is left of / above objects[1]


_OBJ = r"a (\w+) (\w+)"
_PATTERNS = [
    ("left", re.compile(rf"^{_OBJ} to the left of {_OBJ}$")),
    ("above", re.compile(rf"^{_OBJ} above {_OBJ}$")),
    ("and", re.compile(rf"^{_OBJ} and {_OBJ}$")),
    ("count", re.compile(r"^(two|three) (\w+) (\w+)s$")),
    ("single", re.compile(rf"^{_OBJ}$")),
]


def _check(color: str, shape: str, caption: str) -> tuple[str, str]:
    if color not in PALETTE or shape not in SHAPES:
        raise ValueError(f"caption {caption!r}: unknown colour or shape ({color!r}, {shape!r})")
    return color, shape


def parse(caption: str) -> Parsed:
    """Parse a caption of the grammar; raises ValueError naming the caption otherwise."""
    text = caption.strip().lower()
    for kind, pat in _PATTERNS:
        m = pat.match(text)
        if not m:
            continue
        g = m.groups()
        if kind == "count":
            obj = _check(g[1], g[2], caption)
            return Parsed(kind, (obj,) * NUMBERS[g[0]])
        if kind == "single":
            return Parsed(kind, (_check(g[0], g[1], caption),))
        objs = (_check(g[0], g[1], caption), _check(g[2], g[3], caption))
        return Parsed(kind, objs, kind if kind in RELATIONS else None)
    raise ValueError(f"caption {caption!r} is not in the toy grammar")


def caption_kind(caption: str) -> str:
    """One of KINDS: 'single', 'count', 'and', 'left', 'above'."""
    return parse(caption).kind


def make_caption(kind: str, objects) -> str:
    o = [f"{c} {s}" for c, s in objects]
    if kind == "single":
        return f"a {o[0]}"
    if kind == "count":
        word = {v: k for k, v in NUMBERS.items()}[len(objects)]
        return f"{word} {o[0]}s"
    if kind == "and":
        return f"a {o[0]} and a {o[1]}"
    if kind == "left":
        return f"a {o[0]} to the left of a {o[1]}"
    if kind == "above":
        return f"a {o[0]} above a {o[1]}"
    raise ValueError(f"unknown caption kind {kind!r}")


@cache
def all_captions() -> tuple[str, ...]:
    """Every caption of the grammar (432), in a fixed order."""
    objs = [(c, s) for c in COLORS for s in SHAPES]
    caps = [make_caption("single", [o]) for o in objs]
    caps += [make_caption("count", [o] * n) for n in (2, 3) for o in objs]
    for kind in ("and", "left", "above"):
        caps += [make_caption(kind, [a, b]) for a in objs for b in objs if a != b]
    return tuple(caps)


def _heldout(caption: str) -> bool:
    # Fixed hash of the caption's content (colours, shapes, relation): roughly 1 in 4
    # combinations is held out. Not Python's hash() (salted per process).
    h = int(hashlib.sha256(("toy-split-v1:" + caption).encode()).hexdigest()[:8], 16)
    return h % 4 == 0


@cache
def heldout_captions() -> tuple[str, ...]:
    return tuple(c for c in all_captions() if _heldout(c))


@cache
def train_captions() -> tuple[str, ...]:
    return tuple(c for c in all_captions() if not _heldout(c))


# ---------------------------------------------------------------------------- render


def _draw(draw: ImageDraw.ImageDraw, color: str, shape: str, x: int, y: int, s: int) -> None:
    """Filled shape with bounding box [x, x+s-1] x [y, y+s-1]."""
    fill = PALETTE[color]
    x1, y1 = x + s - 1, y + s - 1
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y1), (x1, y1), ((x + x1) / 2, y)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _disjoint(a, b, gap: int = GAP) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    return ax + asz + gap <= bx or bx + bsz + gap <= ax or ay + asz + gap <= by or by + bsz + gap <= ay


def _relation_ok(a, b, relation: str | None, gap: int = GAP) -> bool:
    """Relation with a clear margin: the boxes are separated along the relation's axis."""
    (ax, ay, asz), (bx, by, _) = a, b
    if relation == "left":
        return ax + asz + gap <= bx
    if relation == "above":
        return ay + asz + gap <= by
    return True


def layout(caption: str, seed: int) -> list[tuple[str, str, int, int, int]]:
    """Deterministic placement: list of (color, shape, x, y, size) satisfying the caption."""
    p = parse(caption)
    rng = random.Random(f"{caption}|{seed}")
    for _ in range(10_000):
        boxes = []
        for _obj in p.objects:
            s = rng.randint(MIN_SHAPE, MAX_SHAPE)
            boxes.append((rng.randint(0, SIZE - s), rng.randint(0, SIZE - s), s))
        if not all(_disjoint(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i)):
            continue
        if p.relation and not _relation_ok(boxes[0], boxes[1], p.relation):
            continue
        return [(c, sh, x, y, s) for (c, sh), (x, y, s) in zip(p.objects, boxes)]
    raise RuntimeError(f"could not lay out {caption!r} (seed {seed})")  # pragma: no cover


def render(caption: str, seed: int = 0) -> Image.Image:
    """Draw a correct scene for `caption` (deterministic in (caption, seed))."""
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for color, shape, x, y, s in layout(caption, seed):
        _draw(draw, color, shape, x, y, s)
    return img


def render_objects(objects, size: int = SIZE) -> Image.Image:
    """Draw an explicit list of (color, shape, x, y, s) (for building wrong scenes)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for color, shape, x, y, s in objects:
        _draw(draw, color, shape, x, y, s)
    return img


# -------------------------------------------------------------- hard negatives


def extra_object_scene(caption: str, seed: int) -> Image.Image:
    """The scene of `caption` with one more object (random colour and shape, disjoint from the
    others): a scene-side hard negative. Captions cannot express it ("a red circle and a blue
    square" plus a third object has no caption in the grammar), and a CLIP-style score trained on
    caption negatives alone penalises it far less than a missing object
    (benchmarks/toy_proxy_bias.py)."""
    objects = layout(caption, seed)
    rng = random.Random(f"extra|{caption}|{seed}")
    boxes = [(x, y, s) for _c, _sh, x, y, s in objects]
    for _ in range(10_000):
        s = rng.randint(MIN_SHAPE, MAX_SHAPE)
        box = (rng.randint(0, SIZE - s), rng.randint(0, SIZE - s), s)
        if all(_disjoint(box, b) for b in boxes):
            return render_objects(objects + [(rng.choice(COLORS), rng.choice(SHAPES), *box)])
    raise RuntimeError(f"no room for an extra object in {caption!r} (seed {seed})")  # pragma: no cover


def perturb_caption(caption: str, rng: random.Random, mode: str | None = None) -> str | None:
    """A caption that the scene of `caption` does NOT satisfy (a hard negative).

    mode: 'color' | 'shape' | 'count' | 'relation' | 'swap' (swap the two objects'
    attributes: binding) or None for a random applicable one. Returns None when the mode
    does not apply (e.g. 'relation' on a single object).
    """
    p = parse(caption)
    modes = ["color", "shape"]
    if p.kind in ("single", "count"):
        modes.append("count")
    if p.kind in ("and", "left", "above"):
        modes.append("swap")
    if p.kind in RELATIONS:
        modes.append("relation")
    if mode is None:
        mode = rng.choice(modes)
    elif mode not in modes:
        return None
    objs = list(p.objects)
    kind = p.kind
    if mode == "color":
        i = rng.randrange(len(set(objs)) if kind == "count" else len(objs))
        c, s = objs[i]
        new = (rng.choice([x for x in COLORS if x != c]), s)
        objs = [new] * len(objs) if kind == "count" else objs[:i] + [new] + objs[i + 1 :]
    elif mode == "shape":
        i = 0 if kind == "count" else rng.randrange(len(objs))
        c, s = objs[i]
        new = (c, rng.choice([x for x in SHAPES if x != s]))
        objs = [new] * len(objs) if kind == "count" else objs[:i] + [new] + objs[i + 1 :]
    elif mode == "count":
        n = rng.choice([k for k in (1, 2, 3) if k != len(objs)])
        kind = "single" if n == 1 else "count"
        objs = [objs[0]] * n
    elif mode == "swap":  # exchange the two objects' colours (attribute binding)
        (c1, s1), (c2, s2) = objs
        objs = [(c2, s1), (c1, s2)]
    elif mode == "relation":
        kind, objs = p.kind, [objs[1], objs[0]]  # "A left of B" -> "B left of A"
    if kind in ("and", "left", "above") and objs[0] == objs[1]:
        return None
    out = make_caption(kind, objs)
    if out == caption or (kind == "and" and p.kind == "and" and sorted(objs) == sorted(p.objects)):
        return None
    return out
