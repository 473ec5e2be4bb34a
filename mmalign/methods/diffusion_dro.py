"""Diffusion-DRO (Wu et al., "Ranking-based Preference Optimization for Diffusion Models
from Implicit User Feedback", NeurIPS 2025): max-margin inverse RL as a denoising ranking.

Offline expert images x0^E (human-preferred / demonstrations) are ranked above online
samples of the policy at the same timestep t, measured by the improvement of the denoising
error over the reference:

    d = [e_theta(x^E_t) - e_ref(x^E_t)] - [e_theta(x^P_t) - e_ref(x^P_t)]
    L = max(0, d + margin)

where x^E_t = sqrt(a_t) x0^E + sqrt(1 - a_t) eps (fresh eps), and x^P_t is the policy's
own latent at step t of a sampled trajectory, with target eps^P = (x^P_t - sqrt(a_t) x0^P)
/ sqrt(1 - a_t) from that trajectory's final sample x0^P. The errors are per-sample means
over latent dimensions. The policy samples live in a replay buffer refreshed every round
(`rollout.steps_per_round` optimizer steps) by the current policy.

Experts: `experts: toy:render` draws the toy world's correct scene for each caption (the
toy world's demonstrations); otherwise a JSONL manifest of {prompt, image} (paths
relative to the manifest), read once and VAE-encoded when first needed.
No reward model is used.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmalign.methods.online import RolloutSettings
from mmalign.registry import register_method
from mmalign.types import Rollout, per_sample_randint, per_sample_randn


def dro_loss(err_expert: Tensor, ref_expert: Tensor, err_policy: Tensor, ref_policy: Tensor,
             margin: float) -> tuple[Tensor, Tensor]:
    """Per-sample hinge loss and the ranking difference d (negative = expert ranked above)."""
    d = (err_expert - ref_expert) - (err_policy - ref_policy)
    return torch.relu(d + margin), d


@dataclass
class DiffusionDROConfig:
    rollout: RolloutSettings = field(default_factory=lambda: RolloutSettings(samples_per_prompt=1, eta=0.0,
                                                                             guidance_scale=1.0))
    experts: str = "toy:render"  # or a JSONL manifest of {prompt, image}
    margin: float = 0.001
    expert_seed: int = 0

    def validate(self) -> None:
        if not self.experts.startswith("toy:") and not Path(self.experts).is_file():
            raise ValueError(f"experts: {self.experts} not found")


class DiffusionDRO:
    online = True
    needs_reward = False

    def __init__(self, cfg: DiffusionDROConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self._manifest: dict[str, list[Path]] | None = None

    def _expert_images(self, prompts: list[str], seeds: list[int]) -> Tensor:
        from mmalign.media import load_image, pil_to_tensor

        if self.cfg.experts == "toy:render":
            from mmalign.toy.world import render

            return torch.stack([pil_to_tensor(render(p, self.cfg.expert_seed * 100_003 + s))
                                for p, s in zip(prompts, seeds)])
        if self._manifest is None:
            path = Path(self.cfg.experts)
            self._manifest = {}
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self._manifest.setdefault(row["prompt"], []).append(path.parent / row["image"])
        out = []
        for p, s in zip(prompts, seeds):
            if p not in self._manifest:
                raise ValueError(f"{self.cfg.experts}: no expert image for prompt {p!r}")
            choices = self._manifest[p]
            out.append(load_image(choices[s % len(choices)]))
        return torch.stack(out)

    @torch.no_grad()
    def collect(self, generator, reward, prompts, seeds) -> Rollout:
        rs = self.rollout
        rep = [p for p in prompts for _ in range(rs.samples_per_prompt)]
        sample_seeds = [s * 1009 + j for s in seeds for j in range(rs.samples_per_prompt)]
        ro = generator.rollout(rep, num_steps=rs.num_steps, guidance_scale=rs.guidance_scale, eta=rs.eta,
                               seeds=sample_seeds, need_log_probs=False, decode=False)
        images = self._expert_images(rep, sample_seeds)
        ro.extras["expert_x0"] = generator.encode_images(images, sample_seeds)
        ro.extras["rewards"] = torch.zeros(len(rep))  # no reward model: for the round metrics only
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        return {"policy_samples": float(len(ro))}

    def num_items(self, ro) -> int:
        return len(ro)

    def batch(self, ro, idx, seeds) -> dict:
        return {"rollout": ro.select(idx), "seeds": torch.as_tensor(seeds)}

    def loss(self, batch: dict, generator) -> tuple[Tensor, dict[str, float]]:
        ro, seeds = batch["rollout"], batch["seeds"]
        dev = generator.device
        T = len(ro.timesteps)
        k = per_sample_randint(seeds, 0, T, salt=3)
        t = ro.timesteps[k].to(dev)
        a = generator.train_scheduler.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
        rows = torch.arange(len(ro))
        x_p = ro.latents[rows, k].to(dev).float()
        x0_p = ro.latents[:, -1].to(dev).float()
        eps_p = (x_p - a.sqrt() * x0_p) / (1 - a).sqrt()
        x0_e = ro.extras["expert_x0"].to(dev).float()
        eps_e = per_sample_randn(seeds, x0_e.shape[1:], dev)
        x_e = a.sqrt() * x0_e + (1 - a).sqrt() * eps_e
        cond = generator.encode_prompt(ro.prompts)
        cond2 = generator.cat_cond(cond, cond)
        x, eps, tt = torch.cat([x_e, x_p]), torch.cat([eps_e, eps_p]), torch.cat([t, t])

        def errors():
            pred = generator.model_output(x, tt, cond2)
            return (pred - eps).pow(2).flatten(1).mean(1)

        if generator.prediction_type != "epsilon":
            raise ValueError("diffusion_dro: implemented for epsilon-prediction models")
        e_e, e_p = errors().chunk(2)
        with torch.no_grad(), generator.reference():
            r_e, r_p = errors().chunk(2)
        losses, d = dro_loss(e_e, r_e, e_p, r_p, self.cfg.margin)
        return losses.mean(), {"rank_acc": float((d.detach() < 0).float().mean()), "d": float(d.detach().mean()),
                               "mse_expert": float(e_e.detach().mean()), "mse_policy": float(e_p.detach().mean())}


@register_method("diffusion_dro", DiffusionDROConfig)
def build_diffusion_dro(cfg: DiffusionDROConfig) -> DiffusionDRO:
    """Diffusion-DRO: hinge ranking of offline experts above online policy samples."""
    return DiffusionDRO(cfg)
