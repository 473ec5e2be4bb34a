"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", 2025): online RL on the *forward* process, with clean samples only.

Each round samples G images per prompt from the "old" policy v_old (any sampler: here the
generator's ODE/SDE sampler, no log-probs), scores them, and turns group-normalised
advantages into an optimality probability

    r = 1/2 + 1/2 * clip(A, -A_max, A_max) / A_max            in [0, 1].

With the current model v_theta and fixed beta, the implicit positive and negative policies

    v+ = (1 - beta) v_old + beta v_theta,     v- = (1 + beta) v_old - beta v_theta

are trained by flow matching on the clean samples x0 (fresh noise at each trained timestep):

    L(theta) = E [ r ||v+(x_t, c, t) - v||^2 + (1 - r) ||v-(x_t, c, t) - v||^2 ]   (paper eq. 5)

In the paper's practical form (and its code) both terms are written on the x0 estimate
x0_hat = x_t - t v (affine in v, so v+ / v- map to the same combinations of x0_hat), each
term is divided by its own adaptive weight sg(mean |x0_hat - x0|) (self-normalised, per
sample), and the loss is scaled by A_max / beta:

    L = A_max / beta * E [ r ||x0+ - x0||^2 / w+ + (1 - r) ||x0- - x0||^2 / w- ]

Minimising it moves v_theta towards the positive samples and away from the negative ones
(the implicit direction is (v+ - v-) / 2 = beta (v_theta - v_old)). Written on x0_hat the
objective runs on UNet (epsilon / v-prediction) and flow generators alike.

What the paper's code (NVlabs/DiffusionNFT scripts/train_nft_sd3.py, config/nft.py) does, and
the defaults here:
- Timesteps (`timesteps: sampler`): a sample is trained at the sampler's own timesteps, each
  sample at int(num_steps * timestep_fraction) of them (0.99: 9 of 10) in its own random
  order, with fresh noise: for a flow model x_t = (1 - t) x0 + t noise with t = timestep / 1000
  (the sampler's sigma); for a UNet x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise at the DDIM step.
  `timesteps: training_density` draws `timesteps_per_sample` training timesteps from the
  model's training density instead (a uniform integer t, mapped to sigma by the flow model's
  shift / logit-normal density); not the paper's.
- Clean samples (`train_latents: raw`): the sampler's final latents x0, as the code's
  `latents_clean`. `reencoded`: VAE(decode(x0)), the latents other online methods train on
  (the rollout's `reencode` setting is not used by this method); not the paper's.
- Old policy: an EMA of the trained parameters, initialised to them, updated after each
  round's optimizer steps (here: before the next round samples) with the decay of the global
  optimizer step s reached, theta_old <- eta(s) theta_old + (1 - eta(s)) theta,

      eta(s) = 0 for s < old_decay_flat, else min(old_decay_rate * (s - old_decay_flat), old_decay_max)

  The code's decay_type 1 (its default) is rate 0.001, max 0.5, flat 0; decay_type 2 (its OCR
  config) rate 0.0075, max 0.999, flat 75. A ramp per round of min(c k, max) is rate
  c / steps_per_round.
Optionally a KL-style penalty kl_coef * ||x0_theta - x0_ref||^2 (mean over dimensions) keeps
the policy near the reference (the paper's code puts the same penalty on velocities, with
coefficient train.beta = 1e-4: for a flow model that is this one divided by t^2).

The old-policy EMA and the round counter live in the method; `state_dict` /
`load_state_dict` put them in every checkpoint (method.pt), so a resumed run continues the same
EMA (tests/unit/methods/test_online_methods.py: a resumed run equals an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.methods.online import RolloutSettings, collect, group_advantages, swapped
from mmalign.protocols import DiffusionGenerator
from mmalign.registry import register_method
from mmalign.types import per_sample_randint, per_sample_randn


def optimality_probability(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = 1/2 + 1/2 * clip(A / A_max, -1, 1)."""
    return 0.5 + 0.5 * (advantages / adv_clip).clamp(-1, 1)


def nft_loss(
    x0_hat: Tensor, x0_hat_old: Tensor, x0: Tensor, r: Tensor, beta: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample DiffusionNFT losses (before the A_max scale) from x0 estimates.

    x0_hat: the current model's estimate (with gradients); x0_hat_old: the old policy's
    (no gradients); x0: the clean sample; r: optimality probability per sample.
    """
    dims = tuple(range(1, x0.ndim))
    x0_hat_old = x0_hat_old.detach()
    pos = beta * x0_hat + (1 - beta) * x0_hat_old
    neg = (1 + beta) * x0_hat_old - beta * x0_hat
    w_pos = (pos.detach() - x0).abs().mean(dims, keepdim=True).clamp_min(1e-5)
    w_neg = (neg.detach() - x0).abs().mean(dims, keepdim=True).clamp_min(1e-5)
    l_pos = ((pos - x0) ** 2 / w_pos).mean(dims)
    l_neg = ((neg - x0) ** 2 / w_neg).mean(dims)
    losses = (r * l_pos + (1 - r) * l_neg) / beta
    return losses, {
        "loss_pos": l_pos.detach(),
        "loss_neg": l_neg.detach(),
        "old_deviation": (x0_hat.detach() - x0_hat_old).pow(2).mean(dims),
    }


def old_decay(step: int, rate: float, cap: float, flat: int = 0) -> float:
    """The old policy's EMA decay after `step` optimizer steps: 0 before `flat`, then
    min(rate * (step - flat), cap) (DiffusionNFT's return_decay)."""
    return 0.0 if step < flat else min(rate * (step - flat), cap)


def sampler_step_order(seeds, num_steps: int, count: int) -> Tensor:
    """[B, count] distinct sampler step indices per sample, a random order drawn from its seed."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) * 1_000_003 + 5)
        out.append(torch.randperm(num_steps, generator=g)[:count])
    return torch.stack(out)


def x0_estimate_at(generator, x0: Tensor, cond: dict, t: Tensor, noise: Tensor) -> Tensor:
    """x0_hat of the current parameters from x0 noised to the sampler's timesteps t [B] (scheduler
    units). Flow: sigma = t / N, x_t = (1 - sigma) x0 + sigma noise, x0_hat = x_t - sigma v(x_t, t);
    UNet: its DDIM timesteps are training timesteps, `predict_x0`."""
    if generator.prediction_type == "flow":
        sigma = (t.double() / generator.num_train_timesteps).float().view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - sigma) * x0.float() + sigma * noise.float()
        return x_t - sigma * generator.model_output(x_t, t.float(), cond)
    return generator.predict_x0(x0, cond, t.long(), noise)[0]


def _nft_rollout() -> RolloutSettings:
    return RolloutSettings(eta=0.0)  # any sampler: the deterministic ODE / DDIM by default


@dataclass
class DiffusionNFTConfig:
    rollout: RolloutSettings = field(default_factory=_nft_rollout)
    beta: float = num(1.0, gt=0)  # the implicit policies' step (v+ = (1 - beta) v_old + beta v_theta)
    adv_clip: float = num(5.0, gt=0)  # A_max: advantages clipped to [-A_max, A_max], r = 1/2 + A / (2 A_max)
    # sampler: train at the sampler's timesteps (the paper's code); training_density: drawn t
    timesteps: Literal["sampler", "training_density"] = "sampler"
    timestep_fraction: float = num(0.99, gt=0, le=1)  # sampler: int(num_steps * fraction) steps per sample (at least 1)
    timesteps_per_sample: int = num(2, ge=1)  # training_density: (t, noise) draws per clean sample per micro-batch
    train_latents: Literal["raw", "reencoded"] = "raw"  # the sampler's x0 (the paper's code) or VAE(decode(x0))
    old_decay_rate: float = num(0.001, ge=0)  # per optimizer step: eta(s) = min(rate * (s - flat), max)
    old_decay_max: float = num(0.5, ge=0, lt=1)
    old_decay_flat: int = num(0, ge=0)  # optimizer steps with eta = 0 before the ramp
    kl_coef: float = num(0.0, ge=0)
    group_std: bool = True

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta: must be positive, got {self.beta}")
        if self.adv_clip <= 0:
            raise ValueError(f"adv_clip: must be positive, got {self.adv_clip}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction: must be in (0, 1], got {self.timestep_fraction}")
        if self.timesteps_per_sample < 1:
            raise ValueError(f"timesteps_per_sample: must be >= 1, got {self.timesteps_per_sample}")
        if self.old_decay_rate < 0:
            raise ValueError(f"old_decay_rate: must be >= 0, got {self.old_decay_rate}")
        if not 0 <= self.old_decay_max < 1:
            raise ValueError(f"old_decay_max: must be in [0, 1), got {self.old_decay_max}")
        if self.old_decay_flat < 0:
            raise ValueError(f"old_decay_flat: must be >= 0, got {self.old_decay_flat}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef: must be >= 0, got {self.kl_coef}")


class DiffusionNFT:
    generator_role = DiffusionGenerator

    def __init__(self, cfg: DiffusionNFTConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self._old: list[Tensor] | None = None
        self._round = 0

    @staticmethod
    def _params(generator) -> list[Tensor]:
        return [p for p in generator.trainable().parameters() if p.requires_grad]

    def _old_params(self, params: list[Tensor]) -> list[Tensor]:
        """The old policy's weights on the parameters' device (they load from a checkpoint on the CPU)."""
        if len(self._old) != len(params) or any(o.shape != p.shape for o, p in zip(self._old, params)):
            raise ValueError(
                "diffusion_nft: the old policy (e.g. from a checkpoint's method.pt) does not "
                "match the generator's trainable parameters"
            )
        self._old = [o.to(p.device) for o, p in zip(self._old, params)]
        return self._old

    @torch.no_grad()
    def _update_old(self, generator) -> float:
        """theta_old <- eta(s) theta_old + (1 - eta(s)) theta at the start of round k, after
        s = k * steps_per_round optimizer steps (theta_old = theta on the first round)."""
        params = self._params(generator)
        if self._old is None:
            self._old = [p.detach().float().clone() for p in params]
            return 0.0
        c = self.cfg
        eta = old_decay(self._round * self.rollout.steps_per_round, c.old_decay_rate, c.old_decay_max, c.old_decay_flat)
        for o, p in zip(self._old_params(params), params):
            o.mul_(eta).add_(p.detach().float(), alpha=1 - eta)
        return eta

    def old_policy(self, generator):
        """Context in which the generator's trainable parameters are the old policy's."""
        params = self._params(generator)
        return swapped(params, self._old_params(params))

    def state_dict(self) -> dict:
        """The old-policy EMA (absent before the first round) and the round counter."""
        out = {"round": self._round}
        if self._old is not None:
            out["old"] = [o.detach().cpu() for o in self._old]
        return out

    def load_state_dict(self, state: dict) -> None:
        self._round = int(state["round"])
        self._old = list(state["old"]) if "old" in state else None

    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds):
        eta = self._update_old(generator)
        self._round += 1
        rs = replace(self.rollout, reencode=self.cfg.train_latents == "reencoded")
        with self.old_policy(generator):
            ro = collect(generator, reward, prompts, seeds, rs, need_log_probs=False)
        r, grp = ro.extras["rewards"], ro.extras["group"]
        adv = group_advantages(r, grp, std=self.cfg.group_std).clamp(-self.cfg.adv_clip, self.cfg.adv_clip)
        ro.extras["advantages"] = adv
        ro.extras["optimality"] = optimality_probability(adv, self.cfg.adv_clip)
        ro.extras["old_decay"] = eta
        # clean samples only (the trajectory is not needed): the sampler's x0 (`raw`) or the decoded
        # images re-encoded (`reencoded`), a contiguous copy like the one a resumed run loads from
        # its checkpoint, so both round alike
        x0 = ro.extras.pop("x0", None)
        ro.latents = (x0[:, None] if x0 is not None else ro.latents[:, -1:]).contiguous()
        ro.log_probs = None
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        r = ro.extras["rewards"]
        return {
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std(unbiased=False)),
            "old_decay": float(ro.extras["old_decay"]),
        }

    def num_items(self, ro) -> int:
        return len(ro)

    def batch(self, ro, idx, seeds) -> dict:
        return {"rollout": ro.select(torch.as_tensor(idx)), "seeds": torch.as_tensor(seeds)}

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        ro = batch["rollout"]
        if self._old is None:  # loss before any round (collect sets it): start from the weights
            self._update_old(generator)
        dev = generator.device
        x0 = ro.latents[:, -1].to(dev).float()
        r = ro.extras["optimality"].to(dev).float()
        cond = generator.encode_prompt(ro.prompts)
        K, steps = self._timesteps(ro, batch["seeds"])
        total, sums = 0.0, {"loss_pos": 0.0, "loss_neg": 0.0, "old_deviation": 0.0, "kl": 0.0}
        for j in range(K):
            seeds = [int(s) * K + j for s in batch["seeds"]]
            noise = per_sample_randn(seeds, x0.shape[1:], dev)
            if steps is None:  # training_density
                t = per_sample_randint(seeds, 0, generator.num_train_timesteps, dev)
            else:
                t = ro.timesteps.to(dev)[steps[:, j].to(dev)]

            def predict(t=t, noise=noise) -> Tensor:
                if steps is None:
                    return generator.predict_x0(x0, cond, t, noise)[0]
                return x0_estimate_at(generator, x0, cond, t, noise)

            with torch.no_grad(), self.old_policy(generator):
                x0_old = predict()
            x0_theta = predict()
            losses, m = nft_loss(x0_theta, x0_old, x0, r, self.cfg.beta)
            loss_j = self.cfg.adv_clip * losses.mean()
            if self.cfg.kl_coef:
                with torch.no_grad(), generator.reference():
                    x0_ref = predict()
                kl = (x0_theta - x0_ref).pow(2).flatten(1).mean(1)
                loss_j = loss_j + self.cfg.kl_coef * kl.mean()
                sums["kl"] += float(kl.detach().mean()) / K
            total = total + loss_j / K
            for k in ("loss_pos", "loss_neg", "old_deviation"):
                sums[k] += float(m[k].mean()) / K
        metrics = {**sums, "optimality_mean": float(r.mean())}
        if not self.cfg.kl_coef:
            metrics.pop("kl")
        return total, metrics

    def _timesteps(self, ro, seeds) -> tuple[int, Tensor | None]:
        """(K, [B, K] sampler step indices per sample) with `timesteps: sampler`, (K, None) with
        `training_density` (K = timesteps_per_sample draws)."""
        if self.cfg.timesteps == "training_density":
            return self.cfg.timesteps_per_sample, None
        T = len(ro.timesteps)
        if T == 0:
            raise ValueError(
                "diffusion_nft: `timesteps: sampler` trains at the rollout's timesteps, and this rollout has none"
            )
        K = max(1, int(T * self.cfg.timestep_fraction))
        return K, sampler_step_order(seeds, T, K)


@register_method("diffusion_nft", DiffusionNFTConfig)
def build_diffusion_nft(cfg: DiffusionNFTConfig) -> DiffusionNFT:
    """DiffusionNFT: forward-process online RL with implicit positive/negative policies."""
    return DiffusionNFT(cfg)
