"""The flow-matching generator (SD3 / FLUX layouts) and the methods that run on it:
Flow-GRPO (grpo.py on the SDE sampler), Flow-DPO (diffusion_dpo.py on velocity errors) and
DiffusionNFT. Tiny random models of the real classes, saved and loaded like a user's."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.config import load_config
from mmalign.methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig, nft_loss, optimality_probability
from mmalign.pipelines.common import LoraSettings
from mmalign.pipelines.flow import FLOW_LORA_TARGETS, FlowGeneratorConfig, FlowMatchingGenerator
from mmalign.testing import make_tiny_flux, make_tiny_sd3
from mmalign.trainer import Trainer
from tests.helpers import ROOT, write_config

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("models") / "flux")


def _perturbed(gen: FlowMatchingGenerator, seed: int = 0) -> FlowMatchingGenerator:
    """Make LoRA non-trivial so the reference differs from the policy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return gen


@pytest.fixture(scope="module")
def gen(tiny_sd3):
    torch.manual_seed(0)
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    return _perturbed(
        FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(tiny_sd3), lora=lora, max_sequence_length=4))
    )


@pytest.fixture(scope="module")
def flux(tiny_flux):
    torch.manual_seed(0)
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    return _perturbed(
        FlowMatchingGenerator(
            FlowGeneratorConfig(pretrained=str(tiny_flux), lora=lora, resolution=32, max_sequence_length=8)
        )
    )


# ---------------------------------------------------------------- adapter


def test_loads_sd3_and_flux_with_lora_on_attention(gen, flux):
    assert gen.latent_shape == (4, 8, 8) and not gen.is_flux and gen.pipe.text_encoder_3 is None
    assert flux.latent_shape == (4, 8, 8) and flux.is_flux
    for g in (gen, flux):
        names = [n for n, p in g.trainable().named_parameters() if p.requires_grad]
        assert names and all("lora" in n for n in names)
        assert any("to_q" in n for n in names) and any("add_k_proj" in n for n in names)


def _independent_step(v, x, sigma, sigma_next, sigma_max, a):
    """Flow-GRPO's SDE step in float64 written from the SDE drift: dx = [v + s^2/(2 sigma)(x + (1-sigma) v)] dt."""
    v, x = v.double(), x.double()
    dt = sigma_next - sigma
    s = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    drift = v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)
    return x + drift * dt, s * math.sqrt(-dt)


