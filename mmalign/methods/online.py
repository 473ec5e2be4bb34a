"""What every online method shares: rollout settings, collecting a round of samples,
per-prompt group statistics, and saving a round's buffer (for exact resume and for
inspection / human labelling).

A *round*: the trainer picks `prompts_per_round` prompts (deterministically from the
run seed and the round number; split over processes by whole prompt groups), the method
collects `samples_per_prompt` samples of each with the current policy (no gradients;
per-step log-probs stored), scores them with the reward, and then the trainer takes
`steps_per_round` optimizer steps on micro-batches drawn from that buffer.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mmalign.config import num
from mmalign.media import tensor_to_pil
from mmalign.protocols import DiffusionGenerator, Reward
from mmalign.types import Rollout, Samples, per_sample_randn


@dataclass
class RolloutSettings:
    prompts_per_round: int = num(16, ge=1)  # over all processes
    samples_per_prompt: int = num(4, ge=1)  # the group size G
    num_steps: int = num(20, ge=1)
    guidance_scale: float = num(4.0, ge=0)
    eta: float = num(1.0, ge=0)
    steps_per_round: int = num(2, ge=1)  # optimizer steps per round
    same_initial_noise: bool = False  # the samples of one prompt share x_T
    # Methods that train the denoising loss on their own samples (RAFT, RWR, online DPO) use
    # latents re-encoded from the decoded images (extras["x0"]) instead of the sampler's raw
    # x_0. The raw x_0 carries fine structure the denoiser does not predict (on the toy model
    # its error at t=20..300 is 2-3x that of encoded images) and fitting it degrades sampling.
    reencode: bool = True
    # The part of the trajectory sampled with the SDE (fractions of num_steps; 0 = the first,
    # noisiest step); the other steps are deterministic (ODE / DDIM eta 0) and have no
    # log-probabilities. MixGRPO / Flow-GRPO-Fast: with SDE noise only where the policy trains, a
    # group's reward differences come from the trained steps alone.
    sde_window: list[float] = num(default_factory=lambda: [0.0, 1.0], ge=0, le=1)

    def validate(self) -> None:
        if self.samples_per_prompt < 1 or self.prompts_per_round < 1:
            raise ValueError("rollout: prompts_per_round and samples_per_prompt must be >= 1")
        check_window("sde_window", self.sde_window)

    def sde_steps(self) -> list[int] | None:
        """The stochastic steps of a rollout (None: all of them)."""
        if list(self.sde_window) == [0.0, 1.0]:
            return None
        return list(window_steps(self.num_steps, self.sde_window))


def check_window(name: str, window: Sequence[float]) -> None:
    if len(window) != 2 or not 0 <= window[0] < window[1] <= 1:
        raise ValueError(f"{name}: need [start, end] with 0 <= start < end <= 1, got {list(window)}")


def window_steps(T: int, window: Sequence[float]) -> range:
    """The steps of a T-step trajectory in the window [start, end) (fractions of T; at least one)."""
    lo = min(int(window[0] * T), T - 1)
    return range(lo, max(lo + 1, math.ceil(window[1] * T)))


@torch.no_grad()
def collect(
    generator: DiffusionGenerator,
    reward: Reward | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rs: RolloutSettings,
    need_log_probs: bool = True,
    batch_size: int = 64,
) -> Rollout:
    """G samples of every prompt with the current policy; extras get `rewards` (unless `reward` is
    None: samples for human labelling) and `group`."""
    G = rs.samples_per_prompt
    rep = [p for p in prompts for _ in range(G)]
    sample_seeds = [s * 1009 + j for s in seeds for j in range(G)]
    group_seeds = [s for s in seeds for _ in range(G)]
    init = None
    if rs.same_initial_noise:
        shape = generator.latent_shape
        init = per_sample_randn([s for s in seeds for _ in range(G)], shape, generator.device)
    parts = []
    for i in range(0, len(rep), batch_size):
        sl = slice(i, i + batch_size)
        ro = generator.rollout(
            rep[sl],
            num_steps=rs.num_steps,
            guidance_scale=rs.guidance_scale,
            eta=rs.eta,
            seeds=sample_seeds[sl],
            latents=None if init is None else init[sl],
            need_log_probs=need_log_probs,
            sde_steps=rs.sde_steps(),
        )
        if reward is not None:
            ro.extras["rewards"] = reward(ro.samples, rep[sl]).float().detach()
        if rs.reencode:
            # contiguous: the VAE returns channels-last latents, and convolutions round differently
            # on them than on the contiguous copy a resumed run loads from the checkpoint
            # one posterior draw per prompt: a group's samples share it (see encode_images)
            media = ro.samples.require(generator.modality, "re-encoding samples")  # images, or videos B,F,3,H,W
            ro.extras["x0"] = generator.encode_images(media, group_seeds[sl]).contiguous()
        parts.append(ro)
    ro = Rollout.cat(parts)
    ro.extras["group"] = torch.arange(len(prompts), device=ro.latents.device).repeat_interleave(G)
    return ro


def group_advantages(
    rewards: Tensor, group: Tensor, eps: float = 1e-4, std: bool = True, global_std: bool = False
) -> Tensor:
    """(r - mean_g) / (std_g + eps) within each prompt group (GRPO / DDPO per-prompt stat tracking);
    with `global_std`, (r - mean_g) / (std_all + eps), std_all over every reward of the round on all
    processes (flow_grpo's `PerPromptStatTracker(global_std=True)`). Population stds, float64."""
    r64 = rewards.double()
    adv = torch.zeros_like(r64)
    s_all = round_std(r64) if global_std else None
    for g in group.unique():
        m = group == g
        r = r64[m]
        a = r - r.mean()
        if std:
            a = a / ((s_all if global_std else r.std(unbiased=False)) + eps)
        adv[m] = a
    return adv.to(rewards.dtype)


def round_std(rewards: Tensor) -> Tensor:
    """Population std of the rewards of every process (equal counts per process, as rounds are split)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL gathers only CUDA tensors; the round's rewards may live on the CPU
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else rewards.device
        local = rewards.to(dev).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        rewards = torch.cat(parts).to(rewards.device)
    return rewards.std(unbiased=False)


def train_steps(T: int, fraction: float, seed: int, window: Sequence[float] = (0.0, 1.0)) -> list[int]:
    """A random `fraction` of the T denoising steps, drawn from the window [start, end) of the
    trajectory (as fractions of T; at least one step)."""
    steps = window_steps(T, window)
    n = max(1, math.ceil(fraction * T))
    g = torch.Generator().manual_seed(seed)
    return sorted((steps.start + torch.randperm(len(steps), generator=g)[:n]).tolist())


@contextlib.contextmanager
def swapped(params: list[Tensor], values: list[Tensor]):
    """Temporarily give `params` the data `values` (no copies: the storages are exchanged), e.g. an
    earlier policy's weights for a no-grad reference pass."""
    saved = [p.data for p in params]
    for p, v in zip(params, values):
        p.data = v
    try:
        yield
    finally:
        for p, s in zip(params, saved):
            p.data = s


BUFFER_SKIP = ("cond", "uncond")  # recomputed from the prompts on load


def save_buffer(ro: Rollout, path: Path) -> None:
    """Write a round's buffer: tensors as safetensors, prompts and settings as JSON."""
    tensors = {"latents": ro.latents, "timesteps": ro.timesteps}
    if ro.log_probs is not None:
        tensors["log_probs"] = ro.log_probs
    meta = {"prompts": ro.prompts, "scalars": {}}
    for k, v in ro.extras.items():
        if k in BUFFER_SKIP:
            continue
        if isinstance(v, Tensor):
            tensors[f"extras.{k}"] = v
        else:
            meta["scalars"][k] = v
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / "buffer.safetensors"))
    (path / "buffer.json").write_text(json.dumps(meta))


