"""Reward back-propagation (DRaFT-K / -LV, AlignProp, ReFL, editing) on a tiny SD and a tiny SD3:
gradients against finite differences, ReFL's objective and the edit-mode corruption against
independent float64 computations, gradients only through the last K steps, the chain equal to
the generator's own sampler, and a training step that lowers the loss."""

import math

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.methods.online import RolloutSettings
from mmalign.methods.reward_backprop import RewardBackprop, RewardBackpropConfig, refl_loss
from mmalign.testing import make_tiny_sd3
from mmalign.types import Samples, per_sample_randn
from tests.helpers import ROOT

PROMPTS = ["a red circle", "two blue squares"]


class LinearReward:
    """A fixed linear function of the pixels, r = sum_p w_p x_p / P (differentiable)."""

    name, differentiable = "linear", True

    def __init__(self, seed: int = 0, offset: float = 0.5, modality: str = "image"):
        self.seed, self.offset, self.w, self.modality = seed, offset, None, modality

    def weights(self, shape, device) -> torch.Tensor:
        if self.w is None or self.w.shape != shape:
            self.w = torch.randn(shape, generator=torch.Generator().manual_seed(self.seed)) + self.offset
        return self.w.to(device)

    def __call__(self, samples: Samples, prompts) -> torch.Tensor:
        x = samples.require(self.modality, "linear")
        return (x.double() * self.weights(x.shape[1:], x.device).double()).flatten(1).mean(1)


