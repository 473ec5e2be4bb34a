import math

import pytest
import torch

from mmalign import checkpoint as ckpt
from mmalign.config import load_config
from mmalign.methods.d3po import d3po_step_loss
from mmalign.methods.grpo import GRPO, GRPOConfig, ppo_clip_loss
from mmalign.methods.online import RolloutSettings, group_advantages, train_steps
from mmalign.trainer import Trainer
from tests.helpers import ROOT, write_config


def test_ppo_clip_matches_float64_and_is_flat_outside_the_range():
    g = torch.Generator().manual_seed(0)
    new = torch.randn(64, generator=g, dtype=torch.float64) * 0.3
    old = torch.randn(64, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(64, generator=g, dtype=torch.float64)
    c = 0.2
    per, _ = ppo_clip_loss(new, old, adv, c)
    for i in range(64):
        rho = math.exp(new[i].item() - old[i].item())
        want = max(-adv[i].item() * rho, -adv[i].item() * min(max(rho, 1 - c), 1 + c))
        assert per[i].item() == pytest.approx(want, rel=1e-12)
    # ratio far above 1 + c with a positive advantage: clipped, no gradient
    lp = torch.tensor([1.0], requires_grad=True)
    ppo_clip_loss(lp, torch.zeros(1), torch.ones(1), c)[0].sum().backward()
    assert lp.grad.item() == 0.0
    lp = torch.tensor([0.05], requires_grad=True)  # inside the range: gradient -A * rho
    ppo_clip_loss(lp, torch.zeros(1), torch.ones(1), c)[0].sum().backward()
    assert lp.grad.item() == pytest.approx(-math.exp(0.05))


def test_train_steps_stay_in_the_window():
    assert train_steps(10, 1.0, 0) == list(range(10))
    assert train_steps(10, 0.5, 3, [0.0, 0.8]) == sorted(set(train_steps(10, 0.5, 3, [0.0, 0.8])))
    for seed in range(20):
        steps = train_steps(10, 0.3, seed, [0.2, 0.8])
        assert len(steps) == 3 and all(2 <= k < 8 for k in steps)
    assert train_steps(10, 0.5, 0, [0.0, 0.2]) == [0, 1]  # fewer steps in the window than asked: all of them
    assert train_steps(3, 0.1, 0, [0.9, 1.0]) == [2]  # never empty
    with pytest.raises(ValueError, match="timestep_window"):
        GRPOConfig(timestep_window=[0.8, 0.2]).validate()


def test_sde_window_must_hold_the_trained_steps():
    rs = RolloutSettings(num_steps=10, sde_window=[0.0, 0.5])
    assert rs.sde_steps() == [0, 1, 2, 3, 4] and RolloutSettings().sde_steps() is None
    GRPOConfig(rollout=rs, timestep_window=[0.0, 0.5]).validate()
    GRPOConfig(rollout=rs, timestep_window=[0.1, 0.3]).validate()
    with pytest.raises(ValueError, match=r"steps \[0, 1, 2, 3, 4, 5\] of 10\) must lie inside rollout.sde_window"):
        GRPOConfig(rollout=rs, timestep_window=[0.0, 0.6]).validate()
    with pytest.raises(ValueError, match="sde_window"):
        RolloutSettings(sde_window=[0.5, 0.5]).validate()
    with pytest.raises(ValueError, match="D3PO trains on steps drawn from the whole trajectory"):
        load_config(ROOT / "configs" / "toy" / "d3po.yaml", ["method.rollout.sde_window=[0.0, 0.5]"])


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 2.0])
    grp = torch.tensor([0, 0, 1, 1, 2, 2])
    adv = group_advantages(r, grp, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv[:2], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(adv[2:], torch.zeros(4))


def test_d3po_loss_float64_swap_and_tie():
    g = torch.Generator().manual_seed(1)
    lw, ll, rw, rl = (torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4))
    got = d3po_step_loss(lw, ll, rw, rl, beta=0.7, eps=0.5)
    for i in range(16):
        cl = lambda x: min(max(x, math.log(0.5)), math.log(1.5))
        z = 0.7 * (cl(lw[i].item() - rw[i].item()) - cl(ll[i].item() - rl[i].item()))
        assert got[i].item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-10)
    a = torch.tensor([0.1], requires_grad=True)
    b = torch.tensor([-0.2], requires_grad=True)
    d3po_step_loss(a, b, torch.zeros(1), torch.zeros(1), 1.0, None).sum().backward()
    ga, gb = a.grad.item(), b.grad.item()
    a.grad, b.grad = None, None
    d3po_step_loss(b, a, torch.zeros(1), torch.zeros(1), 1.0, None).sum().backward()
    assert a.grad.item() * ga < 0 and b.grad.item() * gb < 0  # swapping winner and loser flips the gradient
    assert ga < 0 < gb  # descent raises the winner's log-prob, lowers the loser's


