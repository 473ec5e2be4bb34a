"""The toy video world: short clips of moving shapes, their captions, and a fixed split.

A clip is 9 frames of 32x32 RGB on a white background with one or two filled shapes from the
image world (`world.py`: palette, circle / square / upward triangle, 8-12 px across, drawn with
the same code). Each object either moves a constant 1 or 2 px per frame in one direction
(8-16 px over the clip) or stands still; it stays inside the frame in every frame and objects
never overlap (nor touch: `world.GAP` px apart) in any frame. Captions:

    moving   a {color} {shape} moving {left|right|up|down}
    still    a {color} {shape} standing still
    and      {object} and {object}, each with its own motion, e.g.
             "a red circle moving right and a blue square standing still"

Two objects of one caption never share both colour and shape, and are written in a canonical
order (the palette / shape order of `world.py`), so a pair has one caption.

Split: a fixed set of held-out (colour, shape, motion) triples (`HELDOUT_TRIPLES`, one per
colour-shape pair, every motion held out for some pair); a caption is held out when any of its
objects is a held-out triple, so held-out captions ask for combinations never seen in training.
`heldout_captions()` is every held-out caption; `heldout_eval_captions()` a fixed 64-caption
subset of them (all 12 single-object ones + 52 two-object ones) that evaluations sample.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND, COLORS, GAP, MAX_SHAPE, MIN_SHAPE, PALETTE, SHAPES, SIZE, _disjoint, _draw

FRAMES = 9
MOTIONS = ("left", "right", "up", "down", "still")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
SPEEDS = (1, 2)  # px per frame for a moving object
KINDS = ("moving", "still", "and")
N_HELDOUT_EVAL = 64

Obj = tuple[str, str, str]  # (color, shape, motion)


@dataclass(frozen=True)
class ParsedVideo:
    """A caption's meaning: its objects (colour, shape, motion) in caption order, and its kind."""

    kind: str
    objects: tuple[Obj, ...]


_OBJ = r"a (\w+) (\w+) (moving \w+|standing still)"
_ONE = re.compile(rf"^{_OBJ}$")
_TWO = re.compile(rf"^{_OBJ} and {_OBJ}$")


def _obj(color: str, shape: str, motion: str, caption: str) -> Obj:
    motion = "still" if motion == "standing still" else motion.removeprefix("moving ")
    if color not in PALETTE or shape not in SHAPES or motion not in MOTIONS:
        raise ValueError(f"caption {caption!r}: unknown colour, shape or motion ({color!r}, {shape!r}, {motion!r})")
    return color, shape, motion


def parse_video(caption: str) -> ParsedVideo:
    """Parse a caption of the video grammar; raises ValueError naming the caption otherwise."""
    text = " ".join(caption.strip().lower().split())
    m = _TWO.match(text)
    if m:
        g = m.groups()
        a, b = _obj(*g[:3], caption), _obj(*g[3:], caption)
        if a[:2] == b[:2]:
            raise ValueError(f"caption {caption!r}: the two objects share colour and shape")
        return ParsedVideo("and", (a, b))
    m = _ONE.match(text)
    if m:
        o = _obj(*m.groups(), caption)
        return ParsedVideo("still" if o[2] == "still" else "moving", (o,))
    raise ValueError(f"caption {caption!r} is not in the toy video grammar")


def video_caption_kind(caption: str) -> str:
    """One of KINDS: 'moving', 'still', 'and'."""
    return parse_video(caption).kind


def _phrase(o: Obj) -> str:
    c, s, m = o
    return f"a {c} {s} " + ("standing still" if m == "still" else f"moving {m}")


def _order(o: Obj) -> tuple[int, int, int]:
    return COLORS.index(o[0]), SHAPES.index(o[1]), MOTIONS.index(o[2])


def make_video_caption(objects) -> str:
    """Caption of one or two (colour, shape, motion) objects (two are written in canonical order)."""
    objs = sorted(objects, key=_order) if len(objects) == 2 else list(objects)
    if len(objs) not in (1, 2):
        raise ValueError(f"a video caption names one or two objects, got {len(objs)}")
    return " and ".join(_phrase(tuple(o)) for o in objs)


# ------------------------------------------------------------------ split

# One held-out motion per colour-shape pair: motion index (colour + 2 * shape + 1) mod 5.
HELDOUT_TRIPLES: frozenset[Obj] = frozenset(
    (c, s, MOTIONS[(ci + 2 * si + 1) % len(MOTIONS)]) for ci, c in enumerate(COLORS) for si, s in enumerate(SHAPES)
)


@cache
def all_video_captions() -> tuple[str, ...]:
    """Every caption of the grammar (60 single-object + 1650 two-object), in a fixed order."""
    objs = [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS]
    caps = [make_video_caption([o]) for o in objs]
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            if a[:2] != b[:2]:
                caps.append(make_video_caption([a, b]))
    return tuple(caps)


def is_heldout(caption: str) -> bool:
    return any(o in HELDOUT_TRIPLES for o in parse_video(caption).objects)


@cache
def video_train_captions() -> tuple[str, ...]:
    return tuple(c for c in all_video_captions() if not is_heldout(c))


@cache
def heldout_captions() -> tuple[str, ...]:
    return tuple(c for c in all_video_captions() if is_heldout(c))


def _h(text: str) -> int:
    return int(hashlib.sha256(("toy-video-split-v1:" + text).encode()).hexdigest()[:8], 16)


