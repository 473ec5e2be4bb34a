"""VLM judge (tiny LLaVA and Qwen2-VL), audio-LM judge (tiny Qwen2-Audio) and CLAP, each
loaded from a saved directory with an offline word-level tokenizer and chat template."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.rewards import fixtures as fx
from mmalign.rewards._judge import expected_rating, first_probability, yes_probability
from mmalign.rewards.common import build_reward
from mmalign.types import Samples

PROMPTS = ["a red circle left of a blue square", "a cat", "dog"]


def build(name: str, **args):
    return build_reward({"name": name, **args}, "reward")


_BUILT: dict = {}


def cached(name: str, **args):
    """One instance per configuration for this module (building is the slow part)."""
    key = (name, tuple(sorted((k, repr(v)) for k, v in args.items())))
    if key not in _BUILT:
        _BUILT[key] = build(name, **args)
    return _BUILT[key]


def images(b=3, h=40, w=52, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def audio(b=2, sr=16000, seconds=1.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(b, 1, int(sr * seconds), generator=g, dtype=dtype)


# --------------------------------------------------------------------------- formulas


def test_judge_formulas_on_fixed_logits():
    logits = torch.tensor([[math.log(3.0), math.log(1.0), math.log(4.0), 0.0, math.log(2.0)]])
    logp = torch.log_softmax(logits, -1)  # probs 3/11, 1/11, 4/11, 1/11, 2/11
    torch.testing.assert_close(yes_probability(logp, [0], [1]), torch.tensor([0.75]))
    torch.testing.assert_close(yes_probability(logp, [0], [1], normalize=False), torch.tensor([3 / 11]))
    torch.testing.assert_close(yes_probability(logp, [0, 2], [1]), torch.tensor([7 / 8]))  # answer variants add
    torch.testing.assert_close(expected_rating(logp, [1, 2, 4], [1.0, 2.0, 3.0]), torch.tensor([(1 + 8 + 6) / 7]))
    torch.testing.assert_close(first_probability(logp, [2], [4]), torch.tensor([4 / 6]))


# --------------------------------------------------------------------------- VLM judge


@pytest.fixture(scope="module", params=["llava", "qwen2vl"])
def vlm_dir(request):
    return fx.tiny(request.param)["model"]


def test_vlm_judge_yes_no_is_a_probability_and_batch_invariant(vlm_dir):
    r = cached("vlm_judge", model=vlm_dir)
    x = images()
    s = r(Samples(images=x), PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all() and ((s > 0) & (s < 1)).all()
    one = torch.cat([r(Samples(images=x[i : i + 1]), PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(s, one, rtol=1e-4, atol=1e-5)  # left padding: same score alone or batched
    # the score is exactly P(Yes)/(P(Yes)+P(No)) of the next-token distribution
    text = r.judge.render(r.cfg.yes_no_template.format(prompt=PROMPTS[1]))
    assert r.cfg.yes_no_template.format(prompt=PROMPTS[1]) in text
    logp = r.judge.next_token_logprobs([text], {"images": r.media_list(Samples(images=x[1:2]))})
    py, pn = logp[0, r.yes_ids[0]].exp(), logp[0, r.no_ids[0]].exp()
    assert s[1].item() == pytest.approx((py / (py + pn)).item(), rel=1e-4)


def test_vlm_judge_likert_and_pairwise(vlm_dir):
    r = build("vlm_judge", model=vlm_dir, mode="likert", likert_n=5, batch_size=2)  # own instance: mutated below
    x = images()
    s = r(Samples(images=x), PROMPTS)
    assert s.shape == (3,) and ((s >= 1) & (s <= 5)).all()
    a, b = Samples(images=x[:2]), Samples(images=images(2, seed=1))
    p1_ab, p1_ba = r.prefer_first(a, b, PROMPTS[:2]), r.prefer_first(b, a, PROMPTS[:2])  # one order each
    assert p1_ab.shape == (2,) and ((p1_ab > 0) & (p1_ab < 1)).all()
    # P1 is p("1") / (p("1") + p("2")) after the two images, as shown
    text = r.judge.render(r.cfg.pairwise_template.format(prompt=PROMPTS[0]), 2, r.n_labels)
    logp = r.judge.next_token_logprobs([text], {"images": r.media_list(a)[:1] + r.media_list(b)[:1]})
    q1, q2 = logp[0, r.pair_ids[0]].exp(), logp[0, r.pair_ids[1]].exp()
    assert p1_ab[0].item() == pytest.approx((q1 / (q1 + q2)).item(), rel=1e-4)
    # swap_average is the default: both orders, P(a over b) + P(b over a) = 1 exactly
    assert r.cfg.swap_average is True
    p = r.prefer(a, b, PROMPTS[:2])
    torch.testing.assert_close(p, 0.5 * (p1_ab + 1 - p1_ba), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p + r.prefer(b, a, PROMPTS[:2]), torch.ones(2))
    r.cfg.swap_average = False  # one order: prefer is P1(a, b)
    torch.testing.assert_close(r.prefer(a, b, PROMPTS[:2]), p1_ab, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pairwise"):
        build("vlm_judge", model=vlm_dir, mode="pairwise")(Samples(images=x), PROMPTS)


def test_vlm_judge_rejects_multi_token_answers_and_wrong_modality():
    d = fx.tiny("llava")["model"]
    with pytest.raises(ValueError, match=r"answer 'Yes please' is 2 tokens .* single tokens"):
        build("vlm_judge", model=d, yes_answers=["Yes please"])
    with pytest.raises(ValueError, match="yes_no_template: template must contain {prompt}"):
        build("vlm_judge", model=d, yes_no_template="Is this good?")
    r = cached("vlm_judge", model=d)
    with pytest.raises(TypeError, match="vlm_judge.*scores image samples, but got audio"):
        r(Samples(audio=audio(), sample_rate=16000), ["a", "b"])
    with pytest.raises(ValueError, match="3 samples but 1 prompts"):
        r(Samples(images=images()), ["a"])


def test_judge_dtype_auto_is_bfloat16_on_cuda_float32_on_cpu_explicit_wins(monkeypatch):
    from mmalign.rewards import _judge
    from mmalign.rewards.audio_judge import AudioJudgeConfig
    from mmalign.rewards.vlm_judge import VLMJudgeConfig

    assert VLMJudgeConfig().dtype == AudioJudgeConfig().dtype == "auto"
    assert _judge.resolve_dtype("auto", "cpu") == "float32"
    assert _judge.resolve_dtype("auto", "cuda") == _judge.resolve_dtype("auto", "cuda:1") == "bfloat16"
    for explicit in ("float32", "float16", "bfloat16"):
        assert _judge.resolve_dtype(explicit, "cuda") == _judge.resolve_dtype(explicit, "cpu") == explicit
    # no device given: CUDA when available (where the model is then put), else CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _judge.judge_device(None) == "cuda" and _judge.judge_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _judge.judge_device(None) == "cpu"
    with pytest.raises(Exception, match="dtype"):
        build("vlm_judge", model=fx.tiny("llava")["model"], dtype="float64")


def test_judge_loads_in_the_resolved_dtype_on_cpu():
    d = fx.tiny("llava")["model"]
    r = cached("vlm_judge", model=d)  # auto on CPU
    assert r.judge.dtype == "float32" and r.judge.model.dtype == torch.float32
    r16 = build("vlm_judge", model=d, dtype="bfloat16", device="cpu")  # explicit wins
    assert r16.judge.dtype == "bfloat16" and r16.judge.model.dtype == torch.bfloat16
    s = r16(Samples(images=images(2)), PROMPTS[:2])  # the bfloat16 forward runs; scores come back float32
    assert s.dtype == torch.float32 and ((s > 0) & (s < 1)).all()


# --------------------------------------------------------------------------- audio judge


def test_audio_judge_yes_no_likert_pairwise():
    d = fx.tiny("qwen2audio")["model"]
    a = audio(2, sr=22050)
    r = build("audio_judge", model=d)
    s = r(Samples(audio=a, sample_rate=22050), PROMPTS[:2])  # resampled to the processor's 16 kHz
    assert s.shape == (2,) and ((s > 0) & (s < 1)).all()
    r.cfg.mode = "likert"
    s = r(Samples(audio=a, sample_rate=22050), PROMPTS[:2])
    assert ((s >= 1) & (s <= 5)).all()
    sa, sb = Samples(audio=a, sample_rate=22050), Samples(audio=a.flip(0), sample_rate=22050)
    p = r.prefer(sa, sb, PROMPTS[:2])
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    p1_ab, p1_ba = r.prefer_first(sa, sb, PROMPTS[:2]), r.prefer_first(sb, sa, PROMPTS[:2])
    torch.testing.assert_close(p, 0.5 * (p1_ab + 1 - p1_ba), rtol=1e-5, atol=1e-6)  # swap_average by default
    with pytest.raises(TypeError, match="audio_judge.*scores audio samples, but got image"):
        r(Samples(images=images(2)), PROMPTS[:2])


# --------------------------------------------------------------------------- CLAP


@pytest.fixture(scope="module")
def clap():
    return cached("clap", **fx.tiny("clap"))


def test_clap_torch_features_match_the_feature_extractor(clap):
    fe = clap.feature_extractor
    np.testing.assert_allclose(clap.torch_features.fbank.numpy(), fe.mel_filters_slaney, atol=1e-6)
    for seconds in (0.7, 2.0):  # repeat-padded, and exactly max_length_s
        w = audio(2, seconds=seconds, dtype=torch.float64)[:, 0]
        ours, longer = clap.torch_features(w)
        ref = fe([x.numpy() for x in w], sampling_rate=16000, return_tensors="pt")
        assert ours.shape == ref["input_features"].shape
        assert (ours - ref["input_features"].double()).abs().max() < 1e-3  # dB
        assert longer.tolist() == ref["is_longer"].tolist()


def test_clap_score_is_scaled_cosine_and_paths_agree(clap):
    from transformers import AutoProcessor, ClapModel

    a = audio(2, seconds=1.0)
    s = clap(Samples(audio=a, sample_rate=16000), ["a cat", "a dog barking"])
    assert s.shape == (2,) and torch.isfinite(s).all()
    d = fx.tiny("clap")["model"]
    model, proc = ClapModel.from_pretrained(d).eval(), AutoProcessor.from_pretrained(d)
    inp = proc(
        text=["a cat", "a dog barking"],
        audio=[x.numpy() for x in a[:, 0]],
        sampling_rate=16000,
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        ref = torch.diagonal(model(**inp).logits_per_audio)  # exp(logit_scale_a) * cos(audio, text)
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-4)
    proc_path = build("clap", model=d, features="processor", differentiable=False)
    torch.testing.assert_close(
        proc_path(Samples(audio=a, sample_rate=16000), ["a cat", "a dog barking"]), ref, rtol=1e-4, atol=1e-4
    )


def test_clap_resamples_and_checks_modality(clap):
    a = audio(1, sr=48000, seconds=0.5)
    s = clap(Samples(audio=a.repeat(1, 2, 1), sample_rate=48000), ["a cat"])  # stereo 48 kHz -> mono 16 kHz
    assert s.shape == (1,) and torch.isfinite(s).all()
    with pytest.raises(TypeError, match="clap.*scores audio samples, but got image"):
        clap(Samples(images=images(1)), ["a"])
    with pytest.raises(ValueError, match="sample_rate is not set"):
        clap(Samples(audio=a), ["a"])


def test_clap_is_differentiable_finite_difference_float64():
    r = build("clap", dtype="float64", **fx.tiny("clap"))
    fd_wave = audio(1, seconds=0.3, dtype=torch.float64)

    def f(x):
        return r(Samples(audio=x, sample_rate=16000), ["a cat"])

    v = torch.randn(fd_wave.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = fd_wave.clone().requires_grad_(True)
    f(x).sum().backward()
    eps = 1e-6
    with torch.no_grad():
        numeric = ((f(fd_wave + eps * v) - f(fd_wave - eps * v)).sum() / (2 * eps)).item()
    analytic = (x.grad * v).sum().item()
    assert abs(analytic) > 0 and analytic == pytest.approx(numeric, rel=1e-4)
