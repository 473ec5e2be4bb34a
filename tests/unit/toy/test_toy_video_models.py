"""The toy video world's shipped models: wan_toy loads as a WanPipeline with the world's clip
geometry (9 frames -> 3 latent frames, 32x32 -> 8x8) and per-channel latent statistics; the
toy_video_proxy reward loads, is differentiable, and prefers a clip's caption to its hard
negatives on held-out captions it never saw."""

import json
import random

import torch

from mmalign.rewards.common import build_reward
from mmalign.toy import ASSETS
from mmalign.toy.video_train import PaddedCrossAttention, short_text_states, text_states
from mmalign.toy.video_world import (
    PERTURB_MODES,
    heldout_eval_captions,
    perturb_video_caption,
    render_video_tensor,
)
from mmalign.types import Samples

WAN_TOY = ASSETS / "wan_toy"


def test_shipped_wan_toy_is_a_small_wan_pipeline():
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(WAN_TOY, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    vc = pipe.vae.config
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 4)
    assert len(vc.latents_mean) == len(vc.latents_std) == vc.z_dim == pipe.transformer.config.in_channels
    assert any(abs(m) > 1e-3 for m in vc.latents_mean)  # the trained latents' statistics, not defaults
    out = pipe(
        "a red circle moving right",
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames
    assert out.shape == (1, 9, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    info = json.loads((WAN_TOY / "train_info.json").read_text())
    assert info["steps"] > 0 and 0 <= info["heldout_gold"] <= 1
    size = sum(p.stat().st_size for p in WAN_TOY.rglob("*") if p.is_file())
    assert size < 8e6, size


def test_training_conditioning_equals_the_pipelines_512_padded_tokens():
    """The transformer stage attends to TEXT_LEN tokens with a log-count bias on the pad
    positions; that equals the pipeline's 512 zero-padded tokens."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from mmalign.toy.video_train import MAX_SEQ, TEXT_CFG, TEXT_LEN, TRANSFORMER_CFG, make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer()
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), **TEXT_CFG)).eval()
    m = WanTransformer3DModel(**TRANSFORMER_CFG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # cross-attention away from its initial state
    caps = ["a red circle moving left", "a red circle moving right and a blue square standing still", ""]
    short = tok(caps, padding="max_length", max_length=TEXT_LEN, return_tensors="pt")
    full = tok(caps, padding="max_length", max_length=MAX_SEQ, return_tensors="pt")
    x, t = torch.randn(3, 8, 3, 8, 8), torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        ref = m(x, t, text_states(te, full.input_ids, full.attention_mask), return_dict=False)[0]
        cross = [PaddedCrossAttention(b.attn2.processor) for b in m.blocks]
        for b, p in zip(m.blocks, cross):
            b.attn2.processor = p
        h, bias = short_text_states(te, short.input_ids, short.attention_mask)
        for p in cross:
            p.bias = bias
        out = m(x, t, h, return_dict=False)[0]
    assert h.shape[1] == TEXT_LEN
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_toy_video_proxy_prefers_the_caption_to_hard_negatives_and_has_gradients():
    r = build_reward({"name": "toy_video_proxy"})
    assert r.modality == "video" and r.differentiable
    rng = random.Random(0)
    wins = []
    for i, cap in enumerate(heldout_eval_captions()[::2]):
        clip = render_video_tensor(cap, 900 + i)
        negs = [n for m in PERTURB_MODES if (n := perturb_video_caption(cap, rng, m))]
        s = r(Samples(video=clip.expand(1 + len(negs), -1, -1, -1, -1).clone()), [cap] + negs)
        assert s.shape == (1 + len(negs),)
        wins += [bool(s[0] > x) for x in s[1:]]
    assert sum(wins) / len(wins) >= 0.7, sum(wins) / len(wins)
    video = render_video_tensor("a blue square moving up", 1)[None].requires_grad_(True)
    r(Samples(video=video), ["a blue square moving up"]).sum().backward()
    assert video.grad is not None and video.grad.abs().sum() > 0
