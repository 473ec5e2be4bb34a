"""Image reward adapters (CLIP-HF, HPSv2, PickScore, LAION aesthetic), rule rewards, mixes,
ensembles and the video-from-image reward, on tiny random models of the real classes saved
to disk and loaded back through the adapters' normal loading path (no downloads)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign import registry
from mmalign.config import ConfigError, parse_dataclass
from mmalign.rewards import fixtures as fx
from mmalign.rewards.common import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_reward
from mmalign.types import Samples
from tests.helpers import ROOT

fx.register_test_rewards()

PROMPTS = ["a red circle", "a blue square left of a green triangle", "a cat"]


def build(name: str, **args):
    return build_reward({"name": name, **args}, "reward")


def rand_images(b=3, h=40, w=52, seed=0, dtype=torch.float32, smooth=False):
    g = torch.Generator().manual_seed(seed)
    if smooth:  # low-frequency content, like natural images
        x = torch.rand(b, 3, 5, 5, generator=g, dtype=dtype)
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return torch.rand(b, 3, h, w, generator=g, dtype=dtype)


def fd_check(fn, x: torch.Tensor, eps: float = 1e-6, rtol: float = 1e-4):
    """Directional finite difference of sum(fn(x)) in float64 against autograd."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    x = x.clone().requires_grad_(True)
    fn(x).sum().backward()
    analytic = (x.grad * v).sum().item()
    with torch.no_grad():
        numeric = ((fn(x + eps * v).sum() - fn(x - eps * v).sum()) / (2 * eps)).item()
    assert math.isfinite(analytic) and abs(analytic) > 0
    assert analytic == pytest.approx(numeric, rel=rtol, abs=1e-8)


@pytest.fixture(scope="module")
def clip_dir():
    return fx.tiny("clip_hf")["model"]


@pytest.fixture(scope="module")
def clip_hf(clip_dir):
    return build("clip_hf", model=clip_dir)


@pytest.fixture(scope="module")
def hps():
    return build("hps", **fx.tiny("hps"))


# --------------------------------------------------------------------------- registry


def test_every_reward_is_registered_with_its_description():
    registry.load_builtins()
    registry.load_plugins()  # toy_gold comes from the toy world's plug-in
    want = {
        "clip_hf",
        "hps",
        "pickscore",
        "aesthetic",
        "vlm_judge",
        "audio_judge",
        "clap",
        "video_from_image",
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "toy_gold",
        "mix",
        "ensemble",
    }
    assert want <= set(registry.REWARDS)
    for name in want:
        b = registry.REWARDS[name].build
        assert b.modality and b.loads and registry.REWARDS[name].doc, name


def test_configs_validate_with_clear_errors(tmp_path):
    entry = registry.lookup("reward", "hps")
    with pytest.raises(ConfigError, match="checkpoint: file .*missing.pt not found"):
        parse_dataclass(entry.config, {"checkpoint": str(tmp_path / "missing.pt")}, "reward")
    with pytest.raises(ConfigError, match="reward.batch_sizee: unknown key"):
        parse_dataclass(registry.lookup("reward", "clip_hf").config, {"batch_sizee": 3}, "reward")
    with pytest.raises(ConfigError, match="head: missing required key"):
        parse_dataclass(registry.lookup("reward", "aesthetic").config, {}, "reward")
    with pytest.raises(ConfigError, match="weights: 1 weights for 2 rewards"):
        build("mix", rewards=[{"name": "jpeg_compressibility"}, {"name": "jpeg_incompressibility"}], weights=[1.0])
    with pytest.raises(ConfigError, match=r"rewards\[0\].name: unknown reward 'nope'"):
        build("mix", rewards=[{"name": "nope"}])
    with pytest.raises(ConfigError, match="differentiable: needs features: torch"):
        parse_dataclass(registry.lookup("reward", "clap").config, {"features": "processor"}, "reward")


# --------------------------------------------------------------------------- CLIP (transformers)


