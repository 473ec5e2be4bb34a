"""Exact ("gold") evaluator of the shapes world: does an image satisfy its caption?

Pipeline: palette segmentation -> connected components -> shape classification ->
matching against the caption's parse.

1. Every pixel is projected on the segments white -> palette colour: it takes the colour
   it lies closest to (RGB residual < `COLOR_THRESHOLD`) if it is at least half-way from
   white to it; so a blurred shape keeps its outline, and mixtures of two colours and
   near-white pixels are background.
2. 4-connected components per colour; components smaller than `MIN_AREA` pixels are
   specks and ignored.
3. Shape from geometry: a triangle is narrow at the top and wide at the bottom
   (top-quarter width / bottom-quarter width); between circle and square the fill ratio
   of the bounding box (pi/4 vs 1) and the emptiness of the bbox corners decide.

`gold_score` returns per-constraint booleans (each True for constraints a caption does
not have):

    count             every object the caption names appears exactly as many times as named
                      (same colour and shape)
    color             the multiset of detected colours equals the caption's
    shape             the multiset of detected shapes equals the caption's
    binding           every named (colour, shape) pair is present (at least as often as
                      named): colours attached to the right shapes
    relation          for "left"/"above": some detected instance of the first object has
                      its centroid at least `RELATION_MARGIN` px left of / above some
                      instance of the second; True for other kinds
    no_extra_objects  no detected object beyond the named ones (total count matches)
    correct           all of the above
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from mmalign.evaluation import to_array

from .world import BACKGROUND, COLORS, PALETTE, Parsed, parse

COLOR_THRESHOLD = 70.0
MIN_AREA = 12
RELATION_MARGIN = 3.0
CONSTRAINTS = ("count", "color", "shape", "binding", "relation", "no_extra_objects")

_REFS = np.array([PALETTE[c] for c in COLORS] + [BACKGROUND], dtype=np.float32)  # (5, 3)


@dataclass
class Obj:
    color: str
    shape: str
    cx: float  # centroid, pixels (x to the right, y down)
    cy: float
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


def segment(rgb: np.ndarray) -> np.ndarray:
    """HxW int labels: index into COLORS, or -1 for background.

    A pixel on the segment white -> palette colour c is white + a (c - white). For each
    colour we take `a` (projection) and the distance off that segment (residual); the
    pixel gets the colour with the smallest residual among those with a >= 0.5 and
    residual < COLOR_THRESHOLD. Thresholding at a = 0.5 keeps a blurred shape's
    outline where the sharp one was, and mixtures of two colours stay background.
    """
    white = _REFS[-1]
    d = white[None, None] - rgb  # H,W,3
    v = white[None] - _REFS[:-1]  # C,3
    a = np.einsum("hwk,ck->hwc", d, v) / (v * v).sum(-1)  # H,W,C
    resid = np.linalg.norm(d[:, :, None, :] - a[..., None] * v[None, None], axis=-1)
    resid = np.where((a >= 0.5) & (resid < COLOR_THRESHOLD), resid, np.inf)
    lab = resid.argmin(-1)
    return np.where(np.isfinite(resid.min(-1)), lab, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (N, 2) array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pix = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pix))
    return out


def classify_shape(pix: np.ndarray) -> str:
    """'circle' | 'square' | 'triangle' from a component's pixels (N, 2) of (y, x)."""
    y0, x0 = pix.min(0)
    y1, x1 = pix.max(0)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    m = np.zeros((h, w), dtype=bool)
    m[pix[:, 0] - y0, pix[:, 1] - x0] = True
    widths = m.sum(1).astype(np.float32)
    q = max(1, h // 4)
    top, bottom = widths[:q].mean(), widths[-q:].mean()
    if top < 0.55 * bottom:
        return "triangle"
    fill = m.mean()
    # corners: a 25% x 25% box in each corner; a square fills them, a circle does not
    cy, cx = max(1, h // 4), max(1, w // 4)
    corners = np.concatenate(
        [m[:cy, :cx].ravel(), m[:cy, -cx:].ravel(), m[-cy:, :cx].ravel(), m[-cy:, -cx:].ravel()]
    ).mean()
    if fill > 0.87 or corners > 0.7:
        return "square"
    return "circle"


def detect(image) -> list[Obj]:
    """Objects found in an image (specks below MIN_AREA ignored)."""
    lab = segment(to_array(image))
    objs = []
    for ci, color in enumerate(COLORS):
        mask = lab == ci
        if not mask.any():
            continue
        for pix in _components(mask):
            if len(pix) < MIN_AREA:
                continue
            y0, x0 = pix.min(0)
            y1, x1 = pix.max(0)
            objs.append(
                Obj(
                    color=color,
                    shape=classify_shape(pix),
                    cx=float(pix[:, 1].mean()),
                    cy=float(pix[:, 0].mean()),
                    area=len(pix),
                    bbox=(int(x0), int(y0), int(x1), int(y1)),
                )
            )
    return objs


def _relation_holds(objs: list[Obj], p: Parsed) -> bool:
    if p.relation is None:
        return True
    a_s = [o for o in objs if (o.color, o.shape) == p.objects[0]]
    b_s = [o for o in objs if (o.color, o.shape) == p.objects[1]]
    for a in a_s:
        for b in b_s:
            if a is b:
                continue
            if p.relation == "left" and b.cx - a.cx >= RELATION_MARGIN:
                return True
            if p.relation == "above" and b.cy - a.cy >= RELATION_MARGIN:
                return True
    return False


def score_objects(objs: list[Obj], caption: str | Parsed) -> dict:
    p = parse(caption) if isinstance(caption, str) else caption
    want = Counter(p.objects)
    have = Counter((o.color, o.shape) for o in objs)
    res = {
        "count": all(have[k] == n for k, n in want.items()),
        "color": Counter(o.color for o in objs) == Counter(c for c, _ in p.objects),
        "shape": Counter(o.shape for o in objs) == Counter(s for _, s in p.objects),
        "binding": all(have[k] >= n for k, n in want.items()),
        "relation": _relation_holds(objs, p),
        "no_extra_objects": len(objs) == len(p.objects),
    }
    res["correct"] = all(res.values())
    return res


def gold_score(image, caption: str, return_objects: bool = False) -> dict:
    """Per-constraint booleans and `correct` for one image (PIL, uint8 HWC, or CHW [0,1])."""
    objs = detect(image)
    res = score_objects(objs, caption)
    res["kind"] = parse(caption).kind
    res["n_objects"] = len(objs)
    if return_objects:
        res["objects"] = objs
    return res


__all__ = ["gold_score", "detect", "segment", "classify_shape", "CONSTRAINTS", "Obj"]
