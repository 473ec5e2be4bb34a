"""Evaluation of a generator on fixed prompts and seeds: reward, gold accuracy from a
registered gold evaluator (mmalign.sources; the toy world registers one: overall, per caption
kind, per constraint) and diversity (mean pairwise pixel distance across the seeds of one
caption, so mode collapse is visible).

`mmalign eval` (mmalign/cli/eval.py) runs it on a model or a run directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmalign import sources
from mmalign.data.generated import load_prompts


def gold_evaluator(gold: bool | str, modality: str = "image"):
    """The gold evaluator `fn(samples, prompts) -> report` that `gold` names (True: the only one
    for `modality`; an evaluator states its modality in a `modality` attribute, "image" if none)."""
    if isinstance(gold, str):
        return sources.lookup("gold_evaluator", gold)
    known = [
        n
        for n in sources.names("gold_evaluator")
        if getattr(sources.lookup("gold_evaluator", n), "modality", "image") == modality
    ]
    if len(known) != 1:
        raise sources.SourceError(
            f"gold: {len(known)} {modality} gold evaluators are registered ({', '.join(known) or 'none'}); name one"
        )
    return sources.lookup("gold_evaluator", known[0])


def to_array(image) -> np.ndarray:
    """PIL image, HxWx3 uint8 array, or 3xHxW float tensor/array in [0,1] -> HxWx3 float32 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {a.shape}")
    if a.dtype != np.uint8 and a.max() <= 1.0 + 1e-6:
        a = a * 255.0
    return a.astype(np.float32)


def image_list(images) -> list:
    """A B,3,H,W tensor or a sequence of images -> a list of images."""
    if hasattr(images, "detach"):  # torch tensor B,3,H,W
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images as B,3,H,W, got {tuple(images.shape)}")
        return [im for im in images.detach().float().cpu()]
    return list(images)


def _pixels(im) -> np.ndarray:
    return to_array(im) / 255.0  # H,W,3 in [0,1]


def diversity(images_by_caption: Mapping[str, Sequence] | Sequence[Sequence]) -> float:
    """Mean pairwise per-pixel L2 distance (RMS over pixels and channels, images in [0,1])
    between the samples of one caption, averaged over captions with >= 2 samples."""
    groups = images_by_caption.values() if isinstance(images_by_caption, Mapping) else images_by_caption
    per_caption = []
    for group in groups:
        xs = np.stack([_pixels(im) for im in image_list(group)]).reshape(len(group), -1)
        if len(xs) < 2:
            continue
        d = [np.sqrt(np.mean((xs[i] - xs[j]) ** 2)) for i in range(len(xs)) for j in range(i)]
        per_caption.append(float(np.mean(d)))
    return float(np.mean(per_caption)) if per_caption else 0.0


def expand_prompts(prompts: list[str], prompts_from: str | None, max_prompts: int | None) -> list[str]:
    if prompts_from:
        prompts = load_prompts(prompts_from)
    return prompts[:max_prompts] if max_prompts else prompts


@torch.no_grad()
def evaluate_generator(
    generator,
    reward,
    prompts: list[str],
    seeds_per_prompt: int = 1,
    seed: int = 1234,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    gold: bool | str = False,
    batch_size: int = 64,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Deterministic DDIM (eta=0) samples of every prompt x seed; returns (metrics, images), the images
    B,3,H,W (a video generator's videos B,F,3,H,W, an audio generator's clips B,C,T: no per-pixel
    diversity then).

    `gold`: False, True (the one registered gold evaluator) or a gold evaluator's name.

    A reward that only compares pairs (a judge with `mode: pairwise`) gives no reward column;
    the metrics say so under `reward_skipped`."""
    out: dict[str, Any] = {"n_samples": len(prompts) * seeds_per_prompt}
    if reward is not None and not getattr(reward, "scores_single", True):
        out["reward_skipped"] = f"{getattr(reward, 'name', 'reward')}: pairwise-only judge, no per-sample score"
        reward = None
    rep = [p for p in prompts for _ in range(seeds_per_prompt)]
    seeds = [seed + i for i in range(len(rep))]
    images, rewards, sample_rate = [], [], None
    for i in tqdm(range(0, len(rep), batch_size), desc=f"eval {len(rep)} samples", leave=False, dynamic_ncols=True):
        ro = generator.rollout(
            rep[i : i + batch_size],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=0.0,
            seeds=seeds[i : i + batch_size],
            need_log_probs=False,
        )
        # B,3,H,W images / B,F,3,H,W videos / B,C,T audio clips
        media = next(m for m in (ro.samples.images, ro.samples.video, ro.samples.audio) if m is not None)
        images.append(media.float().cpu())
        sample_rate = ro.samples.sample_rate
        if reward is not None:
            rewards.append(reward(ro.samples, rep[i : i + batch_size]).float().cpu())
    images = torch.cat(images)
    if rewards:
        out["reward"] = float(torch.cat(rewards).mean())
    if gold:
        modality = {4: "image", 5: "video"}.get(images.ndim, "audio")  # B,3,H,W / B,F,3,H,W / B,C,T
        if modality == "audio" and sample_rate is not None:  # the audio evaluator reads the clips' rate
            from mmalign.types import Samples

            rep_ = gold_evaluator(gold, modality)(Samples(audio=images, sample_rate=sample_rate), rep)
        else:
            rep_ = gold_evaluator(gold, modality)(images, rep)
        out["gold_accuracy"] = rep_["accuracy"]
        out["gold_compositional"] = rep_["compositional"]
        out["gold_per_kind"] = rep_["per_kind"]
        out["gold_per_constraint"] = rep_["per_constraint"]
    if seeds_per_prompt > 1 and images.ndim in (4, 5):  # per-pixel diversity of images, or of videos' frames
        # a video B,F,3,H,W as one image of its frames stacked vertically: the RMS over all of its pixels
        stills = images if images.ndim == 4 else images.permute(0, 2, 1, 3, 4).flatten(2, 3)
        groups = [list(stills[i * seeds_per_prompt : (i + 1) * seeds_per_prompt]) for i in range(len(prompts))]
        out["diversity"] = diversity(groups)
    return out, images


def evaluate_config(generator, reward, e) -> tuple[dict[str, Any], torch.Tensor]:
    """evaluate_generator with the settings of an `eval:` config block (EvalConfig)."""
    return evaluate_generator(
        generator,
        reward,
        expand_prompts(e.prompts, e.prompts_from, e.max_prompts),
        e.images_per_prompt,
        e.seed,
        e.num_steps,
        e.guidance_scale,
        e.gold,
    )


def format_comparison(before: dict, after: dict) -> str:
    rows = [
        ("gold accuracy", "gold_accuracy"),
        ("gold compositional", "gold_compositional"),
        ("proxy reward", "reward"),
        ("diversity", "diversity"),
    ]
    lines = [f"{'':22s}{'base':>10s}{'aligned':>10s}{'delta':>10s}"]
    for label, k in rows:
        if k in before and k in after:
            lines.append(f"{label:22s}{before[k]:10.4f}{after[k]:10.4f}{after[k] - before[k]:+10.4f}")
    for kind in before.get("gold_per_kind", {}):
        a, b = before["gold_per_kind"][kind], after["gold_per_kind"].get(kind, float("nan"))
        lines.append(f"{'  gold ' + kind:22s}{a:10.4f}{b:10.4f}{b - a:+10.4f}")
    return "\n".join(lines)
