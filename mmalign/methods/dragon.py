"""DRAGON (Bai et al., "DRAGON: Distributional Rewards Optimize Diffusion Generative Models",
2025): online, on-policy preference optimisation of a reward that may score single samples or
whole sets of them.

Every round samples G >= 2 generations per prompt with the current policy and scores the
round with the reward. The reward may be

- instance-wise (a `Reward`: one score per sample, e.g. an aesthetics model or CLAP score);
- instance-to-distribution (also a `Reward`: each sample against an exemplar set, e.g. `fad`
  with `variant: per_clip`, per-song FAD);
- distribution-to-distribution (a `DistributionReward`: one value for the whole round's set,
  e.g. `fad` with `variant: set` (full-dataset FAD) or `vendi`), which credits each sample with
  its contribution c_i (the contributions sum to the set's value; mmalign.protocols).

Each sample gets a credit: its score, or for a distribution reward its contribution signed so
that larger is better (c_i when `higher_is_better`, else -c_i). Within every prompt's group
the sample with the largest credit joins the positive demonstration set D+ and the one with the
smallest the negative set D- (the paper's paired construction from two generations per
prompt; with G > 2, the best and the worst, as online DPO pairs them); a group whose credits
differ by no more than `tie_threshold` gives no pair. The update is the contrast between the
two sets through Diffusion-DPO (Wallace et al. 2023) on the (D+, D-) pairs, the surrogate the
paper trains with:

    L = -log sigmoid( -beta/2 [ (e_w^theta - e_l^theta) - (e_w^ref - e_l^ref) ] )

with e the per-sample denoising errors at a shared (t, noise) (mmalign/methods/diffusion_dpo.py,
the shared preference layer mmalign/methods/preference.py). Everything after the pairs are
formed -- the loss, `reference: previous`, resume state -- is online DPO's
(mmalign/methods/online_dpo.py): DRAGON differs only in how a round is scored and paired.

Under several processes each process scores its own share of a round, so a distribution
reward's set is that share (docs/parity.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmalign.methods.online import RolloutSettings, collect
from mmalign.methods.online_dpo import OnlineDPO, OnlineDPOConfig
from mmalign.protocols import DiffusionGenerator, DistributionReward, Reward
from mmalign.registry import register_method


@dataclass
class DragonConfig(OnlineDPOConfig):
    # two generations per prompt, as the paper pairs them; stochastic sampling (eta 1) for diversity
    rollout: RolloutSettings = field(default_factory=lambda: RolloutSettings(samples_per_prompt=2, eta=1.0))


def item_credits(reward, samples, prompts) -> tuple[Tensor, Tensor | None]:
    """(credits [B], set value or None): a per-sample reward's scores, or a distribution
    reward's contributions signed so that larger is better, with the set's value."""
    if isinstance(reward, DistributionReward):
        value, contrib = reward.score_batch(samples, list(prompts))
        sign = 1.0 if reward.higher_is_better else -1.0
        return sign * contrib.float().detach(), value.detach().float()
    if isinstance(reward, Reward):
        return reward(samples, list(prompts)).float().detach(), None
    raise TypeError(
        f"dragon scores samples with a per-sample reward or a distribution reward; {type(reward).__name__} is neither"
    )


def group_pairs(credits: Tensor, group_size: int, tie_threshold: float = 0.0) -> tuple[Tensor, int]:
    """(pairs [P, 2] of (positive, negative) item indices, ties): per consecutive group of
    `group_size` items, the largest and the smallest credit (the first on equal values); groups
    whose spread is <= tie_threshold give no pair."""
    r = credits.view(-1, group_size)
    base = torch.arange(len(r), device=r.device) * group_size
    w, l = r.argmax(1) + base, r.argmin(1) + base
    ok = (r.max(1).values - r.min(1).values) > tie_threshold
    return torch.stack([w[ok], l[ok]], 1), int((~ok).sum())


class Dragon(OnlineDPO):
    """Online DPO on pairs formed from instance-wise or distributional credits (module docstring)."""

    generator_role = DiffusionGenerator

    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds):
        if self.cfg.reference == "previous" and self.rounds % self.cfg.ref_update_every == 0:
            self.ref_params = [p.detach().clone() for p in self._trained(generator)]
        self.rounds += 1
        ro = collect(generator, None, prompts, seeds, self.rollout, need_log_probs=False)
        # the whole round is scored at once: a distribution reward values the set
        credits, value = item_credits(reward, ro.samples, ro.prompts)
        credits = credits.to(ro.latents.device)
        pairs, ties = group_pairs(credits, self.rollout.samples_per_prompt, self.cfg.tie_threshold)
        ro.extras["rewards"] = credits
        ro.extras["pairs"] = pairs
        ro.extras["ties"] = float(ties)
        if value is not None:
            ro.extras["set_value"] = float(value)
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        out = super().round_metrics(ro)
        if "set_value" in ro.extras:
            out["set_value"] = ro.extras["set_value"]
        return out


@register_method("dragon", DragonConfig)
def build_dragon(cfg: DragonConfig) -> Dragon:
    """DRAGON: online Diffusion-DPO on best/worst pairs per prompt from instance or distributional rewards."""
    return Dragon(cfg)
