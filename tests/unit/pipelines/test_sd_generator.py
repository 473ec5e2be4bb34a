import math

import pytest
import torch

from mmalign.pipelines.sd import LatentDiffusionGenerator, LoraSettings, SDGeneratorConfig
from mmalign.testing import make_tiny_sd, make_tiny_sdxl


@pytest.fixture(scope="module")
def gen(tiny_sd):
    torch.manual_seed(0)
    g = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), lora=LoraSettings(rank=4, alpha=4)))
    with torch.no_grad():  # make LoRA non-trivial so the reference differs from the policy
        for p in g.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return g


def test_rollout_log_probs_are_the_scheduler_gaussian(gen):
    """Stored log-probs equal log N(x_{t-1}; mean, var) with diffusers' own DDIM step, averaged
    over latent dimensions as ddpo-pytorch's ddim_step_with_logprob does."""
    from diffusers import DDIMScheduler

    prompts = ["a red circle", "two blue squares"]
    ro = gen.rollout(prompts, num_steps=4, guidance_scale=3.0, eta=1.0, seeds=[3, 4])
    assert ro.latents.shape == (2, 5, 4, 8, 8) and ro.log_probs.shape == (2, 4)
    assert ro.samples.images.shape == (2, 3, 32, 32)
    sched = DDIMScheduler.from_config(gen.scheduler.config)
    sched.set_timesteps(4)
    for k, t in enumerate(sched.timesteps):
        x, x_next = ro.latents[:, k].double(), ro.latents[:, k + 1].double()
        with torch.no_grad():
            eps = gen.guided_eps(x.float(), t, ro.extras["cond"], ro.extras["uncond"], 3.0).double()
        prev_t = int(t) - sched.config.num_train_timesteps // 4
        var = sched._get_variance(int(t), prev_t).double()
        std = var.sqrt()
        # diffusers' step with zero variance noise returns the mean
        mean = sched.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample.double()
        per_dim = -((x_next - mean) ** 2) / (2 * var) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
        want = per_dim.flatten(1).mean(1)
        assert ro.log_probs.dtype == torch.float64
        torch.testing.assert_close(ro.log_probs[:, k], want, rtol=1e-6, atol=1e-5)


def test_step_log_prob_recomputes_the_stored_one(gen):
    ro = gen.rollout(["a red circle", "a green square"], num_steps=3, guidance_scale=2.0, eta=0.8)
    for k in range(3):
        with torch.no_grad():
            lp = gen.step_log_prob(ro, k)
        torch.testing.assert_close(lp, ro.log_probs[:, k], rtol=1e-6, atol=1e-5)
        with torch.no_grad(), gen.reference():
            ref = gen.step_log_prob(ro, k)
        assert not torch.allclose(ref, lp)  # adapters disabled -> a different policy


def test_eta_zero_is_rejected_when_log_probs_are_needed(gen):
    with pytest.raises(ValueError, match="eta=0"):
        gen.rollout(["a red circle"], num_steps=2, eta=0.0)
    ro = gen.rollout(["a red circle"], num_steps=2, eta=0.0, need_log_probs=False)
    assert ro.log_probs is None


def test_sde_steps_leave_the_other_steps_deterministic_ddim(gen):
    """rollout(sde_steps=...): the listed steps are the full rollout's, bit for bit, the others DDIM at
    eta 0 (as the eta=0 rollout takes them) with NaN log-probs, and only SDE steps can be scored."""
    prompts = ["a red circle", "a green square"]
    full = gen.rollout(prompts, num_steps=4, guidance_scale=2.0, eta=1.0, seeds=[1, 2])
    mixed = gen.rollout(prompts, num_steps=4, guidance_scale=2.0, eta=1.0, seeds=[1, 2], sde_steps=[1])
    ode = gen.rollout(prompts, num_steps=4, guidance_scale=2.0, eta=0.0, seeds=[1, 2], need_log_probs=False)
    assert torch.equal(mixed.latents[:, :2], ode.latents[:, :2])  # step 0 deterministic
    torch.testing.assert_close(mixed.log_probs[:, 1], gen.step_log_prob(mixed, 1).detach(), rtol=1e-6, atol=1e-5)
    assert mixed.log_probs[:, [0, 2, 3]].isnan().all() and mixed.log_probs[:, 1].isfinite().all()
    assert not torch.equal(mixed.latents[:, 2], ode.latents[:, 2])  # step 1 stochastic
    assert not torch.equal(mixed.latents[:, -1], full.latents[:, -1])
    with pytest.raises(ValueError, match="step 0 of this rollout is deterministic"):
        gen.step_log_prob(mixed, 0)


def test_rollout_is_per_sample_deterministic(gen):
    a = gen.rollout(["a red circle", "a blue square"], num_steps=2, seeds=[5, 6]).latents
    b = gen.rollout(["a blue square"], num_steps=2, seeds=[6]).latents
    torch.testing.assert_close(a[1:], b)


