"""Reward back-propagation: fine-tuning a sampler directly on the gradient of a differentiable reward.

The sampler's chain x_T -> ... -> x_0 is differentiable in the trained parameters; the loss is a
function of the reward of the decoded result, back-propagated through the last denoising steps
(and the VAE decoder and the reward model, both frozen). One method, four modes:

- `draft` -- DRaFT-K (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable
  Rewards", 2023): sample x_T..x_K without gradients, the last K steps with gradients,

      L = -reward_scale * mean_i r(decode(x_0^i), c_i)

  K = 1 is DRaFT-1. With `lv_samples: n` (DRaFT-LV, K = 1) the chain is sampled to x_0 without
  gradients and the last step is re-run n times from fresh noisings of it,
  x_1^j = alpha_1 sg(x_0) + sigma_1 eps_j, the loss averaging -r over the n results.
- `alignprop` -- AlignProp (Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with
  Reward Backpropagation", 2023): the same objective with randomized truncation, K drawn
  uniformly from `alignprop_k` (inclusive) every round (AlignProp's `truncated_backprop_minmax`
  (35, 45) of 50 steps is K in [5, 15]).
- `refl` -- ReFL (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for
  Text-to-Image Generation", 2023): sample without gradients to a step s drawn uniformly from the
  late window `refl_window` (fractions of T; ImageReward's train_refl draws s in 30..39 of 40),
  then one model call with gradients predicts x̂_0 from x_s, and

      L = reward_scale * mean_i ReLU(refl_margin - r(decode(x̂_0^i), c_i))

  (train_refl: `F.relu(-rewards + 2)`, margin 2).
- `edit` -- InstructVideo's reward fine-tuning as editing (Yuan et al., "InstructVideo:
  Instructing Video Diffusion Models with Human Feedback", 2024): sample x_0 without gradients
  with the current (`edit_source: policy`) or the reference model, corrupt it to the sampler
  step s_e = T - ceil(edit_fraction T) with the forward process,
  x_{s_e} = alpha(t_{s_e}) x_0 + sigma(t_{s_e}) eps, and run the remaining steps with gradients;
  L = -reward_scale * mean r(decode(x_0')). For video generators the reward is a video reward
  (e.g. `video_from_image`: segmental frame sampling with temporally attenuated weights).

The sampler is the generator's own (`GuidableGenerator` hooks: DDIM with eta for UNet models,
Euler / the config's SDE for flow models, classifier-free guidance u + s (c - u)); every denoiser
call with gradients is wrapped in `torch.utils.checkpoint` (`checkpoint: true`), so the memory
of K steps is that of their inputs. No KL or other regulariser: DRaFT, AlignProp, ReFL's
train_refl and VADER have none.

Where the no-gradient part runs: in `collect`, once per round with the round's weights (the
buffer holds each sample's latent at the step where the loss starts); the loss runs the rest.
With `rollout.steps_per_round: 1` and a batch of the whole round, as the toy configs do, every
update is on a chain sampled with the current weights, as in the papers' code.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from mmalign.config import ConfigError, num
from mmalign.methods.online import RolloutSettings, check_window, window_steps
from mmalign.protocols import GuidableGenerator, Reward, require
from mmalign.registry import register_method
from mmalign.types import Rollout, Samples, per_sample_randn

EDIT_SALT = 104_729  # seeds the edit-mode corruption noise apart from the sampler's noises
LV_SALT = 15_485_863  # DRaFT-LV's re-noisings


def _rollout() -> RolloutSettings:
    # DRaFT's and AlignProp's sampling: 50 DDIM steps with CFG 7.5, one sample per prompt, one
    # optimizer step per chain; DRaFT samples with eta 0
    return RolloutSettings(num_steps=50, guidance_scale=7.5, eta=0.0, samples_per_prompt=1, steps_per_round=1)


@dataclass
class RewardBackpropConfig:
    rollout: RolloutSettings = field(default_factory=_rollout)
    mode: Literal["draft", "alignprop", "refl", "edit"] = "draft"
    k: int = num(1, ge=1)  # draft: the last K steps carry gradients (DRaFT-K; 1 = DRaFT-1)
    lv_samples: int = num(0, ge=0)  # draft with k 1: DRaFT-LV's re-noisings of x_0 (0 = off; the paper's n is 2)
    alignprop_k: list[int] = num(default_factory=lambda: [5, 15], ge=1)  # alignprop: K ~ U{lo..hi} per round
    refl_window: list[float] = num(default_factory=lambda: [0.75, 1.0], ge=0, le=1)  # refl: the gradient step's window
    refl_margin: float = num(2.0)  # refl: phi(r) = ReLU(margin - r)
    edit_fraction: float = num(0.5, gt=0, le=1)  # edit: the fraction of the sampler's steps re-run after corrupting
    edit_source: Literal["policy", "reference"] = "policy"  # edit: who samples the videos (images) to corrupt
    reward_scale: float = num(1.0, gt=0)  # multiplies the loss (ReFL's code: grad_scale 1e-3)
    checkpoint: bool = True  # torch.utils.checkpoint around each denoiser call with gradients

    def validate(self) -> None:
        lo_hi = list(self.alignprop_k)
        if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"alignprop_k: need [lo, hi] with 1 <= lo <= hi, got {lo_hi}")
        check_window("refl_window", self.refl_window)
        if self.lv_samples and (self.mode != "draft" or self.k != 1):
            raise ValueError("lv_samples: DRaFT-LV re-runs the last step only: it needs mode 'draft' and k 1")


def guided_output(generator: Any, x: Tensor, t: Any, cond: dict, uncond: dict | None, scale: float) -> Tensor:
    """The classifier-free guided model output u + s (c - u) (c without `uncond`)."""
    u, c = generator.cfg_outputs(x, t, cond, uncond)
    return c if u is None or scale == 1.0 else u + scale * (c - u)


def run_chain(
    generator: Any,
    x: Tensor,
    steps: list[tuple[Any, Any]],
    start: int,
    stop: int,
    grad_from: int,
    cond: dict,
    uncond: dict | None,
    scale: float,
    eta: float,
    seeds: list[int],
    use_checkpoint: bool = True,
) -> Tensor:
    """Sampler steps start..stop-1 from x (the input of step `start`); the steps before `grad_from`
    run without gradients, the others with (each denoiser call checkpointed)."""
    for k in range(start, stop):
        t, t_prev = steps[k]
        noise = generator.step_noise(seeds, k) if eta > 0 else None
        if k < grad_from or not torch.is_grad_enabled():
            with torch.no_grad():
                pred = guided_output(generator, x, t, cond, uncond, scale)
                x = generator.sampler_step(pred, x, t, t_prev, eta, noise)
            continue
        if use_checkpoint:
            pred = grad_checkpoint(
                lambda x_, t_=t: guided_output(generator, x_, t_, cond, uncond, scale), x, use_reentrant=False
            )
        else:
            pred = guided_output(generator, x, t, cond, uncond, scale)
        x = generator.sampler_step(pred, x, t, t_prev, eta, noise)
    return x


def refl_loss(rewards: Tensor, margin: float = 2.0) -> Tensor:
    """ReFL's per-sample loss ReLU(margin - r) (ImageReward's train_refl: F.relu(-rewards + 2))."""
    return torch.relu(margin - rewards)


class RewardBackprop:
    """DRaFT-K / DRaFT-LV / AlignProp / ReFL / InstructVideo-style editing (see the module docstring)."""

    generator_role = GuidableGenerator

    def __init__(self, cfg: RewardBackpropConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self.reward: Reward | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, generator: Any, reward: Any) -> None:
        require(generator, GuidableGenerator, "method 'reward_backprop'", f"generator {type(generator).__name__}")
        if reward is None:
            raise ConfigError("method 'reward_backprop' back-propagates a reward's gradient: set `reward:`")
        if not isinstance(reward, Reward) or not reward.differentiable:
            raise ConfigError(
                f"method 'reward_backprop' back-propagates the reward's gradient; reward "
                f"{getattr(reward, 'name', type(reward).__name__)!r} is not differentiable"
            )
        self.reward = reward

    # ------------------------------------------------------------------ schedule of a round
    def plan(self, T: int, seed: int) -> tuple[int, int]:
        """(start, grad_from): the step where the loss's chain starts (the no-gradient prefix ends)
        and the first step with gradients, drawn for a round from `seed` where random."""
        c = self.cfg
        g = torch.Generator().manual_seed(int(seed) * 7_368_787 + 11)
        if c.mode == "draft":
            if c.lv_samples:
                return T, T - 1
            s = T - min(c.k, T)
            return s, s
        if c.mode == "alignprop":
            lo, hi = (min(v, T) for v in c.alignprop_k)
            k = int(torch.randint(lo, hi + 1, (1,), generator=g))
            return T - k, T - k
        if c.mode == "refl":
            steps = window_steps(T, c.refl_window)
            s = steps.start + int(torch.randint(len(steps), (1,), generator=g))
            return s, s
        s = T - min(T, math.ceil(c.edit_fraction * T))
        return s, s

    def _conds(self, generator: Any, prompts: list[str]) -> tuple[dict, dict | None]:
        scale = self.rollout.guidance_scale
        cond = generator.encode_prompt(prompts)
        return cond, (generator.encode_prompt(prompts, negative=True) if scale != 1.0 else None)

    # ------------------------------------------------------------------ OnlineMethod
    @torch.no_grad()
    def collect(self, generator: Any, reward: Any, prompts, seeds) -> Rollout:
        """The no-gradient part of each chain: x at the step where the loss starts (edit: the
        corrupted sample; DRaFT-LV: x_0), with the sample seeds and the round's plan."""
        if reward is not None:
            self.reward = reward
        rs, c = self.rollout, self.cfg
        G = rs.samples_per_prompt
        rep = [p for p in prompts for _ in range(G)]
        sample_seeds = [int(s) * 1009 + j for s in seeds for j in range(G)]
        steps = generator.sampling_timesteps(rs.num_steps)
        T = len(steps)
        start, grad_from = self.plan(T, seeds[0])
        x = generator.initial_latents(sample_seeds)
        if rs.same_initial_noise:
            x = generator.initial_latents([int(s) for s in seeds for _ in range(G)])
        cond, uncond = self._conds(generator, rep)
        extras: dict[str, Any] = {}
        samples = Samples()
        if c.mode == "edit":
            ctx = generator.reference() if c.edit_source == "reference" else contextlib.nullcontext()
            with ctx:
                x0 = run_chain(generator, x, steps, 0, T, T, cond, uncond, rs.guidance_scale, rs.eta, sample_seeds)
            samples = generator.decode(x0)
            if self.reward is not None:
                extras["rewards"] = self.reward(samples, rep).float().detach()
            generator.sampling_timesteps(rs.num_steps)  # (the grid, again: decode / reward may not touch it)
            x = self.corrupt(generator, x0, steps[start][0], sample_seeds)
            extras["source"] = x0
        else:
            x = run_chain(generator, x, steps, 0, start, start, cond, uncond, rs.guidance_scale, rs.eta, sample_seeds)
        B = len(rep)
        dev = x.device
        extras.update(
            {
                "seeds": torch.tensor(sample_seeds, dtype=torch.long, device=dev),
                "start": torch.full((B,), start, dtype=torch.long, device=dev),
                "grad_from": torch.full((B,), grad_from, dtype=torch.long, device=dev),
                "guidance_scale": rs.guidance_scale,
                "num_steps": rs.num_steps,
            }
        )
        return Rollout(
            samples=samples,
            latents=x[:, None].contiguous(),
            timesteps=torch.tensor([float(t) for t, _ in steps], dtype=torch.float64),
            log_probs=None,
            prompts=rep,
            extras=extras,
        )

    @staticmethod
    def corrupt(generator: Any, x0: Tensor, t: Any, seeds: list[int]) -> Tensor:
        """The forward process to sampler timestep t: alpha(t) x0 + sigma(t) eps, eps from the seeds."""
        alpha, sigma = generator.alpha_sigma(t)
        eps = per_sample_randn([int(s) * 1_000_003 + EDIT_SALT for s in seeds], x0.shape[1:], x0.device)
        return alpha * x0 + sigma * eps

    def round_metrics(self, ro: Rollout) -> dict[str, float]:
        T = int(ro.extras["num_steps"])
        out = {
            "grad_steps": float(T - int(ro.extras["grad_from"][0])),
            "start_step": float(ro.extras["start"][0]),
        }
        if "rewards" in ro.extras:  # edit: the rewards of the samples before corruption
            out["reward_mean"] = float(ro.extras["rewards"].mean())
        return out

    def num_items(self, ro: Rollout) -> int:
        return len(ro)

    def batch(self, ro: Rollout, idx, seeds) -> dict:
        sub = ro.select(torch.as_tensor(idx))
        return {"rollout": sub, "prompts": sub.prompts, "seeds": torch.as_tensor(seeds)}

    # ------------------------------------------------------------------ loss
    def scores(self, generator: Any, latents: Tensor, prompts: list[str]) -> Tensor:
        if self.reward is None:
            raise ValueError("reward_backprop: no reward (setup or collect gives it)")
        return self.reward(generator.decode(latents), prompts).float()

    def loss(self, batch: dict, generator: Any) -> tuple[Tensor, dict[str, float]]:
        ro: Rollout = batch["rollout"]
        c, rs = self.cfg, self.rollout
        steps = generator.sampling_timesteps(int(ro.extras["num_steps"]))
        T = len(steps)
        x_in = ro.latents[:, -1].to(generator.device).float()
        seeds_all = ro.extras["seeds"].tolist()
        plan = torch.stack([ro.extras["start"], ro.extras["grad_from"]], 1).cpu()
        total, rewards, n = 0.0, [], len(ro)
        for key in plan.unique(dim=0).tolist():
            idx = [i for i in range(n) if plan[i].tolist() == key]
            start, grad_from = key
            prompts = [ro.prompts[i] for i in idx]
            seeds = [seeds_all[i] for i in idx]
            cond, uncond = self._conds(generator, prompts)
            x = x_in[idx]
            if c.lv_samples:
                r = self._lv_rewards(generator, x, steps, prompts, seeds, batch, idx, cond, uncond)
                part = -r
            elif c.mode == "refl":
                t = steps[start][0]
                fn = lambda x_: guided_output(generator, x_, t, cond, uncond, rs.guidance_scale)  # noqa: E731
                pred = grad_checkpoint(fn, x, use_reentrant=False) if c.checkpoint else fn(x)
                r = self.scores(generator, generator.predicted_x0(pred, x, t), prompts)
                part = refl_loss(r, c.refl_margin)
            else:
                x0 = run_chain(
                    generator,
                    x,
                    steps,
                    start,
                    T,
                    grad_from,
                    cond,
                    uncond,
                    rs.guidance_scale,
                    rs.eta,
                    seeds,
                    c.checkpoint,
                )
                r = self.scores(generator, x0, prompts)
                part = -r
            total = total + part.sum() / n
            rewards.append(r.detach())
        r = torch.cat(rewards)
        metrics = {"reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)) if len(r) > 1 else 0.0}
        return c.reward_scale * total, metrics

    def _lv_rewards(self, generator, x0, steps, prompts, seeds, batch, idx, cond, uncond) -> Tensor:
        """DRaFT-LV: [B] mean over n re-noisings x_1^j = alpha_1 sg(x_0) + sigma_1 eps_j of the
        reward after the last step (with gradients)."""
        rs, c = self.rollout, self.cfg
        T = len(steps)
        t, t_prev = steps[T - 1]
        alpha, sigma = generator.alpha_sigma(t)
        loss_seeds = [int(batch["seeds"][i]) for i in idx]
        out = 0.0
        for j in range(c.lv_samples):
            eps = per_sample_randn([s * 1_000_003 + LV_SALT + j for s in loss_seeds], x0.shape[1:], x0.device)
            x1 = alpha * x0.detach() + sigma * eps
            generator.sampling_timesteps(rs.num_steps)
            x = run_chain(
                generator, x1, steps, T - 1, T, T - 1, cond, uncond, rs.guidance_scale, rs.eta, seeds, c.checkpoint
            )
            out = out + self.scores(generator, x, prompts) / c.lv_samples
        return out


@register_method("reward_backprop", RewardBackpropConfig)
def build_reward_backprop(cfg: RewardBackpropConfig) -> RewardBackprop:
    """Reward back-propagation through the sampler: DRaFT-K / -LV, AlignProp, ReFL, editing (InstructVideo)."""
    return RewardBackprop(cfg)
