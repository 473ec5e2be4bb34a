"""Inference-time guidance: dynamic CFG, reward-gradient guidance, best-of-N, beam search, and
`mmalign sample --guidance ...`."""

import json
from pathlib import Path

import pytest
import torch

from mmalign.cli import main
from mmalign.guidance import (
    Evaluator,
    beam_search_sample,
    best_of_n_sample,
    dynamic_cfg_sample,
    guide_prediction,
    reward_guided_sample,
)
from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
from mmalign.testing import make_tiny_sd

PROMPTS = ["a red circle", "a blue square above a green triangle", "two yellow squares"]


def _gen(path) -> LatentDiffusionGenerator:
    cfg = SDGeneratorConfig(pretrained=str(path), finetune="none")
    cfg.validate()
    return LatentDiffusionGenerator(cfg)


@pytest.fixture(scope="module")
def gen(tiny_sd):
    return _gen(tiny_sd)


@pytest.fixture(scope="module")
def toy():
    """The shipped toy-world model and its proxy CLIP reward (differentiable)."""
    from mmalign.rewards.common import build_reward

    return _gen("toy:sd_toy"), build_reward({"name": "clip", "model": "toy:proxy_clip"}, "reward")


class MeanRed:
    """A tiny image reward: mean red minus mean blue (differentiable)."""

    name, modality, differentiable = "red", "image", True

    def __call__(self, samples, prompts):
        x = samples.require("image", "red")
        return (x[:, 0] - x[:, 2]).flatten(1).mean(1)


# --------------------------------------------------------------------------- dynamic CFG


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dynamic_cfg_single_candidate_is_plain_cfg(tmp_path, tiny_sd, eta, prediction_type):
    g = _gen(tiny_sd if prediction_type == "epsilon" else make_tiny_sd(tmp_path / "v", prediction_type="v_prediction"))
    ref = g.rollout(PROMPTS, num_steps=4, guidance_scale=4.0, eta=eta, seeds=[3, 4, 5], need_log_probs=False)
    out = dynamic_cfg_sample(g, PROMPTS, MeanRed(), candidates=[4.0], num_steps=4, seeds=[3, 4, 5], eta=eta)
    assert torch.equal(out.latents, ref.latents)
    assert torch.equal(out.samples.images, ref.samples.images)
    assert out.extras["cfg_schedule"].tolist() == [[4.0] * 4] * 3


