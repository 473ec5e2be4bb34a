"""On-policy preference pairs: sample the generator, rank with a reward, keep best vs worst.

For each prompt, `candidates` samples are drawn (per-sample seeds, so the set is the same
whatever the number of processes); the reward's best and worst form a (chosen, rejected)
pair of latents -- by default re-encoded from the decoded images (`data.reencode`), because
the sampler's raw x_0 carries fine structure the denoiser does not predict. This is how the toy
world's Diffusion-DPO run gets its data, and it works for any generator/reward pair (RLAIF-style self-generated data).
Prompts are split over processes and the pairs gathered, so nobody samples twice; the
pairs are saved in the run directory and reused on resume.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmalign import sources
from mmalign.config import read_utf8
from mmalign.data.preference import DataError


def load_prompts(spec: str) -> list[str]:
    """A registered prompt set (`prefix:name`, e.g. the toy world's "toy:heldout"; see mmalign.sources)
    or a text file with one prompt per line."""
    p = Path(spec)
    if sources.is_spec(spec) and not p.is_file():
        return list(sources.resolve("prompt_set", spec))
    if not p.is_file():
        raise FileNotFoundError(f"{p}: prompts file not found")
    prompts = [line.strip() for line in read_utf8(p, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{p}: no prompts")
    return prompts


class LatentPairs(Dataset):
    def __init__(self, prompts: list[str], latents_w: torch.Tensor, latents_l: torch.Tensor):
        self.prompts, self.w, self.l = prompts, latents_w, latents_l

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "latents_w": self.w[i], "latents_l": self.l[i]}


@torch.no_grad()
def generate_pairs(
    generator,
    reward,
    d,
    seed: int,
    log: Callable[[str], None] = print,
    accelerator=None,
    cache: Path | None = None,
    batch_size: int = 64,
) -> LatentPairs:
    from safetensors.torch import load_file, save_file

    prompts = load_prompts(d.prompts)
    if d.max_samples and d.max_samples < len(prompts):
        prompts = sorted(random.Random(seed).sample(prompts, d.max_samples), key=prompts.index)
    key = json.dumps(
        {
            "prompts": prompts,
            "k": d.candidates,
            "steps": d.sample_steps,
            "cfg": d.sample_guidance,
            "eta": d.sample_eta,
            "seed": seed,
            "gap": d.min_gap,
            "model": generator.cfg.pretrained,
            "reencode": d.reencode,
        }
    )
    if cache is not None and cache.with_suffix(".json").is_file() and cache.with_suffix(".json").read_text() == key:
        t = load_file(str(cache))
        kept = json.loads(cache.with_suffix(".prompts.json").read_text())
        log(f"data: reusing {len(kept)} generated pairs from {cache}")
        return LatentPairs(kept, t["w"], t["l"])

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(prompts), world))
    k = d.candidates
    per_batch = max(1, batch_size // k)
    out_idx, out_w, out_l, gaps, best_s, worst_s = [], [], [], [], [], []
    from tqdm.auto import tqdm

    main = accelerator is None or accelerator.is_main_process
    for start in tqdm(
        range(0, len(mine), per_batch),
        desc=f"sampling {k} candidates x {len(mine)} prompts",
        disable=not main,
        dynamic_ncols=True,
    ):
        idx = mine[start : start + per_batch]
        rep = [prompts[i] for i in idx for _ in range(k)]
        seeds = [seed * 1_000_003 + i * k + j for i in idx for j in range(k)]
        ro = generator.rollout(
            rep,
            num_steps=d.sample_steps,
            guidance_scale=d.sample_guidance,
            eta=d.sample_eta,
            seeds=seeds,
            need_log_probs=False,
        )
        scores = reward(ro.samples, rep).float().view(len(idx), k).cpu()
        # a prompt's candidates share their posterior draw (see encode_images)
        group = [seed * 1_000_003 + i * k for i in idx for _ in range(k)]
        media = ro.samples.require(generator.modality, "re-encoding samples") if d.reencode else None
        x0 = generator.encode_images(media, group) if d.reencode else ro.latents[:, -1]
        x0 = x0.view(len(idx), k, *ro.latents.shape[2:]).cpu()
        for row, i in enumerate(idx):
            b, w = int(scores[row].argmax()), int(scores[row].argmin())
            gap = float(scores[row, b] - scores[row, w])
            if gap <= d.min_gap or b == w:
                continue
            out_idx.append(i)
            out_w.append(x0[row, b])
            out_l.append(x0[row, w])
            gaps.append(gap)
            best_s.append(float(scores[row, b]))
            worst_s.append(float(scores[row, w]))
    local = list(zip(out_idx, out_w, out_l, gaps, best_s, worst_s))
    if world > 1:
        from accelerate.utils import gather_object

        local = gather_object([local])
        local = [x for part in local for x in part]
    local.sort(key=lambda x: x[0])
    if not local:
        raise DataError("data: no preference pairs survived (every reward gap <= data.min_gap)")
    kept = [prompts[x[0]] for x in local]
    w = torch.stack([x[1] for x in local])
    l = torch.stack([x[2] for x in local])
    mean = lambda v: sum(v) / len(v)
    log(
        f"data: {len(kept)} generated pairs from {len(prompts)} prompts x {k} samples; reward best "
        f"{mean([x[4] for x in local]):.4f} vs worst {mean([x[5] for x in local]):.4f} "
        f"(mean gap {mean([x[3] for x in local]):.4f})"
    )
    if cache is not None and (accelerator is None or accelerator.is_main_process):
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": w.contiguous(), "l": l.contiguous()}, str(cache))
        cache.with_suffix(".prompts.json").write_text(json.dumps(kept))
        cache.with_suffix(".json").write_text(key)
    return LatentPairs(kept, w, l)