def _perturb_lora(gen, seed=0, scale=0.3):
    """Non-zero LoRA B (A, B both then carry gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in gen.trainable().named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def sd_gen(tiny_sd):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    _perturb_lora(gen)
    return gen


@pytest.fixture(scope="module")
def flow_gen(tmp_path_factory):
    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.flow import FLOW_LORA_TARGETS, FlowGeneratorConfig, FlowMatchingGenerator

    path = make_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3")
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(FLOW_LORA_TARGETS))
    gen = FlowMatchingGenerator(FlowGeneratorConfig(pretrained=str(path), lora=lora, max_sequence_length=4))
    _perturb_lora(gen)
    return gen


@pytest.fixture(scope="module")
def wan_gen(tmp_path_factory):
    from mmalign.pipelines.common import LoraSettings
    from mmalign.pipelines.wan import WAN_LORA_TARGETS, WanGenerator, WanGeneratorConfig
    from mmalign.testing import make_tiny_wan

    path = make_tiny_wan(tmp_path_factory.mktemp("models") / "wan")
    lora = LoraSettings(rank=4, alpha=4, target_modules=list(WAN_LORA_TARGETS))
    cfg = WanGeneratorConfig(pretrained=str(path), num_frames=5, resolution=32, max_sequence_length=8, lora=lora)
    gen = WanGenerator(cfg)
    _perturb_lora(gen)
    return gen


def _method(gen, reward=None, T=4, scale=2.0, eta=0.0, **kw):
    rs = RolloutSettings(prompts_per_round=2, samples_per_prompt=1, num_steps=T, guidance_scale=scale, eta=eta)
    m = RewardBackprop(RewardBackpropConfig(rollout=rs, **kw))
    m.setup(gen, reward or LinearReward(modality=gen.modality))
    return m


def _params(gen):
    return [p for p in gen.trainable().parameters() if p.requires_grad]


def _loss_at(m, gen, batch):
    """The method's loss (collect's prefix included) as a function of the current weights."""
    ro = m.collect(gen, m.reward, PROMPTS, [3, 8])
    return m.loss(m.batch(ro, [0, 1], list(batch)), gen)[0]


@pytest.mark.parametrize("which,eta", [("sd_gen", 0.0), ("sd_gen", 1.0), ("flow_gen", 0.0), ("wan_gen", 0.0)])
def test_gradient_through_k_steps_matches_finite_differences(which, eta, request):
    """d loss / d theta_j of the three weights with the largest gradient equals the central
    difference (L(theta + h e_j) - L(theta - h e_j)) / 2h, the no-gradient prefix fixed (sampled
    once with theta, as DRaFT-K stops gradients there). The adapters compute in float32, so the
    reward's weights have mean zero (a loss near 0 keeps float32's resolution of it fine)."""
    gen = request.getfixturevalue(which)
    m = _method(gen, LinearReward(offset=0.0, modality=gen.modality), T=4, k=2, eta=eta, checkpoint=True)
    params = _params(gen)
    ro = m.collect(gen, m.reward, PROMPTS, [3, 8])
    batch = m.batch(ro, [0, 1], [5, 6])
    loss, _ = m.loss(batch, gen)
    grads = torch.autograd.grad(loss, params)
    flat = torch.cat([g.flatten() for g in grads])
    ends = torch.tensor([p.numel() for p in params]).cumsum(0).tolist()
    h = 1e-2
    for i in flat.abs().topk(3).indices.tolist():
        n = next(n for n, end in enumerate(ends) if i < end)
        p, g, j = params[n], grads[n], i - (ends[n - 1] if n else 0)
        vals = []
        with torch.no_grad():
            for sign in (1, -1):
                p.view(-1)[j] += sign * h
                vals.append(float(m.loss(batch, gen)[0]))
                p.view(-1)[j] -= sign * h
        numeric = (vals[0] - vals[1]) / (2 * h)
        assert abs(float(g.view(-1)[j])) > 1e-7
        assert numeric == pytest.approx(float(g.view(-1)[j]), rel=0.05)


def _recording(monkeypatch, gen):
    """Record each denoiser call: whether it builds a graph, and the gradient its output receives."""
    calls = []
    inner = gen.model_output

    def model_output(latents, t, cond, *a, **kw):
        out = inner(latents, t, cond, *a, **kw)
        rec = {"grad": out.requires_grad, "t": float(t.flatten()[0]), "g": None}
        calls.append(rec)
        if out.requires_grad:
            out.register_hook(lambda g, rec=rec: rec.__setitem__("g", float(g.abs().sum())))
        return out

    monkeypatch.setattr(gen, "model_output", model_output)
    return calls


@pytest.mark.parametrize("which", ["sd_gen", "flow_gen", "wan_gen"])
def test_only_the_last_k_steps_get_gradient_and_the_chain_is_the_samplers(which, request, monkeypatch):
    """DRaFT-K with T=5, K=2: collect makes the first 3 denoiser calls without a graph, the loss
    the last 2 with one, each of which receives gradient; the chain ends where the generator's
    own `rollout` ends with the same seeds (eta > 0: the same step noises)."""
    gen = request.getfixturevalue(which)
    T, K = 5, 2
    eta = 1.0 if which == "sd_gen" else 0.7
    m = _method(gen, T=T, k=K, eta=eta, checkpoint=False)
    calls = _recording(monkeypatch, gen)
    ro = m.collect(gen, m.reward, PROMPTS, [3, 8])
    assert len(calls) == T - K and not any(c["grad"] for c in calls)
    steps = gen.sampling_timesteps(T)
    assert [c["t"] for c in calls] == pytest.approx([float(t) for t, _ in steps[: T - K]])
    del calls[:]
    captured = {}
    inner_scores = m.scores

    def scores(generator, latents, prompts):
        captured["x0"] = latents.detach().clone()
        return inner_scores(generator, latents, prompts)

    monkeypatch.setattr(m, "scores", scores)
    loss, metrics = m.loss(m.batch(ro, [0, 1], [5, 6]), gen)
    assert len(calls) == K and all(c["grad"] for c in calls)
    assert [c["t"] for c in calls] == pytest.approx([float(t) for t, _ in steps[T - K :]])
    loss.backward()
    assert all(c["g"] is not None and c["g"] > 0 for c in calls)
    gen.trainable().zero_grad(set_to_none=True)
    monkeypatch.undo()
    sample_seeds = [s * 1009 for s in [3, 8]]
    ref = gen.rollout(PROMPTS, num_steps=T, guidance_scale=2.0, eta=eta, seeds=sample_seeds, need_log_probs=False)
    torch.testing.assert_close(captured["x0"], ref.latents[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ro.latents[:, -1], ref.latents[:, T - K], rtol=1e-4, atol=1e-4)
    want = LinearReward(modality=gen.modality)(ref.samples, PROMPTS).mean()
    assert metrics["reward_mean"] == pytest.approx(float(want), abs=1e-4)


def test_alignprop_draws_k_in_its_range_and_trains_exactly_k_steps(sd_gen, monkeypatch):
    T = 6
    m = _method(sd_gen, T=T, mode="alignprop", alignprop_k=[2, 4], checkpoint=False)
    seen = set()
    for seed in range(12):
        start, grad_from = m.plan(T, seed)
        assert start == grad_from and 2 <= T - start <= 4
        seen.add(T - start)
    assert seen == {2, 3, 4}
    calls = _recording(monkeypatch, sd_gen)
    ro = m.collect(sd_gen, m.reward, PROMPTS, [3, 8])
    k = T - int(ro.extras["grad_from"][0])
    assert len(calls) == T - k
    m.loss(m.batch(ro, [0, 1], [5, 6]), sd_gen)
    assert len(calls) == T and sum(c["grad"] for c in calls) == k


def test_refl_equals_imagerewards_objective_computed_independently(sd_gen):
    """ReFL: x_s from the sampler without gradients (s drawn from the last quarter of T), one
    model call at s, x0_hat = (x_s - sqrt(1 - abar_t) eps) / sqrt(abar_t), loss
    mean ReLU(2 - r(decode(x0_hat))) (ImageReward's train_refl, without CFG); recomputed here in
    float64 from the rollout's x_s, the scheduler's abar and the model's eps."""
    T = 8
    reward = LinearReward(seed=3)
    m = _method(sd_gen, reward, T=T, scale=1.0, mode="refl", reward_scale=0.5)
    ro = m.collect(sd_gen, reward, PROMPTS, [3, 8])
    s = int(ro.extras["start"][0])
    assert 6 <= s <= 7
    loss, metrics = m.loss(m.batch(ro, [0, 1], [5, 6]), sd_gen)

    ref = sd_gen.rollout(
        PROMPTS, num_steps=T, guidance_scale=1.0, eta=0.0, seeds=[3 * 1009, 8 * 1009], need_log_probs=False
    )
    x = ref.latents[:, s].double()
    t = int(ref.timesteps[s])
    with torch.no_grad():
        eps = sd_gen.model_output(x.float(), torch.tensor([t, t]), sd_gen.encode_prompt(PROMPTS)).double()
    abar = float(sd_gen.train_scheduler.alphas_cumprod.double()[t])
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    with torch.no_grad():
        r = reward(sd_gen.decode(x0.float()), PROMPTS).double()
    want = 0.5 * torch.relu(2.0 - r).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    assert metrics["reward_mean"] == pytest.approx(float(r.mean()), abs=1e-4)
    # the margin: no gradient from samples already scoring above it
    r_t = torch.tensor([1.0, 3.0], requires_grad=True)
    refl_loss(r_t, 2.0).sum().backward()
    assert r_t.grad.tolist() == [-1.0, 0.0]


@pytest.mark.parametrize("which", ["sd_gen", "flow_gen", "wan_gen"])
@pytest.mark.parametrize("source", ["policy", "reference"])
def test_edit_starts_from_the_forward_noised_sample(which, source, request, monkeypatch):
    """Edit mode: x0 sampled by the policy (or the reference: LoRA off), corrupted to step
    s_e = T - ceil(f T) by the forward process -- UNet sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
    flow (1 - sigma) x0 + sigma eps -- recomputed in float64; the loss re-runs steps s_e..T-1, all
    with gradients."""
    gen = request.getfixturevalue(which)
    T = 6
    m = _method(gen, T=T, mode="edit", edit_fraction=0.5, edit_source=source, checkpoint=False)
    ro = m.collect(gen, m.reward, PROMPTS, [3, 8])
    s_e = T - 3
    assert int(ro.extras["start"][0]) == s_e == int(ro.extras["grad_from"][0])
    seeds = [3 * 1009, 8 * 1009]
    ctx = gen.reference() if source == "reference" else torch.no_grad()
    with ctx:
        ref = gen.rollout(PROMPTS, num_steps=T, guidance_scale=2.0, eta=0.0, seeds=seeds, need_log_probs=False)
    x0 = ref.latents[:, -1].double()
    torch.testing.assert_close(ro.extras["source"].double(), x0, rtol=1e-4, atol=1e-4)
    eps = per_sample_randn([s * 1_000_003 + 104_729 for s in seeds], x0.shape[1:]).double()
    if which == "sd_gen":
        abar = float(gen.scheduler.alphas_cumprod.double()[int(ref.timesteps[s_e])])
        want = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    else:
        _, sigmas = gen.sampling_schedule(T)
        sg = float(sigmas[s_e])
        want = (1 - sg) * x0 + sg * eps
    torch.testing.assert_close(ro.latents[:, -1].double(), want, rtol=1e-5, atol=1e-5)
    assert ro.extras["rewards"].shape == (2,)
    calls = _recording(monkeypatch, gen)
    m.loss(m.batch(ro, [0, 1], [5, 6]), gen)
    assert len(calls) == T - s_e and all(c["grad"] for c in calls)


def test_draft_lv_renoises_x0_through_the_last_step(sd_gen, monkeypatch):
    """DRaFT-LV (n=2): the buffer holds x_0 of the full no-gradient chain; the loss is
    -mean_j r(step_{T-1}(sqrt(abar_1) x_0 + sqrt(1 - abar_1) eps_j)), recomputed here."""
    T = 4
    reward = LinearReward(seed=5)
    m = _method(sd_gen, reward, T=T, k=1, lv_samples=2)
    ro = m.collect(sd_gen, reward, PROMPTS, [3, 8])
    seeds = [3 * 1009, 8 * 1009]
    ref = sd_gen.rollout(PROMPTS, num_steps=T, guidance_scale=2.0, eta=0.0, seeds=seeds, need_log_probs=False)
    torch.testing.assert_close(ro.latents[:, -1], ref.latents[:, -1], rtol=1e-4, atol=1e-4)
    loss, _ = m.loss(m.batch(ro, [0, 1], [5, 6]), sd_gen)
    t = int(ref.timesteps[-1])
    abar = float(sd_gen.scheduler.alphas_cumprod.double()[t])
    cond, uncond = sd_gen.encode_prompt(PROMPTS), sd_gen.encode_prompt(PROMPTS, negative=True)
    want = 0.0
    with torch.no_grad():
        for j in range(2):
            eps = per_sample_randn([s * 1_000_003 + 15_485_863 + j for s in [5, 6]], ref.latents.shape[2:]).double()
            x1 = (math.sqrt(abar) * ref.latents[:, -1].double() + math.sqrt(1 - abar) * eps).float()
            e = sd_gen.guided_eps(x1, torch.tensor(t), cond, uncond, 2.0).double()
            x0_hat = (x1.double() - math.sqrt(1 - abar) * e) / math.sqrt(abar)  # DDIM's last step, eta 0
            want = want - reward(sd_gen.decode(x0_hat.float()), PROMPTS).double().mean() / 2
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    "which,mode", [("sd_gen", "draft"), ("flow_gen", "draft"), ("sd_gen", "refl"), ("wan_gen", "edit")]
)
def test_a_training_step_changes_the_weights_and_lowers_the_loss(which, mode, request):
    gen = request.getfixturevalue(which)
    params = _params(gen)
    saved = [p.detach().clone() for p in params]
    m = _method(gen, T=4, k=2, mode=mode, refl_margin=10.0)
    ro = m.collect(gen, m.reward, PROMPTS, [3, 8])
    batch = m.batch(ro, [0, 1], [5, 6])
    opt = torch.optim.Adam(params, lr=3e-3)
    before, _ = m.loss(batch, gen)
    before.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = float(m.loss(batch, gen)[0])
    moved = max(float((p - s).abs().max()) for p, s in zip(params, saved))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    assert moved > 0
    assert after < float(before.detach())


