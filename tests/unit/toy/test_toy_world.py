"""The toy world: renderer, gold evaluator, split, evaluation helpers and shipped assets."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from mmalign.toy.evaluate import diversity, gold_report
from mmalign.toy.gold import detect, gold_score
from mmalign.toy.world import (
    KINDS,
    PALETTE,
    SHAPES,
    all_captions,
    caption_kind,
    extra_object_scene,
    heldout_captions,
    layout,
    parse,
    perturb_caption,
    render,
    render_objects,
    train_captions,
)
from tests.helpers import ROOT

ASSETS = ROOT / "mmalign" / "toy" / "assets"


def _random_captions(n, seed=0):
    rng = random.Random(seed)
    caps = all_captions()
    return [rng.choice(caps) for _ in range(n)]


def _degrade(img, seed, radius=0.7, sigma=8.0):
    img = img.filter(ImageFilter.GaussianBlur(radius))
    a = np.asarray(img).astype(np.float32)
    a = a + np.random.default_rng(seed).normal(0, sigma, a.shape)
    return np.clip(a, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------- spec


def test_palette_exact():
    assert PALETTE == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (230, 200, 40),
    }
    assert SHAPES == ("circle", "square", "triangle")


def test_render_spec_colors_sizes_background():
    allowed = {(255, 255, 255), *PALETTE.values()}
    for i, cap in enumerate(_random_captions(200, seed=1)):
        img = render(cap, i)
        assert img.size == (32, 32) and img.mode == "RGB"
        a = np.asarray(img)
        assert {tuple(p) for p in a.reshape(-1, 3)} <= allowed
        assert (a == 255).all(-1).mean() > 0.5  # white background
        for _color, _shape, _x, _y, s in layout(cap, i):
            assert 8 <= s <= 12
        for o in detect(img):
            x0, y0, x1, y1 = o.bbox
            assert 7 <= x1 - x0 + 1 <= 12 and 7 <= y1 - y0 + 1 <= 12, (cap, o)


def test_render_deterministic_per_seed():
    for cap in all_captions()[::37]:
        assert render(cap, 3).tobytes() == render(cap, 3).tobytes()
    differ = [render(c, 0).tobytes() != render(c, 1).tobytes() for c in all_captions()[::7]]
    assert np.mean(differ) > 0.9


def test_grammar_and_kinds():
    caps = all_captions()
    assert len(caps) == len(set(caps)) == 432
    assert caption_kind("a red circle") == "single"
    assert caption_kind("three blue triangles") == "count"
    assert caption_kind("a red circle and a green square") == "and"
    assert caption_kind("a red circle to the left of a green square") == "left"
    assert caption_kind("a red circle above a green square") == "above"
    assert parse("two yellow squares").objects == (("yellow", "square"),) * 2
    with pytest.raises(ValueError, match="purple"):
        parse("a purple circle")
    with pytest.raises(ValueError, match="not in the toy grammar"):
        parse("a red circle below a blue square")


def test_split_disjoint_fixed_covers_every_kind():
    tr, ho = set(train_captions()), set(heldout_captions())
    assert not tr & ho and tr | ho == set(all_captions())
    for kind in KINDS:
        assert any(caption_kind(c) == kind for c in tr), kind
        assert any(caption_kind(c) == kind for c in ho), kind
    # fixed: the split is a pure function of the caption text (changing it breaks the
    # shipped models' held-out numbers)
    assert len(ho) == 101
    digest = hashlib.sha256("\n".join(sorted(ho)).encode()).hexdigest()[:12]
    assert digest == _HELDOUT_DIGEST, digest
    # held-out are combinations, not kinds: each held-out colour-shape pair occurs in train
    train_objs = {o for c in tr for o in parse(c).objects}
    assert all(o in train_objs for c in ho for o in parse(c).objects)


# ---------------------------------------------------------------- gold


def test_gold_correct_on_rendered_scenes():
    caps = _random_captions(2000)
    ok = [gold_score(render(c, i), c)["correct"] for i, c in enumerate(caps)]
    assert np.mean(ok) >= 0.99


def test_gold_robust_to_blur_and_noise():
    caps = _random_captions(1000, seed=2)
    ok = [gold_score(_degrade(render(c, i), i), c)["correct"] for i, c in enumerate(caps)]
    assert np.mean(ok) >= 0.95


@pytest.mark.parametrize("mode", ["color", "shape", "count", "swap", "relation"])
def test_gold_rejects_perturbed_scenes(mode):
    rng = random.Random(mode)
    n = wrong = 0
    for i, cap in enumerate(all_captions()[::3]):
        neg = perturb_caption(cap, rng, mode)
        if neg is None:
            continue
        n += 1
        for img in (render(neg, i), _degrade(render(neg, i), i)):
            wrong += not gold_score(img, cap)["correct"]
    assert n > 10 and wrong == 2 * n


def test_extra_object_scene_keeps_the_scene_and_adds_one_object():
    """The scene-side hard negative: the caption's own layout plus one disjoint object, which
    the gold evaluator rejects as an extra object (benchmarks/toy_proxy_bias.py)."""
    for i, cap in enumerate(all_captions()[::7]):
        scene, extra = render(cap, i), extra_object_scene(cap, i)
        assert extra_object_scene(cap, i).tobytes() == extra.tobytes()  # deterministic
        kept = np.asarray(scene) != 255  # every pixel of the original objects is unchanged
        assert (np.asarray(extra)[kept] == np.asarray(scene)[kept]).all(), cap
        assert len(detect(extra)) == len(detect(scene)) + 1, cap
        result = gold_score(extra, cap)
        assert not result["no_extra_objects"] and not result["correct"], cap


def test_gold_constraints_name_the_failure():
    # wrong colour
    img = render_objects([("blue", "circle", 10, 10, 10)])
    r = gold_score(img, "a red circle")
    assert not r["color"] and not r["correct"] and r["shape"] and r["no_extra_objects"]
    # wrong count
    r = gold_score(render("three green squares", 0), "two green squares")
    assert not r["count"] and not r["no_extra_objects"] and r["binding"] and not r["correct"]
    # swapped relation
    img = render_objects([("red", "circle", 20, 10, 10), ("blue", "square", 2, 10, 10)])
    r = gold_score(img, "a red circle to the left of a blue square")
    assert not r["relation"] and r["binding"] and not r["correct"]
    assert gold_score(img, "a blue square to the left of a red circle")["correct"]
    # colours bound to the wrong shapes
    img = render_objects([("blue", "circle", 2, 2, 10), ("red", "square", 18, 18, 10)])
    r = gold_score(img, "a red circle and a blue square")
    assert r["color"] and r["shape"] and not r["binding"] and not r["correct"]
    # empty image, tiny specks
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert not gold_score(blank, "a red circle")["correct"]
    blank[5:7, 5:7] = PALETTE["red"]
    assert gold_score(blank, "a red circle")["n_objects"] == 0


# ---------------------------------------------------------------- evaluate


def test_gold_report_and_diversity():
    caps = [
        "a red circle",
        "two blue squares",
        "a red circle above a green square",
        "a yellow triangle to the left of a blue circle",
        "a red square and a green circle",
    ]
    imgs = [render(c, 0) for c in caps]
    r = gold_report(imgs, caps)
    assert r["accuracy"] == 1.0 and r["n"] == 5 and set(r["per_kind"]) == set(KINDS)
    x = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float() / 255
    r2 = gold_report(x, caps[::-1])  # tensor input, mismatched captions
    assert r2["accuracy"] < 1.0 and set(r2["per_constraint"]) >= {"count", "relation", "binding"}
    with pytest.raises(ValueError, match="captions"):
        gold_report(imgs, caps[:2])
    same = {"a": [render("a red circle", 0)] * 3}
    diff = {"a": [render("a red circle", s) for s in range(3)]}
    assert diversity(same) == 0.0 and diversity(diff) > 0.05


# ---------------------------------------------------------------- shipped assets


def test_shipped_pipeline_loads_and_samples():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "sd_toy")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.prediction_type == "epsilon"
    ids = pipe.tokenizer("a red circle").input_ids
    import open_clip

    assert ids == open_clip.tokenize(["a red circle"])[0][: len(ids)].tolist()
    out = pipe(
        ["a red circle", "two blue squares"],
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    size = sum(f.stat().st_size for f in (ASSETS / "sd_toy").rglob("*") if f.is_file())
    assert size < 16e6


def test_proxy_clip_loss_with_negative_only_images_matches_float64():
    """clip_loss against a direct float64 computation: duplicate captions share one text, and an
    image with caption None is only a negative column of text -> image."""
    from mmalign.toy.proxy import clip_loss

    g = torch.Generator().manual_seed(0)
    caps = ["a", "b", "a", None, "c", None]
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)  # texts of a, b, c
    scale = 7.0
    got = clip_loss(img, txt, caps, scale)

    logits = scale * img.double() @ txt.double().t()  # 6 images x 3 texts
    col = {"a": 0, "b": 1, "c": 2}
    i2t = [-(logits[i, col[c]] - torch.logsumexp(logits[i], 0)) for i, c in enumerate(caps) if c is not None]
    t2i = []
    for c, j in col.items():
        mine = [i for i, cc in enumerate(caps) if cc == c]
        t2i.append(-(torch.logsumexp(logits[mine, j], 0) - torch.logsumexp(logits[:, j], 0)))
    want = (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_shipped_proxy_prefers_true_caption():
    import open_clip

    from mmalign.toy.proxy import load_proxy

    model = open_clip.create_model("local-dir:" + str(ASSETS / "proxy_clip"))
    assert model.visual.image_size in (32, (32, 32))
    _, _, score = load_proxy(ASSETS / "proxy_clip")
    rng = random.Random(0)
    imgs, pos, neg = [], [], []
    for i, cap in enumerate(heldout_captions()):
        for _ in range(2):
            n = perturb_caption(cap, rng)
            if n is None:
                continue
            imgs.append(np.asarray(render(cap, i)) / 255.0)
            pos.append(cap)
            neg.append(n)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        acc = (score(x, pos) > score(x, neg)).float().mean().item()
    assert acc > 0.8, acc


_HELDOUT_DIGEST = "a60f0d6f65b6"


def test_caption_noise_scenes_are_wrong_for_their_caption():
    """`train unet --caption-noise`: the noisy scenes show a hard negative, never the caption."""
    from mmalign.toy.train import noisy_captions

    caps = list(all_captions()[::5])
    wrong = noisy_captions(caps, seed=0)
    assert wrong == noisy_captions(caps, seed=0)  # seeded
    changed = [(c, w) for c, w in zip(caps, wrong) if w != c]
    assert len(changed) >= 0.9 * len(caps)
    assert not any(gold_score(render(w, i), c)["correct"] for i, (c, w) in enumerate(changed))
    rel = noisy_captions(caps, seed=0, mode="relation")  # one systematic bias: relations swapped
    for c, w in zip(caps, rel):
        kind = caption_kind(c)
        assert (w != c) == (kind in ("left", "above")), (c, w)
        if w != c:
            assert caption_kind(w) == kind and not gold_score(render(w, 0), c)["correct"]


def test_heldout_monitoring_draws_a_seed_per_sample():
    from mmalign.toy.train import heldout_samples

    caps, seeds = heldout_samples((0, 1))
    assert caps == list(heldout_captions()) * 2
    assert len(set(seeds)) == len(seeds)
