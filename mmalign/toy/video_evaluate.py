"""Gold evaluation of generated clips in the toy video world (mirrors `evaluate.py`).

    gold_report_video(videos, captions) -> {"accuracy", "n", "per_kind", "n_per_kind",
                                            "compositional" (the two-object kind), "per_constraint", "frames_found",
                                            "temporal_similarity", "scores"}

`videos` is a B,F,3,H,W tensor/array in [0,1] (what `Samples.video` holds) or a sequence of
clips in any form `video_gold.video_frames` takes. Temporal figures that benchmarks report:

    frames_found         mean over clips of the fraction of frames in which every named object
                         is found (objects that flicker in and out lower it)
    temporal_similarity  mean over clips and consecutive frame pairs of 1 - MSE(frame t,
                         frame t+1) with pixels in [0,1] (1.0 for a frozen clip; the world's
                         own clips score about 0.97-0.99)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .video_gold import VIDEO_CONSTRAINTS, gold_score_video, video_frames
from .video_world import KINDS


def temporal_similarity(frames) -> float:
    """1 - mean squared difference of consecutive frames (pixels in [0,1])."""
    a = np.stack(video_frames(frames)).astype(np.float32) / 255.0
    if len(a) < 2:
        return 1.0
    return float(1.0 - ((a[1:] - a[:-1]) ** 2).mean())


def _clips(videos) -> list:
    if hasattr(videos, "detach") or isinstance(videos, np.ndarray):
        if videos.ndim != 5:
            raise ValueError(f"expected videos as B,F,3,H,W, got shape {tuple(videos.shape)}")
        return [v for v in videos]
    return list(videos)


def gold_report_video(videos, captions: Sequence[str]) -> dict:
    clips = _clips(videos)
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} videos but {len(captions)} captions")
    scores, sims = [], []
    for v, c in zip(clips, captions):
        scores.append(gold_score_video(v, c))
        sims.append(temporal_similarity(v))
    by_kind = defaultdict(list)
    for s in scores:
        by_kind[s["kind"]].append(s["correct"])
    n = max(1, len(scores))
    return {
        "accuracy": sum(s["correct"] for s in scores) / n,
        "n": len(scores),
        "per_kind": {k: float(np.mean(by_kind[k])) for k in KINDS if by_kind[k]},
        "n_per_kind": {k: len(by_kind[k]) for k in KINDS if by_kind[k]},
        "compositional": float(np.mean(by_kind["and"])) if by_kind["and"] else float("nan"),
        "per_constraint": {c: float(np.mean([s[c] for s in scores])) if scores else 0.0 for c in VIDEO_CONSTRAINTS},
        "frames_found": float(np.mean([s["frames_found"] for s in scores])) if scores else 0.0,
        "temporal_similarity": float(np.mean(sims)) if sims else 0.0,
        "scores": scores,
    }


gold_report_video.modality = "video"  # type: ignore[attr-defined]  (evaluation.gold_evaluator picks by it)

__all__ = ["gold_report_video", "temporal_similarity"]
