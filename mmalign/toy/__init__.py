"""The toy world: procedurally drawn shape scenes, their captions, an exact gold evaluator,
and tiny pretrained models (assets/sd_toy: StableDiffusionPipeline layout; assets/proxy_clip:
open_clip proxy reward) so that alignment can be measured on a CPU.

The toy world is a plug-in of mmalign (plugin.py, entry point `mmalign.plugins`): the core
never imports it; configs name its prompt sets, data, experts and assets by `toy:` specs
(toy:heldout, toy:vlm_pairs, toy:render, toy:sd_toy), which mmalign.sources resolves.

    from mmalign.toy import render, gold_score, train_captions, heldout_captions
    from mmalign.toy.evaluate import gold_report, diversity
    python -m mmalign.toy.train all --out mmalign/toy/assets     # rebuild the assets
"""

from pathlib import Path

from .gold import CONSTRAINTS, detect, gold_score
from .world import (
    COLORS,
    KINDS,
    PALETTE,
    SHAPES,
    all_captions,
    caption_kind,
    heldout_captions,
    parse,
    perturb_caption,
    render,
    train_captions,
)

ASSETS = Path(__file__).parent / "assets"
SD_TOY = ASSETS / "sd_toy"
PROXY_CLIP = ASSETS / "proxy_clip"

__all__ = [
    "ASSETS",
    "SD_TOY",
    "PROXY_CLIP",
    "CONSTRAINTS",
    "COLORS",
    "KINDS",
    "PALETTE",
    "SHAPES",
    "all_captions",
    "caption_kind",
    "detect",
    "gold_score",
    "heldout_captions",
    "parse",
    "perturb_caption",
    "render",
    "train_captions",
]
