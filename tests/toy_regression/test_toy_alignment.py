"""Slow toy-world checks (run by .ci/run after the fast suite).

- The shipped base model is imperfect on purpose: its held-out compositional gold accuracy
  sits in the band the alignment benchmarks need.
- The demo (Diffusion-DPO on the toy world, pairs ranked by the proxy) runs end to end,
  writes the run directory the quickstart describes, evaluates base and aligned models on the same held-out captions
  and seeds, raises the proxy and held-out gold accuracy, and does not collapse diversity.

- Online DPO, Diffusion-DRO (final-sample targets), D3PO, GRPO, RAFT with a group baseline, and on
  the toy flow model DiffusionNFT (its variant config) and Flow-DPO raise held-out gold on 808 samples. A sign
  error in GRPO's advantages or ratios, in RAFT's weights or in the DPO loss would lower it and
  fail here (the demo's Diffusion-DPO test catches a DPO sign error on the UNet too).

- Flow-GRPO on the toy flow model, in CI's budget (20 steps): the held-out proxy rises and gold holds;
  a flipped advantage sign fails it.

Not asserted here (the measurements are in docs/results/): that plain RAFT / RWR (no baseline) raise
held-out gold; that gold-ranked Diffusion-DPO (configs/toy/diffusion_dpo_gold.yaml) does and its
reversed ranking lowers gold (benchmarks/toy_alignment.py measures them); Flow-GRPO's gold gain (only
at 160 steps, 35-40 min on one thread), which tests/toy_regression/test_toy_alignment_long.py
asserts outside CI's budget (`scripts/test.sh -m long`).
"""

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mmalign.config import load_config
from mmalign.trainer import Trainer
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as the figures in these tests were measured (the stochastic rollouts and
    DDIM sampling amplify reduction-order differences)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit_on_one_thread(cfg, run_dir: Path) -> dict:
    with one_thread():
        return Trainer(cfg, run_dir=run_dir).fit()


def first_and_last_evals(run_dir: Path) -> tuple[dict, dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in rows if "eval" in r]
    return evals[0], evals[-1]


def test_shipped_base_model_is_imperfect_on_purpose():
    from mmalign.evaluation import evaluate_generator, expand_prompts
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained="toy:sd_toy", finetune="none"))
    prompts = expand_prompts([], "toy:heldout", None)
    out, images = evaluate_generator(
        gen, None, prompts, seeds_per_prompt=2, num_steps=20, guidance_scale=4.0, gold=True
    )
    print(json.dumps({k: v for k, v in out.items() if k != "gold_per_constraint"}, indent=1))
    assert 0.25 <= out["gold_compositional"] <= 0.65, out
    assert out["diversity"] > 0.1


def test_flow_grpo_raises_heldout_proxy_and_keeps_gold(tmp_path):
    """Flow-GRPO's held-out *gold* gain needs 160 steps, beyond CI's budget (the `long` test); here 20 steps
    of the shipped config check that it climbs its reward on held-out captions without collapsing gold.
    Gold swings by several points between checkpoints this early, so its bound is loose (6 points); the
    proxy bound is what a flipped advantage sign fails (the proxy then falls)."""
    before, after = heldout_evals("flow_grpo.yaml", ["train.steps=20"], tmp_path / "run")
    print(
        f"flow_grpo.yaml, 20 steps: proxy {before['reward']:.4f} -> {after['reward']:.4f}, gold "
        f"{before['gold_accuracy']:.3f} -> {after['gold_accuracy']:.3f}"
    )
    assert after["reward"] >= before["reward"] + 0.005
    assert after["gold_accuracy"] >= before["gold_accuracy"] - 0.06
    assert after["diversity"] >= 0.8 * before["diversity"], "diversity collapsed"


