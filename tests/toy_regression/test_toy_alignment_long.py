"""Toy-world checks too long for .ci/run's 45-minute budget: `scripts/test.sh -m long` runs them.

Flow-GRPO (`configs/toy/flow_grpo.yaml`, 160 steps of 128 SDE samples) raises the toy flow model's
held-out gold by +3.5 / +3.9 points (run seeds 0 / 1) but only at 160 steps: 35-40 min on one CPU
thread; none of the shorter recipes tried reaches +3 on two seeds (README). CI does not run this test;
it runs a 20-step check instead (tests/toy_regression/test_toy_alignment.py: the held-out proxy rises, gold holds).
"""
import pytest

from tests.toy_regression.test_toy_alignment import METHODS, check_heldout_gain

pytestmark = pytest.mark.long

# Held-out gold on 808 samples, 1 thread, run seed 0 (base 0.483): 0.517, proxy 0.754 -> 0.779.
LONG_METHODS = {"flow_grpo.yaml": 0.03}
assert not set(LONG_METHODS) & set(METHODS)


@pytest.mark.parametrize("config", list(LONG_METHODS))
def test_long_method_raises_heldout_gold(config, tmp_path):
    check_heldout_gain(config, LONG_METHODS[config], tmp_path / "run")