@cache
def heldout_eval_captions() -> tuple[str, ...]:
    """A fixed subset of the held-out captions: every single-object one, and two-object ones
    by a fixed hash, N_HELDOUT_EVAL in all (in the grammar's order)."""
    held = heldout_captions()
    singles = [c for c in held if parse_video(c).kind != "and"]
    pairs = sorted((c for c in held if parse_video(c).kind == "and"), key=_h)[: N_HELDOUT_EVAL - len(singles)]
    keep = set(singles) | set(pairs)
    return tuple(c for c in held if c in keep)


# ------------------------------------------------------------------ render


def _positions(x: int, y: int, motion: str, speed: int) -> list[tuple[int, int]]:
    dx, dy = DIRECTIONS[motion]
    return [(x + dx * speed * f, y + dy * speed * f) for f in range(FRAMES)]


def _start_range(size: int, delta: int) -> tuple[int, int]:
    """Range of start coordinates keeping [start, start + size) inside the frame over a move of delta px."""
    lo, hi = max(0, -delta), min(SIZE - size, SIZE - size - delta)
    return lo, hi


def video_layout(caption: str, seed: int) -> list[tuple[str, str, int, list[tuple[int, int]]]]:
    """Deterministic layout: per object (colour, shape, size, [(x, y) per frame])."""
    p = parse_video(caption)
    rng = random.Random(f"video|{caption}|{seed}")
    for _ in range(10_000):
        objs = []
        for c, s, m in p.objects:
            size = rng.randint(MIN_SHAPE, MAX_SHAPE)
            speed = rng.choice(SPEEDS) if m != "still" else 0
            dx, dy = DIRECTIONS[m]
            xlo, xhi = _start_range(size, dx * speed * (FRAMES - 1))
            ylo, yhi = _start_range(size, dy * speed * (FRAMES - 1))
            x, y = rng.randint(xlo, xhi), rng.randint(ylo, yhi)
            objs.append((c, s, size, _positions(x, y, m, speed)))
        if len(objs) == 2:
            (_, _, sa, pa), (_, _, sb, pb) = objs
            if not all(_disjoint((ax, ay, sa), (bx, by, sb), GAP) for (ax, ay), (bx, by) in zip(pa, pb)):
                continue
        return objs
    raise RuntimeError(f"could not lay out {caption!r} (seed {seed})")  # pragma: no cover


def render_layout(objs) -> np.ndarray:
    """Frames (F, 32, 32, 3) uint8 of a layout of (colour, shape, size, positions)."""
    out = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    for f in range(FRAMES):
        img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for color, shape, size, pos in objs:
            _draw(draw, color, shape, pos[f][0], pos[f][1], size)
        out[f] = np.asarray(img)
    return out


def render_video(caption: str, seed: int = 0) -> np.ndarray:
    """A correct clip of `caption`: (9, 32, 32, 3) uint8, deterministic in (caption, seed)."""
    return render_layout(video_layout(caption, seed))


def render_video_tensor(caption: str, seed: int = 0):
    """`render_video` as a video sample: float tensor (F, 3, H, W) in [0, 1] (the expert source
    `toy:render_video`; Samples.video holds a batch of these)."""
    import torch

    return torch.from_numpy(render_video(caption, seed)).permute(0, 3, 1, 2).float() / 255.0


# ------------------------------------------------------------------ hard negatives

PERTURB_MODES = ("direction", "motion", "color", "shape", "swap")


def perturb_video_caption(caption: str, rng: random.Random, mode: str | None = None) -> str | None:
    """A caption that the clip of `caption` does NOT satisfy (a hard negative).

    mode: 'direction' (a moving object moves another way), 'motion' (moving <-> still),
    'color' / 'shape' (one object's), 'swap' (two objects exchange their motions), or None for a
    random applicable one. Returns None when the mode does not apply (e.g. 'swap' on one object,
    or two objects with the same motion).
    """
    p = parse_video(caption)
    objs = list(p.objects)
    modes = ["motion", "color", "shape"]
    if any(m != "still" for _, _, m in objs):
        modes.append("direction")
    if len(objs) == 2 and objs[0][2] != objs[1][2]:
        modes.append("swap")
    if mode is None:
        mode = rng.choice(modes)
    elif mode not in modes:
        return None
    if mode == "swap":
        (c1, s1, m1), (c2, s2, m2) = objs
        objs = [(c1, s1, m2), (c2, s2, m1)]
    else:
        cands = [i for i, o in enumerate(objs) if mode != "direction" or o[2] != "still"]
        i = rng.choice(cands)
        c, s, m = objs[i]
        if mode == "direction":
            m = rng.choice([d for d in MOTIONS if d not in ("still", m)])
        elif mode == "motion":
            m = rng.choice([d for d in MOTIONS if d != "still"]) if m == "still" else "still"
        elif mode == "color":
            c = rng.choice([x for x in COLORS if x != c])
        else:
            s = rng.choice([x for x in SHAPES if x != s])
        objs[i] = (c, s, m)
    if len(objs) == 2 and objs[0][:2] == objs[1][:2]:
        return None
    out = make_video_caption(objs)
    return None if out == make_video_caption(p.objects) else out


def video_vocabulary() -> tuple[str, ...]:
    """Every word of the grammar (for word-level tokenizers)."""
    words = {"a", "and", "moving", "standing", "still", *COLORS, *SHAPES, *MOTIONS}
    return tuple(sorted(words))


__all__ = [
    "FRAMES",
    "MOTIONS",
    "KINDS",
    "HELDOUT_TRIPLES",
    "ParsedVideo",
    "parse_video",
    "video_caption_kind",
    "make_video_caption",
    "all_video_captions",
    "video_train_captions",
    "heldout_captions",
    "heldout_eval_captions",
    "is_heldout",
    "video_layout",
    "render_layout",
    "render_video",
    "render_video_tensor",
    "perturb_video_caption",
    "PERTURB_MODES",
    "video_vocabulary",
]
