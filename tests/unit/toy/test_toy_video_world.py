"""The toy video world: grammar, renderer, split, gold evaluator, hard negatives, registration."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from mmalign.toy.video_evaluate import gold_report_video, temporal_similarity
from mmalign.toy.video_gold import gold_score_video, motion_ok
from mmalign.toy.video_world import (
    DIRECTIONS,
    FRAMES,
    HELDOUT_TRIPLES,
    MOTIONS,
    PERTURB_MODES,
    all_video_captions,
    heldout_captions,
    heldout_eval_captions,
    parse_video,
    perturb_video_caption,
    render_video,
    render_video_tensor,
    video_layout,
    video_train_captions,
)
from mmalign.toy.world import COLORS, GAP, SHAPES, SIZE, _disjoint


def _sample_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    caps = all_video_captions()
    singles = [c for c in caps if " and " not in c]
    return singles + rng.sample([c for c in caps if " and " in c], n - len(singles))


def test_grammar_parses_and_rejects():
    p = parse_video("a red circle moving right and a blue square standing still")
    assert p.kind == "and" and p.objects == (("red", "circle", "right"), ("blue", "square", "still"))
    assert parse_video("a green triangle standing still").kind == "still"
    assert parse_video("A yellow square moving up").objects == (("yellow", "square", "up"),)
    for bad in ("a purple circle moving left", "a red circle moving sideways", "two red circles"):
        with pytest.raises(ValueError, match="caption"):
            parse_video(bad)
    with pytest.raises(ValueError, match="share colour and shape"):
        parse_video("a red circle moving left and a red circle moving right")
    caps = all_video_captions()
    assert len(caps) == len(set(caps)) == 60 + 66 * 25


def test_render_follows_the_spec():
    for i, c in enumerate(_sample_captions(100)):
        v = render_video(c, i)
        assert v.shape == (FRAMES, SIZE, SIZE, 3) and v.dtype == np.uint8
        assert (v == render_video(c, i)).all()  # deterministic
        assert (v[:, 0, 0] == 255).all() or (v[:, -1, -1] == 255).all()  # white background
        lay = video_layout(c, i)
        for (col, shape, motion), (lc, ls, size, pos) in zip(parse_video(c).objects, lay):
            assert (lc, ls) == (col, shape) and 8 <= size <= 12
            steps = {(b[0] - a[0], b[1] - a[1]) for a, b in zip(pos, pos[1:])}
            assert len(steps) == 1  # constant velocity
            (dx, dy) = steps.pop()
            ux, uy = DIRECTIONS[motion]
            speed = abs(dx) + abs(dy)
            assert (dx, dy) == (ux * speed, uy * speed) and speed in ((0,) if motion == "still" else (1, 2))
            assert all(0 <= x <= SIZE - size and 0 <= y <= SIZE - size for x, y in pos)  # inside every frame
        if len(lay) == 2:
            (_, _, sa, pa), (_, _, sb, pb) = lay
            assert all(_disjoint((*a, sa), (*b, sb), GAP) for a, b in zip(pa, pb))  # never overlap
    t = render_video_tensor("a red circle moving left", 3)
    assert t.shape == (FRAMES, 3, SIZE, SIZE) and 0 <= t.min() and t.max() <= 1


def test_gold_is_exact_on_renders_and_robust_to_blur_and_noise():
    for i, c in enumerate(_sample_captions(72, seed=1)):
        v = render_video(c, 100 + i)
        r = gold_score_video(v, c)
        assert r["correct"] and r["frames_found"] == 1.0, (c, r)
        blurred = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(0.6))) for f in v])
        assert gold_score_video(blurred, c)["correct"], c
        noisy = np.clip(v + np.random.default_rng(i).normal(0, 8, v.shape), 0, 255).astype(np.uint8)
        assert gold_score_video(noisy, c)["correct"], c
        # the B,F,3,H,W float layout of Samples.video gives the same answer
        assert gold_score_video(torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255, c)["correct"]


@pytest.mark.parametrize("mode", PERTURB_MODES)
def test_hard_negatives_fail_gold(mode):
    rng = random.Random(mode)
    n = 0
    for i, c in enumerate(_sample_captions(72, seed=2)):
        neg = perturb_video_caption(c, rng, mode)
        if neg is None:
            continue
        n += 1
        assert neg != c and parse_video(neg)
        r = gold_score_video(render_video(c, i), neg)
        assert not r["correct"], (c, neg, r)
        if mode in ("direction", "motion", "swap"):
            assert r["objects"] and not r["motion"], (c, neg)
    assert n >= 5


def test_motion_track_rules():
    right = [(f, 5.0 + f, 10.0) for f in range(9)]
    assert motion_ok(right, "right") and not motion_ok(right, "left") and not motion_ok(right, "still")
    assert not motion_ok(right, "up") and not motion_ok(right, "down")
    drift = [(f, 5.0 + f, 10.0 + 0.5 * f) for f in range(9)]  # 4 px across: too much drift
    assert not motion_ok(drift, "right")
    short = [(f, 5.0 + 0.4 * f, 10.0) for f in range(9)]  # 3.2 px net: not enough
    assert not motion_ok(short, "right")
    wobble = [(f, 5.0 + (f % 2) * 2, 10.0) for f in range(9)]
    assert motion_ok(wobble, "still") and not motion_ok([(0, 1.0, 1.0)], "still")


def test_split_holds_out_triples_never_seen_in_training():
    train, held = set(video_train_captions()), set(heldout_captions())
    assert train.isdisjoint(held) and train | held == set(all_video_captions())
    for c in train:
        assert not any(o in HELDOUT_TRIPLES for o in parse_video(c).objects), c
    for c in held:
        assert any(o in HELDOUT_TRIPLES for o in parse_video(c).objects), c
    # every colour, shape and motion (and every colour-shape pair) still appears in training
    seen = {o for c in train for o in parse_video(c).objects}
    assert {m for *_, m in seen} == set(MOTIONS)
    assert {(c, s) for c, s, _ in seen} == {(c, s) for c in COLORS for s in SHAPES}
    assert {m for *_, m in HELDOUT_TRIPLES} == set(MOTIONS)
    ev = heldout_eval_captions()
    assert len(ev) == 64 and set(ev) <= held and ev == heldout_eval_captions()
    assert {parse_video(c).kind for c in ev} == {parse_video(c).kind for c in train} == {"moving", "still", "and"}


def test_gold_report_video_over_a_batch():
    caps = ["a red circle moving right", "a blue square standing still", "a green triangle moving up"]
    video = torch.stack([render_video_tensor(c, i) for i, c in enumerate(caps)])  # B,F,3,H,W
    wrong = ["a red circle moving left", "a blue square standing still", "a green circle moving up"]
    r = gold_report_video(video, wrong)
    assert r["accuracy"] == pytest.approx(1 / 3) and r["n"] == 3
    assert r["per_kind"] == {"moving": 0.0, "still": 1.0}
    assert r["per_constraint"]["motion"] == pytest.approx(1 / 3)  # the triangle is no circle: no track
    assert r["per_constraint"]["shape"] == pytest.approx(2 / 3)
    assert gold_report_video(video, caps)["accuracy"] == 1.0
    assert 0.9 < r["temporal_similarity"] < 1.0 and r["frames_found"] == pytest.approx(2 / 3)
    assert temporal_similarity(render_video("a red circle standing still", 0)) == 1.0
    with pytest.raises(ValueError, match="3 videos but 2 captions"):
        gold_report_video(video, caps[:2])


def test_registered_in_the_toy_plugin():
    from mmalign import sources
    from mmalign.config import EvalConfig
    from mmalign.evaluation import gold_evaluator

    assert sources.resolve("prompt_set", "toy:video_train") == video_train_captions()
    assert sources.resolve("prompt_set", "toy:video_heldout") == heldout_eval_captions()
    clip = sources.resolve("expert_source", "toy:render_video", "a red circle moving left", 0)
    assert clip.shape == (FRAMES, 3, SIZE, SIZE)
    assert gold_evaluator(True, "video") is gold_report_video
    assert gold_evaluator("toy_video") is gold_report_video
    assert gold_evaluator(True, "image") is not gold_report_video
    EvalConfig(gold="toy_video").validate()
    with pytest.raises(ValueError, match="gold: unknown gold evaluator 'nope'"):
        EvalConfig(gold="nope").validate()