@pytest.mark.parametrize("which", ["gen", "flux"])
def test_sde_log_prob_is_an_independent_gaussian(which, request):
    g = request.getfixturevalue(which)
    a, steps, scale = 0.7, 4, (3.0 if which == "gen" else 1.0)
    ro = g.rollout(PROMPTS, num_steps=steps, guidance_scale=scale, eta=a, seeds=[3, 4])
    assert ro.latents.shape == (2, steps + 1, 4, 8, 8) and ro.log_probs.shape == (2, steps)
    assert ro.samples.images.shape == (2, 3, 32, 32)
    _, sigmas = g.sampling_schedule(steps)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == steps + 1
    for k in range(steps):
        x, x_next = ro.latents[:, k], ro.latents[:, k + 1]
        with torch.no_grad():
            v = g.guided_velocity(x, ro.timesteps[k], ro.extras["cond"], ro.extras["uncond"], scale)
        mean, std = _independent_step(v, x, sigmas[k], sigmas[k + 1], sigmas[1], a)
        # per-dimension mean, as flow_grpo's sde_step_with_logprob
        want = torch.distributions.Normal(mean, std).log_prob(x_next.double()).flatten(1).mean(1)
        torch.testing.assert_close(ro.log_probs[:, k], want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo"])
def test_noise_level_zero_is_diffusers_euler_sampler_exactly(gen, sde_type, monkeypatch):
    monkeypatch.setattr(gen.cfg, "sde_type", sde_type)  # either SDE at eta = 0 is the Euler ODE
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ro = gen.rollout(PROMPTS, num_steps=5, guidance_scale=3.0, eta=0.0, latents=x_T, need_log_probs=False)
    with torch.no_grad():
        ref = gen.pipe(
            PROMPTS,
            num_inference_steps=5,
            guidance_scale=3.0,
            latents=x_T.clone(),
            output_type="latent",
            max_sequence_length=gen.max_sequence_length,
        ).images
    # without T5 the generator runs the identical zero tokens as one (RepeatedTokenJointAttnProcessor)
    torch.testing.assert_close(ro.latents[:, -1], ref, rtol=0, atol=1e-5)
    # and every step is diffusers' FlowMatchEulerDiscreteScheduler.step on the same velocity
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(gen.pipe.scheduler.config)
    sched.set_timesteps(5)
    for k, t in enumerate(sched.timesteps):
        with torch.no_grad():
            v = gen.guided_velocity(ro.latents[:, k], t, ro.extras["cond"], ro.extras["uncond"], 3.0)
        assert torch.equal(sched.step(v, t, ro.latents[:, k]).prev_sample, ro.latents[:, k + 1])
    with pytest.raises(ValueError, match="eta=0"):
        gen.rollout(PROMPTS, num_steps=2, eta=0.0)


def test_noise_level_zero_matches_flux_pipeline(flux):
    from diffusers import FluxPipeline

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ro = flux.rollout(PROMPTS, num_steps=4, guidance_scale=1.0, eta=0.0, latents=x_T, need_log_probs=False)
    with torch.no_grad():
        ref = flux.pipe(
            PROMPTS,
            num_inference_steps=4,
            height=32,
            width=32,
            output_type="latent",
            latents=FluxPipeline._pack_latents(x_T.clone(), 2, 4, 8, 8),
            max_sequence_length=flux.max_sequence_length,
        ).images
    torch.testing.assert_close(FluxPipeline._pack_latents(ro.latents[:, -1], 2, 4, 8, 8), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["gen", "flux"])
def test_step_log_prob_recomputes_the_stored_one(which, request):
    g = request.getfixturevalue(which)
    ro = g.rollout(PROMPTS, num_steps=3, guidance_scale=2.0, eta=0.8, seeds=[1, 2])
    for k in range(3):
        with torch.no_grad():
            lp, mean, std = g.step_log_prob(ro, k, return_mean=True)
        torch.testing.assert_close(lp, ro.log_probs[:, k], rtol=1e-6, atol=1e-5)
        assert std > 0 and mean.shape == (2, 4, 8, 8)
        with torch.no_grad(), g.reference():
            ref = g.step_log_prob(ro, k)
        assert not torch.allclose(ref, lp)  # adapters disabled -> a different policy
    # a sub-batch recomputes its own rows
    with torch.no_grad():
        torch.testing.assert_close(
            g.step_log_prob(ro, 1, index=torch.tensor([1])), ro.log_probs[1:, 1], rtol=1e-6, atol=1e-5
        )


@pytest.mark.parametrize("which", ["gen", "flux"])
def test_sde_steps_leave_the_other_steps_euler(which, request):
    """rollout(sde_steps=...) (MixGRPO / Flow-GRPO-Fast): the listed steps are the full SDE's, bit for
    bit; every other step is the Euler step from where the trajectory is; only SDE steps have log-probs."""
    g = request.getfixturevalue(which)
    scale = 2.0 if which == "gen" else 1.0
    full = g.rollout(PROMPTS, num_steps=4, guidance_scale=scale, eta=0.8, seeds=[1, 2])
    mixed = g.rollout(PROMPTS, num_steps=4, guidance_scale=scale, eta=0.8, seeds=[1, 2], sde_steps=[0, 1])
    assert torch.equal(mixed.latents[:, :3], full.latents[:, :3])
    assert torch.equal(mixed.log_probs[:, :2], full.log_probs[:, :2]) and mixed.log_probs[:, 2:].isnan().all()
    assert not torch.equal(mixed.latents[:, 3], full.latents[:, 3])
    _, sigmas = g.sampling_schedule(4)
    for k in (2, 3):
        with torch.no_grad():
            v = g.guided_velocity(
                mixed.latents[:, k], mixed.timesteps[k], mixed.extras["cond"], mixed.extras["uncond"], scale
            )
        assert torch.equal(mixed.latents[:, k + 1], mixed.latents[:, k] + (sigmas[k + 1] - sigmas[k]) * v)
    with torch.no_grad():
        torch.testing.assert_close(g.step_log_prob(mixed, 1), mixed.log_probs[:, 1], rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="step 2 of this rollout is deterministic"):
        g.step_log_prob(mixed, 2)
    with pytest.raises(ValueError, match="sde_steps"):
        g.rollout(PROMPTS, num_steps=4, eta=0.8, sde_steps=[])


# ---------------------------------------------------------------- DanceGRPO's SDE (generator.sde_type)


def _dance_step(v, x, sigma, sigma_next, eta):
    """DanceGRPO's step in float64, in the paper's code's terms: the Euler mean plus the score
    correction log_term * dsigma, log_term = -eta^2 score / 2, score = -(x - (1 - sigma) x0_hat) / sigma^2."""
    v, x = v.double(), x.double()
    dsigma = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1 - sigma) * x0_hat) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    return mean, eta * math.sqrt(sigma - sigma_next)


