"""Diffusion-DRO's policy term: which noise target the policy sample is scored against
(basiclab/DiffusionDRO train.py: the sampler's own noise prediction stored in its replay
buffer), checked against independent float64 computations."""

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.methods.diffusion_dro import DiffusionDRO, DiffusionDROConfig, policy_target, sample_with_predictions
from mmalign.methods.online import RolloutSettings
from mmalign.types import per_sample_randint, per_sample_randn
from tests.helpers import ROOT

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def gen(tiny_sd):
    """The tiny UNet with its LoRA moved off zero, so policy and reference differ."""
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    g = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in g.trainable().parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=rng))
    return g


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_keeps_its_guided_prediction_at_every_step(gen, eta):
    """The trajectory is the one `rollout` samples, and extras["eps"][:, k] is the guided noise
    prediction u + s (c - u) at (x_k, t_k), recomputed here from separate cond / uncond passes."""
    s = 3.0
    rs = RolloutSettings(samples_per_prompt=1, num_steps=3, eta=eta, guidance_scale=s)
    ro = sample_with_predictions(gen, PROMPTS, [4, 9], rs)
    want = gen.rollout(
        PROMPTS, num_steps=3, guidance_scale=s, eta=eta, seeds=[4, 9], need_log_probs=False, decode=False
    )
    assert torch.equal(ro.timesteps, want.timesteps)
    torch.testing.assert_close(ro.latents, want.latents, rtol=1e-5, atol=1e-5)
    cond, uncond = gen.encode_prompt(PROMPTS), gen.encode_prompt(PROMPTS, negative=True)
    assert ro.extras["eps"].shape == ro.latents[:, :-1].shape
    with torch.no_grad():
        for k, t in enumerate(ro.timesteps.tolist()):
            x, tt = ro.latents[:, k], torch.tensor(t)
            c = gen.model_output(x, tt, cond).double()
            u = gen.model_output(x, tt, uncond).double()
            torch.testing.assert_close(ro.extras["eps"][:, k].double(), u + s * (c - u), rtol=1e-4, atol=1e-5)


def test_policy_target_is_the_samplers_prediction_or_the_final_sample_noise(gen):
    rs = RolloutSettings(samples_per_prompt=1, num_steps=4, eta=0.0, guidance_scale=2.0)
    ro = sample_with_predictions(gen, PROMPTS, [1, 2], rs)
    k = torch.tensor([1, 3])
    ac = gen.train_scheduler.alphas_cumprod
    got = policy_target(ro, k, ac, "sampler_prediction")
    for i in range(2):
        torch.testing.assert_close(got[i], ro.extras["eps"][i, k[i]], rtol=0, atol=0)
    got_final = policy_target(ro, k, ac, "final_sample")
    for i in range(2):
        a = ac.double()[int(ro.timesteps[k[i]])]
        x_t, x0 = ro.latents[i, k[i]].double(), ro.latents[i, -1].double()
        torch.testing.assert_close(got_final[i].double(), (x_t - a.sqrt() * x0) / (1 - a).sqrt(), rtol=1e-4, atol=1e-4)
    assert (got - got_final).abs().max() > 1e-2  # two different targets


@pytest.mark.parametrize("mode", ["sampler_prediction", "final_sample"])
def test_loss_scores_the_policy_sample_against_its_target(gen, mode):
    """The hinge loss equals a float64 recomputation of the reference code's formula,
    max(0, [e_theta(x^E) - e_ref(x^E)] - [e_theta(x^P) - e_ref(x^P)] + margin), with the
    policy target of `mode` at the step the method draws from each item's seed."""
    m = DiffusionDRO(
        DiffusionDROConfig(
            experts="toy:render",
            rollout=RolloutSettings(samples_per_prompt=1, num_steps=4, eta=0.0, guidance_scale=2.0),
            margin=0.01,
            policy_target=mode,
        )
    )
    ro = m.collect(gen, None, PROMPTS, [5, 6])
    assert ("eps" in ro.extras) == (mode == "sampler_prediction")
    seeds = torch.tensor([11, 12])
    loss, _ = m.loss(m.batch(ro, [0, 1], seeds), gen)
    k = per_sample_randint(seeds, 0, 4, salt=3)
    ac = gen.train_scheduler.alphas_cumprod.double()
    cond = gen.encode_prompt(ro.prompts)
    want = 0.0
    with torch.no_grad():
        for i in range(2):
            t = ro.timesteps[k[i]]
            a = ac[int(t)]
            x_p = ro.latents[i, k[i]].double()
            if mode == "sampler_prediction":
                eps_p = ro.extras["eps"][i, k[i]].double()
            else:
                eps_p = (x_p - a.sqrt() * ro.latents[i, -1].double()) / (1 - a).sqrt()
            eps_e = per_sample_randn([int(seeds[i])], ro.extras["expert_x0"].shape[1:])[0].double()
            x_e = a.sqrt() * ro.extras["expert_x0"][i].double() + (1 - a).sqrt() * eps_e
            c_i = {key: v[i : i + 1] for key, v in cond.items()}

            def err(x, target):
                pred = gen.model_output(x[None].float(), t[None], c_i)[0].double()
                return float((pred - target).pow(2).mean())

            e_e, e_p = err(x_e, eps_e), err(x_p, eps_p)
            with gen.reference():
                r_e, r_p = err(x_e, eps_e), err(x_p, eps_p)
            want += max(0.0, (e_e - r_e) - (e_p - r_p) + 0.01) / 2
    assert want > 0.0
    assert loss.item() == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_policy_target_option_is_read_and_checked():
    assert DiffusionDROConfig(experts="toy:render").policy_target == "sampler_prediction"
    path = ROOT / "configs" / "toy" / "diffusion_dro.yaml"
    assert load_config(path).method.args.policy_target == "sampler_prediction"
    assert load_config(path, ["method.policy_target=final_sample"]).method.args.policy_target == "final_sample"
    with pytest.raises(ConfigError, match=r"method.policy_target: expected one of \['sampler_prediction', "):
        load_config(path, ["method.policy_target=x0"])
    with pytest.raises(ConfigError, match=r"method.margin: must be >= 0"):
        load_config(path, ["method.margin=-0.1"])


def test_refuses_a_non_epsilon_generator():
    class Flow:
        prediction_type = "flow"

    m = DiffusionDRO(DiffusionDROConfig(experts="toy:render"))
    with pytest.raises(ValueError, match="epsilon-prediction models"):
        m.collect(Flow(), None, PROMPTS, [0, 1])
