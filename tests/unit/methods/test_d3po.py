"""D3PO's loss and its reference model, checked against the reference code's formula
(yk7333/d3po, scripts/rm/train_d3po.py) computed independently in float64."""

import math

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.methods.d3po import D3PO, D3POConfig, d3po_step_loss, pairs_from_margin
from mmalign.methods.online import RolloutSettings
from tests.helpers import ROOT


def _reference_code_loss(lp0, lp1, rp0, rp1, r0, r1, beta, eps):
    """One pair as train_d3po.py computes it: human_prefer = compare(r0, r1) is (+1, -1) when
    sample 0 has the higher reward, ratio_i = clamp(exp(lp_i - rp_i), 1 - eps, 1 + eps),
    loss = -log(sigmoid(beta log(ratio_0) h_0 + beta log(ratio_1) h_1))."""
    h0, h1 = (1.0, -1.0) if r0 > r1 else (-1.0, 1.0)
    ratio0 = min(max(math.exp(lp0 - rp0), 1 - eps), 1 + eps)
    ratio1 = min(max(math.exp(lp1 - rp1), 1 - eps), 1 + eps)
    z = beta * math.log(ratio0) * h0 + beta * math.log(ratio1) * h1
    return -math.log(1.0 / (1.0 + math.exp(-z)))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.1), (2.0, 0.5), (0.7, 0.9)])
def test_d3po_loss_matches_the_reference_code_in_float64(beta, eps):
    """Pairs (2j, 2j+1) with either sample winning, log-ratios inside and outside the clip range."""
    g = torch.Generator().manual_seed(3)
    P = 24
    logp = torch.randn(2 * P, generator=g, dtype=torch.float64) * 0.4
    ref = torch.randn(2 * P, generator=g, dtype=torch.float64) * 0.4
    rewards = torch.randn(2 * P, generator=g, dtype=torch.float64)
    r = rewards.view(-1, 2)
    pairs, ties = pairs_from_margin(r[:, 0] - r[:, 1], 0.0)
    assert ties == 0 and len(pairs) == P
    w, l = pairs[:, 0], pairs[:, 1]
    got = d3po_step_loss(logp[w], logp[l], ref[w], ref[l], beta, eps)
    lr = (logp - ref).abs()
    assert (lr > math.log(1 + eps)).any() and (lr < -math.log(1 - eps)).any()  # both sides of the clip
    for j in range(P):
        a, b = 2 * j, 2 * j + 1
        want = _reference_code_loss(
            logp[a].item(),
            logp[b].item(),
            ref[a].item(),
            ref[b].item(),
            rewards[a].item(),
            rewards[b].item(),
            beta,
            eps,
        )
        assert got[j].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def _sd(tiny_sd, finetune):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    return LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), finetune=finetune))


def _reward(samples, prompts):  # distinct scores, the first sample of each pair higher
    return torch.arange(len(prompts), 0, -1, dtype=torch.float32)


def _close(a, b, scale):
    return torch.allclose(a.double(), b.double(), rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_reference_is_the_initial_model_after_updates_or_the_rounds_sampler(tiny_sd, finetune):
    """`reference: base` (the default) scores steps with the initial weights even after optimizer
    steps: the log-probs of a fresh copy of the pretrained model (finetune none), not those of the
    round's sampler; `reference: sampler` returns the round's stored log-probs."""
    gen, initial = _sd(tiny_sd, finetune), _sd(tiny_sd, "none")
    rs = RolloutSettings(
        prompts_per_round=2, samples_per_prompt=2, same_initial_noise=True, num_steps=3, eta=1.0, guidance_scale=2.0
    )
    base = D3PO(D3POConfig(rollout=rs, timestep_fraction=1.0))
    sampler = D3PO(D3POConfig(rollout=rs, timestep_fraction=1.0, reference="sampler"))
    assert base.cfg.reference == "base"
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    ro = base.collect(gen, _reward, prompts, seeds)
    for step in range(2):  # two optimizer steps on round 0
        loss, _ = base.loss(base.batch(ro, [0, 1], [step, step]), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before) if p.grad is not None)
    ro1 = base.collect(gen, _reward, prompts, seeds)  # round 1, sampled by the updated policy
    scale = float(ro1.log_probs.abs().max().clamp_min(1.0))
    for k in range(3):
        with torch.no_grad():
            want_initial = initial.step_log_prob(ro1, k)
            current = gen.step_log_prob(ro1, k)
        stored = ro1.log_probs[:, k]
        got_base, got_sampler = base.reference_log_prob(ro1, k, gen), sampler.reference_log_prob(ro1, k, gen)
        assert _close(got_base, want_initial, scale)
        assert _close(got_sampler, stored, scale)
        assert _close(stored, current, scale)  # no update since the round was sampled
        # the updated policy is measurably away from the initial model at every step (so the two
        # references differ)
        assert float((want_initial.double() - stored.double()).abs().max()) > 1e-4 * scale
    # the loss uses the initial model's log-probs: with the policy at the initial weights it is log 2
    # per step, while against the round's sampler the updated-vs-initial gap makes it differ
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    loss_base, m_base = base.loss(base.batch(ro1, [0, 1], [5, 5]), gen)
    assert loss_base.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m_base["abs_log_ratio"] < 1e-6 * scale
    _, m_sampler = sampler.loss(sampler.batch(ro1, [0, 1], [5, 5]), gen)
    assert m_sampler["abs_log_ratio"] > 1e-4 * scale


def test_reference_option_is_read_and_checked():
    assert D3POConfig().reference == "base"
    cfg = load_config(ROOT / "configs" / "toy" / "d3po.yaml")
    assert cfg.method.args.reference == "base"
    assert (
        load_config(ROOT / "configs" / "toy" / "d3po.yaml", ["method.reference=sampler"]).method.args.reference
        == "sampler"
    )
    with pytest.raises(ConfigError, match=r"method.reference: expected one of \['base', 'sampler'\]"):
        load_config(ROOT / "configs" / "toy" / "d3po.yaml", ["method.reference=initial"])
