"""What the distribution rewards share (private: registers nothing): the embedding a reward
is computed on, exemplar sets, and Gaussian statistics in float64.

Embedding. `embedding: {name: REWARD, ...}` names a registered reward whose encoder is reused
(built through the registry like any reward, so its arguments are validated by its config):

    audio   a reward with `prepare(samples)` and `audio_embeds(waves)` (`clap`: LAION-CLAP's
            normalised audio embedding; its `text_embeds(texts)` gives the text side)
    image   a reward with `embed_images(images)` (`clip_hf`, `pickscore`, `hps`, `aesthetic`: their
            normalised CLIP image embedding)

Exemplars. `exemplars:` is a folder of media files of the embedding's modality (read with
mmalign.media; subfolders included, sorted by path), or a registered expert source
(`toy:render_audio`, `toy:render`) rendered over `exemplar_prompts` (a list, or a prompt-set
spec such as `toy:audio_train`) with seeds 0..exemplar_seeds-1. An expert source returns a PIL
image or a (waveform, sample_rate) pair.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmalign import sources
from mmalign.config import ConfigError
from mmalign.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, MediaError, load_audio, load_image, pil_to_tensor
from mmalign.types import Samples

from .common import build_reward

DEFAULT_EMBEDDING: dict[str, Any] = {"name": "clap"}


# --------------------------------------------------------------------------- embedding


class Embedder:
    """Normalised embeddings [B, D] float64 of samples (and, where the encoder has a text tower,
    of texts) from a built reward's encoder."""

    def __init__(self, reward: Any, where: str = "embedding"):
        self.reward = reward
        self.name = getattr(reward, "name", type(reward).__name__)
        if hasattr(reward, "audio_embeds") and hasattr(reward, "prepare"):
            self.modality = "audio"
        elif hasattr(reward, "embed_images"):
            self.modality = "image"
        else:
            raise ConfigError(
                f"{where}.name: reward {self.name!r} has no encoder to reuse (it lacks audio_embeds or embed_images)"
            )
        self.batch_size = int(getattr(getattr(reward, "cfg", None), "batch_size", 16) or 16)

    @property
    def has_text(self) -> bool:
        return hasattr(self.reward, "text_embeds")

    @torch.no_grad()
    def embed(self, samples: Samples) -> Tensor:
        """Samples of the encoder's modality -> [B, D] float64 on the CPU."""
        who = f"embedding {self.name!r}"
        out = []
        if self.modality == "audio":
            samples.require("audio", who)
            waves = self.reward.prepare(samples)
            for i in range(0, len(waves), self.batch_size):
                out.append(self.reward.audio_embeds(waves[i : i + self.batch_size]))
        else:
            images = samples.require("image", who)
            for i in range(0, len(images), self.batch_size):
                out.append(self.reward.embed_images(images[i : i + self.batch_size]))
        return torch.cat(out).detach().to("cpu", torch.float64)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        if not self.has_text:
            raise ConfigError(f"embedding {self.name!r} has no text encoder (text exemplars need one, e.g. clap)")
        out = [
            self.reward.text_embeds(list(texts[i : i + self.batch_size])) for i in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out).detach().to("cpu", torch.float64)

    def embed_clips(self, clips: Sequence[tuple[Tensor, int | None]]) -> Tensor:
        """(tensor, sample_rate or None) items of any shapes -> [N, D], in input order (items of
        one shape and rate are embedded together)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (x, sr) in enumerate(clips):
            groups[(tuple(x.shape), sr)].append(i)
        rows: list[Tensor | None] = [None] * len(clips)
        for (_shape, sr), idx in groups.items():
            x = torch.stack([clips[i][0] for i in idx])
            s = Samples(audio=x, sample_rate=sr) if self.modality == "audio" else Samples(images=x)
            for i, e in zip(idx, self.embed(s)):
                rows[i] = e
        return torch.stack(rows)  # type: ignore[arg-type]


def build_embedder(spec: dict[str, Any] | None, where: str = "embedding") -> Embedder:
    """The Embedder of a reward spec `{name: REWARD, **args}` (default: clap)."""
    return Embedder(build_reward(dict(spec or DEFAULT_EMBEDDING), where), where)


def check_embedding_spec(spec: Any, field: str = "embedding") -> None:
    """Config validation: a mapping with a reward name."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{field}: expected a mapping with a 'name' key (a registered reward whose encoder is reused)")


# --------------------------------------------------------------------------- exemplars


