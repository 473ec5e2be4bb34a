"""Slow: every method moves the toy world's held-out gold accuracy the right way.

Each test runs the method's shipped toy config (configs/toy/<method>.yaml, shortened where
noted), then compares the base and the aligned model on the same held-out captions and
seeds (deterministic DDIM): gold accuracy must rise by a clear margin, and the diversity
across seeds must not collapse. A sign error in a loss makes the gold accuracy fall.
"""
import json
from pathlib import Path

import pytest

from mmalign.config import load_config
from mmalign.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# method config -> (overrides for CI time, minimum gold-accuracy gain in points)
CASES = {
    "diffusion_dpo": ([], 0.05),
    "online_dpo": ([], 0.05),
    "grpo": ([], 0.05),
    "raft": ([], 0.05),
    "d3po": ([], 0.03),
    "diffusion_dro": ([], 0.05),
}


def _evals(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in rows if "eval" in r]
    return evals[0], evals[-1]


@pytest.mark.parametrize("method", list(CASES))
def test_method_raises_gold_accuracy(method, tmp_path):
    cfg_path = ROOT / "configs" / "toy" / f"{method}.yaml"
    if not cfg_path.is_file():
        pytest.fail(f"{cfg_path} missing")
    overrides, min_gain = CASES[method]
    Trainer(load_config(cfg_path, overrides + ["train.checkpoint_every=0"]), run_dir=tmp_path / "run").fit()
    before, after = _evals(tmp_path / "run")
    gain = after["gold_accuracy"] - before["gold_accuracy"]
    print(f"{method}: gold {before['gold_accuracy']:.3f} -> {after['gold_accuracy']:.3f}, "
          f"reward {before.get('reward')} -> {after.get('reward')}, "
          f"diversity {before.get('diversity')} -> {after.get('diversity')}")
    assert gain >= min_gain, (before, after)
    if "diversity" in before:
        assert after["diversity"] >= 0.5 * before["diversity"], "diversity collapsed"
