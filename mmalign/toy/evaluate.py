"""Gold evaluation of generated images in the shapes world.

    gold_report(images, captions) -> {"accuracy", "n", "per_kind", "per_constraint",
                                      "compositional", "scores"}
    diversity(images_by_caption)  -> mean pairwise L2 pixel distance across seeds of one
                                     caption, averaged over captions (from mmalign.evaluation)

`images` is a list of PIL images or a B,3,H,W tensor in [0,1]. "compositional" is the
accuracy over the two-object and count kinds ("count", "and", "left", "above").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from mmalign.evaluation import diversity, image_list

from .gold import CONSTRAINTS, gold_score
from .world import KINDS

COMPOSITIONAL = ("count", "and", "left", "above")


def gold_report(images, captions: Sequence[str]) -> dict:
    imgs = image_list(images)
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


__all__ = ["gold_report", "diversity", "COMPOSITIONAL"]