def dump_rollout(ro: Rollout, path: Path) -> list[str]:
    """A round for inspection or labelling: `save_buffer`'s files, each image sample as
    images/<sample id>.png (sample id = index in the buffer) and rollout.jsonl, one line per
    sample: sample_id, prompt, reward (when scored), image. Returns the image paths (relative)."""
    path = Path(path)
    save_buffer(ro, path)
    names: list[str] = []
    if ro.samples.images is not None:
        (path / "images").mkdir(exist_ok=True)
        names = [f"images/{i:05d}.png" for i in range(len(ro))]
        for name, img in zip(names, ro.samples.images):
            tensor_to_pil(img.float()).save(path / name)
    rewards = ro.extras.get("rewards")
    with open(path / "rollout.jsonl", "w") as f:
        for i, prompt in enumerate(ro.prompts):
            row = {"sample_id": i, "prompt": prompt}
            if rewards is not None:
                row["reward"] = float(rewards[i])
            if names:
                row["image"] = names[i]
            f.write(json.dumps(row) + "\n")
    return names


def load_buffer(path: Path, generator: DiffusionGenerator) -> Rollout:
    """A buffer written by `save_buffer`, on the generator's device, its conditioning recomputed."""
    t = load_file(str(path / "buffer.safetensors"))
    meta = json.loads((path / "buffer.json").read_text())
    extras = {k[len("extras.") :]: v.to(generator.device) for k, v in t.items() if k.startswith("extras.")}
    extras.update(meta["scalars"])
    if extras.get("sde_steps") is not None:  # a tuple: a list the length of the batch would be indexed per sample
        extras["sde_steps"] = tuple(extras["sde_steps"])
    ro = Rollout(
        Samples(), t["latents"].to(generator.device), t["timesteps"], t.get("log_probs"), meta["prompts"], extras
    )
    if ro.log_probs is not None:
        ro.log_probs = ro.log_probs.to(generator.device)
    generator.condition(ro)
    return ro
