"""GRPO / Flow-GRPO against float64 re-implementations of the reference code's formulas:
flow_grpo's `sde_step_with_logprob` (per-dimension mean log-prob, prev_sample_mean, std_dev_t),
its train_sd3.py KL and PPO-clip loss, and its `PerPromptStatTracker` advantages; the
precision of step log-prob ratios at SD3-1024px latent size; and the flow SDE at one step."""

import math

import numpy as np
import pytest
import torch

from mmalign.config import load_config
from mmalign.methods.grpo import GRPO, GRPOConfig
from mmalign.methods.online import RolloutSettings, group_advantages
from mmalign.pipelines.common import LoraSettings
from mmalign.pipelines.flow import FLOW_LORA_TARGETS, FlowGeneratorConfig, FlowMatchingGenerator, sde_noise_level
from mmalign.testing import make_tiny_sd3
from mmalign.types import step_gaussian_log_prob
from tests.helpers import ROOT

PROMPTS = ["a red circle", "two blue squares"]


def flow_grpo_sde_step(v, x, sigma, sigma_prev, sigma_max, noise_level, prev_sample):
    """flow_grpo's sde_step_with_logprob in float64: (log_prob [B], prev_sample_mean, std_dev_t)."""
    v, x, prev_sample = v.double(), x.double(), prev_sample.double()
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_dev_t * math.sqrt(-dt)
    log_prob = -((prev_sample - mean) ** 2) / (2 * step_std**2) - math.log(step_std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.flatten(1).mean(1), mean, std_dev_t


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = make_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3")
    torch.manual_seed(0)
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    g = FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(path), lora=lora, max_sequence_length=4))
    _perturb(g, 0)
    return g


def _perturb(g, seed, scale=0.05):
    gen_ = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen_) * scale)


def test_log_ratio_is_float64_accurate_at_262144_dims():
    """D = 16 x 128 x 128 (SD3 at 1024 px): the log-ratio of two nearby step Gaussians from float32
    latents equals the float64 per-dimension-mean formula to ~1e-12 (a float32 sum would be off by ~1e-2)."""
    g = torch.Generator().manual_seed(0)
    shape, std = (2, 16, 128, 128), 0.07
    m_old = torch.randn(shape, generator=g)
    m_new = m_old + 1e-3 * std * torch.randn(shape, generator=g)
    x = m_old + std * torch.randn(shape, generator=g)
    got = step_gaussian_log_prob(x, m_new, std) - step_gaussian_log_prob(x, m_old, std)

    def ref(mean):  # float64, element by element, then the mean over dimensions
        lp = -((x.double() - mean.double()) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
        return lp.flatten(1).mean(1)

    want = ref(m_new) - ref(m_old)
    assert want.abs().min() > 1e-7  # nearby, but not identical
    assert (got - want).abs().max().item() < 1e-12
    assert (torch.exp(got) / torch.exp(want) - 1).abs().max().item() < 1e-12


def test_flow_step_log_prob_matches_flow_grpo(gen):
    """Stored and recomputed log-probs, the step mean and sigma_t (what the KL divides by) are
    flow_grpo's sde_step_with_logprob outputs."""
    steps, a, scale = 3, 0.7, 2.0
    ro = gen.rollout(PROMPTS, num_steps=steps, guidance_scale=scale, eta=a, seeds=[1, 2])
    _, sigmas = gen.sampling_schedule(steps)
    assert ro.log_probs.dtype == torch.float64
    for k in range(steps):
        x, x_next = ro.latents[:, k], ro.latents[:, k + 1]
        with torch.no_grad():
            v = gen.guided_velocity(x, ro.timesteps[k], ro.extras["cond"], ro.extras["uncond"], scale)
            lp, mean, std_t = gen.step_log_prob(ro, k, return_mean=True)
        want_lp, want_mean, want_std_t = flow_grpo_sde_step(v, x, sigmas[k], sigmas[k + 1], sigmas[1], a, x_next)
        torch.testing.assert_close(ro.log_probs[:, k], want_lp, rtol=0, atol=1e-6)
        torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-6)
        torch.testing.assert_close(mean.double(), want_mean, rtol=0, atol=1e-5)
        assert std_t == pytest.approx(want_std_t, rel=1e-12)