@pytest.mark.parametrize("which", ["gen", "flux"])
def test_dance_grpo_log_prob_is_an_independent_gaussian(which, request, monkeypatch):
    g = request.getfixturevalue(which)
    monkeypatch.setattr(g.cfg, "sde_type", "dance_grpo")
    eta, steps, scale = 0.5, 4, (3.0 if which == "gen" else 1.0)
    ro = g.rollout(PROMPTS, num_steps=steps, guidance_scale=scale, eta=eta, seeds=[3, 4])
    assert ro.extras["sde_type"] == "dance_grpo" and ro.log_probs.shape == (2, steps)
    _, sigmas = g.sampling_schedule(steps)
    for k in range(steps):
        x, x_next = ro.latents[:, k], ro.latents[:, k + 1]
        with torch.no_grad():
            v = g.guided_velocity(x, ro.timesteps[k], ro.extras["cond"], ro.extras["uncond"], scale)
            _, mean, std = g.step_log_prob(ro, k, return_mean=True)
        want_mean, want_std = _dance_step(v, x, sigmas[k], sigmas[k + 1], eta)
        # per-dimension mean of the Gaussian log-density, as DanceGRPO's flux_step
        want = torch.distributions.Normal(want_mean, want_std).log_prob(x_next.double()).flatten(1).mean(1)
        torch.testing.assert_close(ro.log_probs[:, k], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mean.double(), want_mean, rtol=0, atol=1e-5)  # the mean KL penalties use
        assert std == pytest.approx(eta, rel=1e-12)  # sigma_t = eta: the step std without sqrt(-dt)
        # and it is not Flow-GRPO's step (whose std is a sqrt(sigma / (1 - sigma)) sqrt(-dt))
        flow_mean, flow_std = _independent_step(v, x, sigmas[k], sigmas[k + 1], sigmas[1], eta)
        assert flow_std != pytest.approx(want_std) and not torch.allclose(flow_mean, want_mean)


@pytest.mark.parametrize("which", ["gen", "flux"])
def test_dance_grpo_step_log_prob_recomputes_the_stored_one(which, request, monkeypatch):
    g = request.getfixturevalue(which)
    monkeypatch.setattr(g.cfg, "sde_type", "dance_grpo")
    ro = g.rollout(PROMPTS, num_steps=3, guidance_scale=2.0, eta=0.8, seeds=[1, 2])
    _, sigmas = g.sampling_schedule(3)
    for k in range(3):
        with torch.no_grad():
            lp, mean, std = g.step_log_prob(ro, k, return_mean=True)
        torch.testing.assert_close(lp, ro.log_probs[:, k], rtol=1e-6, atol=1e-6)
        assert std == pytest.approx(0.8, rel=1e-12)  # sigma_t; the step std is 0.8 sqrt(sigma - sigma_next)
        with torch.no_grad(), g.reference():
            ref = g.step_log_prob(ro, k)
        assert not torch.allclose(ref, lp)  # adapters disabled -> a different policy
    with torch.no_grad():
        torch.testing.assert_close(
            g.step_log_prob(ro, 1, index=torch.tensor([1])), ro.log_probs[1:, 1], rtol=1e-6, atol=1e-6
        )
    # the rollout carries its SDE: switching the config back does not change how it is scored
    monkeypatch.setattr(g.cfg, "sde_type", "flow_grpo")
    with torch.no_grad():
        torch.testing.assert_close(g.step_log_prob(ro, 2), ro.log_probs[:, 2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "field,bad,bad_yaml,good,default,choices,toy",
    [
        ("sde_type", "dance", "dance", "dance_grpo", "flow_grpo", r"\['flow_grpo', 'dance_grpo'\]", "flow_grpo.yaml"),
        (
            "loss_weighting",
            "logit_normal",
            "sigma",
            "cosmap",
            "none",
            r"\['none', 'sigma_sqrt', 'cosmap', 'eps'\]",
            "flow_dpo.yaml",
        ),
    ],
)
def test_unknown_choice_is_a_clear_error(field, bad, bad_yaml, good, default, choices, toy, tiny_sd3):

    from mmalign.config import ConfigError
    from mmalign.pipelines.flow import sde_step

    msg = rf"generator\.{field}: '{bad}' is not one of {choices}"
    with pytest.raises(ValueError, match=msg):
        FlowGeneratorConfig(pretrained=str(tiny_sd3), **{field: bad}).validate()
    with pytest.raises(ValueError, match=msg):  # before anything is loaded
        FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(tiny_sd3), **{field: bad}))
    if field == "sde_type":
        x = torch.zeros(1, 4, 8, 8)
        with pytest.raises(ValueError, match=msg):
            sde_step(x, x, 0.5, 0.25, 0.9, 0.7, bad)
    toy = ROOT / "configs" / "toy" / toy
    assert getattr(load_config(toy, [f"generator.{field}={good}"]).generator.args, field) == good
    assert getattr(load_config(toy).generator.args, field) == default  # the default: existing numbers unchanged
    with pytest.raises(ConfigError, match=rf"generator\.{field}: expected one of {choices}"):
        load_config(toy, [f"generator.{field}={bad_yaml}"])


