"""The Wan text-to-video generator (pipelines/wan.py) on a tiny random WanPipeline saved and
loaded like a user's: its sampler against WanPipeline.__call__ and an independent float64
Gaussian, the flow-matching error on 5-D latents, LoRA in diffusers' Wan format, gradient
checkpointing and the frame-count rule."""

import math

import pytest
import torch

from mmalign.config import ConfigError
from mmalign.pipelines.common import LoraSettings
from mmalign.pipelines.wan import WAN_LORA_TARGETS, WanGenerator, WanGeneratorConfig, check_wan_variant
from mmalign.testing import make_tiny_wan

PROMPTS = ["a red ball moving left", "two blue squares"]


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    return make_tiny_wan(tmp_path_factory.mktemp("models") / "wan")


def _cfg(path, **kw):
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(WAN_LORA_TARGETS))
    kw = {"num_frames": 5, "resolution": 32, "max_sequence_length": 8, **kw}
    return WanGeneratorConfig(pretrained=str(path), lora=lora, **kw)


def _perturb(gen, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return gen


@pytest.fixture(scope="module")
def gen(tiny_wan):
    torch.manual_seed(0)
    return _perturb(WanGenerator(_cfg(tiny_wan)))


def test_loads_with_5d_latents_and_lora_on_both_attentions(gen):
    assert gen.modality == "video" and gen.latent_shape == (4, 2, 4, 4)  # 5 frames -> 2 latent frames
    names = [n for n, p in gen.trainable().named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any("attn1.to_q" in n for n in names) and any("attn2.to_out.0" in n for n in names)
    assert not any("ffn" in n for n in names)


def _independent_step(v, x, sigma, sigma_next, sigma_max, a, sde_type):
    v, x = v.double(), x.double()
    dt = sigma_next - sigma
    if sde_type == "dance_grpo":
        s = a
    else:
        s = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    return x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, s * math.sqrt(-dt)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo"])
def test_rollout_log_probs_are_an_independent_gaussian_and_step_log_prob_recomputes_them(gen, sde_type, monkeypatch):
    monkeypatch.setattr(gen.cfg, "sde_type", sde_type)
    a, steps, scale = 0.7, 3, 3.0
    ro = gen.rollout(PROMPTS, num_steps=steps, guidance_scale=scale, eta=a, seeds=[3, 4])
    assert ro.latents.shape == (2, steps + 1, 4, 2, 4, 4) and ro.log_probs.shape == (2, steps)
    assert ro.samples.video.shape == (2, 5, 3, 32, 32) and ro.samples.images is None
    assert 0 <= float(ro.samples.video.min()) and float(ro.samples.video.max()) <= 1
    _, sigmas = gen.sampling_schedule(steps)
    for k in range(steps):
        x, x_next = ro.latents[:, k], ro.latents[:, k + 1]
        with torch.no_grad():
            v = gen.guided_velocity(x, ro.timesteps[k], ro.extras["cond"], ro.extras["uncond"], scale)
        mean, std = _independent_step(v, x, sigmas[k], sigmas[k + 1], sigmas[1], a, sde_type)
        want = torch.distributions.Normal(mean, std).log_prob(x_next.double()).flatten(1).mean(1)
        torch.testing.assert_close(ro.log_probs[:, k], want, rtol=1e-6, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(gen.step_log_prob(ro, k), ro.log_probs[:, k], rtol=0, atol=1e-5)


def _pipe_latents(pipe, x_T, steps=4, scale=3.0, output_type="latent"):
    with torch.no_grad():
        return pipe(
            PROMPTS,
            num_frames=5,
            height=32,
            width=32,
            num_inference_steps=steps,
            guidance_scale=scale,
            latents=x_T.clone(),
            output_type=output_type,
            max_sequence_length=8,
        ).frames


def test_ode_path_is_wan_pipeline_call(gen):
    x_T = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    ro = gen.rollout(PROMPTS, num_steps=4, guidance_scale=3.0, eta=0.0, latents=x_T, need_log_probs=False)
    torch.testing.assert_close(ro.latents[:, -1], _pipe_latents(gen.pipe, x_T), rtol=0, atol=1e-5)
    video = _pipe_latents(gen.pipe, x_T, output_type="pt")  # B,F,3,H,W in [0, 1]
    torch.testing.assert_close(ro.samples.video, video, rtol=0, atol=1e-5)


def test_denoise_error_is_the_flow_matching_error_on_5d_latents(gen):
    x0 = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([100, 700])
    cond = gen.encode_prompt(PROMPTS)
    got = gen.denoise_error(x0, cond, t, noise)
    # independent: logit-normal quantile, then the scheduler's shift, in float64
    u = (t.double() + 0.5) / 1000
    u = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u))
    shift = gen.pipe.scheduler.config.shift
    sigma = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1, 1)
    x_t = ((1 - sigma) * x0.double() + sigma * noise.double()).float()
    with torch.no_grad():
        v = gen.transformer(
            hidden_states=x_t,
            timestep=(sigma.flatten() * 1000).float(),
            encoder_hidden_states=cond["encoder_hidden_states"],
        )[0].double()
    want = (v - (noise.double() - x0.double())).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    got.sum().backward()  # differentiable into the LoRA weights
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.trainable().parameters() if p.requires_grad)
    gen.trainable().zero_grad(set_to_none=True)