ONLINE = {
    "grpo": {
        "name": "grpo",
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "steps_per_round": 2},
        "kl_coef": 0.1,
    },
    "raft": {
        "name": "raft",
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "steps_per_round": 2},
    },
    "rwr": {
        "name": "raft",
        "mode": "rwr",
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "steps_per_round": 2},
    },
    "raft_baseline": {
        "name": "raft",
        "baseline": True,
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "steps_per_round": 2},
    },
    "online_dpo": {
        "name": "online_dpo",
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "steps_per_round": 2},
    },
    "d3po": {
        "name": "d3po",
        "reference": "base",
        "rollout": {
            "prompts_per_round": 2,
            "samples_per_prompt": 2,
            "same_initial_noise": True,
            "num_steps": 3,
            "steps_per_round": 2,
        },
    },
    "diffusion_dro": {
        "name": "diffusion_dro",
        "experts": "toy:render",
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 1, "num_steps": 3, "steps_per_round": 2},
    },
}


def _online_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, method, **train):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")  # toy captions (DRO renders experts)
    return write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        method=method,
        data={"kind": "prompts", "prompts": str(prompts)},
        train={"steps": 3, "batch_size": 2, "lr": 1e-3, **train},
    )


@pytest.mark.parametrize("name", list(ONLINE))
def test_online_method_trains(name, tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    p = _online_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, ONLINE[name])
    tr = Trainer(load_config(p), run_dir=tmp_path / "run")
    before = {n: v.detach().clone() for n, v in tr.generator.trainable().named_parameters() if v.requires_grad}
    tr.fit()
    after = {n: v for n, v in tr.generator.trainable().named_parameters() if v.requires_grad}
    assert any(not torch.equal(before[n], after[n]) for n in before)
    import json

    logs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(any(k.startswith("rollout/") for k in l) for l in logs)


def test_dro_loss_float64_and_margin():
    from mmalign.methods.diffusion_dro import dro_loss

    g = torch.Generator().manual_seed(2)
    ee, re, ep, rp = (torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    losses, d = dro_loss(ee, re, ep, rp, margin=0.05)
    for i in range(16):
        di = (ee[i].item() - re[i].item()) - (ep[i].item() - rp[i].item())
        assert losses[i].item() == pytest.approx(max(0.0, di + 0.05), abs=1e-15)
    # expert already ranked above the policy by more than the margin: no gradient
    x = torch.tensor([0.1], requires_grad=True)
    dro_loss(x, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.5]), 0.05)[0].sum().backward()
    assert x.grad.item() == 0.0


def test_stored_log_prob_equals_recomputed_before_update(tiny_sd, tiny_clip):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.rewards.clip import ClipRewardConfig, ClipScore

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    reward = ClipScore(ClipRewardConfig(model=f"local-dir:{tiny_clip}"))
    m = GRPO(
        GRPOConfig(
            rollout=RolloutSettings(samples_per_prompt=3, num_steps=3), timestep_fraction=1.0, filter_zero_std=False
        )
    )
    buf = m.collect(gen, reward, ["a red circle", "a blue square"], [0, 1])
    assert "x0" not in buf.extras  # no VAE round trip: the policy gradient needs log-probs only
    batch = m.batch(buf, list(range(6)), [5] * 6)
    loss, metrics = m.loss(batch, gen)
    assert metrics["abs_log_ratio"] < 1e-6  # ratio = 1 (per-dimension mean log-probs, float64)
    assert metrics["clipfrac"] == 0.0