def test_video_edit_with_video_from_image_trains_on_the_tiny_wan(wan_gen, tiny_clip):
    """InstructVideo's setting: a video reward made of a differentiable image reward (CLIP) on
    segment-sampled frames with temporally attenuated weights; the edit chain back-propagates it
    into the transformer's LoRA and one Adam step raises it on the same batch."""
    from mmalign.rewards.common import build_reward

    reward = build_reward(
        {
            "name": "video_from_image",
            "image_reward": {"name": "clip", "model": f"local-dir:{tiny_clip}"},
            "segments": 3,
            "frames": "uniform",
            "tar_lambda": 0.5,
        },
        "reward",
    )
    assert reward.differentiable
    params = _params(wan_gen)
    saved = [p.detach().clone() for p in params]
    m = _method(wan_gen, reward, T=4, mode="edit", edit_fraction=0.5)
    ro = m.collect(wan_gen, reward, PROMPTS, [3, 8])
    batch = m.batch(ro, [0, 1], [5, 6])
    opt = torch.optim.Adam(params, lr=3e-3)
    before, metrics = m.loss(batch, wan_gen)
    before.backward()
    assert all(p.grad is not None for p in params) and any(float(p.grad.abs().max()) > 0 for p in params)
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        after = float(m.loss(batch, wan_gen)[0])
        for p, s in zip(params, saved):
            p.copy_(s)
    assert metrics["reward_mean"] == pytest.approx(-float(before.detach()), rel=1e-5)
    assert after < float(before.detach())