def test_dynamic_cfg_picks_the_scale_its_evaluator_prefers(gen):
    """A latent evaluator that prefers the x̂0 trajectory of CFG at 3.0 makes dynamic CFG choose
    3.0 at every step among four candidates, and so reproduce CFG at 3.0."""
    steps, seeds, target = 5, [0, 1, 2], 3.0
    ref = gen.rollout(PROMPTS, num_steps=steps, guidance_scale=target, eta=0.0, seeds=seeds, need_log_probs=False)
    cond, uncond = gen.encode_prompt(PROMPTS), gen.encode_prompt(PROMPTS, negative=True)
    ref_x0 = []
    with torch.no_grad():
        for k, (t, _) in enumerate(gen.sampling_timesteps(steps)):
            u, c = gen.cfg_outputs(ref.latents[:, k], t, cond, uncond)
            ref_x0.append(gen.predicted_x0(u + target * (c - u), ref.latents[:, k], t))
    calls = []

    def closeness(x0, prompts):  # called once per step with B*K candidates in candidate order
        k = len(calls)
        calls.append(len(x0))
        return -(x0 - ref_x0[k].repeat_interleave(len(x0) // 3, 0)).flatten(1).norm(dim=1)

    out = dynamic_cfg_sample(
        gen,
        PROMPTS,
        Evaluator(closeness, space="latent"),
        candidates=[5.0, 1.5, 3.0, 7.5],
        num_steps=steps,
        seeds=seeds,
    )
    assert calls == [12] * steps
    assert out.extras["cfg_schedule"].tolist() == [[target] * steps] * 3
    torch.testing.assert_close(out.latents, ref.latents, rtol=0, atol=1e-5)


def test_dynamic_cfg_weights_follow_the_timestep(gen):
    """Two evaluators with opposite linear schedules: early steps follow the first, late the second;
    a step where every weight is 0 is not evaluated and keeps the first candidate."""
    cands = [5.0, 2.0, 8.0]
    prefer = lambda j, v: lambda x0, p: torch.tensor([v if i == j else 0.0 for i in range(3)]).repeat(len(x0) // 3)
    evals = [
        Evaluator(prefer(1, 1.0), weight=(1.0, 0.0), space="latent", name="early"),
        Evaluator(prefer(2, 2.0), weight=(0.0, 1.0), space="latent", name="late"),
    ]
    out = dynamic_cfg_sample(gen, PROMPTS[:2], evals, candidates=cands, num_steps=5, normalize="none")
    # progress 0, .25, .5, .75, 1: early scores 1-p on candidate 1, late 2p on candidate 2
    assert out.extras["cfg_schedule"].tolist() == [[2.0, 2.0, 8.0, 8.0, 8.0]] * 2
    n = []
    off = Evaluator(lambda x0, p: n.append(1) or torch.zeros(len(x0)), weight=0.0, space="latent")
    out = dynamic_cfg_sample(gen, PROMPTS[:2], off, candidates=cands, num_steps=3)
    assert n == [] and out.extras["cfg_schedule"].tolist() == [[5.0] * 3] * 2


def test_dynamic_cfg_with_image_rewards_reports_a_schedule(gen):
    out = dynamic_cfg_sample(
        gen,
        PROMPTS,
        [(MeanRed(), 1.0), (MeanRed(), (0.0, 2.0))],
        candidates=[5.0, 1.0, 9.0],
        num_steps=3,
        keep_scores=True,
    )
    sched = out.extras["cfg_schedule"]
    assert sched.shape == (3, 3) and set(sched.flatten().tolist()) <= {5.0, 1.0, 9.0}
    # the chosen candidate is the argmax of the combined scores at every step
    picked = torch.tensor([5.0, 1.0, 9.0])[out.extras["scores"].argmax(-1)]
    assert torch.equal(picked, sched)
    assert out.samples.images.shape == (3, 3, 32, 32)


def test_dynamic_cfg_bad_input(gen):
    with pytest.raises(ValueError, match="at least one evaluator"):
        dynamic_cfg_sample(gen, PROMPTS, [], candidates=[1.0, 2.0], num_steps=2)
    audio = type(
        "A",
        (),
        {"name": "clap", "modality": "audio", "differentiable": False, "__call__": lambda self, samples, prompts: None},
    )()
    with pytest.raises(TypeError, match="scores audio samples"):
        dynamic_cfg_sample(gen, PROMPTS, audio, candidates=[1.0, 2.0], num_steps=2)


# --------------------------------------------------------------------------- reward guidance


def test_guide_prediction_is_one_score_shift_in_every_parameterisation():
    """Each parameterisation's guided output implies the same guided x̂0 = x̂0 + (σ²/α) g."""
    g = torch.Generator().manual_seed(0)
    x0, eps, grad = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    alpha, sigma = 0.6, 0.8  # DDPM: α² + σ² = 1
    x = alpha * x0 + sigma * eps
    want = x0 + sigma**2 / alpha * grad
    e = guide_prediction(eps, grad, "epsilon", alpha, sigma)
    torch.testing.assert_close((x - sigma * e) / alpha, want)
    v = guide_prediction(alpha * eps - sigma * x0, grad, "v_prediction", alpha, sigma)
    torch.testing.assert_close(alpha * x - sigma * v, want)  # x̂0 = α x_t − σ v
    s = guide_prediction(x0, grad, "sample", alpha, sigma)
    torch.testing.assert_close(s, want)
    a, sg = 0.3, 0.7  # rectified flow: x_t = (1−σ) x0 + σ ε, v = ε − x0
    xf = a * x0 + sg * eps
    vf = guide_prediction(eps - x0, grad, "flow", a, sg)
    torch.testing.assert_close(xf - sg * vf, x0 + sg**2 / a * grad)
    with pytest.raises(ValueError, match="unsupported prediction_type"):
        guide_prediction(eps, grad, "mystery", alpha, sigma)


def test_reward_guidance_weight_zero_is_unguided_sampling(gen):
    ref = gen.rollout(PROMPTS, num_steps=4, guidance_scale=5.0, eta=0.0, seeds=[7, 8, 9], need_log_probs=False)
    out = reward_guided_sample(gen, PROMPTS, [(MeanRed(), 0.0)], guidance_scale=5.0, num_steps=4, seeds=[7, 8, 9])
    assert torch.equal(out.latents, ref.latents)
    assert torch.equal(out.samples.images, ref.samples.images)
    assert out.extras["guidance_norm"].abs().sum() == 0


def test_reward_guidance_raises_the_proxy_reward_on_the_toy_world(toy):
    gen, proxy = toy
    from mmalign.toy.world import heldout_captions

    prompts = list(heldout_captions())[::6][:8]
    kw = dict(guidance_scale=4.0, num_steps=8, seeds=list(range(8)))
    base = reward_guided_sample(gen, prompts, [(proxy, 0.0)], **kw)
    guided = reward_guided_sample(gen, prompts, [(proxy, (0.0, 80.0))], **kw)  # weight ramps up over the steps
    with torch.no_grad():
        r0, r1 = proxy(base.samples, prompts), proxy(guided.samples, prompts)
    assert r1.mean() > r0.mean() + 0.05, (r0.tolist(), r1.tolist())
    assert guided.extras["guidance_norm"][:, 0].eq(0).all() and (guided.extras["guidance_norm"][:, 1:] > 0).all()
    # the cheaper form (denoiser output held fixed) also raises it
    cheap = reward_guided_sample(gen, prompts, [(proxy, (0.0, 80.0))], through_model=False, **kw)
    with torch.no_grad():
        assert proxy(cheap.samples, prompts).mean() > r0.mean() + 0.02


def test_reward_guidance_refuses_a_non_differentiable_reward(gen):
    from mmalign.toy.reward import ToyGold, ToyGoldConfig

    with pytest.raises(ValueError, match="'toy_gold' is not differentiable"):
        reward_guided_sample(gen, PROMPTS, ToyGold(ToyGoldConfig()), num_steps=2)


# --------------------------------------------------------------------------- search


def test_best_of_n_returns_the_argmax(gen):
    r = MeanRed()
    out = best_of_n_sample(gen, PROMPTS, r, n=3, guidance_scale=5.0, num_steps=3, seeds=[0, 10, 20])
    cand = out.extras["candidate_rewards"]["red"]  # B, n
    assert torch.equal(out.extras["chosen"], cand.argmax(1))
    # the chosen sample is exactly the rollout of the chosen seed, and its reward is the maximum
    want_seeds = [s * 3 + int(j) for s, j in zip([0, 10, 20], out.extras["chosen"])]
    assert out.extras["seeds"].tolist() == want_seeds
    ref = gen.rollout(PROMPTS, num_steps=3, guidance_scale=5.0, eta=0.0, seeds=want_seeds, need_log_probs=False)
    torch.testing.assert_close(out.samples.images, ref.samples.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(r(out.samples, PROMPTS), cand.max(1).values, rtol=0, atol=1e-5)


def test_beam_search_keeps_the_best_particle(gen):
    r = MeanRed()
    out = beam_search_sample(gen, PROMPTS, r, beam_width=2, num_candidates=3, num_steps=3, seeds=[0, 1, 2])
    assert out.samples.images.shape == (3, 3, 32, 32) and out.latents.shape[1] == 4
    torch.testing.assert_close(r(out.samples, PROMPTS), out.extras["scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(gen.decode(out.latents[:, -1]).images, out.samples.images, rtol=0, atol=1e-5)
    # per-step selection beats a plain stochastic sample of the same prompts on average
    plain = gen.rollout(PROMPTS, num_steps=3, guidance_scale=5.0, eta=1.0, seeds=[0, 1, 2], need_log_probs=False)
    assert r(out.samples, PROMPTS).mean() > r(plain.samples, PROMPTS).mean()
    with pytest.raises(ValueError, match="eta must be > 0"):
        beam_search_sample(gen, PROMPTS, r, eta=0.0, num_steps=2)


# --------------------------------------------------------------------------- CLI


def _rows(d):
    return [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]


def test_cli_sample_every_guidance(tmp_path, tiny_sd, tiny_clip):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    common = [
        "sample",
        "--model",
        str(tiny_sd),
        "--prompts",
        str(prompts),
        "--steps",
        "3",
        "--reward",
        "clip",
        "--reward-args",
        f"model=local-dir:{tiny_clip}",
    ]
    out = tmp_path / "dyn"
    assert main([*common, "--guidance", "dynamic-cfg", "--cfg-candidates", "5,2,8", "--n", "2", "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and (out / "grid.png").is_file()
    for r in rows:
        assert Path(r["path"]).is_file()
        assert r["guidance"] == "dynamic-cfg" and len(r["cfg_schedule"]) == 3
        assert set(r["cfg_schedule"]) <= {5.0, 2.0, 8.0} and isinstance(r["rewards"]["clip"], float)
    assert [r["seed"] for r in rows] == [0, 1, 1000, 1001]

    for mode, key in (("reward", "guidance_norm"), ("best-of-n", "candidate_scores"), ("beam", None)):
        d = tmp_path / mode
        extra = ["--best-of", "2"] if mode == "best-of-n" else ["--beam-candidates", "2"] if mode == "beam" else []
        assert main([*common, "--guidance", mode, *extra, "--out", str(d)]) == 0
        rows = _rows(d)
        assert len(rows) == 2 and all(r["guidance"] == mode and "clip" in r["rewards"] for r in rows)
        if key:
            assert all(key in r for r in rows)

    # the older spelling: --pretrained / --weights / --guidance SCALE, no reward
    d = tmp_path / "old"
    assert (
        main(
            [
                "sample",
                "--pretrained",
                str(tiny_sd),
                "--prompt",
                "a red square",
                "--guidance",
                "3.5",
                "--steps",
                "2",
                "--out",
                str(d),
            ]
        )
        == 0
    )
    (row,) = _rows(d)
    assert row["guidance"] == "cfg" and row["cfg_scale"] == 3.5 and row["rewards"] == {}


def test_cli_sample_bad_input_names_the_problem(tmp_path, tiny_sd, tiny_clip, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    base = ["sample", "--model", str(tiny_sd), "--steps", "2", "--out", str(tmp_path / "o")]
    assert main([*base, "--prompts", str(prompts), "--guidance", "dynamic-cfg", "--reward", "no_such_reward"]) == 2
    assert "--reward no_such_reward: unknown reward 'no_such_reward'; registered:" in capsys.readouterr().err
    assert main([*base, "--prompts", str(prompts), "--guidance", "best-of-n", "--reward", "clap"]) == 2
    assert "--reward clap: scores audio samples, but this generator makes image samples" in capsys.readouterr().err
    assert main([*base, "--prompts", str(prompts), "--guidance", "reward", "--reward", "toy_gold"]) == 2
    assert "--reward toy_gold: not differentiable" in capsys.readouterr().err
    assert main([*base, "--prompts", str(prompts), "--guidance", "best-of-n"]) == 2
    assert "--guidance best-of-n needs at least one --reward NAME" in capsys.readouterr().err
    assert main([*base, "--prompts", str(prompts), "--guidance", "sideways"]) == 2
    assert "--guidance: expected one of cfg, dynamic-cfg, reward, best-of-n, beam" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "missing.txt"), "--guidance", "cfg"]) == 2
    assert "missing.txt: prompts file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