@pytest.mark.parametrize("name,per_round,split", [("grpo", 3, 2), ("online_dpo_previous", 2, 3)])
def test_online_resume_mid_round_is_exact(name, per_round, split, tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    """Checkpoint in the middle of a round (the round's buffer and the method's state are saved)
    and resume. online_dpo stops in round 1, whose reference copy is not the base."""
    base = ONLINE["grpo"] if name == "grpo" else dict(ONLINE["online_dpo"], reference="previous", beta=50.0)
    method = dict(base, rollout=dict(base["rollout"], steps_per_round=per_round))
    p = _online_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, method, steps=4, checkpoint_every=1, keep_last=10)
    Trainer(load_config(p), run_dir=tmp_path / "full").fit()
    Trainer(load_config(p, [f"train.steps={split}"]), run_dir=tmp_path / "split").fit()
    assert (ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "buffer_0" / "buffer.safetensors").is_file()
    Trainer(load_config(p), run_dir=tmp_path / "split", resume="latest").fit()
    from safetensors.torch import load_file

    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints") / "trainable.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "trainable.safetensors"))
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_grpo_drops_zero_advantage_groups(tiny_sd):
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))

    def reward(samples, prompts):  # the first prompt's group all scores 1: nothing to learn there
        return torch.tensor([1.0 if p == "a red circle" else float(i) for i, p in enumerate(prompts)])

    for filt, kept in [(True, [3, 4, 5]), (False, list(range(6)))]:
        m = GRPO(GRPOConfig(rollout=RolloutSettings(samples_per_prompt=3, num_steps=2), filter_zero_std=filt))
        buf = m.collect(gen, reward, ["a red circle", "a blue square"], [0, 1])
        assert buf.extras["keep"].tolist() == kept
        assert m.num_items(buf) == len(kept)
        assert m.round_metrics(buf)["dropped_groups"] == (1.0 if filt else 0.0)
        torch.testing.assert_close(buf.extras["advantages"][:3], torch.zeros(3))


def test_online_dpo_previous_policy_reference(tiny_sd, tiny_clip):
    """reference: previous -- round 0's copy is the base (LoRA starts at zero); after an update
    the margin is measured against the copy until the next copy, which resets it to 0."""
    from mmalign.methods.online_dpo import OnlineDPO, OnlineDPOConfig
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.rewards.clip import ClipRewardConfig, ClipScore

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    reward = ClipScore(ClipRewardConfig(model=f"local-dir:{tiny_clip}"))
    roll = RolloutSettings(samples_per_prompt=3, num_steps=3)
    prev = OnlineDPO(OnlineDPOConfig(rollout=roll, beta=50.0, reference="previous", ref_update_every=2))
    base = OnlineDPO(OnlineDPOConfig(rollout=roll, beta=50.0))
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]

    def loss(m, buf):
        return m.loss(m.batch(buf, list(range(m.num_items(buf))), [7, 8]), gen)[0]

    buf = prev.collect(gen, reward, prompts, seeds)
    assert prev.num_items(buf) == 2
    assert loss(prev, buf).item() == pytest.approx(math.log(2), abs=1e-6)  # policy == copy
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands in for an optimizer step
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    moved = [p.detach().clone() for p in params]
    l_prev, l_base = loss(prev, buf), loss(base, buf)
    assert abs(l_prev.item() - math.log(2)) > 1e-4
    torch.testing.assert_close(l_prev, l_base)  # round 0's copy is the base
    l_prev.backward()  # the swap happens before the graph is built: no in-place error
    assert all(p.grad is not None for p in params)
    assert all(torch.equal(p, m) for p, m in zip(params, moved))  # the trained weights are back
    buf = prev.collect(gen, reward, prompts, seeds)  # round 1: still round 0's copy (every 2 rounds)
    torch.testing.assert_close(loss(prev, buf), loss(base, buf))
    buf = prev.collect(gen, reward, prompts, seeds)  # round 2: a fresh copy, margin 0 again
    assert loss(prev, buf).item() == pytest.approx(math.log(2), abs=1e-6)
    assert abs(loss(base, buf).item() - math.log(2)) > 1e-4
    with pytest.raises(ValueError, match="ref_update_every"):
        OnlineDPOConfig(ref_update_every=0).validate()