def test_setup_refuses_a_reward_without_gradients(sd_gen):
    class Flat(LinearReward):
        name, differentiable = "flat", False

    m = RewardBackprop(RewardBackpropConfig())
    with pytest.raises(ConfigError, match="'flat' is not differentiable"):
        m.setup(sd_gen, Flat())
    with pytest.raises(ConfigError, match="set `reward:`"):
        m.setup(sd_gen, None)


def test_toy_config_loads_and_bad_options_are_one_line_config_errors():
    path = ROOT / "configs" / "toy" / "reward_backprop.yaml"
    c = load_config(path).method.args
    assert (c.mode, c.k, c.lv_samples, c.refl_margin) == ("draft", 1, 0, 2.0)
    for override, msg in [
        ("mode=alignprop", None),
        ("alignprop_k=[5,2]", "alignprop_k"),
        ("refl_window=[0.9,0.5]", "refl_window"),
        ("lv_samples=2", None),
        ("k=0", "method.k: must be >= 1"),
        ("edit_fraction=0", "method.edit_fraction: must be > 0 and <= 1"),
        ("reward_scale=0", "method.reward_scale: must be > 0"),
        ("mode=nope", "method.mode: expected one of"),
    ]:
        if msg is None:
            load_config(path, [f"method.{override}"])
            continue
        with pytest.raises(ConfigError, match=msg):
            load_config(path, [f"method.{override}"])
    with pytest.raises(ConfigError, match="lv_samples"):
        load_config(path, ["method.lv_samples=2", "method.k=2"])


