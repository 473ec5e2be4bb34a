"""The toy video world's proxy reward model: a tiny video-text model trained contrastively.

Video encoder: the 9 frames and their 8 consecutive differences stacked as 51 channels of one
32x32 image, then a small 2-D CNN (motion is in the difference channels, where it is in the
frame order). Text encoder: word embeddings over the grammar's vocabulary + learned positions,
a 2-layer transformer encoder, masked mean pooling. Score = exp(logit_scale) * cos(video, text)
(CLIP's form; Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision").

Training (`train_video_proxy`): symmetric InfoNCE on batches built from pairs (caption, hard
negative caption) -- wrong direction, moving vs still, wrong colour or shape, swapped motions
(`video_world.perturb_video_caption`) -- each with its own rendered clip, so the in-batch
softmax must separate near-misses both ways. Clips are augmented as generated ones differ from
rendered ones (blur, noise, colour jitter, a one-pixel shift of the whole clip; no flips or time
reversal, which would change the caption). Train captions only; the gold evaluator is never
used for training (only to report agreement).

Saved as `video_proxy_config.json` + `video_proxy.safetensors` (fp16 weights, loaded in float32).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .video_world import (
    FRAMES,
    PERTURB_MODES,
    heldout_eval_captions,
    perturb_video_caption,
    render_video,
    video_train_captions,
    video_vocabulary,
)

CONFIG_NAME = "video_proxy_config.json"
WEIGHTS_NAME = "video_proxy.safetensors"
PROXY_CFG = {
    "frames": FRAMES,
    "size": 32,
    "width": 64,
    "embed_dim": 64,
    "text_width": 64,
    "text_layers": 2,
    "context": 16,
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def word_vocab() -> dict[str, int]:
    vocab = {"<pad>": 0, "<unk>": 1}
    for w in video_vocabulary():
        vocab[w] = len(vocab)
    return vocab


class VideoProxy(nn.Module):
    def __init__(
        self, frames: int, size: int, width: int, embed_dim: int, text_width: int, text_layers: int, context: int
    ):
        super().__init__()
        self.frames, self.size, self.context = frames, size, context
        self.vocab = word_vocab()
        c_in = 3 * frames + 3 * (frames - 1)
        w = width
        self.video = nn.Sequential(
            nn.Conv2d(c_in, w, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2),  # 16
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, stride=2),  # 8
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2),  # 4
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * w * (size // 8) ** 2, embed_dim),
        )
        self.tok = nn.Embedding(len(self.vocab), text_width)
        self.pos = nn.Parameter(torch.randn(context, text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            text_width, 2, 2 * text_width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.text = nn.TransformerEncoder(layer, text_layers, enable_nested_tensor=False)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def tokenize(self, captions) -> torch.Tensor:
        out = torch.zeros(len(captions), self.context, dtype=torch.long)
        for i, c in enumerate(captions):
            ids = [self.vocab.get(w, 1) for w in c.lower().split()][: self.context]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video: B,F,3,H,W in [0,1] -> unit-norm B,D."""
        if video.ndim != 5 or video.shape[1] != self.frames or video.shape[2] != 3:
            raise ValueError(f"toy_video_proxy: expected video B,{self.frames},3,H,W, got {tuple(video.shape)}")
        x = video.float() * 2 - 1
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            b, f = x.shape[:2]
            x = F.interpolate(x.flatten(0, 1), size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = x.view(b, f, 3, self.size, self.size)
        d = x[:, 1:] - x[:, :-1]
        z = self.video(torch.cat([x.flatten(1, 2), d.flatten(1, 2)], 1))
        return F.normalize(z, dim=-1)

    def encode_text(self, captions) -> torch.Tensor:
        ids = self.tokenize(captions).to(self.pos.device)
        mask = ids != 0
        h = self.text(self.tok(ids) + self.pos, src_key_padding_mask=~mask)
        h = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(h), dim=-1)

    def forward(self, video: torch.Tensor, captions) -> torch.Tensor:
        """Per-pair score exp(logit_scale) * cos (B,)."""
        return self.logit_scale.exp() * (self.encode_video(video) * self.encode_text(captions)).sum(-1)


