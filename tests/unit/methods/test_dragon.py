"""DRAGON (mmalign/methods/dragon.py): pairs from instance-wise and distributional credits, the
Diffusion-DPO loss on them, and training steps on a tiny audio generator."""

import json
import math
from dataclasses import dataclass

import pytest
import torch

from mmalign.config import load_config
from mmalign.methods.dragon import Dragon, DragonConfig, group_pairs, item_credits
from mmalign.methods.online import RolloutSettings
from mmalign.pipelines.audioldm import AudioLDMGenerator, AudioLDMGeneratorConfig
from mmalign.protocols import DistributionReward, Reward
from mmalign.rewards.rules import AudioLoudness
from mmalign.testing import make_tiny_audioldm
from mmalign.trainer import Trainer
from mmalign.types import Samples


class SetSpread:
    """A stand-in distribution-to-distribution reward: the population variance of the clips' RMS
    levels over the set (lower is better: a uniform set), credited to item i as
    (rms_i - mean)^2 / B (the contributions sum to the value)."""

    name = "test_set_spread"
    modality = "audio"
    higher_is_better = False

    def score_batch(self, samples, prompts):
        rms = samples.require("audio", self.name).float().pow(2).flatten(1).mean(1).sqrt()
        contrib = (rms - rms.mean()).pow(2) / len(rms)
        return contrib.sum(), contrib


@dataclass
class SetSpreadConfig:
    pass


def _register_set_spread():
    from mmalign import registry

    if "test_set_spread" not in registry.REWARDS:
        registry.register_reward("test_set_spread", SetSpreadConfig)(lambda cfg: SetSpread())


@pytest.fixture(scope="module")
def tiny_audioldm(tmp_path_factory):
    return make_tiny_audioldm(tmp_path_factory.mktemp("models") / "audioldm")


def test_pairs_from_credits_by_hand():
    credits = torch.tensor([0.1, 0.5, 0.3, 0.3, 0.9, -1.0])
    pairs, ties = group_pairs(credits, 2)
    assert pairs.tolist() == [[1, 0], [4, 5]] and ties == 1  # the (0.3, 0.3) group is a tie
    pairs, ties = group_pairs(credits, 3)  # groups (0.1, 0.5, 0.3), (0.3, 0.9, -1.0)
    assert pairs.tolist() == [[1, 0], [4, 5]] and ties == 0
    pairs, ties = group_pairs(credits, 2, tie_threshold=0.5)  # spreads 0.4, 0, 1.9
    assert pairs.tolist() == [[4, 5]] and ties == 2