def _trainer_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, method, **train):
    from tests.helpers import write_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    return write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        method={"name": "reward_backprop", **method},
        data={"kind": "prompts", "prompts": str(prompts)},
        train={"steps": 3, "batch_size": 2, "lr": 1e-3, **train},
    )


@pytest.mark.parametrize("mode", ["draft", "refl", "edit"])
def test_trains_in_the_trainer_with_the_clip_reward_and_resumes_mid_round_exactly(
    mode, tmp_path, tiny_sd, tiny_clip, pairs_manifest
):
    """The trainer gives the method its (differentiable) CLIP reward in `setup`; a run trains the
    LoRA, logs the back-propagated rewards, and a run stopped mid-round (the buffer of no-gradient
    prefixes saved with the checkpoint) and resumed ends with the same weights."""
    import json

    from safetensors.torch import load_file

    from mmalign import checkpoint as ckpt
    from mmalign.trainer import Trainer

    rollout = {"prompts_per_round": 2, "samples_per_prompt": 1, "num_steps": 3, "steps_per_round": 2, "eta": 1.0}
    method = {"mode": mode, "k": 2, "rollout": rollout}
    p = _trainer_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, method, steps=3, checkpoint_every=1, keep_last=10)
    full = Trainer(load_config(p), run_dir=tmp_path / "full")
    before = {n: v.detach().clone() for n, v in full.generator.trainable().named_parameters() if v.requires_grad}
    full.fit()
    after = dict(full.generator.trainable().named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in logs if "reward_mean" in r]) == 3
    assert any("rollout/grad_steps" in r for r in logs)
    Trainer(load_config(p, ["train.steps=1"]), run_dir=tmp_path / "split").fit()
    Trainer(load_config(p), run_dir=tmp_path / "split", resume="latest").fit()
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints") / "trainable.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_video_toy_config_edits_wan_samples_with_the_video_proxy():
    c = load_config(ROOT / "configs" / "toy" / "video_reward_backprop.yaml")
    assert (c.generator.name, c.method.args.mode, c.reward.name) == ("wan", "edit", "toy_video_proxy")
    assert c.method.args.edit_source == "policy" and c.method.args.rollout.steps_per_round == 1