def test_demo_runs_end_to_end_and_raises_heldout_gold(tmp_path):
    """The demo (scripts/demo.sh): proxy-ranked Diffusion-DPO, full fine-tuning with an EMA, evaluated
    on 808 held-out samples (1 thread). Asserted: a gain of at least 3 points (two paired standard
    errors); the measured numbers are on docs/methods/diffusion_dpo.md."""
    cfg = load_config(ROOT / "configs" / "toy" / "diffusion_dpo.yaml")
    summary = fit_on_one_thread(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "final/unet/diffusion_pytorch_model.safetensors",
        "generated_pairs.safetensors",
        "samples/step_0000000.png",
        f"samples/step_{cfg.train.steps:07d}.png",
    ):
        assert (run / f).exists(), f
    before, after = first_and_last_evals(run)
    print(
        f"gold {before['gold_accuracy']:.3f} -> {after['gold_accuracy']:.3f}, proxy {before['reward']:.4f} -> "
        f"{after['reward']:.4f}, diversity {before['diversity']:.4f} -> {after['diversity']:.4f}"
    )
    assert after["n_samples"] == before["n_samples"] == 808
    assert after["diversity"] >= 0.8 * before["diversity"], "diversity collapsed"
    assert summary["steps"] == cfg.train.steps
    assert after["reward"] > before["reward"]
    assert after["gold_accuracy"] >= before["gold_accuracy"] + 0.03, (before["gold_accuracy"], after["gold_accuracy"])


_BASE_EVALS: dict[tuple, dict] = {}


def base_eval(cfg) -> dict:
    """The held-out evaluation of cfg's untrained generator, as the trainer's step-0 evaluation
    computes it (deterministic samples, fixed seeds), once per test process: the tests of one base
    model share it instead of each spending ~80 s on the same 808 samples."""
    from mmalign.evaluation import evaluate_config
    from mmalign.trainer import build

    key = repr((cfg.generator, cfg.reward, dataclasses.replace(cfg.eval, every=0, at_start=True)))
    if key not in _BASE_EVALS:
        with one_thread(), torch.no_grad():
            _BASE_EVALS[key] = evaluate_config(
                build("generator", cfg.generator), build("reward", cfg.reward), cfg.eval
            )[0]
    return _BASE_EVALS[key]


def heldout_evals(config: str, overrides: list[str], run_dir: Path) -> tuple[dict, dict]:
    """Train configs/toy/<config> on one thread; the base model's held-out evaluation and the
    trained model's final one."""
    cfg = load_config(ROOT / "configs" / "toy" / config, ["eval.at_start=false", *overrides])
    fit_on_one_thread(cfg, run_dir)
    return base_eval(cfg), first_and_last_evals(run_dir)[1]


# Alignment methods, each in its shipped config (full fine-tuning, EMA 0.99, proxy reward where one is
# used), and the minimum held-out gold gain asserted on 808 samples (run seed 0): 3 points, a paired
# gain of about two standard errors, where the current config and model were measured to clear it.
# GRPO (per-dimension log-probs with its settings converted to give the same updates) and Flow-DPO (on
# the distilled toy flow model) are asserted at 1 and 2 points. Diffusion-DRO and DiffusionNFT are asserted in their
# variant configs: the recipes faithful to their papers' code (diffusion_dro.yaml, diffusion_nft.yaml)
# do not raise gold on the toy (docs/parity.md has both rows).
METHODS = {
    "flow_dpo.yaml": 0.02,
    "diffusion_nft_variant.yaml": 0.03,
    "d3po.yaml": 0.03,
    "grpo.yaml": 0.01,
    "raft.yaml": 0.03,
    "online_dpo.yaml": 0.03,
    "diffusion_dro_final_sample.yaml": 0.03,
}


def check_heldout_gain(config: str, min_gain: float, run_dir: Path) -> None:
    """Train configs/toy/<config>: held-out gold rises by `min_gain`, the proxy rises and diversity keeps 80%."""
    before, after = heldout_evals(config, [], run_dir)
    print(
        f"{config}: gold {before['gold_accuracy']:.3f} -> {after['gold_accuracy']:.3f}, proxy "
        f"{before['reward']:.4f} -> {after['reward']:.4f}, diversity {before['diversity']:.3f} -> "
        f"{after['diversity']:.3f}"
    )
    assert after["n_samples"] == before["n_samples"] == 808
    assert after["diversity"] >= 0.8 * before["diversity"], "diversity collapsed"
    assert after["reward"] > before["reward"]
    assert after["gold_accuracy"] >= before["gold_accuracy"] + min_gain, (
        before["gold_accuracy"],
        after["gold_accuracy"],
    )


@pytest.mark.parametrize("config", list(METHODS))
def test_shipped_method_raises_heldout_gold(config, tmp_path):
    check_heldout_gain(config, METHODS[config], tmp_path / "run")
