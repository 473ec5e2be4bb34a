"""AudioLDM adapter (pipelines/audioldm.py) on a tiny random AudioLDMPipeline."""

import math

import pytest
import torch

from mmalign.pipelines.audioldm import AudioLDMGenerator, AudioLDMGeneratorConfig
from mmalign.pipelines.common import LoraSettings
from mmalign.testing import make_tiny_audioldm

PROMPTS = ["a dog barks", "rain on a roof"]


@pytest.fixture(scope="module")
def tiny_audioldm(tmp_path_factory):
    return make_tiny_audioldm(tmp_path_factory.mktemp("models") / "audioldm")


def _gen(path, **kw):
    torch.manual_seed(0)
    g = AudioLDMGenerator(AudioLDMGeneratorConfig(pretrained=str(path), lora=LoraSettings(rank=4, alpha=4), **kw))
    with torch.no_grad():  # non-trivial LoRA: the reference differs from the policy
        for p in g.trainable().parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return g


@pytest.fixture(scope="module")
def gen(tiny_audioldm):
    return _gen(tiny_audioldm)


def test_duration_sets_the_latent_length_as_the_pipeline_does(tiny_audioldm):
    g = _gen(tiny_audioldm, audio_length_in_s=0.05)
    # 16 samples per mel frame at 16 kHz: int(0.05 / 0.001) = 50 frames -> 50 (multiple of 2) -> 25 latent rows
    assert g.latent_shape == (4, 25, 8)
    ro = g.rollout(PROMPTS[:1], num_steps=2, guidance_scale=1.0, eta=0.0, need_log_probs=False)
    assert ro.samples.audio.shape == (1, 1, 800) and ro.samples.sample_rate == 16000
    default = _gen(tiny_audioldm)
    assert default.latent_shape == (4, 16, 8)  # UNet sample_size 16 x VAE factor 2 = 32 frames
    with pytest.raises(ValueError, match="audio_length_in_s"):
        _gen(tiny_audioldm, audio_length_in_s=0.001)


def test_deterministic_rollout_equals_the_pipeline(gen):
    """eta=0 DDIM with CFG on the same x_T: the pipeline's own sampler, latents and waveform."""
    x_T = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(1))
    ro = gen.rollout(PROMPTS, num_steps=4, guidance_scale=2.5, eta=0.0, latents=x_T, need_log_probs=False)
    # AudioLDMPipeline has no output_type="latent": compare the decoded waveforms
    wav = gen.pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.5, latents=x_T, output_type="pt").audios
    ours = gen.decode(ro.latents[:, -1])
    torch.testing.assert_close(ours.audio[:, 0], wav.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    assert ours.audio.shape[-1] == gen.num_audio_samples == wav.shape[-1]


def test_rollout_log_probs_are_the_ddim_gaussian_in_float64(gen):
    """Stored log-probs equal an independent float64 Gaussian log-density of diffusers' DDIM step
    (eta = 1), averaged over latent dimensions; step_log_prob recomputes them."""
    from diffusers import DDIMScheduler

    ro = gen.rollout(PROMPTS, num_steps=3, guidance_scale=2.0, eta=1.0, seeds=[3, 4])
    assert ro.latents.shape == (2, 4, 4, 16, 8) and ro.log_probs.dtype == torch.float64
    sched = DDIMScheduler.from_config(gen.scheduler.config)
    sched.set_timesteps(3)
    for k, t in enumerate(sched.timesteps):
        x, x_next = ro.latents[:, k], ro.latents[:, k + 1].double()
        with torch.no_grad():
            eps = gen.guided_eps(x, t, ro.extras["cond"], ro.extras["uncond"], 2.0)
        prev_t = int(t) - sched.config.num_train_timesteps // 3
        var = sched._get_variance(int(t), prev_t).double()
        mean = sched.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample.double()
        per_dim = -((x_next - mean) ** 2) / (2 * var) - 0.5 * torch.log(var) - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(ro.log_probs[:, k], per_dim.flatten(1).mean(1), rtol=1e-6, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(gen.step_log_prob(ro, k), ro.log_probs[:, k], rtol=1e-6, atol=1e-5)
            with gen.reference():
                assert not torch.allclose(gen.step_log_prob(ro, k), ro.log_probs[:, k])


def test_conditioning_is_the_pipelines_clap_embedding(gen):
    """class_labels = the normalised CLAP text embedding; the negative branch as the pipeline encodes it."""
    c = gen.encode_prompt(PROMPTS)["class_labels"]
    assert c.shape == (2, 16)
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(2))
    both = gen.pipe._encode_prompt(PROMPTS, gen.device, 1, True, ["", ""])
    torch.testing.assert_close(gen.encode_prompt(PROMPTS, negative=True)["class_labels"], both[:2])


def test_denoise_error_is_the_epsilon_mse(gen):
    x0 = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(5))
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 700])
    cond = gen.encode_prompt(PROMPTS)
    with torch.no_grad():
        err = gen.denoise_error(x0, cond, t, noise)
        a = gen.train_scheduler.alphas_cumprod[t].double().view(2, 1, 1, 1)
        x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
        pred = gen.unet(x_t, t, encoder_hidden_states=None, class_labels=cond["class_labels"]).sample
    want = (pred.double() - noise.double()).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(err.double(), want, rtol=1e-5, atol=1e-6)