def test_clip_hf_returns_finite_batch_and_matches_manual_formula(clip_hf, clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    x = rand_images()
    s = clip_hf(Samples(images=x), PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all()
    # independent computation with the model, its tokenizer and the processor constants
    model, tok = CLIPModel.from_pretrained(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    px = clip_hf.clip.preprocess(x)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(**tok(PROMPTS, padding=True, return_tensors="pt"))
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    torch.testing.assert_close(s, F.cosine_similarity(img, txt, dim=-1), rtol=1e-5, atol=1e-6)
    # batching does not change scores
    one = torch.cat([clip_hf(Samples(images=x[i : i + 1]), PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(s, one, rtol=1e-5, atol=1e-6)


def test_clipscore_convention_on_fixed_embeddings():
    from mmalign.rewards.clip_hf import clip_score_formula, cosine_scores

    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]]), dim=-1)
    cos = cosine_scores(img, txt)
    torch.testing.assert_close(cos, torch.tensor([1.0, math.sqrt(0.5), -1.0]))
    torch.testing.assert_close(clip_score_formula(cos, 2.5, True), torch.tensor([2.5, 2.5 * math.sqrt(0.5), 0.0]))
    torch.testing.assert_close(clip_score_formula(cos, 1.0, False), cos)


def test_clip_hf_clip_at_zero_config(clip_dir):
    r = build("clip_hf", model=clip_dir, weight=2.5, clip_at_zero=True)
    s = r(Samples(images=rand_images()), PROMPTS)
    assert (s >= 0).all() and (s <= 2.5).all()


def test_hf_preprocessing_uses_processor_constants_and_matches_it(clip_hf):
    from transformers import CLIPImageProcessor

    t = clip_hf.clip.transform
    assert t.mean == pytest.approx(OPENAI_CLIP_MEAN) and t.std == pytest.approx(OPENAI_CLIP_STD)
    assert t.resize == 32 and t.crop == (32, 32) and t.interpolation == "bicubic"
    proc = CLIPImageProcessor.from_pretrained(clip_hf.cfg.model)
    step = 1 / 255 / min(OPENAI_CLIP_STD)  # one 8-bit level after normalisation
    for h, w in [(32, 32), (40, 52), (64, 37)]:
        for smooth in (True, False):
            u8 = (rand_images(2, h, w, smooth=smooth) * 255).round().to(torch.uint8)
            ref = proc(images=list(u8), return_tensors="pt")["pixel_values"]
            ours = clip_hf.clip.preprocess(u8.float() / 255)
            assert ours.shape == ref.shape == (2, 3, 32, 32)
            diff = (ours - ref).abs()
            if (h, w) == (32, 32):
                assert diff.max() < 1e-5  # no resize: identical
            elif smooth:  # natural-image-like: within the processor's 8-bit rounding
                assert diff.max() < 1.5 * step, (h, w)
            else:  # white noise: its separable 8-bit passes clip overshoot in between; on average close
                assert diff.mean() < 1.0 * step, (h, w)


def test_wrong_modality_shape_or_count_is_a_clear_error(clip_hf):
    with pytest.raises(TypeError, match="clip_hf.*scores image samples, but got audio"):
        clip_hf(Samples(audio=torch.zeros(2, 1, 100), sample_rate=16000), ["a", "b"])
    with pytest.raises(ValueError, match=r"images must be B,3,H,W.*\(2, 1, 8, 8\)"):
        clip_hf(Samples(images=torch.zeros(2, 1, 8, 8)), ["a", "b"])
    with pytest.raises(ValueError, match="3 samples but 2 prompts"):
        clip_hf(Samples(images=rand_images()), ["a", "b"])


# --------------------------------------------------------------------------- HPSv2


def test_hps_loads_checkpoint_into_architecture_and_scores_cosine(hps):
    import open_clip

    cfg = fx.tiny("hps")
    x = rand_images()
    s = hps(Samples(images=x), PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s.abs() <= 1).all()
    # independent: open_clip model + the checkpoint's state dict, forward() features, diag(img @ txt.T)
    ref_model = open_clip.create_model("mmalign-tiny-clip", pretrained=None).eval()
    ref_model.load_state_dict(torch.load(cfg["checkpoint"], weights_only=True)["state_dict"])
    with torch.no_grad():
        out = ref_model(hps.preprocess(x), open_clip.get_tokenizer("ViT-B-32")(PROMPTS))
    img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    torch.testing.assert_close(s, torch.diagonal(img @ txt.T), rtol=1e-5, atol=1e-6)


HPS_REFERENCE = ROOT / "tests" / "fixtures" / "hps_reference.safetensors"


def _hps_reference_cases():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_hps_reference", ROOT / "scripts" / "make_hps_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hps_preprocessing_matches_the_hpsv2_reference_transform(hps):
    """Against the outputs of HPSv2's own eval transform (hpsv2 1.2.0 transform.py, ResizeMaxSize:
    letterbox, not crop), recorded by scripts/make_hps_reference.py on det_images inputs.
    Tolerance 1e-5: the reference resizes the same float32 tensor with the same torch bicubic
    kernel (identical here; 1e-5 allows other CPUs' kernels), far below one 8-bit level
    after normalisation (1 / 255 / 0.26 = 0.015)."""
    from safetensors.torch import load_file

    from mmalign.rewards.hps import LetterboxTransform

    assert hps.transform == LetterboxTransform(32, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    ref, mk = load_file(str(HPS_REFERENCE)), _hps_reference_cases()
    for h, w, size in mk.CASES:
        name = mk.case_name(h, w, size)
        x = fx.det_images(1, h, w, mk.SEED).float() / 255  # ToTensor of the same uint8 image
        t = hps.transform if size == 32 else LetterboxTransform(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        ours = t(torch.cat([x, x]))  # batched
        assert ours.shape == (2, 3, size, size), name
        ours = ours[1]
        close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
        if size == 224:
            close(ours[:, ::4, ::4], ref[f"{name}/sub4"])
            close(ours.mean(2), ref[f"{name}/row_mean"])
            close(ours.mean(1), ref[f"{name}/col_mean"])
        elif (h, w) == (32, 20):  # longest side already 32: the reference leaves it 32x20, we pad it
            r = ref[f"{name}/full"]
            assert r.shape == (3, 32, 20)
            close(ours[:, :, 6:26], r)
            pad = (-torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)).view(3, 1, 1)
            close(ours[:, :, :6], pad.expand(3, 32, 6))
        else:
            close(ours, ref[f"{name}/full"])
    # the float64 path (gradient checks) computes the same transform
    x = fx.det_images(1, 37, 53, mk.SEED).double() / 255
    torch.testing.assert_close(hps.preprocess(x)[0].float(), ref["37x53_to_32/full"], rtol=0, atol=1e-5)


def test_video_from_image_letterboxes_every_frame_like_hps(hps):
    video = rand_images(6, 24, 40, smooth=True).view(2, 3, 3, 24, 40)  # B=2, F=3 non-square frames
    v = build("video_from_image", image_reward={"name": "hps", **fx.tiny("hps")}, frames="all", consistency_weight=0.5)
    with torch.no_grad():
        got = v(Samples(video=video), PROMPTS[:2])
        frames = hps(Samples(images=video.flatten(0, 1)), [p for p in PROMPTS[:2] for _ in range(3)]).view(2, 3)
        emb = hps.image_features(hps.transform(video.flatten(0, 1))).view(2, 3, -1)
    cons = (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(1)
    torch.testing.assert_close(got, frames.mean(1) + 0.5 * cons, rtol=1e-5, atol=1e-6)


def test_hps_rejects_a_checkpoint_of_another_architecture(tmp_path):
    cfg = fx.tiny("hps")
    sd = torch.load(cfg["checkpoint"], weights_only=True)["state_dict"]
    sd.pop("logit_scale")
    sd["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, bad)
    with pytest.raises(ValueError, match="does not match the model.*logit_scale.*extra.weight"):
        build("hps", checkpoint=str(bad), model_config=cfg["model_config"])
    with pytest.raises(ValueError, match="not an open_clip model name"):
        build("hps", checkpoint=str(bad), architecture="ViT-Nope-14")


def test_hps_is_differentiable_finite_difference_float64():
    r = build("hps", dtype="float64", **fx.tiny("hps"))
    fd_check(lambda x: r(Samples(images=x), PROMPTS[:1]), rand_images(1, 30, 36, dtype=torch.float64))  # letterboxed


# --------------------------------------------------------------------------- PickScore


def test_pickscore_processor_defaults_to_the_references_laion_repo(clip_dir, monkeypatch):
    """The PickScore README loads the processor from laion/CLIP-ViT-H-14-laion2B-s32B-b79K and the
    model from yuvalkirstain/PickScore_v1; an explicit `processor` is honoured. No network: the
    processor loaders are redirected to the tiny model directory and record the id asked for."""
    import transformers

    from mmalign.rewards.pickscore import PickScoreConfig

    assert PickScoreConfig().processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert PickScoreConfig().model == "yuvalkirstain/PickScore_v1"
    asked = []
    for cls in (transformers.AutoImageProcessor, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def fake(src, *a, _real=real, **k):
            asked.append(src)
            return _real(clip_dir, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    build("pickscore", model=clip_dir)
    assert asked == ["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"] * 2
    asked.clear()
    build("pickscore", model=clip_dir, processor="my-org/my-processor")
    assert asked == ["my-org/my-processor"] * 2
    asked.clear()
    build("pickscore", model=clip_dir, processor=None)  # null: the model directory's own processor
    assert asked == [clip_dir] * 2


def test_pickscore_is_logit_scale_times_cosine(clip_dir):
    from mmalign.rewards.pickscore import pickscore_formula, preference_probs

    r = build("pickscore", model=clip_dir, processor=clip_dir)
    x = rand_images()
    s = r(Samples(images=x), PROMPTS)
    scale = r.clip.model.logit_scale.exp()
    with torch.no_grad():
        cos = (r.clip.image_features(x) * r.clip.text_features(PROMPTS)).sum(-1)
    torch.testing.assert_close(s, scale * cos)
    # fixed embeddings
    img = F.normalize(torch.tensor([[3.0, 4.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0]]), dim=-1)
    torch.testing.assert_close(pickscore_formula(img, txt, torch.tensor(100.0)), torch.tensor([60.0]))
    # softmax preference over candidates of one prompt
    p = preference_probs(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0]), group_size=3)
    torch.testing.assert_close(p[0], torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0))
    torch.testing.assert_close(p[1], torch.full((3,), 1 / 3))
    probs = r.probs(x, "a red circle")
    assert probs.shape == (3,) and probs.sum().item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- aesthetic


def test_aesthetic_head_layout_loads_and_scores_normalised_embedding():
    from mmalign.rewards.aesthetic import AestheticMLP

    cfg = fx.tiny("aesthetic")
    sd = torch.load(cfg["head"], weights_only=True)
    assert sorted(k.rsplit(".", 1)[0] for k in sd if k.endswith("weight")) == [f"layers.{i}" for i in (0, 2, 4, 6, 7)]
    assert [type(m).__name__ for m in AestheticMLP(768).layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]
    r = build("aesthetic", **cfg)
    x = rand_images()
    s = r(Samples(images=x), None)
    assert s.shape == (3,) and torch.isfinite(s).all()
    head = AestheticMLP(16)
    head.load_state_dict(sd)
    with torch.no_grad():
        emb = r.clip.image_features(x, normalize=False)
        ref = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-6)


def test_aesthetic_head_dimension_mismatch_is_reported(tmp_path):
    from mmalign.rewards.aesthetic import AestheticMLP

    bad = tmp_path / "head768.pth"
    torch.save(AestheticMLP(768).state_dict(), bad)
    with pytest.raises(ValueError, match="head expects 768-d embeddings but .* gives 16-d"):
        build("aesthetic", head=str(bad), clip_model=fx.tiny("aesthetic")["clip_model"])


def test_aesthetic_is_differentiable_finite_difference_float64():
    r = build("aesthetic", dtype="float64", **fx.tiny("aesthetic"))
    fd_check(lambda x: r(Samples(images=x)), rand_images(2, 40, 44, dtype=torch.float64))


# --------------------------------------------------------------------------- rule rewards


def test_jpeg_rewards_are_ddpo_kilobytes_at_quality_95():
    from PIL import Image

    x = torch.cat([torch.full((1, 3, 32, 32), 0.5), rand_images(1, 32, 32)])
    inc = build("jpeg_incompressibility")(Samples(images=x))
    comp = build("jpeg_compressibility")(Samples(images=x))
    torch.testing.assert_close(comp, -inc)
    for i in range(2):
        buf = io.BytesIO()
        arr = (x[i] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        assert inc[i].item() == pytest.approx(len(buf.getvalue()) / 1000)
    assert comp[0] > comp[1]  # a flat image compresses better than noise


def test_toy_gold_reduces_the_gold_dict(monkeypatch):
    import mmalign.toy.gold as gold

    calls = []

    def fake(image, caption):
        calls.append((tuple(image.shape), caption))
        return {
            "count": True,
            "color": False,
            "shape": True,
            "binding": False,
            "relation": True,
            "no_extra_objects": True,
            "correct": False,
            "kind": "single",
            "n_objects": 1,
        }

    monkeypatch.setattr(gold, "gold_score", fake)
    x = rand_images(2, 16, 16)
    torch.testing.assert_close(build("toy_gold")(Samples(images=x), ["a", "b"]), torch.tensor([4 / 6, 4 / 6]))
    torch.testing.assert_close(build("toy_gold", mode="correct")(Samples(images=x), ["a", "b"]), torch.zeros(2))
    assert calls[0] == ((3, 16, 16), "a")


def test_toy_gold_on_the_real_evaluator():
    pytest.importorskip("mmalign.toy.gold")
    s = build("toy_gold")(Samples(images=torch.ones(1, 3, 32, 32)), ["a red circle"])
    assert s.shape == (1,) and 0.0 <= s.item() < 1.0  # a blank image misses the circle


# --------------------------------------------------------------------------- mixes and ensembles


def test_mix_is_the_weighted_sum_of_named_rewards():
    x = rand_images(2, 8, 8)
    mean = x.flatten(1).mean(1)
    r = build(
        "mix",
        rewards=[{"name": "test_mean_pixel", "scale": 2.0}, {"name": "test_mean_pixel", "offset": 1.0}],
        weights=[0.5, -3.0],
    )
    torch.testing.assert_close(r(Samples(images=x), ["a", "b"]), 0.5 * 2.0 * mean - 3.0 * (mean + 1.0))
    assert r.differentiable and r.modality == "image"
    assert len(r.last_components) == 2


def test_per_prompt_stat_tracker_matches_hand_computation():
    from mmalign.rewards.mix import PerPromptStatTracker

    t = PerPromptStatTracker(buffer_size=4, min_count=2)
    r1 = torch.tensor([1.0, 3.0, 10.0])
    a1 = t.update(["p", "p", "q"], r1)
    # p: 2 seen >= min_count -> its own stats (mean 2, std 1); q: 1 seen -> batch stats
    bmean, bstd = r1.mean(), r1.std(unbiased=False)
    torch.testing.assert_close(
        a1, torch.tensor([(1 - 2) / (1 + 1e-6), (3 - 2) / (1 + 1e-6), float((10 - bmean) / (bstd + 1e-6))])
    )
    a2 = t.update(["p", "p", "p"], torch.tensor([5.0, 5.0, 5.0]))
    hist = torch.tensor([3.0, 5.0, 5.0, 5.0])  # buffer of 4 keeps the last four for p
    torch.testing.assert_close(a2, (5.0 - hist.mean()) / (hist.std(unbiased=False) + 1e-6) * torch.ones(3))
    mix = build("mix", rewards=[{"name": "test_mean_pixel"}], normalize="per_prompt", buffer_size=8, min_count=2)
    out = mix(Samples(images=rand_images(4, 8, 8)), ["a", "a", "b", "b"])
    assert out.shape == (4,) and torch.isfinite(out).all() and not mix.differentiable


def test_ensemble_aggregations_by_hand_and_ordering():
    from mmalign.rewards.mix import aggregate

    s = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0], [2.0, 0.0, 0.0]])  # [members, batch]
    torch.testing.assert_close(aggregate(s, "mean"), torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(aggregate(s, "wco"), torch.tensor([1.0, 0.0, -2.0]))
    var = torch.tensor([2 / 3, 0.0, 8 / 3])
    torch.testing.assert_close(aggregate(s, "uwo", 0.5), torch.tensor([2.0, 0.0, 0.0]) - 0.5 * var)
    g = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    assert (aggregate(g, "wco") <= aggregate(g, "mean")).all()
    assert (aggregate(g, "mean") <= g.max(0).values).all()
    assert (aggregate(g, "uwo", 1.0) <= aggregate(g, "mean")).all()
    x = rand_images(2, 8, 8)
    m = x.flatten(1).mean(1)
    members = [{"name": "test_mean_pixel", "scale": 1.0}, {"name": "test_mean_pixel", "scale": 3.0}]
    ens = build("ensemble", members=members, aggregate="uwo", uwo_lambda=2.0)
    rows = torch.stack([m, 3 * m])
    torch.testing.assert_close(ens(Samples(images=x), ["a", "b"]), rows.mean(0) - 2.0 * rows.var(0, unbiased=False))
    assert ens.member_scores(Samples(images=x), ["a", "b"]).shape == (2, 2)


# --------------------------------------------------------------------------- video from image


def _ramp_video(b=2, f=8, h=8, w=8):
    """Frame t of video i is constant (t + 10 i) / 100, so test_mean_pixel scores it exactly."""
    vals = (torch.arange(f)[None] + 10 * torch.arange(b)[:, None]).float() / 100
    return vals[:, :, None, None, None].expand(b, f, 3, h, w).clone()


def test_video_segment_sampling_tar_weights_and_mean():
    from mmalign.rewards.video import segment_indices, tar_weights

    v = _ramp_video()
    spec = {"name": "test_mean_pixel"}
    r = build("video_from_image", image_reward=spec, frames="segments", segments=4, pick="first")
    # segments of span 2: frames 0, 2, 4, 6
    torch.testing.assert_close(r(Samples(video=v), ["a", "b"]), torch.tensor([3.0, 13.0]) / 100)
    r = build("video_from_image", image_reward=spec, frames="all")
    torch.testing.assert_close(r(Samples(video=v), ["a", "b"]), torch.tensor([3.5, 13.5]) / 100)
    r = build("video_from_image", image_reward=spec, frames="segments", segments=4, tar_lambda=0.5)
    w = torch.exp(-0.5 * torch.tensor([4.0, 2.0, 0.0, 2.0]))  # |f - F//2| for f = 0, 2, 4, 6
    f = torch.tensor([0.0, 2.0, 4.0, 6.0])
    torch.testing.assert_close(
        r(Samples(video=v), ["a", "b"]), torch.stack([(w * f).mean(), (w * (f + 10)).mean()]) / 100
    )
    torch.testing.assert_close(tar_weights(torch.tensor([[4]]), 8, 3.0), torch.ones(1, 1))
    idx = segment_indices(16, 4, "random", torch.Generator().manual_seed(0), batch=5)
    assert ((idx // 4) == torch.arange(4)).all()  # one frame inside each segment


def test_video_frame_consistency_term(clip_dir):
    v = _ramp_video(b=1, f=4, h=32, w=32)
    still = v[:, :1].expand(1, 4, 3, 32, 32).clone()
    spec = {"name": "clip_hf", "model": clip_dir}
    r = build("video_from_image", image_reward=spec, frames="all", consistency_weight=1.0)
    base = build("video_from_image", image_reward=spec, frames="all")
    # a still video: consecutive CLIP embeddings are identical, so the term adds exactly 1
    torch.testing.assert_close(
        r(Samples(video=still), ["a"]) - base(Samples(video=still), ["a"]), torch.ones(1), rtol=0, atol=1e-5
    )
    assert r.differentiable and r.modality == "video"
    with pytest.raises(TypeError, match="scores video samples, but got image"):
        r(Samples(images=rand_images(1, 32, 32)), ["a"])
