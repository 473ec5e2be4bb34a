"""Exact ("gold") evaluator of the toy video world: does a clip satisfy its caption?

Each frame goes through the image world's detector (`gold.detect`: palette segmentation,
connected components, shape classification); then, per named object (colour, shape, motion):

    objects           it is found with its colour and shape in at least MIN_FRAMES of the
                      9 frames (all named objects)
    color / shape     the frame's detected colours / shapes equal the caption's, in at least
                      MIN_FRAMES frames
    no_extra_objects  no object beyond the named ones, in at least MIN_FRAMES frames
    motion            its centroid track (the frames where it is found) moves at least
                      MIN_DISPLACEMENT px net in the stated direction with at most MAX_DRIFT
                      px of drift across it (any frame vs. the first); a still object stays
                      within STILL_TOLERANCE px of its first position in both axes
                      (False if the object is not found in at least 2 frames)
    correct           all of the above

`gold_score_video` returns these booleans plus `kind`, `frames_found` (fraction of frames in
which every named object is found) and, on request, the tracks.
"""

from __future__ import annotations

import numpy as np

from mmalign.evaluation import to_array

from .gold import detect
from .video_world import DIRECTIONS, FRAMES, ParsedVideo, parse_video

MIN_FRAMES = 8
MIN_DISPLACEMENT = 4.0
MAX_DRIFT = 3.0
STILL_TOLERANCE = 2.0
VIDEO_CONSTRAINTS = ("objects", "color", "shape", "no_extra_objects", "motion")


def video_frames(frames) -> list[np.ndarray]:
    """A clip as a list of HxWx3 uint8 frames: accepts (F,H,W,3) uint8, (F,3,H,W) float in
    [0,1] (numpy or torch), or a list of frames in any form `evaluation.to_array` takes."""
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"a clip must be 4-D (frames, ...), got shape {frames.shape}")
        if frames.shape[-1] != 3 and frames.shape[1] == 3:  # F,3,H,W in [0,1]
            frames = np.clip(frames.transpose(0, 2, 3, 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        elif frames.dtype != np.uint8:
            frames = np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return list(frames)
    return [to_array(f) for f in frames]


def _track(per_frame, color: str, shape: str) -> list[tuple[int, float, float]]:
    """(frame, cx, cy) of the object in each frame where it is found (largest instance)."""
    out = []
    for f, objs in enumerate(per_frame):
        hits = [o for o in objs if (o.color, o.shape) == (color, shape)]
        if hits:
            o = max(hits, key=lambda o: o.area)
            out.append((f, o.cx, o.cy))
    return out


def motion_ok(track, motion: str) -> bool:
    """Does a centroid track [(frame, cx, cy), ...] show `motion` (see the module docstring)?"""
    if len(track) < 2:
        return False
    xs = np.array([t[1] for t in track]) - track[0][1]
    ys = np.array([t[2] for t in track]) - track[0][2]
    if motion == "still":
        return bool(np.abs(xs).max() <= STILL_TOLERANCE and np.abs(ys).max() <= STILL_TOLERANCE)
    dx, dy = DIRECTIONS[motion]
    along = xs * dx + ys * dy  # positive in the stated direction
    across = xs * dy + ys * dx  # the other axis
    return bool(along[-1] >= MIN_DISPLACEMENT and np.abs(across).max() <= MAX_DRIFT)


def score_tracks(per_frame, caption: str | ParsedVideo) -> dict:
    p = parse_video(caption) if isinstance(caption, str) else caption
    named = [(c, s) for c, s, _ in p.objects]
    tracks = [_track(per_frame, c, s) for c, s in named]
    want_colors = sorted(c for c, _ in named)
    want_shapes = sorted(s for _, s in named)
    color_frames = sum(sorted(o.color for o in objs) == want_colors for objs in per_frame)
    shape_frames = sum(sorted(o.shape for o in objs) == want_shapes for objs in per_frame)
    clean_frames = sum(len(objs) <= len(named) for objs in per_frame)
    all_found = sum(all(any((o.color, o.shape) == k for o in objs) for k in named) for objs in per_frame)
    res = {
        "objects": all(len(t) >= MIN_FRAMES for t in tracks),
        "color": color_frames >= MIN_FRAMES,
        "shape": shape_frames >= MIN_FRAMES,
        "no_extra_objects": clean_frames >= MIN_FRAMES,
        "motion": all(motion_ok(t, m) for t, (_, _, m) in zip(tracks, p.objects)),
    }
    res["correct"] = all(res.values())
    res["frames_found"] = all_found / max(1, len(per_frame))
    return res, tracks


def gold_score_video(frames, caption: str, return_tracks: bool = False) -> dict:
    """Per-constraint booleans, `correct`, `kind` and `frames_found` for one clip."""
    fr = video_frames(frames)
    if len(fr) != FRAMES:
        raise ValueError(f"clip for {caption!r} has {len(fr)} frames, the toy video world has {FRAMES}")
    per_frame = [detect(f) for f in fr]
    res, tracks = score_tracks(per_frame, caption)
    res["kind"] = parse_video(caption).kind
    if return_tracks:
        res["tracks"] = tracks
    return res


__all__ = ["gold_score_video", "motion_ok", "video_frames", "VIDEO_CONSTRAINTS", "MIN_FRAMES"]