def test_denoise_error_by_hand(gen):
    """x_s = (1 - s) x0 + s eps, target eps - x0, s = shift(sigmoid(Phi^-1((t + 1/2) / N))), mean over dims."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    cond = gen.encode_prompt(PROMPTS)
    with torch.no_grad():
        got = gen.denoise_error(x0, cond, t, noise)
        shift = gen.scheduler.config.shift
        assert shift == 3.0
        errs = []
        for i in range(2):
            u = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((t[i].item() + 0.5) / 1000, dtype=torch.float64))
            s = torch.sigmoid(u).item()
            s = shift * s / (1 + (shift - 1) * s)
            xt = (1 - s) * x0[i : i + 1] + s * noise[i : i + 1]
            v = gen.transformer(
                hidden_states=xt,
                timestep=torch.tensor([s * 1000.0]),
                encoder_hidden_states=cond["encoder_hidden_states"][i : i + 1],
                pooled_projections=cond["pooled_projections"][i : i + 1],
            ).sample
            errs.append(((noise[i : i + 1] - x0[i : i + 1]) - v).pow(2).mean())
    torch.testing.assert_close(got, torch.stack(errs), rtol=1e-4, atol=1e-6)
    # uniform t -> logit-normal sigma: the median timestep is sigma = shift(1/2)
    assert gen.train_sigmas(torch.tensor([499, 500])).mean().item() == pytest.approx(0.75, abs=2e-3)
    s = gen.train_sigmas(torch.arange(1000))
    lo = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.0005))).item()
    assert (s[1:] > s[:-1]).all() and s[0].item() == pytest.approx(3 * lo / (1 + 2 * lo), rel=1e-4)


def _sigma_by_hand(t: int, shift: float = 3.0) -> float:
    """float64 shift(sigmoid(Phi^-1((t + 1/2) / N))): the toy SD3's logit-normal training sigma."""
    u = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((t + 0.5) / 1000, dtype=torch.float64))
    s = torch.sigmoid(u).item()
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap", "eps"])
def test_denoise_error_loss_weighting_by_hand(gen, weighting, monkeypatch):
    """w(sigma) * mean ||(eps - x0) - v||^2 in float64 on a float64 copy of the model, with SD3's
    weights written out: none 1, sigma_sqrt sigma^-2, cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)),
    and mmalign's eps (1 - sigma)^2."""
    monkeypatch.setattr(gen.cfg, "loss_weighting", weighting)
    g = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([20, 900])  # low and high noise, where the weights differ most
    cond = gen.encode_prompt(PROMPTS)
    with torch.no_grad():
        got = gen.denoise_error(x0, cond, t, noise)
        model = copy.deepcopy(gen.transformer).double()
        want = []
        for i in range(2):
            s = _sigma_by_hand(int(t[i]))
            w = {
                "none": 1.0,
                "sigma_sqrt": s**-2,
                "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s**2)),
                "eps": (1 - s) ** 2,
            }[weighting]
            x, e = x0[i : i + 1].double(), noise[i : i + 1].double()
            v = model(
                hidden_states=(1 - s) * x + s * e,
                timestep=torch.tensor([s * 1000.0], dtype=torch.float64),
                encoder_hidden_states=cond["encoder_hidden_states"][i : i + 1].double(),
                pooled_projections=cond["pooled_projections"][i : i + 1].double(),
            ).sample
            want.append(w * ((e - x) - v).pow(2).mean())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-4, atol=1e-6)


