"""DiffusionNFT's schedule as in NVlabs/DiffusionNFT scripts/train_nft_sd3.py: the old policy's
EMA decay per optimizer step, training at the sampler's timesteps, on the sampler's raw latents;
each checked against an independent float64 computation."""

import pytest
import torch
from torch import nn

from mmalign.config import ConfigError, load_config
from mmalign.methods.diffusion_nft import DiffusionNFT, DiffusionNFTConfig, old_decay
from mmalign.methods.online import RolloutSettings
from mmalign.testing import make_tiny_sd3
from mmalign.types import per_sample_randn
from tests.helpers import ROOT

PROMPTS = ["a red circle", "two blue squares"]


def _return_decay(step, decay_type):
    """The reference's schedule, written out: (flat, uprate, uphold) per decay_type."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * uprate, uphold)


def test_old_decay_function_matches_the_reference_schedules():
    for step in [0, 1, 4, 74, 75, 76, 100, 208, 499, 500, 501, 10_000]:
        assert old_decay(step, 0.001, 0.5) == pytest.approx(_return_decay(step, 1), abs=1e-15)
        assert old_decay(step, 0.0075, 0.999, 75) == pytest.approx(_return_decay(step, 2), abs=1e-15)
        assert old_decay(step, 0.0, 0.0) == _return_decay(step, 0)


class _Params:
    """A stand-in generator: only its trainable parameters matter to the old-policy update."""

    def __init__(self):
        self.net = nn.Linear(3, 2)

    def trainable(self):
        return self.net


def test_old_policy_ema_ramps_per_optimizer_step():
    """Round k starts after s = 4k optimizer steps: theta_old <- eta theta_old + (1 - eta) theta with
    eta = min(0.001 s, 0.5) (25x slower than a ramp of 0.1 per round), recomputed in float64 from
    the parameters each round ends with."""
    m = DiffusionNFT(DiffusionNFTConfig(rollout=RolloutSettings(steps_per_round=4)))
    gen, g = _Params(), torch.Generator().manual_seed(0)
    want_old = None
    for k in range(140):  # past the cap (s = 500 at k = 125)
        with torch.no_grad():  # stands in for the round's optimizer steps
            for p in gen.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        theta = [p.detach().double().clone() for p in gen.net.parameters()]
        eta = m._update_old(gen)
        m._round += 1
        if want_old is None:
            assert eta == 0.0
            want_old = theta
        else:
            want_eta = min(0.001 * 4 * k, 0.5)
            assert eta == pytest.approx(want_eta, abs=1e-15)
            want_old = [want_eta * o + (1 - want_eta) * t for o, t in zip(want_old, theta)]
        for o, w in zip(m._old, want_old):
            torch.testing.assert_close(o.double(), w, rtol=1e-6, atol=1e-6)
        if k == 5:
            assert eta == pytest.approx(0.02)  # the per-round ramp had reached its cap of 0.5 here


@pytest.fixture(scope="module")
def flow_gen(tmp_path_factory):
    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.flow import FLOW_LORA_TARGETS, FlowGeneratorConfig, FlowMatchingGenerator

    path = make_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3")
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    return FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(path), lora=lora, max_sequence_length=4))


@pytest.fixture(scope="module")
def sd_gen(tiny_sd):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    return LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))


def _reward(samples, prompts):
    return torch.arange(len(prompts), dtype=torch.float32)


def _recording(monkeypatch, gen):
    calls = []
    inner = gen.model_output

    def model_output(latents, t, cond, *a, **kw):
        calls.append((latents.detach().clone(), t.detach().clone()))
        return inner(latents, t, cond, *a, **kw)

    monkeypatch.setattr(gen, "model_output", model_output)
    return calls


@pytest.mark.parametrize("which", ["flow_gen", "sd_gen"])
def test_trains_at_the_samplers_timesteps_on_its_raw_latents(which, request, monkeypatch):
    """With the defaults the clean samples are the sampler's final latents (no VAE round trip),
    every model call of the loss is at one of the sampler's timesteps, each sample at
    int(T * 0.99) distinct ones, and x_t is the forward process of the raw latent at that
    timestep: flow (1 - t/1000) x0 + (t/1000) noise, UNet sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    gen = request.getfixturevalue(which)
    T, G = 5, 2
    rs = RolloutSettings(prompts_per_round=2, samples_per_prompt=G, num_steps=T, eta=0.0, guidance_scale=2.0)
    m = DiffusionNFT(DiffusionNFTConfig(rollout=rs))
    ro = m.collect(gen, _reward, PROMPTS, [3, 8])
    assert "x0" not in ro.extras
    sample_seeds = [s * 1009 + j for s in [3, 8] for j in range(G)]
    raw = gen.rollout(
        [p for p in PROMPTS for _ in range(G)],
        num_steps=T,
        guidance_scale=2.0,
        eta=0.0,
        seeds=sample_seeds,
        need_log_probs=False,
        decode=False,
    )
    torch.testing.assert_close(ro.latents[:, -1], raw.latents[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(ro.timesteps, raw.timesteps)

    calls = _recording(monkeypatch, gen)
    seeds = [21, 22, 23, 24]
    m.loss(m.batch(ro, [0, 1, 2, 3], seeds), gen)
    K = int(T * 0.99)
    assert K == 4 and len(calls) == 2 * K  # the old policy's and the current model's pass per timestep
    x0 = raw.latents[:, -1].double()
    sampler_t = set(raw.timesteps.tolist())
    per_sample = [[] for _ in seeds]
    for j in range(K):
        noise = per_sample_randn([s * K + j for s in seeds], x0.shape[1:]).double()
        for x_t, t in calls[2 * j : 2 * j + 2]:
            for i in range(len(seeds)):
                ti = t[i].item()
                assert ti in sampler_t
                if which == "flow_gen":
                    sigma = ti / 1000.0
                    want = (1 - sigma) * x0[i] + sigma * noise[i]
                else:
                    a = gen.train_scheduler.alphas_cumprod.double()[int(ti)]
                    want = a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i]
                torch.testing.assert_close(x_t[i].double(), want, rtol=1e-5, atol=1e-5)
        for i in range(len(seeds)):
            per_sample[i].append(calls[2 * j][1][i].item())
    assert all(len(set(ts)) == K for ts in per_sample)  # distinct steps per sample
    assert len({tuple(ts) for ts in per_sample}) > 1  # each sample in its own order


def test_reencoded_latents_and_training_density_are_options(flow_gen, monkeypatch):
    rs = RolloutSettings(prompts_per_round=2, samples_per_prompt=2, num_steps=4, eta=0.0, guidance_scale=2.0)
    m = DiffusionNFT(
        DiffusionNFTConfig(rollout=rs, train_latents="reencoded", timesteps="training_density", timesteps_per_sample=3)
    )
    ro = m.collect(flow_gen, _reward, PROMPTS, [3, 8])
    raw = flow_gen.rollout(
        [p for p in PROMPTS for _ in range(2)],
        num_steps=4,
        guidance_scale=2.0,
        eta=0.0,
        seeds=[3 * 1009, 3 * 1009 + 1, 8 * 1009, 8 * 1009 + 1],
        need_log_probs=False,
    )
    torch.testing.assert_close(
        ro.latents[:, -1], flow_gen.encode_images(raw.samples.images, [3, 3, 8, 8]), rtol=1e-4, atol=1e-4
    )
    calls = _recording(monkeypatch, flow_gen)
    m.loss(m.batch(ro, [0, 1, 2, 3], [1, 2, 3, 4]), flow_gen)
    assert len(calls) == 2 * 3
    assert not set(calls[0][1].tolist()) <= set(raw.timesteps.tolist())  # drawn, not the sampler's


def test_options_are_read_and_range_checked():
    c = DiffusionNFTConfig()
    assert (c.timesteps, c.timestep_fraction, c.train_latents) == ("sampler", 0.99, "raw")
    assert (c.old_decay_rate, c.old_decay_max, c.old_decay_flat) == (0.001, 0.5, 0)
    path = ROOT / "configs" / "toy" / "diffusion_nft.yaml"
    toy = load_config(path).method.args
    assert (toy.timesteps, toy.train_latents, toy.old_decay_rate, toy.old_decay_max) == ("sampler", "raw", 0.001, 0.5)
    for override, msg in [
        ("timestep_fraction=0", r"method.timestep_fraction: must be > 0 and <= 1"),
        ("timestep_fraction=1.5", r"method.timestep_fraction: must be > 0 and <= 1"),
        ("old_decay_rate=-0.1", "method.old_decay_rate: must be >= 0"),
        ("old_decay_max=1.0", r"method.old_decay_max: must be >= 0 and < 1"),
        ("old_decay_flat=-1", "method.old_decay_flat: must be >= 0"),
        ("timesteps_per_sample=0", "method.timesteps_per_sample: must be >= 1"),
        ("kl_coef=-1", "method.kl_coef: must be >= 0"),
        ("timesteps=uniform", r"method.timesteps: expected one of \['sampler', 'training_density'\]"),
        ("train_latents=decoded", r"method.train_latents: expected one of \['raw', 'reencoded'\]"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(path, [f"method.{override}"])