def test_raft_trains_on_reencoded_samples_above_min_timestep(tiny_sd, tiny_clip):
    """RAFT's targets are VAE(decode(x_0)) of the kept samples, and t never falls below min_timestep."""
    from mmalign.methods.raft import RAFT, RAFTConfig
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.rewards.clip import ClipRewardConfig, ClipScore
    from mmalign.types import per_sample_randint

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    reward = ClipScore(ClipRewardConfig(model=f"local-dir:{tiny_clip}"))
    m = RAFT(RAFTConfig(rollout=RolloutSettings(samples_per_prompt=3, num_steps=3, eta=0.0), min_timestep=600))
    buf = m.collect(gen, reward, ["a red circle", "a blue square"], [0, 1])
    # a posterior draw per prompt, shared by the prompt's samples
    torch.testing.assert_close(buf.extras["x0"], gen.encode_images(buf.samples.images, [0, 0, 0, 1, 1, 1]))
    assert not torch.allclose(buf.extras["x0"], buf.latents[:, -1])  # the round trip changes the latents
    keep = buf.extras["keep"]
    batch = m.batch(buf, [0, 1], [7, 8])
    torch.testing.assert_close(batch["latents"], buf.extras["x0"][keep[:2]])
    t = per_sample_randint(torch.arange(1000), 600, 1000)
    assert int(t.min()) >= 600
    no_rt = RAFT(RAFTConfig(rollout=RolloutSettings(samples_per_prompt=3, num_steps=3, eta=0.0, reencode=False)))
    buf2 = no_rt.collect(gen, reward, ["a red circle"], [0])
    assert "x0" not in buf2.extras
    torch.testing.assert_close(no_rt.batch(buf2, [0], [1])["latents"], buf2.latents[buf2.extras["keep"][:1], -1])


def test_diffusion_nft_resume_keeps_the_old_policy(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    """DiffusionNFT's old policy (an EMA of the trained weights) and its round counter are saved in
    method.pt: a run stopped in the middle of round 1 and resumed equals an uninterrupted one,
    through round 2's EMA update (eta = min(0.3 * 4, 0.9) after 4 optimizer steps) after the resume."""
    from safetensors.torch import load_file

    method = {
        "name": "diffusion_nft",
        "kl_coef": 0.01,
        "old_decay_rate": 0.3,
        "old_decay_max": 0.9,
        "rollout": {"prompts_per_round": 2, "samples_per_prompt": 3, "num_steps": 3, "eta": 0.0, "steps_per_round": 2},
    }
    p = _online_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, method, steps=6, checkpoint_every=1, keep_last=10)
    Trainer(load_config(p), run_dir=tmp_path / "full").fit()
    tr = Trainer(load_config(p, ["train.steps=3"]), run_dir=tmp_path / "split")
    tr.fit()
    mid = ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints")
    saved = torch.load(mid / "method.pt", weights_only=True)
    trained = load_file(str(mid / "trainable.safetensors"))
    names = [n for n, v in tr.unwrapped.named_parameters() if v.requires_grad]  # the order of saved["old"]
    assert saved["round"] == 2 and [o.shape for o in saved["old"]] == [trained[n].shape for n in names]
    assert any(not torch.equal(o, trained[n]) for o, n in zip(saved["old"], names))  # old policy != current
    Trainer(load_config(p), run_dir=tmp_path / "split", resume="latest").fit()

    last = [ckpt.latest_checkpoint(tmp_path / r / "checkpoints") for r in ("full", "split")]
    a, b = (load_file(str(d / "trainable.safetensors")) for d in last)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    ma, mb = (torch.load(d / "method.pt", weights_only=True) for d in last)
    assert ma["round"] == mb["round"] == 3
    for oa, ob in zip(ma["old"], mb["old"], strict=True):
        torch.testing.assert_close(oa, ob, rtol=0, atol=0)


def test_rwr_weights_match_float64_softmax(tiny_sd):
    """RWR's weights w_i = softmax_group(r_i / temperature) * G, recomputed in float64 from a
    hand-made reward vector (2 groups of 3), are the ones the batch carries and the loss applies."""
    from mmalign.methods.raft import RAFT, RAFTConfig
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.types import per_sample_randint, per_sample_randn

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    rewards = [0.30, 0.10, 0.25, -0.40, 0.90, 0.85]
    T, G = 0.2, 3

    def reward(samples, prompts):
        assert len(prompts) == len(rewards)
        return torch.tensor(rewards)

    m = RAFT(RAFTConfig(mode="rwr", temperature=T, rollout=RolloutSettings(samples_per_prompt=G, num_steps=2)))
    buf = m.collect(gen, reward, ["a red circle", "a blue square"], [0, 1])
    want = []
    for grp in (rewards[:3], rewards[3:]):
        z = sum(math.exp(r / T) for r in grp)
        want += [G * math.exp(r / T) / z for r in grp]
    assert sum(want[:3]) == pytest.approx(G) and want[4] > 1 > want[1]  # uniform mean 1; best > 1 > worst
    torch.testing.assert_close(
        buf.extras["weights"].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0
    )
    assert m.num_items(buf) == 6  # rwr keeps every sample

    idx, seeds = [4, 0, 3], [11, 12, 13]
    batch = m.batch(buf, idx, seeds)
    torch.testing.assert_close(
        batch["weights"].double(), torch.tensor([want[i] for i in idx], dtype=torch.float64), rtol=1e-6, atol=0
    )
    loss, metrics = m.loss(batch, gen)
    x0 = batch["latents"].float()  # the loss is mean_i w_i * ||eps - eps_theta(x_t^(i))||^2
    s = torch.as_tensor(seeds)
    with torch.no_grad():
        err = gen.denoise_error(
            x0,
            gen.encode_prompt(batch["prompts"]),
            per_sample_randint(s, 0, 1000, x0.device),
            per_sample_randn(s, x0.shape[1:], x0.device),
        )
    expect = sum(want[i] * e for i, e in zip(idx, err.double().tolist())) / len(idx)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert metrics["weight_max"] == pytest.approx(want[4], rel=1e-6)


