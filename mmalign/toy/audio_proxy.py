"""toy_audio_proxy: a tiny CLAP-like reward of the toy audio world, trained contrastively on
rendered clips (never on the gold evaluator), so that alignment methods on the toy audio world
have a learned, imperfect reward to optimise.

Model (`AudioProxy`): the audio side takes the clip at 16 kHz (mono; other rates are resampled
with torchaudio), a log-mel spectrogram (n_fft 512, hop 160, 40 mel bands from 100 to 2000 Hz,
log(mel + 1e-5)), three strided 1-D convolutions over time (40 -> 64 -> 64 -> 64 channels, GELU)
down to 13 frames, flattened (so the order of the beeps is seen) and projected to 64 numbers;
the text side embeds the caption's words (the world's vocabulary, `<unk>` otherwise) with a
learned position embedding, a one-layer GRU, and projects its last state to 64 numbers. The
score is the cosine similarity of the two L2-normalised embeddings (in [-1, 1]).

Training (`train_audio_proxy`, run by `python -m mmalign.toy.audio_train proxy`): CLIP's
symmetric InfoNCE over a batch of (clip, caption) pairs of the training captions, plus for
every clip its caption against three hard negatives (`perturb_audio_caption`: wrong pitch,
wrong count, swapped order) in a clip-to-text softmax. Held-out captions are never seen;
train_info.json records the held-out pairwise accuracy against each kind of hard negative.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.registry import register_reward
from mmalign.rewards.common import check_batch, reward_info
from mmalign.types import Samples

from .audio_world import (
    AUDIO_PERTURBATIONS,
    SAMPLE_RATE,
    all_audio_captions,
    audio_heldout_captions,
    audio_train_captions,
    perturb_audio_caption,
    render_audio,
)

PROXY_DIR = Path(__file__).parent / "assets" / "audio_proxy"
MODEL_CFG = {"n_mels": 40, "width": 64, "embed": 64, "max_words": 12}


def vocabulary() -> list[str]:
    return ["<pad>", "<unk>"] + sorted({w for c in all_audio_captions() for w in c.split()})


class AudioProxy(nn.Module):
    def __init__(self, n_mels: int = 40, width: int = 64, embed: int = 64, max_words: int = 12):
        super().__init__()
        import torchaudio

        self.vocab = {w: i for i, w in enumerate(vocabulary())}
        self.max_words = max_words
        self.mel = torchaudio.transforms.MelSpectrogram(
            SAMPLE_RATE, n_fft=512, hop_length=160, f_min=100.0, f_max=2000.0, n_mels=n_mels
        )
        self.conv = nn.Sequential(
            nn.Conv1d(n_mels, width, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2),
            nn.GELU(),
        )
        self.audio_proj = nn.Linear(width * 13, embed)
        self.word = nn.Embedding(len(self.vocab), width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(max_words, width))
        self.gru = nn.GRU(width, width, batch_first=True)
        self.text_proj = nn.Linear(width, embed)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = torch.zeros(len(captions), self.max_words, dtype=torch.long)
        lengths = []
        for i, c in enumerate(captions):
            words = c.strip().lower().split()[: self.max_words] or ["<unk>"]
            ids[i, : len(words)] = torch.tensor([self.vocab.get(w, 1) for w in words])
            lengths.append(len(words))
        return ids, torch.tensor(lengths)

    def features(self, waves: Tensor) -> Tensor:
        """Mono waveforms [B, T] at 16 kHz -> log-mel [B, n_mels, 101] (1 s; other lengths are
        cut or zero-padded to 1 s)."""
        waves = F.pad(waves, (0, max(0, SAMPLE_RATE - waves.shape[1])))[:, :SAMPLE_RATE]
        return torch.log(self.mel(waves.float()) + 1e-5)

    def embed_features(self, feats: Tensor) -> Tensor:
        h = self.conv(feats)
        return F.normalize(self.audio_proj(h.flatten(1)), dim=-1)

    def audio_embeds(self, waves: Tensor) -> Tensor:
        return self.embed_features(self.features(waves))

    def text_embeds(self, captions: Sequence[str]) -> Tensor:
        ids, lengths = self.tokenize(captions)
        ids = ids.to(self.pos.device)
        x = self.word(ids) + self.pos[None]
        out, _ = self.gru(x)
        last = out[torch.arange(len(captions)), lengths.to(ids.device) - 1]
        return F.normalize(self.text_proj(last), dim=-1)


def to_16k(samples: Samples, name: str) -> Tensor:
    audio = samples.require("audio", f"reward {name!r}")
    if samples.sample_rate is None:
        raise ValueError(f"reward {name!r}: Samples.sample_rate is not set")
    wave = audio.float()
    wave = wave.mean(1) if wave.ndim == 3 else wave
    if int(samples.sample_rate) != SAMPLE_RATE:
        import torchaudio

        wave = torchaudio.functional.resample(wave, int(samples.sample_rate), SAMPLE_RATE)
    return wave


@dataclass
class ToyAudioProxyConfig:
    path: str = ""  # a directory with model.safetensors + config.json; "" -> the shipped assets/audio_proxy


class ToyAudioProxy:
    modality = "audio"
    differentiable = False

    def __init__(self, cfg: ToyAudioProxyConfig, name: str = "toy_audio_proxy"):
        from safetensors.torch import load_file

        self.cfg, self.name = cfg, name
        d = Path(cfg.path) if cfg.path else PROXY_DIR
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"reward {name!r}: {d / 'model.safetensors'} not found (python -m mmalign.toy.audio_train proxy)"
            )
        mc = json.loads((d / "config.json").read_text())
        self.model = AudioProxy(**mc)
        res = self.model.load_state_dict(
            {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}, strict=False
        )
        if res.unexpected_keys or any(not k.startswith("mel.") for k in res.missing_keys):
            raise ValueError(f"reward {name!r}: {d} does not match the proxy model: {res}")
        self.model.eval().requires_grad_(False)
        self.batch_size = 64

    def audio_embeds(self, waves: Tensor) -> Tensor:
        return self.model.audio_embeds(waves.float().cpu())

    @torch.no_grad()
    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        waves = to_16k(samples, self.name).cpu()
        check_batch(self.name, len(waves), prompts)
        s = (self.model.audio_embeds(waves) * self.model.text_embeds(list(prompts))).sum(-1)
        return s.to(samples.audio.device)


@register_reward("toy_audio_proxy", ToyAudioProxyConfig)
@reward_info("audio", False, "mmalign/toy/assets/audio_proxy (trained by python -m mmalign.toy.audio_train proxy)")
def build_toy_audio_proxy(cfg: ToyAudioProxyConfig) -> ToyAudioProxy:
    """Toy audio world's learned CLAP-like proxy reward: cosine of audio and caption embeddings."""
    return ToyAudioProxy(cfg)


