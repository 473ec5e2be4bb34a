"""Stable Audio Open adapter (pipelines/stable_audio.py) on a tiny random StableAudioPipeline."""

import math
import warnings

import pytest
import torch

from mmalign.pipelines.common import LoraSettings
from mmalign.pipelines.stable_audio import StableAudioGenerator, StableAudioGeneratorConfig
from mmalign.testing import make_tiny_stable_audio

PROMPTS = ["a dog barks", "rain on a roof"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchsde's Brownian-interval endpoint notes


@pytest.fixture(scope="module")
def tiny_stable_audio(tmp_path_factory):
    return make_tiny_stable_audio(tmp_path_factory.mktemp("models") / "stable_audio")


def _gen(path, **kw):
    torch.manual_seed(0)
    g = StableAudioGenerator(StableAudioGeneratorConfig(pretrained=str(path), lora=LoraSettings(rank=4, alpha=4), **kw))
    with torch.no_grad():  # non-trivial LoRA: the reference differs from the policy
        for p in g.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return g


@pytest.fixture(scope="module")
def gen(tiny_stable_audio):
    return _gen(tiny_stable_audio)


def test_eta_zero_is_the_pipelines_own_sampler(gen):
    """eta=0 without log-probs runs the pipeline's scheduler (SDE-DPM-Solver++(2M), Brownian noise
    seeded per sample): the same latents as StableAudioPipeline on the same x_T and generators."""
    x_T = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(1))
    ro = gen.rollout(PROMPTS, num_steps=4, guidance_scale=3.0, eta=0.0, latents=x_T, seeds=[5, 6], need_log_probs=False)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    want = gen.pipe(
        PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=x_T, generator=gens, output_type="latent"
    ).audios
    torch.testing.assert_close(ro.latents[:, -1], want, rtol=1e-5, atol=1e-5)
    wav = gen.pipe(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        latents=x_T,
        generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
        output_type="pt",
    ).audios
    torch.testing.assert_close(ro.samples.audio, wav.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    assert ro.samples.sample_rate == 64 and ro.log_probs is None


def test_stochastic_step_log_probs_against_float64_and_the_scheduler(gen):
    """The stored log-probs are the Gaussian log-density (float64, per-dimension mean) of the step
    whose eta=1 mean is diffusers' first-order update, dpm_solver_first_order_update with zero noise,
    and whose std is sigma_t sqrt(1 - sigma_t^2 / sigma_s^2); step_log_prob recomputes them."""
    from diffusers import CosineDPMSolverMultistepScheduler

    ro = gen.rollout(PROMPTS, num_steps=3, guidance_scale=2.0, eta=1.0, seeds=[3, 4])
    assert ro.latents.shape == (2, 4, 4, 64) and ro.log_probs.shape == (2, 3)
    sched = CosineDPMSolverMultistepScheduler.from_config(gen.pipe.scheduler.config)
    sched.set_timesteps(3)
    sig = sched.sigmas.double().tolist()
    sig[-1] = 0.01  # sde_final_sigma
    for k in range(3):
        x, x_next = ro.latents[:, k], ro.latents[:, k + 1].double()
        with torch.no_grad():
            inp = torch.cat([x, x]) / math.sqrt(sig[k] ** 2 + 1)
            u = torch.tensor(math.atan(sig[k]) * 2 / math.pi)
            un, co = gen.model_output(inp, u, gen.cat_cond(ro.extras["uncond"], ro.extras["cond"])).chunk(2)
            out = un + 2.0 * (co - un)
        x0 = sched.precondition_outputs(x.double(), out.double(), sig[k])
        sched._step_index = k
        sched.sigmas = torch.tensor(sig, dtype=torch.float64)
        mean = sched.dpm_solver_first_order_update(x0, sample=x.double(), noise=torch.zeros_like(x0))
        var = sig[k + 1] ** 2 * (1 - sig[k + 1] ** 2 / sig[k] ** 2)
        per_dim = -((x_next - mean) ** 2) / (2 * var) - 0.5 * math.log(var) - 0.5 * math.log(2 * math.pi)
        assert ro.log_probs.dtype == torch.float64
        torch.testing.assert_close(ro.log_probs[:, k], per_dim.flatten(1).mean(1), rtol=1e-6, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(gen.step_log_prob(ro, k), ro.log_probs[:, k], rtol=1e-6, atol=1e-6)
            with gen.reference():
                assert not torch.allclose(gen.step_log_prob(ro, k), ro.log_probs[:, k])
    with pytest.raises(ValueError, match="eta=0"):
        gen.rollout(PROMPTS, num_steps=2, eta=0.0)


def test_denoise_error_is_the_v_objective_of_the_schedulers_parameterisation(gen):
    """At u = (t+1)/1000: the network input is the scheduler's c_in x for x = x0 + tan(u pi/2) n,
    and the target v is the output for which the scheduler's precondition_outputs returns x0."""
    x0 = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(5))
    noise = torch.randn_like(x0)
    t = torch.tensor([99, 699])
    cond = gen.encode_prompt(PROMPTS)
    with torch.no_grad():
        err = gen.denoise_error(x0, cond, t, noise)
    u = (t.double() + 1) / 1000
    sigma = torch.tan(u * math.pi / 2).view(2, 1, 1)
    x_ve = x0.double() + sigma * noise.double()
    inp = gen.pipe.scheduler.precondition_inputs(x_ve, sigma)
    with torch.no_grad():
        out = gen.model_output(inp.float(), u.float(), cond).double()
    a, s = torch.cos(u * math.pi / 2).view(2, 1, 1), torch.sin(u * math.pi / 2).view(2, 1, 1)
    v = a * noise.double() - s * x0.double()
    torch.testing.assert_close(gen.pipe.scheduler.precondition_outputs(x_ve, v, sigma), x0.double())
    torch.testing.assert_close(err.double(), (out - v).pow(2).flatten(1).mean(1), rtol=1e-4, atol=1e-6)
    x0_hat, _ = gen.predict_x0(x0, cond, t, noise)
    torch.testing.assert_close(
        x0_hat.double(), gen.pipe.scheduler.precondition_outputs(x_ve, out, sigma), rtol=1e-4, atol=1e-4
    )


def test_duration_conditions_and_crops(tiny_stable_audio):
    g = _gen(tiny_stable_audio, audio_end_in_s=2.0)
    ro = g.rollout(PROMPTS[:1], num_steps=2, guidance_scale=1.0, eta=1.0)
    assert ro.samples.audio.shape == (1, 2, 128)
    full = _gen(tiny_stable_audio)
    a, b = g.encode_prompt(PROMPTS[:1]), full.encode_prompt(PROMPTS[:1])
    assert not torch.allclose(a["global_hidden_states"], b["global_hidden_states"])  # seconds_total differs
    with pytest.raises(ValueError, match="maximum"):
        _gen(tiny_stable_audio, audio_end_in_s=5.0)


def test_lora_round_trip_through_the_pipeline(gen, tmp_path, tiny_stable_audio):
    """save_trained writes a peft LoRA; injected into StableAudioPipeline's transformer it gives the
    adapter's samples, and a fresh generator loads it back."""
    from diffusers import StableAudioPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    out = gen.save_trained(tmp_path / "lora")
    x_T = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(2))
    ours = gen.rollout(PROMPTS[:1], num_steps=2, guidance_scale=1.0, eta=0.0, latents=x_T, need_log_probs=False)
    pipe = StableAudioPipeline.from_pretrained(tiny_stable_audio)
    pipe.set_progress_bar_config(disable=True)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(out)), pipe.transformer)
    set_peft_model_state_dict(pipe.transformer, load_file(str(out / "adapter_model.safetensors")))
    want = pipe(
        PROMPTS[:1],
        num_inference_steps=2,
        guidance_scale=1.0,
        latents=x_T,
        generator=[torch.Generator().manual_seed(0)],
        output_type="latent",
    ).audios
    torch.testing.assert_close(ours.latents[:, -1], want, rtol=1e-5, atol=1e-5)
    for finetune in ("lora", "none"):
        fresh = StableAudioGenerator(
            StableAudioGeneratorConfig(
                pretrained=str(tiny_stable_audio), finetune=finetune, lora=LoraSettings(rank=4, alpha=4)
            )
        )
        fresh.load_trained(out)
        again = fresh.rollout(PROMPTS[:1], num_steps=2, guidance_scale=1.0, eta=0.0, latents=x_T, need_log_probs=False)
        torch.testing.assert_close(again.latents, ours.latents, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_stable_audio):
    grads = []
    for ckpt in (False, True):
        g = _gen(tiny_stable_audio)
        if ckpt:
            g.enable_gradient_checkpointing()
        g.trainable().train()
        x0 = torch.randn(2, *g.latent_shape, generator=torch.Generator().manual_seed(3))
        err = g.denoise_error(x0, g.encode_prompt(PROMPTS), torch.tensor([50, 900]), torch.randn_like(x0))
        err.sum().backward()
        grads.append({n: p.grad.clone() for n, p in g.trainable().named_parameters() if p.requires_grad})
    assert grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_bfloat16_frozen_weights_sample(tiny_stable_audio):
    g = StableAudioGenerator(StableAudioGeneratorConfig(pretrained=str(tiny_stable_audio), dtype="bfloat16"))
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore")
        ro = g.rollout(PROMPTS[:1], num_steps=2, guidance_scale=2.0, eta=1.0)
    assert torch.isfinite(ro.log_probs).all() and torch.isfinite(ro.samples.audio).all()


def test_reencoding_clips_is_the_oobleck_posterior_of_the_padded_waveform(gen):
    """encode_images places each clip at audio_start_in_s in a zero waveform of the model's length
    (as the pipeline prepares initial_audio_waveforms) and draws from the VAE posterior per seed."""
    ro = gen.rollout(PROMPTS, num_steps=2, guidance_scale=1.0, eta=1.0, seeds=[1, 2])
    z = gen.encode_images(ro.samples.audio, [5, 5])
    assert z.shape == ro.latents[:, -1].shape
    torch.testing.assert_close(z, gen.encode_images(ro.samples.audio, [5, 5]))  # seeded
    full = torch.zeros(2, 2, 64 * 4)
    full[:, :, : ro.samples.audio.shape[-1]] = ro.samples.audio
    with torch.no_grad():
        dist = gen.vae.encode(full).latent_dist
    from mmalign.types import per_sample_randn

    eps = per_sample_randn([5 * 1_000_003 + 7919] * 2, z.shape[1:])
    torch.testing.assert_close(z, dist.mean + dist.std * eps, rtol=1e-5, atol=1e-5)
    mono = gen.encode_images(ro.samples.audio.mean(1, keepdim=True), [5, 5])
    assert mono.shape == z.shape