def test_eps_weighting_is_the_implied_noise_prediction_error(gen, monkeypatch):
    """loss_weighting eps gives mean ||eps - eps_hat||^2 with eps_hat = x_sigma + (1 - sigma) v_theta,
    the error the UNet adapter measures."""
    monkeypatch.setattr(gen.cfg, "loss_weighting", "eps")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 500, 990])
    cond = gen.encode_prompt(PROMPTS + PROMPTS[:1])
    with torch.no_grad():
        got = gen.denoise_error(x0, cond, t, noise)
        x_t, sigma = gen.noisy(x0, t, noise)
        v = gen.model_output(x_t, sigma.flatten() * gen.num_train_timesteps, cond)
        want = (noise - (x_t + (1 - sigma) * v)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_loss_weighting_none_is_the_previous_error_exactly(gen, tiny_sd3):
    """The default adds nothing: bit-for-bit the unweighted flow-matching error (plain and guided)."""
    assert FlowGeneratorConfig(pretrained=str(tiny_sd3)).loss_weighting == "none" == gen.cfg.loss_weighting
    g = torch.Generator().manual_seed(9)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([20, 900])
    cond, uncond = gen.encode_prompt(PROMPTS), gen.encode_prompt(PROMPTS, negative=True)
    with torch.no_grad():
        x_t, sig = gen.noisy(x0, t, noise)
        v = gen.model_output(x_t, sig.flatten() * 1000, cond)
        assert torch.equal(gen.denoise_error(x0, cond, t, noise), (v - (noise - x0)).pow(2).flatten(1).mean(1))
        u, c = gen.model_output(
            torch.cat([x_t, x_t]), torch.cat([sig.flatten() * 1000] * 2), gen.cat_cond(uncond, cond)
        ).chunk(2)
        assert torch.equal(
            gen.denoise_error(x0, cond, t, noise, uncond=uncond, guidance_scale=3.0),
            ((u + 3.0 * (c - u)) - (noise - x0)).pow(2).flatten(1).mean(1),
        )


def test_lora_save_and_load_roundtrip(gen, tiny_sd3, tmp_path):
    gen.save_trained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = FlowMatchingGenerator(
        FlowGeneratorConfig(
            pretrained=str(tiny_sd3),
            max_sequence_length=4,
            lora=LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS)),
        )
    )
    fresh.load_trained(tmp_path / "lora")
    x = torch.randn(1, 4, 8, 8)
    cond = gen.encode_prompt(PROMPTS[:1])
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.model_output(x, torch.tensor(500.0), cond), gen.model_output(x, torch.tensor(500.0), cond)
        )
    # the diffusers way a user loads it
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=x,
            timestep=torch.tensor([500.0]),
            return_dict=False,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        )[0]
    torch.testing.assert_close(out, gen.model_output(x, torch.tensor(500.0), cond).detach())


# ---------------------------------------------------------------- Flow-DPO


@pytest.mark.parametrize("weighting", ["none", "cosmap"])
def test_flow_dpo_loss_matches_float64(gen, weighting, monkeypatch):
    """Diffusion-DPO on velocity errors (Flow-DPO) through the method, against a float64 model copy.
    With a loss weighting, policy and reference errors are both weighted: DPO with beta w(sigma_t)."""
    from mmalign.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
    from mmalign.types import per_sample_randint, per_sample_randn

    g = torch.Generator().manual_seed(1)
    x_w, x_l = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    seeds = torch.tensor([11, 12])
    beta = 700.0
    monkeypatch.setattr(gen.cfg, "loss_weighting", weighting)
    loss, _ = DiffusionDPO(DiffusionDPOConfig(beta=beta)).loss(
        {"prompts": PROMPTS, "latents_w": x_w, "latents_l": x_l, "seeds": seeds}, gen
    )

    model = copy.deepcopy(gen.transformer).double()
    noise = per_sample_randn(seeds, (4, 8, 8)).double()
    t = per_sample_randint(seeds, 0, 1000)
    cond = {k: v.double() for k, v in gen.encode_prompt(PROMPTS).items()}
    sig = gen.train_sigmas(t).double().view(-1, 1, 1, 1)

    def err(x0):
        x0 = x0.double()
        xt = (1 - sig) * x0 + sig * noise
        v = model(
            hidden_states=xt,
            timestep=sig.flatten() * 1000,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        ).sample
        return ((noise - x0) - v).pow(2).flatten(1).mean(1)

    with torch.no_grad():
        ew, el = err(x_w), err(x_l)
        model.disable_adapters()
        rw, rl = err(x_w), err(x_l)
    s = sig.flatten()
    w = torch.ones_like(s) if weighting == "none" else 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    want = -F.logsigmoid(-beta / 2 * w * ((ew - el) - (rw - rl))).mean()
    # beta / 2 = 350 multiplies a difference of four float32 errors: float32 rounding alone moves
    # the loss by ~1e-4 relative (1.06e-4 with diffusers 0.42 / transformers 5.25); a wrong sign,
    # beta or weighting moves it by far more
    assert loss.item() == pytest.approx(want.item(), rel=1e-3, abs=1e-6)