# ------------------------------------------------------------------ training


def _pool(model: AudioProxy, captions, per_caption: int, seed_offset: int):
    caps, waves = [], []
    for s in range(per_caption):
        for c in captions:
            caps.append(c)
            waves.append(render_audio(c, seed_offset + s)[0])
    with torch.no_grad():
        feats = torch.cat(
            [model.features(torch.from_numpy(np.stack(waves[i : i + 256]))) for i in range(0, len(waves), 256)]
        )
    return caps, feats


@torch.no_grad()
def pairwise_accuracy(model: AudioProxy, caps: list[str], feats: Tensor, seed: int = 0) -> dict:
    """Held-out pairwise accuracy: score(clip, its caption) > score(clip, a hard negative), per
    perturbation kind."""
    rng = random.Random(seed)
    a = model.embed_features(feats)
    pos = (a * model.text_embeds(caps)).sum(-1)
    out = {}
    for mode in AUDIO_PERTURBATIONS:
        wins = []
        for i, c in enumerate(caps):
            neg = perturb_audio_caption(c, rng, mode)
            if neg is not None:
                wins.append(float(pos[i] > (a[i] * model.text_embeds([neg])[0]).sum()))
        out[mode] = float(np.mean(wins)) if wins else float("nan")
    return out


def train_audio_proxy(out: Path, minutes: float, seed: int, max_steps: int | None = None, batch: int = 64):
    from safetensors.torch import save_file

    from .train import log, seed_all

    seed_all(seed)
    rng = random.Random(seed)
    model = AudioProxy(**MODEL_CFG)
    caps, feats = _pool(model, audio_train_captions(), 24, seed_offset=20_000)
    hcaps, hfeats = _pool(model, audio_heldout_captions(), 8, seed_offset=60_000)
    log(f"proxy: train pool {tuple(feats.shape)}, held-out {tuple(hfeats.shape)}")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed)
    t0, step, losses, history = time.time(), 0, [], []
    while time.time() - t0 < minutes * 60 and (max_steps is None or step < max_steps):
        idx = torch.randint(0, len(caps), (batch,), generator=g)
        bc = [caps[i] for i in idx.tolist()]
        a = model.embed_features(feats[idx])
        uniq = sorted(set(bc))
        t = model.text_embeds(uniq)
        target = torch.tensor([uniq.index(c) for c in bc])
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * a @ t.T  # clips x distinct captions (duplicates share a row)
        loss_a = F.cross_entropy(logits, target)
        loss_t = F.cross_entropy(
            logits.T, torch.stack([(target == j).float() / (target == j).sum() for j in range(len(uniq))])
        )
        negs = [
            [perturb_audio_caption(c, rng, m) or perturb_audio_caption(c, rng) for m in AUDIO_PERTURBATIONS] for c in bc
        ]
        tn = model.text_embeds([n for row in negs for n in row]).view(batch, 3, -1)
        hard = scale * torch.cat([(a * t[target]).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", a, tn)], 1)
        loss_h = F.cross_entropy(hard, torch.zeros(batch, dtype=torch.long))
        loss = (loss_a + loss_t) / 2 + loss_h
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 100 == 0:
            model.eval()
            acc = pairwise_accuracy(model, hcaps, hfeats)
            model.train()
            history.append({"step": step, "heldout_pairwise": acc})
            log(f"proxy step {step} loss {np.mean(losses[-100:]):.3f} held-out pairwise {acc}")
    model.eval()
    acc = pairwise_accuracy(model, hcaps, hfeats)
    log(f"proxy: {step} steps; held-out pairwise accuracy vs hard negatives {acc}")
    d = out / "audio_proxy"
    d.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if not k.startswith("mel.")},
        str(d / "model.safetensors"),
    )
    (d / "config.json").write_text(json.dumps(MODEL_CFG))
    (d / "train_info.json").write_text(
        json.dumps(
            {
                "steps": step,
                "seed": seed,
                "batch": batch,
                "minutes": (time.time() - t0) / 60,
                "heldout_pairwise": acc,
                "history": history,
            },
            indent=1,
        )
    )
    return model
