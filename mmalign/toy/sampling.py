"""Sampling a toy Stable Diffusion pipeline on captions with per-caption seeds (used to
build and evaluate the assets: train.py, proxy.py)."""

from __future__ import annotations

import torch

from .world import SIZE


@torch.no_grad()
def sample(pipe, captions, seeds, steps=20, cfg=4.0, batch=64):
    images = []
    for i in range(0, len(captions), batch):
        cs, ss = captions[i : i + batch], seeds[i : i + batch]
        gens = [torch.Generator().manual_seed(int(s)) for s in ss]
        out = pipe(
            list(cs),
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=gens,
            height=SIZE,
            width=SIZE,
            output_type="pil",
        )
        images += out.images
    return images