def test_encode_images_draws_from_the_vae_posterior(gen):
    """Training latents are posterior draws (as the denoiser was trained), not the mean:
    (mean + std * eps) * scaling_factor with eps from the sample's salted seed."""
    from mmalign.pipelines.common import VAE_SALT
    from mmalign.types import per_sample_randn

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dist = gen.vae.encode(images * 2 - 1).latent_dist
    eps = per_sample_randn([s * 1_000_003 + VAE_SALT for s in (4, 4, 9)], dist.mean.shape[1:])
    expect = (dist.mean + dist.std * eps) * gen.vae.config.scaling_factor
    got = gen.encode_images(images, [4, 4, 9])
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(gen.encode_images(images[2:], [9]), got[2:])  # per-sample, batch-independent
    assert (dist.std > 1e-3).all()  # the draw is not the mean
    assert not torch.allclose(gen.encode_images(images, [5, 5, 5]), got)
    gen.cfg.vae_latents = "mean"
    try:
        torch.testing.assert_close(gen.encode_images(images, [4, 4, 9]), dist.mean * gen.vae.config.scaling_factor)
    finally:
        gen.cfg.vae_latents = "sample"


def test_reference_disables_lora(gen):
    x0 = torch.randn(2, 4, 8, 8)
    cond = gen.encode_prompt(["a", "b"])
    t, noise = torch.tensor([100, 900]), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        pol = gen.denoise_error(x0, cond, t, noise)
        with gen.reference():
            ref = gen.denoise_error(x0, cond, t, noise)
        again = gen.denoise_error(x0, cond, t, noise)
    assert not torch.allclose(pol, ref)
    torch.testing.assert_close(pol, again)


def test_full_finetune_keeps_a_frozen_copy(tiny_sd):
    g = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd), finetune="full"))
    assert all(p.requires_grad for p in g.trainable().parameters())
    with torch.no_grad():
        next(iter(g.trainable().parameters())).add_(1.0)
    x0, cond = torch.randn(1, 4, 8, 8), g.encode_prompt(["a"])
    t, noise = torch.tensor([500]), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        pol = g.denoise_error(x0, cond, t, noise)
        with g.reference():
            ref = g.denoise_error(x0, cond, t, noise)
    assert not torch.allclose(pol, ref)


def test_sdxl_conditioning_and_rollout(tmp_path):
    path = make_tiny_sdxl(tmp_path / "sdxl")
    g = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(path), lora=LoraSettings(rank=2, alpha=2)))
    assert g.is_xl
    cond = g.encode_prompt(["a red circle", "a blue square"])
    assert cond["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    err = g.denoise_error(torch.randn(2, 4, 8, 8), cond, torch.tensor([1, 999]), torch.randn(2, 4, 8, 8))
    err.sum().backward()
    assert any(p.grad is not None for p in g.trainable().parameters() if p.requires_grad)
    ro = g.rollout(["a red circle"], num_steps=2, guidance_scale=3.0)
    assert torch.isfinite(ro.log_probs).all()


def test_v_prediction_model(tmp_path):
    path = make_tiny_sd(tmp_path / "sdv", prediction_type="v_prediction")
    g = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(path)))
    assert g.prediction_type == "v_prediction"
    ro = g.rollout(["a"], num_steps=2)
    assert torch.isfinite(ro.log_probs).all()


def test_lora_save_is_diffusers_format_and_loads(gen, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = gen.save_trained(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(
        gen.cfg.pretrained, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(out)
    fresh = LatentDiffusionGenerator(
        SDGeneratorConfig(pretrained=gen.cfg.pretrained, lora=LoraSettings(rank=4, alpha=4))
    )
    fresh.load_trained(out)
    for (n, a), b in zip(gen.trainable_state_dict().items(), fresh.trainable_state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from mmalign.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"generator\.pretrained: directory .*nope not found"):
        config_from_dict(
            {"generator": {"name": "sd", "pretrained": str(tmp_path / "nope")}, "method": {"name": "diffusion_dpo"}}
        )


def test_guided_denoise_error_is_the_cfg_combination(gen):
    """denoise_error(..., uncond, s) scores u + s (c - u) with gradients through both branches."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, *gen.latent_shape, generator=g)
    noise = torch.randn(2, *gen.latent_shape, generator=g)
    t = torch.tensor([100, 700])
    cond, uncond = gen.encode_prompt(["a red circle", "two blue squares"]), gen.encode_prompt(["", ""], negative=True)
    with torch.no_grad():
        x_t = gen.train_scheduler.add_noise(x0, noise, t)
        c, u = gen.model_output(x_t, t, cond), gen.model_output(x_t, t, uncond)
        want = (u.double() + 3.0 * (c.double() - u.double()) - noise.double()).pow(2).flatten(1).mean(1)
        got = gen.denoise_error(x0, cond, t, noise, uncond=uncond, guidance_scale=3.0)
        plain = gen.denoise_error(x0, cond, t, noise, uncond=uncond, guidance_scale=1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        plain.double(), (c.double() - noise.double()).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-6
    )
