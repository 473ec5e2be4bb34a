"""The toy world as an mmalign plug-in: `register()` is the `mmalign.plugins` entry point
(pyproject.toml), called the first time the core resolves a source spec or a registry name it
does not know. It registers:

    prompt sets         toy:train, toy:heldout, toy:all            (world.py captions)
    preference sources  toy:vlm_pairs, toy:vlm_pairs_perturbed     (vlm_pairs.py, built on first use)
    expert source       toy:render                                 (world.render: the correct scene)
    gold evaluator      toy                                        (evaluate.gold_report)
    audio world         toy:audio_train, toy:audio_heldout,        (audio_world.py captions)
                        toy:audio_all (prompt sets),
                        toy:render_audio (expert source: (waveform, 16000)),
                        toy_audio (gold evaluator, audio_gold.gold_evaluator_audio)
    video world         toy:video_train, toy:video_heldout (a fixed 64-caption subset of the
                        held-out captions), toy:video_heldout_all, toy:video_all (prompt sets;
                        video_world.py), toy:render_video (expert source: F,3,H,W in [0,1]),
                        toy_video (gold evaluator, video_evaluate.gold_report_video)
    asset root          toy  -> assets/ (toy:sd_toy, toy:sd3_toy, toy:proxy_clip, toy:vlm_toy)
    reward              toy_gold                                   (reward.py)
    reward              toy_audio_gold                             (audio_reward.py)
    reward              toy_audio_proxy                            (audio_proxy.py, assets/audio_proxy)
    reward              toy_video_proxy                            (video_reward.py)
"""

from __future__ import annotations

from functools import partial

from mmalign.sources import register_asset_root, register_source

from . import (
    ASSETS,
    audio_proxy,  # noqa: F401  (importing it registers the toy_audio_proxy reward)
    audio_reward,  # noqa: F401  (importing it registers the toy_audio_gold reward)
    audio_world,
    reward,  # noqa: F401  (importing it registers the toy_gold reward)
    video_reward,  # noqa: F401  (importing it registers the toy_video_proxy reward)
    video_world,
    vlm_pairs,
    world,
)
from .audio_gold import gold_evaluator_audio
from .evaluate import gold_report
from .video_evaluate import gold_report_video


def register() -> None:
    """Register the toy world's sources (the `toy_gold` reward registers on importing reward.py)."""
    register_source("prompt_set", "toy:train", world.train_captions)
    register_source("prompt_set", "toy:heldout", world.heldout_captions)
    register_source("prompt_set", "toy:all", world.all_captions)
    for spec in vlm_pairs.SPECS:
        register_source("preference_source", spec, partial(vlm_pairs.materialize, spec))
    register_source("expert_source", "toy:render", world.render)
    register_source("gold_evaluator", "toy", gold_report)
    register_asset_root("toy", ASSETS)
    register_source("prompt_set", "toy:audio_train", audio_world.audio_train_captions)
    register_source("prompt_set", "toy:audio_heldout", audio_world.audio_heldout_captions)
    register_source("prompt_set", "toy:audio_all", audio_world.all_audio_captions)
    register_source("expert_source", "toy:render_audio", audio_world.render_audio)
    register_source("gold_evaluator", "toy_audio", gold_evaluator_audio)
    register_source("prompt_set", "toy:video_train", video_world.video_train_captions)
    register_source("prompt_set", "toy:video_heldout", video_world.heldout_eval_captions)
    register_source("prompt_set", "toy:video_heldout_all", video_world.heldout_captions)
    register_source("prompt_set", "toy:video_all", video_world.all_video_captions)
    register_source("expert_source", "toy:render_video", video_world.render_video_tensor)
    register_source("gold_evaluator", "toy_video", gold_report_video)