def test_lora_round_trip_through_the_pipeline(gen, tmp_path, tiny_audioldm):
    """save_trained writes a diffusers-format LoRA that AudioLDMPipeline's UNet loads
    (load_lora_adapter) and that a fresh generator loads back: same outputs."""
    from diffusers import AudioLDMPipeline

    out = gen.save_trained(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    x_T = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(2))
    ours = gen.rollout(PROMPTS[:1], num_steps=2, guidance_scale=1.0, eta=0.0, latents=x_T, need_log_probs=False)
    pipe = AudioLDMPipeline.from_pretrained(tiny_audioldm)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.load_lora_adapter(str(out), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    wav = pipe(PROMPTS[:1], num_inference_steps=2, guidance_scale=1.0, latents=x_T, output_type="pt").audios
    torch.testing.assert_close(ours.samples.audio[:, 0], wav.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    fresh = AudioLDMGenerator(
        AudioLDMGeneratorConfig(pretrained=str(tiny_audioldm), lora=LoraSettings(rank=4, alpha=4))
    )
    fresh.load_trained(out)
    again = fresh.rollout(PROMPTS[:1], num_steps=2, guidance_scale=1.0, eta=0.0, latents=x_T, need_log_probs=False)
    torch.testing.assert_close(again.latents, ours.latents)
    inference = AudioLDMGenerator(AudioLDMGeneratorConfig(pretrained=str(tiny_audioldm), finetune="none"))
    inference.load_trained(out)
    inf = inference.rollout(PROMPTS[:1], num_steps=2, guidance_scale=1.0, eta=0.0, latents=x_T, need_log_probs=False)
    torch.testing.assert_close(inf.latents, ours.latents, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_audioldm):
    grads = []
    for ckpt in (False, True):
        g = _gen(tiny_audioldm)
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


def test_bfloat16_frozen_weights_sample(tiny_audioldm):
    g = AudioLDMGenerator(AudioLDMGeneratorConfig(pretrained=str(tiny_audioldm), dtype="bfloat16"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs (train.mixed_precision: bf16)
        ro = g.rollout(PROMPTS[:1], num_steps=2, guidance_scale=2.0, eta=1.0)
    assert torch.isfinite(ro.log_probs).all() and torch.isfinite(ro.samples.audio).all()


def test_audio_loudness_reward_and_config_errors(tiny_audioldm, tmp_path):
    from mmalign.config import ConfigError
    from mmalign.rewards.rules import AudioLoudness
    from mmalign.types import Samples

    x = torch.full((1, 1, 100), 0.5)
    assert AudioLoudness()(Samples(audio=x, sample_rate=16000), ["a"]).item() == pytest.approx(20 * math.log10(0.5))
    with pytest.raises(TypeError, match="audio"):
        AudioLoudness()(Samples(images=torch.zeros(1, 3, 4, 4)), ["a"])
    from mmalign.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"generator: {{name: audioldm, pretrained: {tiny_audioldm}, audio_length_in_s: -1}}\n"
        "method: {name: grpo}\nreward: {name: audio_loudness}\ndata: {kind: prompts, prompts: [a]}\n"
    )
    with pytest.raises(ConfigError, match="audio_length_in_s"):
        load_config(cfg)