def test_distribution_credits_are_signed_contributions_by_hand():
    """Lower spread is better: the credit is minus the contribution, so within each prompt the
    clip nearer the set's mean RMS is the positive demonstration."""
    levels = [0.1, 0.5, 0.3, 0.2]  # constant clips: RMS = level
    audio = torch.stack([torch.full((1, 8), v) for v in levels])
    s = Samples(audio=audio, sample_rate=16000)
    assert isinstance(SetSpread(), DistributionReward) and not isinstance(SetSpread(), Reward)
    credits, value = item_credits(SetSpread(), s, ["a"] * 4)
    mean = sum(levels) / 4  # 0.275
    want = [-((v - mean) ** 2) / 4 for v in levels]
    torch.testing.assert_close(credits.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert value.item() == pytest.approx(sum((v - mean) ** 2 for v in levels) / 4, rel=1e-5)
    pairs, _ = group_pairs(credits, 2)
    assert pairs.tolist() == [[0, 1], [2, 3]]  # |0.1-0.275| < |0.5-0.275|; |0.3-0.275| < |0.2-0.275|
    inst, none = item_credits(AudioLoudness(), s, ["a"] * 4)  # an instance-wise reward: its scores
    assert none is None and inst.argmax().item() == 1
    with pytest.raises(TypeError, match="neither"):
        item_credits(object(), s, ["a"] * 4)


def _gen(path):
    torch.manual_seed(0)
    return AudioLDMGenerator(AudioLDMGeneratorConfig(pretrained=str(path)))


def test_round_pairs_and_loss_against_float64(tiny_audioldm):
    """A round of 2 prompts x 2 samples scored by the set reward gives one pair per prompt (the
    clip nearer the mean RMS wins), and the loss on a pair is -log sigmoid(-beta/2 [(e_w - e_l)
    - (e_w^ref - e_l^ref)]) computed in float64 from the generator's own errors."""
    gen = _gen(tiny_audioldm)
    with torch.no_grad():  # a LoRA away from zero: policy != reference
        for p in gen.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    roll = RolloutSettings(samples_per_prompt=2, num_steps=2, reencode=False)
    m = Dragon(DragonConfig(rollout=roll, beta=500.0))
    buf = m.collect(gen, SetSpread(), ["a dog barks", "rain"], [0, 1])
    rms = buf.samples.audio.pow(2).flatten(1).mean(1).sqrt()
    d = (rms - rms.mean()).abs().view(2, 2)
    want = [[int(d[g].argmin()) + 2 * g, int(d[g].argmax()) + 2 * g] for g in range(2)]
    assert buf.extras["pairs"].tolist() == want
    assert m.num_items(buf) == 2 and "set_value" in m.round_metrics(buf)
    batch = m.batch(buf, [0, 1], [7, 8])
    torch.testing.assert_close(batch["latents_w"], buf.latents[[want[0][0], want[1][0]], -1])
    loss, metrics = m.loss(batch, gen)
    # independent: the errors at the pair's shared (t, noise), then the formula in float64
    from mmalign.types import per_sample_randint, per_sample_randn

    seeds = batch["seeds"]
    noise = per_sample_randn(seeds, gen.latent_shape)
    t = per_sample_randint(seeds, 0, gen.num_train_timesteps)
    cond = gen.encode_prompt(batch["prompts"])
    with torch.no_grad():
        ew, el = (gen.denoise_error(batch[k], cond, t, noise).double() for k in ("latents_w", "latents_l"))
        with gen.reference():
            rw, rl = (gen.denoise_error(batch[k], cond, t, noise).double() for k in ("latents_w", "latents_l"))
    want_loss = (
        sum(-math.log(1 / (1 + math.exp(250.0 * ((ew[i] - el[i]) - (rw[i] - rl[i])).item()))) for i in range(2)) / 2
    )
    assert loss.item() == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    assert abs(loss.item() - math.log(2)) > 1e-4


def test_one_step_changes_the_params(tiny_audioldm):
    gen = _gen(tiny_audioldm)
    m = Dragon(DragonConfig(rollout=RolloutSettings(samples_per_prompt=2, num_steps=2, reencode=False), beta=500.0))
    buf = m.collect(gen, SetSpread(), ["a dog barks", "rain"], [0, 1])
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-2)
    loss, _ = m.loss(m.batch(buf, list(range(m.num_items(buf))), [3, 4]), gen)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def _fad_set():  # full-dataset FAD of the round against toy exemplar clips, embedded by a tiny CLAP
    from mmalign.rewards.fixtures import tiny

    caps = ["one low beep", "two high beeps"]
    return {
        "name": "fad",
        "variant": "set",
        "exemplars": "toy:render_audio",
        "exemplar_prompts": caps,
        "exemplar_seeds": 2,
        "embedding": tiny("clap") | {"name": "clap"},
    }


@pytest.mark.parametrize("reward", ["test_set_spread", "audio_loudness", "fad"])
def test_dragon_trains_through_the_trainer(reward, tiny_audioldm, tmp_path):
    import yaml

    _register_set_spread()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barks\nrain on a roof\n")
    cfg = {
        "run": {"name": "dragon", "seed": 0},
        "generator": {"name": "audioldm", "pretrained": str(tiny_audioldm), "lora": {"rank": 4, "alpha": 4}},
        "reward": _fad_set() if reward == "fad" else {"name": reward},
        "method": {
            "name": "dragon",
            "beta": 500,
            "rollout": {"prompts_per_round": 2, "num_steps": 2, "steps_per_round": 1, "reencode": False},
        },
        "data": {"kind": "prompts", "prompts": str(prompts)},
        "train": {"steps": 1, "batch_size": 2, "lr": 1e-3},
        "eval": {"enabled": False, "prompts": ["a dog barks"], "num_steps": 2},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    tr = Trainer(load_config(tmp_path / "c.yaml"), run_dir=tmp_path / "run")
    before = {n: v.detach().clone() for n, v in tr.generator.trainable().named_parameters() if v.requires_grad}
    tr.fit()
    after = dict(tr.generator.trainable().named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("rollout/pairs" in rec for rec in logs)
    assert any("rollout/set_value" in rec for rec in logs) == (reward != "audio_loudness")