def test_lora_save_then_pipeline_load_lora_weights_gives_the_same_outputs(gen, tmp_path):
    from diffusers import WanPipeline

    out = gen.save_trained(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    x_T = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    ro = gen.rollout(PROMPTS, num_steps=3, guidance_scale=3.0, eta=0.0, latents=x_T, need_log_probs=False)
    pipe = WanPipeline.from_pretrained(gen.cfg.pretrained)
    pipe.set_progress_bar_config(disable=True)
    base = _pipe_latents(pipe, x_T, steps=3)
    pipe.load_lora_weights(out)
    loaded = _pipe_latents(pipe, x_T, steps=3)
    torch.testing.assert_close(loaded, ro.latents[:, -1], rtol=0, atol=1e-5)
    assert (base - loaded).abs().max() > 1e-3  # the LoRA changes the samples
    # and the generator reads its own format back
    fresh = WanGenerator(_cfg(gen.cfg.pretrained))
    fresh.load_trained(out)
    ro2 = fresh.rollout(PROMPTS, num_steps=3, guidance_scale=3.0, eta=0.0, latents=x_T, need_log_probs=False)
    torch.testing.assert_close(ro2.latents[:, -1], ro.latents[:, -1], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_wan):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        g = _perturb(WanGenerator(_cfg(tiny_wan)))
        if ckpt:
            g.enable_gradient_checkpointing()
        g.trainable().train()
        x0 = torch.randn(2, *g.latent_shape, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(2, *g.latent_shape, generator=torch.Generator().manual_seed(2))
        g.denoise_error(x0, g.encode_prompt(PROMPTS), torch.tensor([300, 800]), noise).sum().backward()
        grads.append({n: p.grad.clone() for n, p in g.trainable().named_parameters() if p.requires_grad})
        assert g.transformer.gradient_checkpointing == ckpt
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [4, 6, 32])
def test_num_frames_not_4k_plus_1_is_refused_in_one_line_at_load(tiny_wan, tmp_path, n):
    import yaml

    from mmalign.config import load_config

    p = tmp_path / "c.yaml"
    cfg = {
        "run": {"name": "t"},
        "generator": {"name": "wan", "pretrained": str(tiny_wan), "num_frames": n, "resolution": 32},
        "method": {"name": "grpo"},
        "reward": {"name": "video_motion"},
    }
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=rf"generator\.num_frames: {n} is not 4k\+1") as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_wan22_two_expert_and_ti2v_pipelines_are_refused():
    with pytest.raises(ConfigError, match="two-expert"):
        check_wan_variant({"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.875}, "x")
    with pytest.raises(ConfigError, match="expand_timesteps"):
        check_wan_variant({"transformer_2": [None, None], "expand_timesteps": True}, "x")
    check_wan_variant({"transformer_2": [None, None], "boundary_ratio": None}, "x")  # Wan 2.1: fine


def test_encode_then_decode_roundtrips_the_latent_normalisation(gen):
    x0 = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(3)) * 0.5
    video = gen.decode(x0).video
    assert video.shape == (1, 5, 3, 32, 32)
    gen.cfg.vae_latents = "mean"
    try:
        z = gen.encode_images(video)
    finally:
        gen.cfg.vae_latents = "sample"
    # normalised like WanPipeline: (z - latents_mean) / latents_std, shape C,F_lat,h,w
    assert z.shape == x0.shape
    raw = gen.vae.encode(video.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean
    mean = torch.tensor(gen.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(gen.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_video_motion_rule_reward_is_the_mean_frame_difference():
    from mmalign.rewards.rules import VideoMotion
    from mmalign.types import Samples

    video = torch.rand(2, 3, 3, 4, 4, dtype=torch.float64)
    want = torch.stack([(v[1:] - v[:-1]).abs().mean() for v in video]).float()
    torch.testing.assert_close(VideoMotion()(Samples(video=video.float())), want)
    torch.testing.assert_close(VideoMotion(-1.0)(Samples(video=video.float())), -want)
    still = video[:, :1].expand(2, 3, 3, 4, 4).float()
    assert VideoMotion()(Samples(video=still)).abs().max() == 0
    with pytest.raises(TypeError, match="scores video samples, but got image samples"):
        VideoMotion()(Samples(images=torch.rand(2, 3, 4, 4)))


def test_wan_plays_the_diffusion_and_guidable_generator_roles(gen):
    from mmalign.protocols import DiffusionGenerator, GuidableGenerator

    assert isinstance(gen, DiffusionGenerator) and isinstance(gen, GuidableGenerator)


def test_video_step_benchmark_row_on_the_tiny_model(tiny_wan):
    """benchmarks/video_step.py: one timed LoRA step (denoise_error + backward + AdamW) per row."""
    import argparse
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("video_step", ROOT / "benchmarks" / "video_step.py")
    vs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs)
    args = argparse.Namespace(
        pretrained=str(tiny_wan),
        device="cpu",
        dtype="float32",
        num_frames=9,
        height=32,
        width=32,
        batch=1,
        rank=4,
        max_sequence_length=8,
        steps=1,
    )
    for ckpt in (False, True):
        row = vs.run_row(args, ckpt)
        assert row["gradient_checkpointing"] == ckpt and row["latent_shape"] == [4, 3, 4, 4]
        assert row["frames_per_s"] == pytest.approx(9 / row["s_per_step"]) and row["peak_mem_mb"] > 0


def test_released_unipc_scheduler_gives_its_grid_and_its_flow_shift_for_training(tmp_path):
    """Released Wan checkpoints ship UniPC with flow sigmas: the samplers walk its grid (single
    Euler / SDE steps) and the training sigmas use its flow_shift."""
    from diffusers import UniPCMultistepScheduler

    path = make_tiny_wan(tmp_path / "wan_unipc", flow_shift=5.0, scheduler="unipc")
    g = WanGenerator(_cfg(path))
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    ref.set_timesteps(6)
    timesteps, sigmas = g.sampling_schedule(6)
    assert torch.equal(timesteps, ref.timesteps) and sigmas[1:] == [float(s) for s in ref.sigmas[1:]]
    # its first sigma is 0.999999 in float32: taken as 1 (else Flow-GRPO's sigma_t would be ~1000 eta)
    assert float(ref.sigmas[0]) == pytest.approx(1.0, abs=1e-5) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    ro = g.rollout(PROMPTS, num_steps=3, guidance_scale=1.0, eta=0.7, seeds=[0, 1])
    assert ro.latents.abs().max() < 20 and torch.isfinite(ro.log_probs).all()
    u = 0.5  # t = 499.5 / 1000 is the median of the logit-normal density: sigma = shift(0.5)
    assert float(g.train_sigmas(torch.tensor([499]))) == pytest.approx(5.0 * u / (1 + 4.0 * u), abs=1e-3)
    ro = g.rollout(PROMPTS, num_steps=3, guidance_scale=1.0, eta=0.0, seeds=[0, 1], need_log_probs=False)
    x, (ts, sg) = ro.latents, g.sampling_schedule(3)
    with torch.no_grad():
        v = g.model_output(x[:, 0], ts[0], ro.extras["cond"])
    torch.testing.assert_close(x[:, 1], x[:, 0] + (sg[1] - sg[0]) * v, rtol=0, atol=1e-6)  # an Euler step


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_zero_padded_text_tokens_run_as_one_with_the_same_velocities(tiny_wan, finetune):
    """512-style zero padding: the cut text states with the log(n) logit give the stock
    processor's velocities on all 32 positions, for the policy and the frozen reference."""
    torch.manual_seed(0)
    on = _perturb(WanGenerator(_cfg(tiny_wan, finetune=finetune, max_sequence_length=32)))
    torch.manual_seed(0)
    off = _perturb(WanGenerator(_cfg(tiny_wan, finetune=finetune, max_sequence_length=32)))
    off.cross_attn = None
    for b in off.transformer.blocks:  # the stock processor
        b.attn2.set_processor(type(on.cross_attn.stock)())
    x = torch.randn(2, *on.latent_shape, generator=torch.Generator().manual_seed(5))
    cond = on.encode_prompt(PROMPTS)
    assert cond["encoder_hidden_states"].shape[1] == 32
    t = torch.tensor([700.0, 200.0])
    with torch.no_grad():
        torch.testing.assert_close(on.model_output(x, t, cond), off.model_output(x, t, cond), rtol=0, atol=1e-5)
        with on.reference(), off.reference():
            torch.testing.assert_close(on.model_output(x, t, cond), off.model_output(x, t, cond), rtol=0, atol=1e-5)
    from mmalign.pipelines.wan import cut_zero_tokens

    assert cut_zero_tokens(cond["encoder_hidden_states"]).shape[1] < 12  # the real tokens + 1 of 32


def test_bfloat16_frozen_weights_with_float32_lora(tiny_wan):
    """dtype: bfloat16 keeps the frozen transformer and text encoder in bf16 and the VAE and LoRA in
    float32; velocities stay close to the float32 model's and the LoRA gets gradients."""
    torch.manual_seed(0)
    g16 = WanGenerator(_cfg(tiny_wan, dtype="bfloat16"))
    torch.manual_seed(0)
    g32 = WanGenerator(_cfg(tiny_wan))
    assert g16.pipe.text_encoder.dtype == torch.bfloat16 and g16.vae.dtype == torch.float32
    # the VAE is loaded in float32, not rounded through bf16
    assert all(torch.equal(a, b) for a, b in zip(g16.vae.parameters(), g32.vae.parameters()))
    frozen = [p for p in g16.transformer.parameters() if not p.requires_grad]
    trained = [p for p in g16.transformer.parameters() if p.requires_grad]
    assert {p.dtype for p in trained} == {torch.float32} and torch.bfloat16 in {p.dtype for p in frozen}
    x = torch.randn(2, *g16.latent_shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([600.0, 300.0])
    v16 = g16.model_output(x, t, g16.encode_prompt(PROMPTS))
    with torch.no_grad():
        v32 = g32.model_output(x, t, g32.encode_prompt(PROMPTS))
    assert v16.dtype == torch.float32 and (v16.detach() - v32).abs().max() < 0.1 * v32.abs().max()
    v16.pow(2).mean().backward()
    assert all(p.grad is not None for p in trained)
