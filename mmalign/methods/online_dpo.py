"""Online (iterative) Diffusion-DPO: Diffusion-DPO whose pairs come from the current policy.

Every round samples G images per prompt with the current policy, ranks them with the
reward (or a judge), and trains Diffusion-DPO (Wallace et al. 2023; see diffusion_dpo.py)
on (best, worst) pairs of each prompt for `steps_per_round` steps, so the pairs track the
policy instead of going stale as in the offline method (the iterative scheme of flow_grpo's
reference updates and of online DPO for LLMs). Prompts whose best and worst rewards are
within `tie_threshold` give no pair (ties are counted). The reference is the frozen base
model (LoRA disabled).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmalign.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from mmalign.methods.online import RolloutSettings, collect
from mmalign.registry import register_method


@dataclass
class OnlineDPOConfig:
    rollout: RolloutSettings = field(default_factory=lambda: RolloutSettings(eta=1.0))
    beta: float = 5000.0
    loss_type: str = "dpo"
    label_smoothing: float = 0.0
    tie_threshold: float = 0.0
    train_guidance_scale: float = 1.0  # see DiffusionDPOConfig

    def validate(self) -> None:
        DiffusionDPOConfig(self.beta, self.loss_type, self.label_smoothing).validate()
        if self.rollout.samples_per_prompt < 2:
            raise ValueError("rollout.samples_per_prompt: need >= 2 samples per prompt to make a pair")


class OnlineDPO:
    online = True

    def __init__(self, cfg: OnlineDPOConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self.dpo = DiffusionDPO(DiffusionDPOConfig(cfg.beta, cfg.loss_type, cfg.label_smoothing,
                                                   train_guidance_scale=cfg.train_guidance_scale))

    def collect(self, generator, reward, prompts, seeds):
        ro = collect(generator, reward, prompts, seeds, self.rollout, need_log_probs=False)
        G = self.rollout.samples_per_prompt
        r = ro.extras["rewards"].view(-1, G)
        base = torch.arange(len(r), device=r.device) * G
        w, l = r.argmax(1) + base, r.argmin(1) + base
        ok = (r.max(1).values - r.min(1).values) > self.cfg.tie_threshold
        ro.extras["pairs"] = torch.stack([w[ok], l[ok]], 1)
        ro.extras["ties"] = float((~ok).sum())
        return ro

    def round_metrics(self, ro) -> dict[str, float]:
        r, p = ro.extras["rewards"], ro.extras["pairs"]
        out = {"reward_mean": float(r.mean()), "pairs": float(len(p)), "ties": ro.extras["ties"]}
        if len(p):
            out["reward_gap"] = float((r[p[:, 0]] - r[p[:, 1]]).mean())
        return out

    def num_items(self, ro) -> int:
        return len(ro.extras["pairs"])

    def batch(self, ro, idx, seeds) -> dict:
        p = ro.extras["pairs"][torch.as_tensor(idx, device=ro.extras["pairs"].device)]
        x0 = ro.extras["x0"] if "x0" in ro.extras else ro.latents[:, -1]
        return {"prompts": [ro.prompts[i] for i in p[:, 0].tolist()], "latents_w": x0[p[:, 0]],
                "latents_l": x0[p[:, 1]], "seeds": torch.as_tensor(seeds)}

    def loss(self, batch: dict, generator) -> tuple[Tensor, dict[str, float]]:
        return self.dpo.loss(batch, generator)


@register_method("online_dpo", OnlineDPOConfig)
def build_online_dpo(cfg: OnlineDPOConfig) -> OnlineDPO:
    """Online Diffusion-DPO: pairs sampled from the current policy and ranked every round."""
    return OnlineDPO(cfg)