def test_flow_grpo_loss_and_kl_match_train_sd3(gen):
    """GRPO's loss on the flow generator after a policy change: per trained step,
    mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 -+ c)) + beta mean_i mean_d (mu - mu_ref)^2 / (2 std_dev_t^2),
    averaged over the steps (flow_grpo scripts/train_sd3.py), with the float64 reference log-probs."""
    beta = 0.3
    rs = RolloutSettings(samples_per_prompt=2, num_steps=3, eta=0.7, guidance_scale=2.0)
    assert GRPOConfig().timestep_fraction == 1.0  # every step, as flow_grpo's base config
    m = GRPO(GRPOConfig(rollout=rs, filter_zero_std=False))
    buf = m.collect(gen, lambda s, p: torch.tensor([0.1, 0.5, 0.2, 0.9]), PROMPTS, [0, 1])
    batch = m.batch(buf, list(range(4)), [5] * 4)
    saved = [p.detach().clone() for p in gen.trainable().parameters()]
    _perturb(gen, 1, scale=0.02)  # the policy moved since sampling: ratios != 1
    try:
        ro, ex = batch["rollout"], batch["rollout"].extras
        _, sigmas = gen.sampling_schedule(3)
        ratios, kls = [], []
        for k in range(3):
            x, x_next = ro.latents[:, k], ro.latents[:, k + 1]
            with torch.no_grad():
                v = gen.guided_velocity(x, ro.timesteps[k], ex["cond"], ex["uncond"], 2.0)
                with gen.reference():
                    v_ref = gen.guided_velocity(x, ro.timesteps[k], ex["cond"], ex["uncond"], 2.0)
            lp, mean, std_t = flow_grpo_sde_step(v, x, sigmas[k], sigmas[k + 1], sigmas[1], 0.7, x_next)
            _, mean_ref, _ = flow_grpo_sde_step(v_ref, x, sigmas[k], sigmas[k + 1], sigmas[1], 0.7, x_next)
            ratios.append(torch.exp(lp - ro.log_probs[:, k].double()))
            kls.append((((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std_t**2)).mean().item())
        c = float(torch.cat(ratios).sub(1).abs().median())  # half of the ratios fall outside the clip
        adv = ex["advantages"].double()
        policy = [torch.maximum(-adv * r, -adv * r.clamp(1 - c, 1 + c)).mean().item() for r in ratios]
        m0 = GRPO(GRPOConfig(rollout=rs, clip_range=c, filter_zero_std=False))
        m1 = GRPO(GRPOConfig(rollout=rs, clip_range=c, kl_coef=beta, filter_zero_std=False))
        loss1, met1 = m1.loss(batch, gen)
        loss0, met0 = m0.loss(batch, gen)
        assert 0 < met0["clipfrac"] < 1
        # ~1e-7: the float32 step mean in the log-prob (a sign or clip-side error moves it by >1e-5)
        assert loss0.item() == pytest.approx(sum(policy) / 3, rel=0, abs=2e-7)
        assert abs(sum(policy) / 3) > 1e-5
        assert met1["kl"] == pytest.approx(sum(kls) / 3, rel=1e-5)
        assert (loss1 - loss0).item() == pytest.approx(beta * sum(kls) / 3, rel=1e-5)
    finally:
        with torch.no_grad():
            for p, s in zip(gen.trainable().parameters(), saved):
                p.copy_(s)


def _stat_tracker(prompts, rewards, global_std):
    """flow_grpo's PerPromptStatTracker.update (type grpo) in numpy float64."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.zeros_like(rewards)
    for p in np.unique(prompts):
        r = rewards[prompts == p]
        std = (np.std(rewards) if global_std else np.std(r)) + 1e-4
        adv[prompts == p] = (r - np.mean(r)) / std
    return adv


@pytest.mark.parametrize("mode", ["global", "group"])
def test_advantages_match_flow_grpo_stat_tracker(mode):
    g = torch.Generator().manual_seed(3)
    rewards = torch.rand(24, generator=g) * torch.tensor([1.0, 5.0, 0.2, 2.0]).repeat_interleave(6)
    group = torch.arange(4).repeat_interleave(6)
    want = _stat_tracker(group.tolist(), rewards.tolist(), global_std=mode == "global")
    got = group_advantages(rewards, group, global_std=mode == "global")
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-6, atol=1e-6)
    if mode == "global":  # and the method's default uses it
        assert GRPOConfig().advantage_std == "global"
        m = GRPO(GRPOConfig(rollout=RolloutSettings(samples_per_prompt=6), filter_zero_std=False, adv_clip=100.0))

        class Gen:  # collect() only needs rollouts with rewards
            def rollout(self, prompts, **kw):
                from mmalign.types import Rollout, Samples

                return Rollout(
                    Samples(),
                    torch.zeros(len(prompts), 2, 1),
                    torch.zeros(1),
                    torch.zeros(len(prompts), 1),
                    list(prompts),
                )

        buf = m.collect(Gen(), lambda s, p: rewards[: len(p)], ["a", "b", "c", "d"], [0, 1, 2, 3])
        np.testing.assert_allclose(buf.extras["advantages"].double().numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "key,value",
    [("clip_range", 0.0), ("clip_range", 1.5), ("adv_clip", 0.0), ("kl_coef", -0.1), ("advantage_std", "batch")],
)
def test_grpo_options_are_range_checked(key, value, tmp_path):

    root = ROOT
    with pytest.raises(ValueError, match=key):
        load_config(root / "configs" / "toy" / "grpo.yaml", [f"method.{key}={value}"])


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo"])
def test_one_step_guided_flow_sampler_is_the_rollout(gen, sde_type, monkeypatch):
    """num_steps=1, eta>0: sigma = 1 with no grid point between it and 0. flow_grpo's sigma_t takes
    sigma_max = sigmas[1] = 0, so sigma_t = eta; the guided samplers walk exactly `rollout`'s step
    (they used sigma_max = 1 and divided by zero)."""
    from mmalign.guidance import dynamic_cfg_sample, reward_guided_sample

    monkeypatch.setattr(gen.cfg, "sde_type", sde_type)
    a = 0.7
    ro = gen.rollout(PROMPTS, num_steps=1, guidance_scale=3.0, eta=a, seeds=[3, 4])
    assert torch.isfinite(ro.latents).all() and torch.isfinite(ro.log_probs).all()
    _, sigmas = gen.sampling_schedule(1)
    assert sigmas == [1.0, 0.0]
    with torch.no_grad():
        v = gen.guided_velocity(ro.latents[:, 0], ro.timesteps[0], ro.extras["cond"], ro.extras["uncond"], 3.0)
    noise = gen.step_noise([3, 4], 0).double()
    x = ro.latents[:, 0].double()
    # float64: sigma_t = eta for both SDEs here (flow_grpo: eta sqrt(1 / (1 - 0))); dt = -1
    want = x * (1 - a**2 / 2) - v.double() + a * noise
    torch.testing.assert_close(ro.latents[:, 1].double(), want, rtol=0, atol=1e-5)

    class Zero:
        modality, differentiable, name = "image", True, "zero"

        def __call__(self, samples, prompts):
            return samples.images.sum((1, 2, 3)) * 0

    dyn = dynamic_cfg_sample(gen, PROMPTS, Zero(), candidates=[3.0], num_steps=1, seeds=[3, 4], eta=a)
    rg = reward_guided_sample(gen, PROMPTS, [(Zero(), 0.0)], guidance_scale=3.0, num_steps=1, seeds=[3, 4], eta=a)
    for out in (dyn, rg):
        assert torch.equal(out.latents, ro.latents)


def test_flow_grpo_noise_level_refuses_an_infinite_sigma_t():
    assert sde_noise_level(1.0, 0.0, 0.7) == pytest.approx(0.7)
    assert sde_noise_level(0.5, 0.9, 0.7) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="sigma_max=1.0 at sigma=1.0"):
        sde_noise_level(1.0, 1.0, 0.7)