@pytest.mark.parametrize("mode", ["raft", "rwr"])
def test_raft_baseline_weights_are_group_centred_and_share_noise(tiny_sd, mode):
    """baseline: true -- a group's weights are the plain ones minus their group mean (float64 by
    hand: RAFT top-1 of 3 gives +2/3, -1/3, -1/3), an item is a whole group whose samples share one
    noise draw and one timestep, the loss is mean_i w_i err_i over the group's samples, and
    reversing the preferences flips the gradient."""
    from mmalign.methods.raft import RAFT, RAFTConfig
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.types import per_sample_randint, per_sample_randn

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    rewards = [0.30, 0.10, 0.25, -0.40, 0.90, 0.85]
    T, G = 0.2, 3

    def build(rs, group_size=G):
        m = RAFT(
            RAFTConfig(
                mode=mode,
                temperature=T,
                baseline=True,
                rollout=RolloutSettings(samples_per_prompt=group_size, num_steps=2),
            )
        )
        return m, m.collect(gen, lambda samples, prompts: torch.tensor(rs), ["a red circle", "a blue square"], [0, 1])

    m, buf = build(rewards)
    want = []
    for grp in (rewards[:3], rewards[3:]):
        if mode == "raft":
            w = [1.0 if r == max(grp) else 0.0 for r in grp]
        else:
            z = sum(math.exp(r / T) for r in grp)
            w = [G * math.exp(r / T) / z for r in grp]
        want += [x - sum(w) / G for x in w]
    if mode == "raft":
        assert want[:3] == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    torch.testing.assert_close(
        buf.extras["weights"].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7
    )
    assert m.num_items(buf) == 2  # whole groups

    batch = m.batch(buf, [1], [11])  # group 1: samples 3, 4, 5, all with seed 11
    assert batch["seeds"].tolist() == [11, 11, 11]
    torch.testing.assert_close(batch["latents"], buf.extras["x0"][3:6])
    loss, _ = m.loss(batch, gen)
    x0, s = batch["latents"].float(), torch.tensor([11] * 3)
    with torch.no_grad():
        err = gen.denoise_error(
            x0, gen.encode_prompt(batch["prompts"]), per_sample_randint(s, 0, 1000), per_sample_randn(s, x0.shape[1:])
        )
    want_loss = sum(w * e for w, e in zip(want[3:], err.double().tolist())) / 3  # a difference: float32 abs tol
    assert loss.item() == pytest.approx(want_loss, abs=1e-5 * float(err.mean()))

    # groups of 2: the centred weights are +-1/2 (raft) or +-tanh((r_1 - r_2) / 2T) (rwr), so reversing
    # the rewards negates every weight and the gradient exactly
    params = [p for p in gen.trainable().parameters() if p.requires_grad]

    def grad(rs):
        m_, buf_ = build(rs, group_size=2)
        gen.trainable().zero_grad()
        m_.loss(m_.batch(buf_, [0, 1], [11, 12]), gen)[0].backward()
        return torch.cat([p.grad.flatten() for p in params])

    g = grad([0.30, 0.10, -0.40, 0.90])
    assert g.abs().max() > 0
    torch.testing.assert_close(grad([0.10, 0.30, 0.90, -0.40]), -g, rtol=0, atol=1e-3 * float(g.abs().max()))


