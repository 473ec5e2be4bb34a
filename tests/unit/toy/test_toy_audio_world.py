"""The toy audio world: grammar, renderer, split, perturbations and the gold evaluator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchaudio

from mmalign import sources
from mmalign.evaluation import gold_evaluator
from mmalign.toy.audio_gold import (
    AUDIO_CONSTRAINTS,
    detect_beeps,
    gold_evaluator_audio,
    gold_report_audio,
    gold_score_audio,
)
from mmalign.toy.audio_world import (
    KINDS,
    NUM_SAMPLES,
    PITCHES,
    SAMPLE_RATE,
    Beep,
    all_audio_captions,
    audio_caption_kind,
    audio_heldout_captions,
    audio_train_captions,
    beep_layout,
    parse_audio,
    perturb_audio_caption,
    render_audio,
    synthesize,
)
from mmalign.types import Samples

SEEDS = range(12)


def test_grammar_parses_every_caption_and_refuses_others():
    caps = all_audio_captions()
    assert len(caps) == len(set(caps)) == 9 + 6 + 24
    assert parse_audio("a low beep then a high beep").pitches == ("low", "high")
    assert parse_audio("three mid beeps").pitches == ("mid",) * 3
    assert audio_caption_kind("one high beep") == "single"
    for bad in ("two low beep", "one low beeps", "a loud beep then a low beep", "four low beeps", "a red circle"):
        with pytest.raises(ValueError, match="caption"):
            parse_audio(bad)


def test_render_follows_the_spec():
    for cap in ("three high beeps", "a low beep then a mid beep then a high beep", "one low beep"):
        for seed in SEEDS:
            wave, sr = render_audio(cap, seed)
            assert sr == SAMPLE_RATE and wave.dtype == np.float32 and wave.shape == (NUM_SAMPLES,)
            assert np.abs(wave).max() <= 1.0
            beeps = beep_layout(cap, seed)
            assert tuple(b.pitch for b in beeps) == parse_audio(cap).pitches
            for b in beeps:
                assert 150 * 16 <= b.length <= 250 * 16 and 0.3 <= b.amplitude <= 0.6
                assert b.start >= 0 and b.start + b.length <= NUM_SAMPLES
            for a, b in zip(beeps, beeps[1:]):
                assert b.start - (a.start + a.length) >= 100 * 16  # >= 100 ms of silence
        w0, _ = render_audio(cap, 0)
        np.testing.assert_array_equal(w0, render_audio(cap, 0)[0])  # deterministic
        assert not np.array_equal(w0, render_audio(cap, 1)[0])
    # the noise floor: -50 dBFS RMS where no beep plays
    wave, _ = render_audio("one low beep", 3)
    b = beep_layout("one low beep", 3)[0]
    quiet = np.concatenate([wave[: b.start], wave[b.start + b.length :]])
    assert 20 * np.log10(np.sqrt((quiet.astype(np.float64) ** 2).mean())) == pytest.approx(-50.0, abs=0.5)


def test_gold_is_exact_on_its_own_renders():
    for cap in all_audio_captions():
        for seed in SEEDS:
            wave, sr = render_audio(cap, seed)
            g = gold_score_audio(wave, sr, cap)
            assert g["correct"], (cap, seed, g["detected"])
            assert all(abs(b["cents"]) < 5 for b in g["beeps"])


def test_gold_is_robust_to_resampling_and_mild_noise():
    gen = torch.Generator().manual_seed(0)
    for cap in all_audio_captions():
        for seed in (0, 1):
            x = torch.from_numpy(render_audio(cap, seed)[0])
            up = torchaudio.functional.resample(x, 16000, 44100)
            back = torchaudio.functional.resample(up, 44100, 16000)
            noisy = x + 10 ** (-30 / 20) * torch.randn(x.shape, generator=gen)  # -30 dBFS white noise
            assert gold_score_audio(up, 44100, cap)["correct"], cap
            assert gold_score_audio(back, 16000, cap)["correct"], cap
            assert gold_score_audio(noisy[None].repeat(2, 1), 16000, cap)["correct"], cap  # stereo [C, T]


def test_gold_constraints_on_wrong_clips():
    def clip(*beeps):
        return synthesize([Beep(p, int(s * SAMPLE_RATE), 3200, 0.5, 0.0) for p, s in beeps], noise_seed=0)

    g = gold_score_audio(clip(("high", 0.1), ("low", 0.5)), SAMPLE_RATE, "a low beep then a high beep")
    assert g["detected"] == ["high", "low"]
    assert (g["count"], g["pitch"], g["order"], g["no_extra_beeps"], g["correct"]) == (True, True, False, True, False)
    g = gold_score_audio(clip(("low", 0.1), ("low", 0.4), ("low", 0.7)), SAMPLE_RATE, "two low beeps")
    assert (g["count"], g["pitch"], g["no_extra_beeps"], g["correct"]) == (False, True, False, False)
    g = gold_score_audio(clip(("mid", 0.3)), SAMPLE_RATE, "two mid beeps")
    assert (g["count"], g["pitch"], g["no_extra_beeps"]) == (False, False, True)
    # a detuned beep (between 220 and 440 Hz, far from both) is out of tune
    t = np.arange(3200) / SAMPLE_RATE
    wave = np.zeros(NUM_SAMPLES)
    wave[4000:7200] = 0.5 * np.sin(2 * np.pi * 300.0 * t)
    g = gold_score_audio(wave, SAMPLE_RATE, "one low beep")
    assert g["count"] and not g["beeps"][0]["in_tune"] and not g["pitch"] and not g["correct"]
    assert detect_beeps(np.zeros(NUM_SAMPLES), SAMPLE_RATE) == []


def test_split_holds_out_pitch_orders_and_keeps_every_kind():
    train, held = audio_train_captions(), audio_heldout_captions()
    assert set(train) | set(held) == set(all_audio_captions()) and not set(train) & set(held)
    train_orders = {parse_audio(c).pitches for c in train}
    assert all(parse_audio(c).pitches not in train_orders for c in held)  # never seen in training
    for kind in KINDS:
        assert any(audio_caption_kind(c) == kind for c in train) and any(audio_caption_kind(c) == kind for c in held)
    assert any(audio_caption_kind(c) == "sequence" for c in held)


def test_perturbations_are_hard_negatives():
    rng = random.Random(0)
    seen = set()
    for cap in all_audio_captions():
        wave, sr = render_audio(cap, 0)
        for mode in ("pitch", "count", "swap", None):
            neg = perturb_audio_caption(cap, rng, mode)
            if neg is None:
                assert mode == "swap" and audio_caption_kind(cap) != "sequence"
                continue
            seen.add(mode)
            assert neg != cap and neg in all_audio_captions()
            assert not gold_score_audio(wave, sr, neg)["correct"], (cap, mode, neg)
            if mode == "swap":
                assert sorted(parse_audio(neg).pitches) == sorted(parse_audio(cap).pitches)
            if mode == "count":
                assert len(parse_audio(neg).pitches) != len(parse_audio(cap).pitches)
    assert seen == {"pitch", "count", "swap", None}


def test_gold_report_and_registered_sources():
    caps = ["one low beep", "a mid beep then a high beep", "three high beeps"]
    audio = torch.stack([torch.from_numpy(render_audio(c, 0)[0])[None] for c in caps])  # B,1,T
    prompts = [caps[0], caps[1], "three low beeps"]  # the last is wrong (pitch)
    rep = gold_report_audio(audio, SAMPLE_RATE, prompts)
    assert rep["accuracy"] == pytest.approx(2 / 3) and rep["n"] == 3
    assert rep["per_kind"] == {"single": 1.0, "sequence": 1.0, "count": 0.0}
    assert set(rep["per_constraint"]) == set(AUDIO_CONSTRAINTS) and rep["per_constraint"]["pitch"] == pytest.approx(
        2 / 3
    )
    assert rep["compositional"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 clips but 2 captions"):
        gold_report_audio(audio, SAMPLE_RATE, prompts[:2])

    assert sources.resolve("prompt_set", "toy:audio_train") == audio_train_captions()
    assert sources.resolve("prompt_set", "toy:audio_heldout") == audio_heldout_captions()
    wave, sr = sources.resolve("expert_source", "toy:render_audio", caps[1], 5)
    assert sr == SAMPLE_RATE and gold_score_audio(wave, sr, caps[1])["correct"]
    assert gold_evaluator("toy_audio") is gold_evaluator_audio
    from mmalign.types import Samples

    assert gold_evaluator_audio(Samples(audio=audio, sample_rate=SAMPLE_RATE), prompts)["accuracy"] == rep["accuracy"]
    # `gold: true` still means the image world's evaluator, the only image one
    assert gold_evaluator(True) is sources.lookup("gold_evaluator", "toy")
    assert set(PITCHES.values()) == {220.0, 440.0, 880.0}


def test_toy_audio_gold_reward_and_its_embedding_for_distribution_rewards():
    from mmalign.rewards.common import build_reward

    r = build_reward({"name": "toy_audio_gold"})
    caps = ["one low beep", "a mid beep then a high beep", "three high beeps"]
    audio = torch.stack([torch.from_numpy(render_audio(c, 2)[0])[None] for c in caps])
    s = r(Samples(audio=audio, sample_rate=SAMPLE_RATE), [caps[0], caps[1], "three low beeps"])
    assert s.tolist() == [1.0, 1.0, 0.75]  # the last fails `pitch` only
    c = build_reward({"name": "toy_audio_gold", "mode": "correct"})
    assert c(Samples(audio=audio, sample_rate=SAMPLE_RATE), [caps[0], caps[1], "three low beeps"]).tolist() == [1, 1, 0]
    # the beep-band embedding separates pitches: FAD to low-beep exemplars is far smaller for low beeps
    low = ["one low beep", "two low beeps", "three low beeps"]
    fad = build_reward(
        {
            "name": "fad",
            "embedding": {"name": "toy_audio_gold"},
            "exemplars": "toy:render_audio",
            "exemplar_prompts": low,
            "exemplar_seeds": 4,
        }
    )

    def batch(cs, seed):
        return Samples(
            audio=torch.stack([torch.from_numpy(render_audio(x, seed)[0])[None] for x in cs]), sample_rate=SAMPLE_RATE
        )

    same = float(fad.score_batch(batch(low * 2, 9), low * 2)[0])
    other = float(fad.score_batch(batch(["one high beep", "two high beeps", "three high beeps"] * 2, 9), low * 2)[0])
    assert other < 3 * same < 0  # -FAD: the high beeps are much further away
    emb = r.audio_embeds(r.prepare(batch(low, 0)))
    assert emb.shape == (3, 40) and torch.allclose(emb.norm(dim=-1), torch.ones(3, dtype=emb.dtype))
    # resampled input gives nearly the same features
    up = torchaudio.functional.resample(batch(low, 0).audio, 16000, 44100)
    assert (r.audio_embeds(r.prepare(Samples(audio=up, sample_rate=44100))) - emb).abs().max() < 0.05