def check_exemplars(exemplars: str | None, prompts: Any, field: str = "exemplars") -> None:
    """Config validation: a folder that exists, or a source spec with prompts."""
    if exemplars is None:
        return
    if Path(exemplars).exists():
        if not Path(exemplars).is_dir():
            raise ValueError(f"{field}: {exemplars} is a file; give a folder of exemplar media or an expert source")
        return
    if sources.is_spec(exemplars):
        if prompts is None:
            raise ValueError(f"{field}: expert source {exemplars!r} needs exemplar_prompts (a list or a prompt set)")
        return
    raise ValueError(f"{field}: folder {exemplars} not found (give a folder of exemplar media or an expert source)")


def _suffixes(modality: str) -> set[str]:
    return AUDIO_SUFFIXES if modality == "audio" else IMAGE_SUFFIXES


def exemplar_files(folder: str | Path, modality: str, field: str = "exemplars") -> list[Path]:
    """The media files of `modality` under `folder` (recursive, sorted); one-line errors when the
    folder is missing or holds none."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{field}: folder {root} not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _suffixes(modality))
    if not files:
        raise ConfigError(
            f"{field}: no {modality} files in {root} (looked for {', '.join(sorted(_suffixes(modality)))})"
        )
    return files


def _as_clip(item: Any, modality: str, who: str) -> tuple[Tensor, int | None]:
    """An expert source's output -> (tensor, sample_rate)."""
    if modality == "audio":
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"{who}: expected (waveform, sample_rate) from an audio expert source, got {type(item)}")
        wave, sr = item
        x = torch.as_tensor(np.asarray(wave), dtype=torch.float32)
        return (x[None] if x.ndim == 1 else x), int(sr)
    if hasattr(item, "convert"):  # PIL image
        return pil_to_tensor(item.convert("RGB")), None
    return torch.as_tensor(item, dtype=torch.float32), None


def resolve_prompts(prompts: Any, field: str = "exemplar_prompts") -> list[str]:
    if isinstance(prompts, str):
        return list(sources.resolve("prompt_set", prompts))
    if not prompts:
        raise ConfigError(f"{field}: give at least one prompt")
    return [str(p) for p in prompts]


def load_exemplar_clips(
    exemplars: str, modality: str, prompts: Any = None, seeds: int = 1, field: str = "exemplars"
) -> list[tuple[Tensor, int | None]]:
    """The exemplar media as (tensor, sample_rate) items: from a folder or an expert source."""
    if not Path(exemplars).exists() and sources.is_spec(exemplars):
        try:
            render = sources.lookup("expert_source", exemplars)
        except sources.SourceError as e:
            raise ConfigError(f"{field}: {e}") from None
        return [
            _as_clip(render(p, s), modality, f"{field} {exemplars}")
            for p in resolve_prompts(prompts)
            for s in range(seeds)
        ]
    clips = []
    for path in exemplar_files(exemplars, modality, field):
        try:
            clips.append(load_audio(path) if modality == "audio" else (load_image(path), None))
        except MediaError as e:
            raise MediaError(f"{field}: {e}") from None
    return clips


def exemplar_embeddings(
    embedder: Embedder,
    exemplars: str | None = None,
    prompts: Any = None,
    seeds: int = 1,
    texts: Sequence[str] | None = None,
    field: str = "exemplars",
) -> Tensor:
    """[N, D] float64 embeddings of the exemplar media (and/or texts, through the text tower)."""
    parts = []
    if exemplars is not None:
        parts.append(embedder.embed_clips(load_exemplar_clips(exemplars, embedder.modality, prompts, seeds, field)))
    if texts:
        parts.append(embedder.embed_texts(texts))
    if not parts:
        raise ConfigError(f"{field}: give exemplar media (a folder or an expert source) or exemplar texts")
    return torch.cat(parts)


# --------------------------------------------------------------------------- statistics (float64)


def gaussian(emb: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [D], covariance [D, D]) of embeddings [N, D], as numpy's np.cov(rowvar=False)
    (unbiased: divided by N - 1; zero for N = 1)."""
    e = emb.to(torch.float64)
    mu = e.mean(0)
    if len(e) < 2:
        return mu, torch.zeros(e.shape[1], e.shape[1], dtype=torch.float64, device=e.device)
    d = e - mu
    return mu, d.T @ d / (len(e) - 1)


def psd_sqrt(s: Tensor) -> Tensor:
    """The symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh(0.5 * (s + s.T))
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(s1: Tensor, s2: Tensor) -> Tensor:
    """tr((s1 s2)^(1/2)) for symmetric PSD s1, s2, as tr((R s1 R)^(1/2)) with R = s2^(1/2): s1 s2
    is similar to R s1 R, which is symmetric PSD, so its eigenvalues are real and >= 0."""
    r = psd_sqrt(s2)
    m = r @ s1 @ r
    return torch.linalg.eigvalsh(0.5 * (m + m.T)).clamp(min=0).sqrt().sum()


def frechet_distance(mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> Tensor:
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)) (float64)."""
    d = mu1 - mu2
    return d @ d + torch.trace(s1) + torch.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
