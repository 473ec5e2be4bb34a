"""D3PO with a pairwise judge (`preference: pairwise`): the judge's preferred sample wins, a judge
with its answers swapped swaps winner and loser, ties are counted, both presentation orders are
averaged, and a reward that cannot compare pairs is refused by name."""

import json

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.methods.d3po import D3PO, D3POConfig, check_pairwise, judge_pairs, pairs_from_margin
from mmalign.methods.online import RolloutSettings
from mmalign.rewards import fixtures as fx
from mmalign.rewards.common import build_reward
from mmalign.trainer import Trainer
from mmalign.types import Samples
from tests.helpers import write_config

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow circle above a red square"]
SEEDS = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def gen(tiny_sd):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    return LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))


@pytest.fixture(scope="module")
def judge_dir():
    return fx.tiny("llava")["model"]  # a real VLMJudge on a tiny LLaVA (random weights, offline tokenizer)


@pytest.fixture(scope="module")
def judge(judge_dir):
    return build_reward({"name": "vlm_judge", "model": judge_dir}, "reward")


def _method(**kw) -> D3PO:
    rs = RolloutSettings(
        prompts_per_round=len(PROMPTS), samples_per_prompt=2, same_initial_noise=True, num_steps=2, reencode=False
    )
    cfg = D3POConfig(rollout=rs, preference="pairwise", **kw)
    cfg.validate()
    return D3PO(cfg)


def _collect(m: D3PO, gen, judge):
    m.setup(gen, judge)
    return m.collect(gen, judge, PROMPTS, SEEDS)


def _halves(ro):
    return Samples(images=ro.samples.images[0::2]), Samples(images=ro.samples.images[1::2]), ro.prompts[0::2]


def test_pairwise_winner_is_the_judges_preferred_sample(gen, judge):
    m = _method()
    ro = _collect(m, gen, judge)
    a, b, prompts = _halves(ro)
    assert prompts == PROMPTS and ro.prompts[1::2] == PROMPTS  # samples 2j, 2j+1 are one prompt's pair
    p_ab, p_ba = judge.prefer_first(a, b, prompts), judge.prefer_first(b, a, prompts)  # one order each, asked directly
    p = 0.5 * (p_ab + 1 - p_ba)  # both orders averaged (swap_average, the default)
    torch.testing.assert_close(judge.prefer(a, b, prompts), p, rtol=1e-5, atol=1e-6)  # the judge's own default
    want = [[2 * j, 2 * j + 1] if p[j] >= 0.5 else [2 * j + 1, 2 * j] for j in range(len(PROMPTS))]
    assert ro.extras["pairs"].tolist() == want and ro.extras["ties"] == 0.0
    metrics = m.round_metrics(ro)
    assert metrics["pairs"] == 4 and metrics["ties"] == 0 and "reward_mean" not in metrics
    assert metrics["position_bias"] == pytest.approx(float((p_ab + p_ba - 1).mean()), abs=1e-5)
    assert metrics["judge_margin"] == pytest.approx(float((p - 0.5).abs().mean()), abs=1e-5)
    # without swap_average only the (first, second) order is asked
    ro1 = _collect(_method(swap_average=False), gen, judge)
    assert torch.equal(ro1.samples.images, ro.samples.images)  # same seeds, same samples
    want1 = [[2 * j, 2 * j + 1] if p_ab[j] >= 0.5 else [2 * j + 1, 2 * j] for j in range(len(PROMPTS))]
    assert ro1.extras["pairs"].tolist() == want1 and "position_bias" not in ro1.extras


def test_swapping_the_judges_answers_swaps_winner_and_loser(gen, judge, judge_dir):
    flipped = build_reward({"name": "vlm_judge", "model": judge_dir, "pair_answers": ["2", "1"]}, "reward")
    for swap in (True, False):
        pairs = _collect(_method(swap_average=swap), gen, judge).extras["pairs"]
        pairs_f = _collect(_method(swap_average=swap), gen, flipped).extras["pairs"]
        assert len(pairs) == len(PROMPTS) and pairs_f.tolist() == pairs.flip(1).tolist()


def test_ties_are_counted_and_skipped(gen, judge):
    ro = _collect(_method(), gen, judge)
    p, _ = judge_pairs(judge, ro.samples, ro.prompts)
    m = (p - 0.5).abs().sort().values
    thr = float(0.5 * (m[1] + m[2]))  # between the 2nd and 3rd smallest margins: 2 ties
    ro_t = _collect(_method(tie_threshold=thr), gen, judge)
    assert ro_t.extras["ties"] == 2.0 and len(ro_t.extras["pairs"]) == 2
    kept = (p - 0.5).abs() > thr
    assert ro_t.extras["pairs"].tolist() == ro.extras["pairs"][kept].tolist()


class BiasedJudge:
    """A stub with the pairwise interface: prefers the brighter image, plus a strong bias for whatever
    it is shown first: P(first better) = sigmoid(20 (mean(a) - mean(b)) + 3)."""

    name, modality, differentiable = "biased_stub", "image", False

    def __call__(self, samples, prompts):
        raise AssertionError("pairwise D3PO must not score single samples")

    def prefer(self, a, b, prompts):
        assert len(a) == len(b) == len(prompts)
        return torch.sigmoid(20 * (a.images.flatten(1).mean(1) - b.images.flatten(1).mean(1)) + 3)