# ---------------------------------------------------------------- DiffusionNFT


def _nft_float64(x0_hat, x0_old, x0, r, beta):
    out = []
    for i in range(len(x0)):
        xh, xo, x, ri = x0_hat[i].double(), x0_old[i].double(), x0[i].double(), float(r[i])
        pos = xo + beta * (xh - xo)  # (1 - beta) old + beta theta
        neg = xo - beta * (xh - xo)  # (1 + beta) old - beta theta
        wp, wn = max((pos - x).abs().mean().item(), 1e-5), max((neg - x).abs().mean().item(), 1e-5)
        out.append((ri * ((pos - x) ** 2).mean() / wp + (1 - ri) * ((neg - x) ** 2).mean() / wn) / beta)
    return torch.stack(out)


def test_nft_loss_matches_float64_and_reward_sign_flips_the_gradient():
    g = torch.Generator().manual_seed(3)
    x0, x0_hat, x0_old = (torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    r = optimality_probability(torch.tensor([3.0, -1.0, 0.0, 7.0, -9.0], dtype=torch.float64), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.8, 0.4, 0.5, 1.0, 0.0], dtype=torch.float64))
    for beta in (1.0, 0.1):
        got, m = nft_loss(x0_hat, x0_old, x0, r, beta)
        torch.testing.assert_close(got, _nft_float64(x0_hat, x0_old, x0, r, beta), rtol=1e-12, atol=0)
    # at theta = theta_old the gradient is (2r - 1) * 2 (x0_old - x0) / w: r -> 1 - r (the reward's
    # sign swapped) negates it, and a good sample (r > 1/2) pulls x0_hat towards x0
    adv = torch.tensor([2.0, -3.0], dtype=torch.float64)
    x, xo = x0[:2], x0_old[:2]
    grads = []
    for sign in (1, -1):
        xh = xo.clone().requires_grad_(True)
        nft_loss(xh, xo, x, optimality_probability(sign * adv, 5.0), 1.0)[0].sum().backward()
        grads.append(xh.grad)
    torch.testing.assert_close(grads[0], -grads[1], rtol=1e-12, atol=1e-15)
    assert (grads[0][0] * (xo[0] - x[0])).sum() > 0  # descent moves the good sample's estimate to x0
    assert (grads[0][1] * (xo[1] - x[1])).sum() < 0  # and the bad one's away