def load_video_proxy(path: str | Path) -> VideoProxy:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"toy_video_proxy: no {CONFIG_NAME} in {path} (rebuild: python -m mmalign.toy.video_train proxy)"
        )
    model = VideoProxy(**json.loads(cfg_path.read_text())["model"])
    state = {k: v.float() for k, v in load_file(str(path / WEIGHTS_NAME)).items()}
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------ training


def augment(clips: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """clips B,F,3,H,W in [0,1]: per-clip blur / noise / colour jitter / one-pixel shift."""
    b = clips.shape[0]
    x = clips
    blur = torch.rand(b, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        xb = x[blur].flatten(0, 1)
        xb = F.conv2d(F.pad(xb, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
        x = x.clone()
        x[blur] = xb.view(-1, *x.shape[1:])
    x = x * (1 + 0.1 * (torch.rand(b, 1, 3, 1, 1, generator=g) - 0.5))
    x = x + 0.04 * torch.rand(b, 1, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    sx, sy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    x = torch.roll(x, shifts=(sy, sx), dims=(-2, -1))
    return x.clamp(0, 1)


def _clips(captions, seeds) -> torch.Tensor:
    a = np.stack([render_video(c, s) for c, s in zip(captions, seeds)])
    return torch.from_numpy(a).permute(0, 1, 4, 2, 3).float() / 255.0


@torch.no_grad()
def pairwise_accuracy(model: VideoProxy, captions, seeds=(0, 1), seed_offset: int = 70_000) -> dict:
    """Correct clip scored higher with its caption than with each hard negative, per mode."""
    rng = random.Random(1234)
    hits: dict[str, list[bool]] = {m: [] for m in PERTURB_MODES}
    for s in seeds:
        clips = _clips(captions, [seed_offset + s] * len(captions))
        pos = model(clips, list(captions))
        for mode in PERTURB_MODES:
            negs = [perturb_video_caption(c, rng, mode) for c in captions]
            keep = [i for i, n in enumerate(negs) if n is not None]
            if not keep:
                continue
            neg = model(clips[keep], [negs[i] for i in keep])
            hits[mode] += (pos[keep] > neg).tolist()
    out = {m: float(np.mean(v)) for m, v in hits.items() if v}
    out["mean"] = float(np.mean([x for v in hits.values() for x in v]))
    return out


def train_video_proxy(
    out: Path, minutes: float, seed: int, max_steps: int | None = None, batch: int = 64
) -> VideoProxy:
    from safetensors.torch import save_file

    random.seed(seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    model = VideoProxy(**PROXY_CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    train = video_train_captions()
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        caps = rng.sample(train, batch)
        negs = [perturb_video_caption(c, rng) or c for c in caps]
        allc = caps + negs
        # distinct captions only (a negative may equal another batch caption)
        seen, idx = set(), []
        for i, c in enumerate(allc):
            if c not in seen:
                seen.add(c)
                idx.append(i)
        allc = [allc[i] for i in idx]
        clips = augment(_clips(allc, [rng.randrange(10**6) for _ in allc]), g)
        v = model.encode_video(clips)
        t = model.encode_text(allc)
        logits = model.logit_scale.exp() * v @ t.T
        y = torch.arange(len(allc))
        loss = (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2
        for pg in opt.param_groups:
            pg["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))
        step += 1
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"video proxy step {step} loss {np.mean(losses[-50:]):.3f} ({(time.time() - t0) / step:.2f}s/step)")
    model.eval()
    acc = pairwise_accuracy(model, heldout_eval_captions())
    log("video proxy held-out pairwise accuracy: " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
    d = out / "video_proxy"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(d / WEIGHTS_NAME))
    info = {
        "model": PROXY_CFG,
        "train": {"steps": step, "seed": seed, "batch": batch, "minutes": (time.time() - t0) / 60},
        "heldout_pairwise_accuracy": acc,
    }
    (d / CONFIG_NAME).write_text(json.dumps(info, indent=2))
    return model


__all__ = ["VideoProxy", "load_video_proxy", "train_video_proxy", "pairwise_accuracy", "PROXY_CFG"]
