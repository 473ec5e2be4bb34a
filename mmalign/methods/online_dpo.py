"""Online (iterative) Diffusion-DPO: Diffusion-DPO whose pairs come from the current policy.

Every round samples G images per prompt with the current policy, ranks them with the
reward (or a judge), and trains Diffusion-DPO (Wallace et al. 2023; see diffusion_dpo.py)
on (best, worst) pairs of each prompt for `steps_per_round` steps, so the pairs track the
policy instead of going stale as in the offline method (the iterative scheme of flow_grpo's
reference updates and of online DPO for LLMs). Prompts whose best and worst rewards are
within `tie_threshold` give no pair (ties are counted).

The reference is the frozen base model (LoRA disabled) by default. `reference: previous`
makes it an earlier policy instead, as SePPO (Zhang et al., "SePPO: Semi-Policy Preference
Optimization for Diffusion Alignment", 2024) and flow_grpo's reference updates do: a copy of
the trained weights taken at the start of every `ref_update_every`-th round. The DPO margin
then measures improvement over that checkpoint, so the policy keeps being pushed where the
base-referenced margin has saturated, and the KL anchor moves with it (no anchor to the base
at all: watch diversity). With ref_update_every=1 the reference is the round's sampler, and
the first step of every round has margin 0 (loss log 2 for `dpo`). The copy is saved in
checkpoints, so a resumed run uses the same reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mmalign.config import num
from mmalign.methods.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from mmalign.methods.online import RolloutSettings, collect, swapped
from mmalign.protocols import DiffusionGenerator
from mmalign.registry import register_method


@dataclass
class OnlineDPOConfig:
    rollout: RolloutSettings = field(default_factory=lambda: RolloutSettings(eta=1.0))
    beta: float = num(5000.0, gt=0)
    loss_type: str = "dpo"
    label_smoothing: float = num(0.0, ge=0, lt=1)
    tie_threshold: float = num(0.0, ge=0)
    train_guidance_scale: float = num(1.0, ge=0)  # see DiffusionDPOConfig
    reference: Literal["base", "previous"] = "base"
    ref_update_every: int = num(1, ge=1)  # reference: previous -- rounds between copies of the policy

    def validate(self) -> None:
        DiffusionDPOConfig(self.beta, self.loss_type, self.label_smoothing).validate()
        if self.reference not in ("base", "previous"):
            raise ValueError(f"reference: {self.reference!r} is not 'base' or 'previous'")
        if self.ref_update_every < 1:
            raise ValueError("ref_update_every: must be >= 1 (rounds)")
        if self.rollout.samples_per_prompt < 2:
            raise ValueError("rollout.samples_per_prompt: need >= 2 samples per prompt to make a pair")


class OnlineDPO:
    generator_role = DiffusionGenerator

    def __init__(self, cfg: OnlineDPOConfig):
        self.cfg, self.rollout = cfg, cfg.rollout
        self.dpo = DiffusionDPO(
            DiffusionDPOConfig(
                cfg.beta, cfg.loss_type, cfg.label_smoothing, train_guidance_scale=cfg.train_guidance_scale
            ),
            reference=self._previous_policy if cfg.reference == "previous" else None,
        )
        self.rounds = 0  # rounds collected so far
        self.ref_params: list[Tensor] | None = None  # reference: previous -- the policy copy

    @staticmethod
    def _trained(generator) -> list[Tensor]:
        return [p for p in generator.trainable().parameters() if p.requires_grad]

    def _previous_policy(self, generator):
        """The copied policy's weights in place of the trained ones (for the no-grad reference pass)."""
        params = self._trained(generator)
        self.ref_params = [r.to(p.device, p.dtype) for r, p in zip(self.ref_params, params)]  # after a resume: CPU
        return swapped(params, self.ref_params)

    def collect(self, generator: DiffusionGenerator, reward, prompts, seeds):
        if self.cfg.reference == "previous" and self.rounds % self.cfg.ref_update_every == 0:
            self.ref_params = [p.detach().clone() for p in self._trained(generator)]
        self.rounds += 1
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
        return {
            "prompts": [ro.prompts[i] for i in p[:, 0].tolist()],
            "latents_w": x0[p[:, 0]],
            "latents_l": x0[p[:, 1]],
            "seeds": torch.as_tensor(seeds),
        }

    def loss(self, batch: dict, generator: DiffusionGenerator) -> tuple[Tensor, dict[str, float]]:
        return self.dpo.loss(batch, generator)

    def state_dict(self) -> dict:
        out = {"rounds": self.rounds}
        if self.ref_params is not None:
            out["ref_params"] = [p.detach().cpu() for p in self.ref_params]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
        if self.cfg.reference == "previous":
            if "ref_params" not in state:
                raise ValueError("online_dpo checkpoint has no reference copy (was it trained with reference: base?)")
            self.ref_params = list(state["ref_params"])


@register_method("online_dpo", OnlineDPOConfig)
def build_online_dpo(cfg: OnlineDPOConfig) -> OnlineDPO:
    """Online Diffusion-DPO: pairs sampled from the current policy and ranked every round."""
    return OnlineDPO(cfg)
