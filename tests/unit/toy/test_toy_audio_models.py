"""The toy audio world's shipped models: the Stable Audio layout generator loads through the
adapter and was trained with the adapter's own conditioning; the toy_audio_proxy reward loads,
and prefers a clip's caption to its hard negatives."""

import random

import pytest
import torch

from mmalign.rewards.common import build_reward
from mmalign.toy import ASSETS
from mmalign.toy.audio_world import audio_heldout_captions, perturb_audio_caption, render_audio
from mmalign.types import Samples

SHIPPED = ASSETS / "stable_audio_toy"


@pytest.fixture(scope="module")
def gen():
    from mmalign.pipelines.stable_audio import StableAudioGenerator, StableAudioGeneratorConfig

    return StableAudioGenerator(StableAudioGeneratorConfig(pretrained=str(SHIPPED), finetune="none"))


def test_shipped_generator_is_stable_audio_layout_at_4khz(gen):
    assert gen.sample_rate == 4000
    assert gen.latent_shape == (8, 125)
    assert gen.max_seconds == 1.0
    ro = gen.rollout(["a low beep then a high beep"], num_steps=2, eta=0.0, need_log_probs=False)
    assert ro.samples.audio.shape == (1, 1, 4000)
    assert torch.isfinite(ro.samples.audio).all()


def test_training_conditioning_is_the_adapters(gen):
    """audio_train.conditioning (what the DiT was trained on) equals the adapter's encode_prompt,
    and a dropped caption (all-zero cross-attention states) is the adapter's unconditional branch."""
    from mmalign.toy.audio_train import TEXT_LEN, conditioning

    caps = ["a high beep then a mid beep then a low beep", "one low beep"]
    pipe = gen.pipe
    enc = pipe.tokenizer(caps, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    assert pipe.tokenizer.model_max_length == TEXT_LEN and enc.input_ids.shape[1] == TEXT_LEN
    assert (enc.input_ids != 2).all()  # no <unk>: every word is in the vocabulary
    with torch.no_grad():
        ehs, glob = conditioning(pipe.text_encoder, pipe.projection_model, enc.input_ids, enc.attention_mask)
    ref = gen.encode_prompt(caps)
    torch.testing.assert_close(ehs, ref["encoder_hidden_states"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(glob, ref["global_hidden_states"], rtol=1e-5, atol=1e-6)
    neg = gen.encode_prompt(caps, negative=True)
    assert (neg["encoder_hidden_states"] == 0).all()
    torch.testing.assert_close(neg["global_hidden_states"], glob, rtol=1e-5, atol=1e-6)


def test_toy_audio_proxy_prefers_the_caption_to_hard_negatives():
    """Rendered held-out clips (never seen in training), resampled to 4 kHz as the generator
    writes them: the proxy scores the true caption above most of its hard negatives."""
    import torchaudio

    r = build_reward({"name": "toy_audio_proxy"})
    assert r.modality == "audio"
    rng = random.Random(0)
    wins = []
    for cap in audio_heldout_captions():
        wave = torch.from_numpy(render_audio(cap, 123)[0])
        wave4 = torchaudio.functional.resample(wave, 16000, 4000)
        negs = [n for m in ("pitch", "count", "swap") if (n := perturb_audio_caption(cap, rng, m))]
        s = r(Samples(audio=wave4.expand(1 + len(negs), 1, -1).clone(), sample_rate=4000), [cap] + negs)
        assert s.shape == (1 + len(negs),) and (s.abs() <= 1.0 + 1e-5).all()
        wins += [bool(s[0] > x) for x in s[1:]]
    assert sum(wins) / len(wins) >= 0.75, wins


def test_latent_normalisation_is_folded_into_the_vae_exactly():
    """audio_train.normalise_latents: afterwards the posterior means have zero mean and unit
    variance per channel over the pool, and the decoder's first convolution maps them to what it
    gave the old means (exactly, away from its 3 zero-padded frames at either end)."""
    from diffusers import AutoencoderOobleck

    from mmalign.toy.audio_train import VAE_CFG, normalise_latents

    torch.manual_seed(0)
    vae = AutoencoderOobleck(**VAE_CFG).eval()
    x = 0.3 * torch.randn(6, 1, 1024)
    with torch.no_grad():
        mu0 = vae.encode(x).latent_dist.mean
        h0 = vae.decoder.conv1(mu0)
        rec0 = vae.decode(mu0).sample
        normalise_latents(vae, x)
        mu1 = vae.encode(x).latent_dist.mean
        h1 = vae.decoder.conv1(mu1)
        rec1 = vae.decode(mu1).sample
    torch.testing.assert_close(mu1.mean(dim=(0, 2)), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(mu1.std(dim=(0, 2)), torch.ones(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(mu1, (mu0 - mu0.mean(dim=(0, 2), keepdim=True)) / mu0.std(dim=(0, 2), keepdim=True))
    torch.testing.assert_close(h1[..., 3:-3], h0[..., 3:-3], atol=1e-5, rtol=1e-4)
    assert (rec1 - rec0).abs().max() < 0.05 * rec0.abs().max()


def test_evaluate_generator_scores_audio_gold_at_the_generators_sample_rate():
    """A generator at 4 kHz that plays the correct clip: evaluate_generator hands the gold
    evaluator the clips' rate (read as 16 kHz, every pitch would be two octaves off)."""
    from types import SimpleNamespace

    import torchaudio

    from mmalign.evaluation import evaluate_generator

    class Player:
        def rollout(self, prompts, seeds, **kw):
            clips = [
                torchaudio.functional.resample(torch.from_numpy(render_audio(p, s)[0]), 16000, 4000)
                for p, s in zip(prompts, seeds)
            ]
            return SimpleNamespace(samples=Samples(audio=torch.stack(clips)[:, None], sample_rate=4000))

    caps = ["one low beep", "a mid beep then a high beep", "three high beeps"]
    out, clips = evaluate_generator(Player(), None, caps, seeds_per_prompt=2, gold="toy_audio")
    assert clips.shape == (6, 1, 4000)
    assert out["gold_accuracy"] == 1.0, out