def test_nft_method_moves_towards_rewarded_samples(gen, tiny_sd3):
    """A few NFT steps on two clean samples (r = 1 and r = 0) lower the model's error on the
    rewarded one relative to the other; the old policy stays where it was."""
    from mmalign.types import Rollout, Samples

    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    g = FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(tiny_sd3), lora=lora, max_sequence_length=4))
    m = DiffusionNFT(DiffusionNFTConfig(timesteps="training_density", timesteps_per_sample=2))
    x0 = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ro = Rollout(Samples(), x0, torch.zeros(0), None, ["a red circle"] * 2, {"optimality": torch.tensor([1.0, 0.0])})
    params = [p for p in g.trainable().parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    probe_t, probe_noise = torch.tensor([300, 300, 700, 700]), torch.randn(4, 4, 8, 8)
    cond = g.encode_prompt(["a red circle"] * 4)

    def errs():
        with torch.no_grad():
            x = torch.cat([x0[:, 0], x0[:, 0]])[[0, 1, 0, 1]]
            e = g.denoise_error(x, cond, probe_t, probe_noise)
        return e[[0, 2]].mean(), e[[1, 3]].mean()

    good0, bad0 = errs()
    m._update_old(g)
    old = [o.clone() for o in m._old]
    for step in range(10):
        loss, metrics = m.loss({"rollout": ro, "seeds": torch.tensor([step * 2, step * 2 + 1])}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    good1, bad1 = errs()
    assert (good1 - good0) < (bad1 - bad0) and good1 < good0
    assert all(torch.equal(a, b) for a, b in zip(old, m._old))
    assert set(metrics) >= {"loss_pos", "loss_neg", "old_deviation"}


# ---------------------------------------------------------------- end to end, UNet and flow


SD3_BLOCK = {"name": "flow", "lora": {"rank": 4, "alpha": 4}, "max_sequence_length": 4}
METHODS = {
    "flow_grpo": {
        "name": "grpo",
        "kl_coef": 0.1,
        "timestep_fraction": 0.5,
        "rollout": {
            "prompts_per_round": 2,
            "samples_per_prompt": 3,
            "num_steps": 4,
            "eta": 0.7,
            "steps_per_round": 2,
            "same_initial_noise": True,
        },
    },
    # SDE only on the first half of the steps, trained there (MixGRPO / Flow-GRPO-Fast)
    "grpo_sde_window": {
        "name": "grpo",
        "kl_coef": 0.1,
        "timestep_fraction": 0.5,
        "timestep_window": [0.0, 0.5],
        "rollout": {
            "prompts_per_round": 2,
            "samples_per_prompt": 3,
            "num_steps": 4,
            "eta": 0.7,
            "steps_per_round": 2,
            "sde_window": [0.0, 0.5],
        },
    },
    "diffusion_nft": {
        "name": "diffusion_nft",
        "kl_coef": 0.01,
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "eta": 0.0, "steps_per_round": 2},
    },
    "flow_dpo": {"name": "diffusion_dpo", "beta": 500},
}


@pytest.mark.parametrize("kind", ["sd", "flow"])
@pytest.mark.parametrize("method", list(METHODS))
def test_same_method_config_trains_unet_and_flow(method, kind, tmp_path, tiny_sd, tiny_sd3, tiny_clip, pairs_manifest):
    """One method block; only the `generator` block changes between the UNet and the flow model."""
    generator = (
        {"name": "sd", "pretrained": str(tiny_sd), "lora": {"rank": 4, "alpha": 4}}
        if kind == "sd"
        else {**SD3_BLOCK, "pretrained": str(tiny_sd3)}
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    data = (
        {"kind": "manifest", "path": str(pairs_manifest)}
        if method == "flow_dpo"
        else {"kind": "prompts", "prompts": str(prompts)}
    )
    p = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        generator=generator,
        method=METHODS[method],
        data=data,
        train={"steps": 2, "batch_size": 2, "lr": 1e-3},
    )
    tr = Trainer(load_config(p), run_dir=tmp_path / "run")
    before = {n: v.detach().clone() for n, v in tr.generator.trainable().named_parameters() if v.requires_grad}
    tr.fit()
    after = dict(tr.generator.trainable().named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all("lora" in n for n in changed)
    logs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(l["loss"]) for l in logs if "loss" in l)
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_toy_configs_validate():

    root = ROOT / "configs" / "toy"
    for name in ("flow_grpo", "flow_dpo", "diffusion_nft"):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.generator.name == "flow" and cfg.generator.args.pretrained.endswith("sd3_toy")


# ---------------------------------------------------------------- the shipped toy flow model


def test_shipped_sd3_toy_loads_in_diffusers_and_the_adapter():
    from diffusers import StableDiffusion3Pipeline

    from mmalign.toy import ASSETS as TOY_ASSETS

    path = TOY_ASSETS / "sd3_toy"
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder_2.dtype == torch.float32
    out = pipe(
        PROMPTS, num_inference_steps=4, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert out.images.shape == (2, 32, 32, 3)
    g = FlowMatchingGenerator(FlowGeneratorConfig(pretrained="toy:sd3_toy", finetune="none"))
    assert g.max_sequence_length == 256 and g.latent_shape == (4, 8, 8)  # the pipeline's default
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 17e6


def test_bf16_weights_and_gradient_checkpointing_train(tiny_sd3):
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    g = FlowMatchingGenerator(
        FlowGeneratorConfig(pretrained=str(tiny_sd3), lora=lora, dtype="bfloat16", max_sequence_length=4)
    )
    g.enable_gradient_checkpointing()
    g.trainable().train()
    assert g.vae.dtype == torch.bfloat16 and g.pipe.text_encoder.dtype == torch.bfloat16
    trained = [p for p in g.trainable().parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)  # LoRA weights train in float32
    ro = g.rollout(PROMPTS, num_steps=2, guidance_scale=2.0, eta=0.7)
    assert ro.log_probs.dtype == torch.float64 and torch.isfinite(ro.log_probs).all()
    err = g.denoise_error(
        ro.latents[:, -1], g.encode_prompt(PROMPTS), torch.tensor([200, 700]), torch.randn(2, 4, 8, 8)
    )
    err.mean().backward()
    assert err.dtype == torch.float32 and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


def test_guided_denoise_error_is_the_cfg_combination(gen):
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([250, 600])
    cond, uncond = gen.encode_prompt(PROMPTS), gen.encode_prompt(PROMPTS, negative=True)
    with torch.no_grad():
        got = gen.denoise_error(x0, cond, t, noise, uncond=uncond, guidance_scale=3.0)
        x_t, sig = gen.noisy(x0, t, noise)
        u = gen.model_output(x_t, sig.flatten() * 1000, uncond)
        c = gen.model_output(x_t, sig.flatten() * 1000, cond)
    want = ((u + 3.0 * (c - u)) - (noise - x0)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- inference-time guidance on flow models


def _mean_red(images, prompts):
    return (images[:, 0] - images[:, 2]).flatten(1).mean(1)


class _MeanRed:
    """A differentiable image 'reward': red minus blue."""

    modality, differentiable, name = "image", True, "mean_red"

    def __call__(self, samples, prompts):
        return _mean_red(samples.images, prompts)


@pytest.mark.parametrize("eta,sde_type", [(0.0, "flow_grpo"), (0.7, "flow_grpo"), (0.7, "dance_grpo")])
def test_guided_samplers_with_nothing_to_do_are_the_rollout_sampler(gen, eta, sde_type, monkeypatch):
    from mmalign.guidance import dynamic_cfg_sample, reward_guided_sample

    monkeypatch.setattr(gen.cfg, "sde_type", sde_type)

    ref = gen.rollout(PROMPTS, num_steps=4, guidance_scale=3.0, eta=eta, seeds=[3, 4], need_log_probs=False)
    dyn = dynamic_cfg_sample(gen, PROMPTS, _MeanRed(), candidates=[3.0], num_steps=4, seeds=[3, 4], eta=eta)
    rg = reward_guided_sample(gen, PROMPTS, [(_MeanRed(), 0.0)], guidance_scale=3.0, num_steps=4, seeds=[3, 4], eta=eta)
    for out in (dyn, rg):
        assert torch.equal(out.latents, ref.latents)
        assert torch.equal(out.samples.images, ref.samples.images)


def test_flow_hooks_are_the_rectified_flow_parameterisation(gen):
    steps = gen.sampling_timesteps(3)
    _, sigmas = gen.sampling_schedule(3)
    assert [round(t / gen.num_train_timesteps, 5) for t, _ in steps] == [round(s, 5) for s in sigmas[:3]]
    assert steps[-1][1] == 0.0
    t = steps[1][0]
    a, s = gen.alpha_sigma(t)
    assert a == pytest.approx(1 - sigmas[1]) and s == pytest.approx(sigmas[1])
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = a * x0 + s * eps
    torch.testing.assert_close(gen.predicted_x0(eps - x0, x_t, t), x0)  # the true velocity recovers x0
    with pytest.raises(ValueError, match="not on the grid"):
        gen.alpha_sigma(123.456)


def test_reward_guidance_on_a_flow_model_raises_its_reward(gen):
    from mmalign.guidance import reward_guided_sample

    kw = dict(guidance_scale=3.0, num_steps=6, seeds=[0, 1])
    base = reward_guided_sample(gen, PROMPTS, [(_MeanRed(), 0.0)], **kw)
    guided = reward_guided_sample(gen, PROMPTS, [(_MeanRed(), 500.0)], **kw)
    r0, r1 = _mean_red(base.samples.images, PROMPTS), _mean_red(guided.samples.images, PROMPTS)
    assert (r1 > r0 + 0.002).all(), (r0.tolist(), r1.tolist())  # a small rise on the tiny random VAE
    assert guided.extras["guidance_norm"][:, 0].eq(0).all()  # sigma = 1: unguided
    anti = reward_guided_sample(gen, PROMPTS, [(_MeanRed(), -500.0)], **kw)  # the sign matters
    assert (_mean_red(anti.samples.images, PROMPTS) < r0 - 0.002).all()


def test_guidance_refuses_a_guidance_distilled_flux(flux):
    from mmalign.guidance import reward_guided_sample

    if not flux.distilled_guidance:
        flux.distilled_guidance, restore = True, True
    else:
        restore = False
    try:
        with pytest.raises(ValueError, match="guidance-distilled"):
            reward_guided_sample(flux, PROMPTS, [(_MeanRed(), 1.0)], num_steps=2)
    finally:
        if restore:
            flux.distilled_guidance = False


@pytest.mark.parametrize("which", ["tiny_sd3", "tiny_flux"])
def test_a_resolution_the_latent_patches_cannot_tile_is_refused(which, request):
    """A resolution that is not a multiple of the VAE's downsampling x the patch size is one line at load."""
    from mmalign.config import ConfigError

    path = request.getfixturevalue(which)
    with pytest.raises(ConfigError, match=r"generator\.resolution: 33 is not a multiple of \d+"):
        FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(path), resolution=33))