def test_grpo_kl_matches_float64_gaussian_kl(tiny_sd, tiny_clip):
    """GRPO's KL term on the UNet: per step, KL(N(mu_theta, s^2 I) || N(mu_ref, s^2 I)) per latent
    dimension, mean_d (mu_theta - mu_ref)_d^2 / (2 s^2) with s the DDIM step std (flow_grpo's KL form,
    whose std_dev_t is the step function's), averaged over the batch and the trained steps. The DDIM step
    Gaussians are rebuilt here in float64 from the two models' epsilon predictions; the loss
    with kl_coef = c exceeds the one with kl_coef = 0 by c * KL."""
    from mmalign.pipelines.sd import LatentDiffusionGenerator, SDGeneratorConfig
    from mmalign.rewards.clip import ClipRewardConfig, ClipScore

    gen = LatentDiffusionGenerator(SDGeneratorConfig(pretrained=str(tiny_sd)))
    reward = ClipScore(ClipRewardConfig(model=f"local-dir:{tiny_clip}"))
    params = [p for p in gen.trainable().parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA starts at zero (policy == reference): move it so that the KL is not 0
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    c = 0.3
    settings = dict(
        rollout=RolloutSettings(samples_per_prompt=3, num_steps=3), timestep_fraction=1.0, filter_zero_std=False
    )
    m0, m1 = GRPO(GRPOConfig(**settings)), GRPO(GRPOConfig(kl_coef=c, **settings))
    buf = m1.collect(gen, reward, ["a red circle", "a blue square"], [0, 1])
    batch = m1.batch(buf, list(range(6)), [5] * 6)
    loss1, met1 = m1.loss(batch, gen)
    loss0, met0 = m0.loss(batch, gen)
    assert "kl" not in met0

    ro = batch["rollout"]
    ex, ac = ro.extras, gen.scheduler.alphas_cumprod.double()
    eta = float(ex["eta"])
    kls = []
    for k in range(len(ro.timesteps)):  # timestep_fraction 1: every step is trained
        t, prev = int(ro.timesteps[k]), int(ro.timesteps[k]) - ex["stride"]
        a_t = float(ac[t])
        a_prev = float(ac[prev]) if prev >= 0 else float(gen.scheduler.final_alpha_cumprod)
        x = ro.latents[:, k].to(gen.device)
        with torch.no_grad():
            eps = gen.guided_eps(x, torch.tensor(t), ex["cond"], ex["uncond"], ex["guidance_scale"]).double()
            with gen.reference():
                eps_ref = gen.guided_eps(x, torch.tensor(t), ex["cond"], ex["uncond"], ex["guidance_scale"]).double()
        var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # DDIM (Song et al. eq. 16)
        # mu = sqrt(a_prev) (x - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev - var) eps: affine in eps
        coef = math.sqrt(1 - a_prev - var) - math.sqrt(a_prev) * math.sqrt(1 - a_t) / math.sqrt(a_t)
        d_mu = coef * (eps - eps_ref)
        kls.append(float((d_mu**2).flatten(1).mean(1).div(2 * var).mean()))
    want = sum(kls) / len(kls)
    assert want > 1e-4
    assert met1["kl"] == pytest.approx(want, rel=1e-5)
    assert (loss1 - loss0).item() == pytest.approx(c * want, rel=1e-5)


def test_rollouts_written_for_inspection(tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    import json

    from safetensors.torch import load_file

    from mmalign.config import ConfigError

    p = _online_cfg(tmp_path, tiny_sd, tiny_clip, pairs_manifest, ONLINE["grpo"], save_rollouts_every=2)
    Trainer(load_config(p), run_dir=tmp_path / "run").fit()  # 3 steps, 2 per round: rounds 0 and 1
    assert [d.name for d in (tmp_path / "run" / "rollouts").iterdir()] == ["round_000000"]
    out = tmp_path / "run" / "rollouts" / "round_000000"
    rows = [json.loads(l) for l in (out / "rollout.jsonl").read_text().splitlines()]
    buf = load_file(str(out / "buffer.safetensors"))
    assert [r["sample_id"] for r in rows] == list(range(6))  # 2 prompts x 3 samples
    assert json.loads((out / "buffer.json").read_text())["prompts"] == [r["prompt"] for r in rows]
    torch.testing.assert_close(torch.tensor([r["reward"] for r in rows]), buf["extras.rewards"])
    assert buf["log_probs"].shape == (6, 3) and all((out / r["image"]).is_file() for r in rows)
    with pytest.raises(ConfigError, match="save_rollouts_every"):
        load_config(p, ["train.save_rollouts_every=-1"])