def test_both_orders_remove_the_judges_position_bias():
    means = torch.tensor([0.40, 0.45, 0.60, 0.50, 0.30, 0.31])  # pairs (0,1) (2,3) (4,5): brighter 1, 2, 5
    samples = Samples(images=means.view(6, 1, 1, 1).expand(6, 3, 4, 4).clone())
    prompts = [p for p in ["x", "y", "z"] for _ in (0, 1)]
    p, bias = judge_pairs(BiasedJudge(), samples, prompts, swap_average=False)
    assert bias is None and (p > 0.5).all()  # one order: the first image always wins
    p, bias = judge_pairs(BiasedJudge(), samples, prompts, swap_average=True)
    assert pairs_from_margin(p - 0.5, 0.0)[0].tolist() == [[1, 0], [2, 3], [5, 4]]  # the brighter one wins
    d = torch.tensor([-1.0, 2.0, -0.2])  # 20 * (mean(a) - mean(b))
    want = 0.5 * (torch.sigmoid(d + 3) + 1 - torch.sigmoid(-d + 3))
    torch.testing.assert_close(p, want, atol=1e-5, rtol=0)
    assert bias == pytest.approx(float((torch.sigmoid(d + 3) + torch.sigmoid(-d + 3) - 1).mean()), rel=1e-5)
    assert bias > 0.5  # favours the first image


def test_stub_judge_through_collect(gen):
    ro = _collect(_method(), gen, BiasedJudge())  # any object with prefer() works; __call__ is never used
    means = ro.samples.images.flatten(1).mean(1)
    for w, l in ro.extras["pairs"].tolist():
        assert w // 2 == l // 2 and means[w] >= means[l]
    assert ro.extras["position_bias"] > 0  # sigmoid(3 + d) + sigmoid(3 - d) > 1 for every d


def test_pairs_from_margin_hand_computed():
    pairs, ties = pairs_from_margin(torch.tensor([0.2, -0.1, 0.0, 0.05, -0.3]), 0.05)
    assert pairs.tolist() == [[0, 1], [3, 2], [9, 8]] and ties == 2
    pairs, ties = pairs_from_margin(torch.tensor([0.0, -0.1]), 0.0)
    assert pairs.tolist() == [[3, 2]] and ties == 1  # margin exactly 0 is a tie at threshold 0


def test_pairwise_refuses_a_reward_without_prefer(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    with pytest.raises(ConfigError, match="set `reward:` to a pairwise judge"):
        check_pairwise(None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        method={"name": "d3po", "preference": "pairwise"},
        data={"kind": "prompts", "prompts": str(prompts)},
    )
    with pytest.raises(
        ConfigError,
        match=r"method.preference: pairwise needs a reward with prefer\(.*reward 'clip' "
        r"only scores single samples",
    ):
        Trainer(load_config(p), run_dir=tmp_path / "run")


@pytest.mark.parametrize(
    "method, error",
    [
        ({"preference": "judge"}, r"method.preference: expected one of \['reward', 'pairwise'\]"),
        ({"preference": "pairwise", "tie_threshold": 0.5}, r"method.*tie_threshold: .*must be < 0.5"),
        ({"tie_threshold": -0.1}, r"method.*tie_threshold: must be >= 0"),
    ],
)
def test_config_validation(tmp_path, tiny_sd, tiny_clip, pairs_manifest, method, error):
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        method={"name": "d3po", **method},
        data={"kind": "prompts", "prompts": "toy:train"},
    )
    with pytest.raises(ConfigError, match=error):
        load_config(p)


def test_pairwise_with_labels_is_refused(tmp_path):
    (tmp_path / "buffer.safetensors").write_bytes(b"")
    (tmp_path / "labels.jsonl").write_text(json.dumps({}) + "\n")
    cfg = D3POConfig(buffer=str(tmp_path), labels=str(tmp_path / "labels.jsonl"), preference="pairwise")
    with pytest.raises(ValueError, match="preference: 'pairwise' asks the reward; with labels"):
        cfg.validate()


@pytest.mark.parametrize("mode", ["yes_no", "pairwise"])
def test_trains_with_a_vlm_judge(tmp_path, tiny_sd, tiny_clip, pairs_manifest, judge_dir, mode):
    """Either judge mode trains; a pairwise-only judge has no per-sample score, so the run's
    evaluations report no reward (and say why) instead of failing after training."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    method = {
        "name": "d3po",
        "preference": "pairwise",
        "reference": "base",
        "timestep_fraction": 1.0,
        "rollout": {
            "prompts_per_round": 2,
            "samples_per_prompt": 2,
            "same_initial_noise": True,
            "num_steps": 3,
            "steps_per_round": 2,
        },
    }
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        method=method,
        reward={"name": "vlm_judge", "model": judge_dir, "mode": mode},
        data={"kind": "prompts", "prompts": str(prompts)},
        train={"steps": 2, "batch_size": 2, "lr": 1e-3},
        eval={"enabled": True, "images_per_prompt": 1},
    )
    tr = Trainer(load_config(p), run_dir=tmp_path / "run")
    before = {n: v.detach().clone() for n, v in tr.generator.trainable().named_parameters() if v.requires_grad}
    tr.fit()
    after = dict(tr.generator.trainable().named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rollout = {k: v for l in logs for k, v in l.items() if k.startswith("rollout/")}
    assert {"rollout/pairs", "rollout/ties", "rollout/position_bias", "rollout/judge_margin"} <= set(rollout)
    evals = [l["eval"] for l in logs if "eval" in l]
    assert len(evals) == 2
    for e in evals:
        assert ("reward" in e) == (mode == "yes_no") and ("reward_skipped" in e) == (mode == "pairwise"), e
