"""Slow: the shipped toy audio generator (assets/stable_audio_toy, Stable Audio layout) is
imperfect on purpose: its held-out gold accuracy sits in the band the alignment benchmarks need."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_shipped_audio_toy_is_imperfect_on_purpose():
    """Held-out gold accuracy (the 8 held-out captions x 6 seeds, through the stable_audio
    adapter's default sampler: 20 steps of the pipeline's scheduler, CFG 7) is low but not zero
    (measured 0.15-0.17; the 3-beep held-out sequences are never right, see docs/toy-world.md),
    and at most 60%, so that alignment has room to show."""
    from mmalign.evaluation import evaluate_generator, expand_prompts
    from mmalign.pipelines.stable_audio import StableAudioGenerator, StableAudioGeneratorConfig

    g = StableAudioGenerator(StableAudioGeneratorConfig(pretrained="toy:stable_audio_toy", finetune="none"))
    assert g.sample_rate == 4000 and g.max_seconds == 1.0
    out, clips = evaluate_generator(
        g,
        None,
        expand_prompts([], "toy:audio_heldout", None),
        seeds_per_prompt=6,
        num_steps=20,
        guidance_scale=7.0,
        gold="toy_audio",
    )
    print(json.dumps(out, indent=1))
    assert clips.shape[1:] == (1, 4000)
    assert 0.10 <= out["gold_accuracy"] <= 0.60, out
    assert out["gold_per_kind"]["single"] > 0 and out["gold_per_kind"]["count"] > 0, out
