"""Slow: the shipped toy base models are imperfect on purpose (their held-out gold accuracy sits
in the band the alignment benchmarks need)."""

import json

import pytest

from mmalign.pipelines.flow import FlowGeneratorConfig, FlowMatchingGenerator

pytestmark = pytest.mark.slow


def test_shipped_sd3_toy_is_imperfect_on_purpose():
    """Held-out gold accuracy (101 held-out captions x 2 seeds, 20 Euler steps, CFG 4) lies in the
    30-60% band the alignment benchmarks need."""
    from mmalign.evaluation import evaluate_generator, expand_prompts

    g = FlowMatchingGenerator(FlowGeneratorConfig(pretrained="toy:sd3_toy", finetune="none"))
    out, _ = evaluate_generator(
        g,
        None,
        expand_prompts([], "toy:heldout", None),
        seeds_per_prompt=2,
        num_steps=20,
        guidance_scale=4.0,
        gold=True,
    )
    print(json.dumps({k: v for k, v in out.items() if k != "gold_per_constraint"}, indent=1))
    assert 0.30 <= out["gold_accuracy"] <= 0.60, out
    assert out["diversity"] > 0.1
