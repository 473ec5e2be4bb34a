"""Gold evaluation of generated images in the shapes world.

    gold_report(images, captions) -> {"accuracy", "n", "per_kind", "per_constraint",
                                      "compositional", "scores"}
    diversity(images_by_caption)  -> mean pairwise L2 pixel distance across seeds of one
                                     caption, averaged over captions

`images` is a list of PIL images or a B,3,H,W tensor in [0,1]. "compositional" is the
accuracy over the two-object and count kinds ("count", "and", "left", "above").
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np

from .gold import CONSTRAINTS, gold_score, to_array
from .world import KINDS

COMPOSITIONAL = ("count", "and", "left", "above")


def _as_list(images) -> list:
    if hasattr(images, "detach"):  # torch tensor B,3,H,W
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images as B,3,H,W, got {tuple(images.shape)}")
        return [im for im in images.detach().float().cpu()]
    return list(images)


def gold_report(images, captions: Sequence[str]) -> dict:
    imgs = _as_list(images)
    if len(imgs) != len(captions):
        raise ValueError(f"{len(imgs)} images but {len(captions)} captions")
    scores = [gold_score(im, c) for im, c in zip(imgs, captions)]
    by_kind = defaultdict(list)
    for s in scores:
        by_kind[s["kind"]].append(s["correct"])
    comp = [s["correct"] for s in scores if s["kind"] in COMPOSITIONAL]
    n = max(1, len(scores))
    return {
        "accuracy": sum(s["correct"] for s in scores) / n,
        "n": len(scores),
        "per_kind": {k: float(np.mean(by_kind[k])) for k in KINDS if by_kind[k]},
        "n_per_kind": {k: len(by_kind[k]) for k in KINDS if by_kind[k]},
        "per_constraint": {c: float(np.mean([s[c] for s in scores])) if scores else 0.0 for c in CONSTRAINTS},
        "compositional": float(np.mean(comp)) if comp else float("nan"),
        "scores": scores,
    }


def _pixels(im) -> np.ndarray:
    return to_array(im) / 255.0  # H,W,3 in [0,1]


def diversity(images_by_caption: Mapping[str, Sequence] | Sequence[Sequence]) -> float:
    """Mean pairwise per-pixel L2 distance (RMS over pixels and channels, images in [0,1])
    between the samples of one caption, averaged over captions with >= 2 samples."""
    groups = images_by_caption.values() if isinstance(images_by_caption, Mapping) else images_by_caption
    per_caption = []
    for group in groups:
        xs = np.stack([_pixels(im) for im in _as_list(group)]).reshape(len(group), -1)
        if len(xs) < 2:
            continue
        d = [np.sqrt(np.mean((xs[i] - xs[j]) ** 2)) for i in range(len(xs)) for j in range(i)]
        per_caption.append(float(np.mean(d)))
    return float(np.mean(per_caption)) if per_caption else 0.0


__all__ = ["gold_report", "diversity", "COMPOSITIONAL"]
